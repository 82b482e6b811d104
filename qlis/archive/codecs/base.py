"""The codec interface, the codec registry and `get_codec` (numcodecs-style, found by id).

An archive stores each record's codec as plain JSON (``codec.get_config()``), and the reader
rebuilds it with ``get_codec(config)``; third parties add codecs with `register_codec` or an
entry point in the ``qlis.archive.codecs`` group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from qlis.config import Param, checked_init, config_id, init_parameters
from qlis.errors import ConfigError
from qlis.registry import Registry, construct


class Codec:
    """Turns a 1-D array into bytes and back; parameters are set in ``__init__`` only.

    ``decode`` fills a preallocated ``out`` (dtype and length come from the archive header)
    and raises `qlis.errors.ArchiveError` on any malformed buffer.
    """

    codec_id: ClassVar[str]
    params: ClassVar[Mapping[str, Param]] = {}  # declared options, checked on construction

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        checked_init(cls, lambda: f"codec {cls.codec_id!r}")

    def encode(self, array: np.ndarray) -> bytes:
        """The byte stream of a 1-D array."""
        raise NotImplementedError

    def encode_view(self, array: np.ndarray) -> bytes | memoryview:
        """``encode``'s stream, or a read-only view of the same bytes in a buffer of the
        codec's own: what the archive writer takes, without a copy into ``bytes``."""
        return self.encode(array)

    def encode_rows(self, array: np.ndarray, row_length: int) -> bytes | memoryview:
        """``encode_view`` of a matrix's values, flattened, whose rows are ``row_length``
        long: a codec that can use the rows does (``ans`` codes classes of alike rows with a
        table each); the stream decodes as any other of the codec's."""
        return self.encode_view(array)

    def fewest_bytes(self, array: np.ndarray, row_length: int | None = None) -> float:
        """A lower bound of the size of ``array``'s stream (`encode_rows`'s, with
        ``row_length``), far cheaper than encoding it: `Auto` does not encode a candidate
        that cannot beat its best so far. 0 where the codec knows no such bound."""
        return 0.0

    def decode(self, buf: bytes | memoryview, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` from ``buf`` and return it."""
        raise NotImplementedError

    def get_config(self) -> dict:
        """Plain-JSON parameters with ``"id"``: the ``__init__`` arguments, read back."""
        config: dict[str, Any] = {"id": self.codec_id}
        for name in init_parameters(type(self)):
            config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config: dict) -> Codec:
        """The codec that ``config`` (as written by `get_config`) describes."""
        codec_id, params = config_id(config, "codec")
        if codec_id != cls.codec_id:
            raise ConfigError(f"config for codec {codec_id!r} given to {cls.codec_id!r}")
        return construct(cls, params, f"codec {cls.codec_id!r}",
                         f"bad parameters for codec {cls.codec_id!r}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(self))


codec_registry: Registry[Codec] = Registry("codec", "qlis.codecs", base=Codec)

C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Class decorator: make ``cls`` findable by ``get_codec`` under its ``codec_id``."""
    codec_id = getattr(cls, "codec_id", None)
    if not isinstance(codec_id, str) or not codec_id:
        raise ConfigError(f"{cls.__name__} needs a non-empty string codec_id to be registered")
    codec_registry.register(codec_id, cls)
    return cls


def get_codec(config: dict | str) -> Codec:
    """The codec a stored config (or a bare id, with default parameters) names.

    >>> get_codec({"id": "bitpack", "bits": 4}).get_config()
    {'id': 'bitpack', 'bits': 4}
    """
    codec_id, params = config_id(config, "codec")
    return codec_registry.get(codec_id).from_config({"id": codec_id, **params})
