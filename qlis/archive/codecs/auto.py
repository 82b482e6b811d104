"""Pick, per array, whichever configured codec gives the fewest bytes."""

from __future__ import annotations

import numpy as np

from qlis.archive.codecs._common import SYMBOL_DTYPES, check_input
from qlis.archive.codecs.base import Codec, get_codec, register_codec
from qlis.config import Param
from qlis.errors import ConfigError


@register_codec
class Auto(Codec):
    """Tries candidate codecs and keeps the smallest encoding; use `select`, which says which
    codec won, since decoding needs that codec (``"auto"`` never appears in an archive).

    Default candidates: for uint8 and uint16 codes, ``bitpack`` (``bits`` wide, or the
    narrowest width that holds the largest code), ``huffman`` and ``ans``; for other dtypes
    ``raw`` and ``sparse``. Candidates that cannot take an array's dtype are skipped. Ties go to the
    earlier candidate.

    >>> codec, data = Auto().select(np.zeros(1000, dtype=np.uint8))
    >>> codec.codec_id
    'huffman'
    """

    codec_id = "auto"
    params = {"candidates": Param("config", sequence=True, non_empty=True, optional=True),
              "bits": Param("int", 1, 16, optional=True)}

    def __init__(self, candidates: list | None = None, bits: int | None = None) -> None:
        if candidates is not None:
            for candidate in candidates:
                if get_codec(candidate).codec_id == self.codec_id:
                    raise ConfigError("auto cannot be a candidate of itself")
            candidates = list(candidates)
        self.candidates = candidates
        self.bits = bits

    def _default_candidates(self, array: np.ndarray) -> list[Codec]:
        if array.dtype not in SYMBOL_DTYPES:
            return [get_codec("raw"), get_codec("sparse")]
        bits = self.bits or max(1, int(array.max()).bit_length() if array.size else 1)
        return [get_codec({"id": "bitpack", "bits": bits}), get_codec("huffman"), get_codec("ans")]

    def select(self, array: np.ndarray, row_length: int | None = None,
               ) -> tuple[Codec, bytes | memoryview]:
        """The candidate codec that encodes ``array`` smallest, and its bytes; with
        ``row_length``, each candidate encodes it as a matrix's rows (`Codec.encode_rows`)."""
        array = check_input(array, self.codec_id, dtypes=None)
        if self.candidates is None:
            codecs = self._default_candidates(array)
        else:
            codecs = [get_codec(candidate) for candidate in self.candidates]
        best: tuple[Codec, bytes] | None = None
        reasons = []
        for codec in codecs:
            try:
                if best is not None and codec.fewest_bytes(array, row_length) >= len(best[1]):
                    continue  # it cannot win: ties go to the earlier candidate
                data = (codec.encode(array) if row_length is None
                        else codec.encode_rows(array, row_length))
            except ConfigError as err:
                reasons.append(str(err))
                continue
            if best is None or len(data) < len(best[1]):
                best = (codec, data)
        if best is None:
            raise ConfigError("no candidate codec can encode this array: " + "; ".join(reasons))
        return best

    def encode(self, array: np.ndarray) -> bytes:
        """The smallest candidate encoding; record ``select(array)[0].get_config()`` with it."""
        return self.select(array)[1]

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        raise ConfigError(
            "'auto' cannot decode: decode with the codec that Auto.select() chose "
            "(the archive stores its config)"
        )
