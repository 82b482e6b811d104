"""An archive's bytes taken apart and put back together as a hostile writer would: the
header as JSON whatever its version stores it as (deflated from version 5 on), and a file
rebuilt around an edited header with its checksum recomputed."""

from __future__ import annotations

import json
import zlib

import google_crc32c

from qlis.archive.format import ALIGN, COMPACT_VERSION, MAGIC, PREFIX, READABLE_VERSIONS


def split(raw: bytes) -> tuple[dict, bytes]:
    """The header of the file ``raw`` (parsed) and its data section."""
    _, version, _, header_len, _ = PREFIX.unpack(raw[: PREFIX.size])
    stored = raw[PREFIX.size : PREFIX.size + header_len]
    text = zlib.decompressobj().decompress(stored) if version >= COMPACT_VERSION \
        else stored
    data_start = -(-(PREFIX.size + header_len) // ALIGN) * ALIGN
    return json.loads(text), raw[data_start:]


def build(header: dict | bytes, data: bytes, version: int | None = None) -> bytes:
    """A file around ``header`` (a dict, or its JSON's bytes) and a data section, stored as
    ``version`` stores a header (by default the readable version a dict states, else the
    one qlis writes), its CRC recomputed."""
    if version is None:
        stated = header.get("version") if isinstance(header, dict) else None
        version = stated if stated in READABLE_VERSIONS and type(stated) is int \
            else COMPACT_VERSION
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if version >= COMPACT_VERSION:
        raw = zlib.compress(raw)
    pad = -(-(PREFIX.size + len(raw)) // ALIGN) * ALIGN - PREFIX.size - len(raw)
    prefix = PREFIX.pack(MAGIC, version, google_crc32c.value(raw), len(raw), len(data))
    return prefix + raw + b" " * pad + data
