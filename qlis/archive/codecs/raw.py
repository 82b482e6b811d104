"""The identity codec: the array's bytes, little-endian, nothing else."""

from __future__ import annotations

import numpy as np

from qlis.archive.codecs._common import as_bytes_array, check_input, check_out
from qlis.archive.codecs.base import Codec, register_codec
from qlis.errors import ArchiveError, ConfigError


def _little_endian(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


@register_codec
class Raw(Codec):
    """Stores the bytes as they are: the fallback for data no other codec shrinks (any dtype).

    >>> Raw().encode(np.array([1, 2], dtype=np.uint16))
    b'\\x01\\x00\\x02\\x00'
    """

    codec_id = "raw"

    def encode(self, array: np.ndarray) -> bytes:
        array = check_input(array, self.codec_id, dtypes=None)
        if array.dtype.hasobject:
            raise ConfigError("codec 'raw' cannot store Python objects")
        return array.astype(_little_endian(array.dtype), copy=False).tobytes()

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        out = check_out(out, self.codec_id, dtypes=None)
        if out.dtype.hasobject:
            raise ArchiveError("codec 'raw' cannot decode into an object array")
        data = as_bytes_array(buf)
        if data.size != out.nbytes:
            raise ArchiveError(
                f"corrupt 'raw' stream: {data.size} bytes for {out.size} x {out.dtype}"
            )
        out[...] = data.view(_little_endian(out.dtype))
        return out
