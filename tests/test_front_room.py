"""Room at a file's front: inserted by the file system where it can, the bytes moved up in
place elsewhere, the same file either way; a large archive's header fills its room, so an
archive's bytes do not depend on which way its room was made."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

import qlis
import qlis.archive.file
import qlis.archive.front_room as front_room
from qlis.archive.file import encode_tensor
from qlis.archive.format import PREFIX
from qlis.archive.front_room import ROOM_BLOCK, make_room


def _file_with(path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDWR)


@pytest.mark.parametrize("insert", [True, False], ids=["inserted", "moved"])
@pytest.mark.parametrize("room", [ROOM_BLOCK, 3 * ROOM_BLOCK, 100])
def test_the_bytes_move_up_by_the_room(tmp_path, monkeypatch, insert, room):
    if not insert:
        monkeypatch.setattr(front_room, "_FALLOCATE", None)
    monkeypatch.setattr(front_room, "_CHUNK", 1000)  # several chunks, the last one short
    data = np.random.default_rng(room).integers(0, 256, 5_500, dtype=np.uint8).tobytes()
    fd = _file_with(tmp_path / "f", data)
    try:
        make_room(fd, room, len(data))
    finally:
        os.close(fd)
    moved = (tmp_path / "f").read_bytes()
    assert len(moved) == room + len(data) and moved[room:] == data


def test_a_file_system_that_refuses_the_insertion_gets_the_bytes_moved(tmp_path, monkeypatch):
    calls = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((mode, offset, length))
        return -1

    monkeypatch.setattr(front_room, "_FALLOCATE", refuse)
    data = b"records" * 1000
    fd = _file_with(tmp_path / "f", data)
    try:
        make_room(fd, ROOM_BLOCK, len(data))
    finally:
        os.close(fd)
    assert calls == [(0x20, 0, ROOM_BLOCK)]
    assert (tmp_path / "f").read_bytes()[ROOM_BLOCK:] == data


def test_a_large_archive_is_the_same_bytes_whichever_way_its_room_was_made(
        tmp_path, monkeypatch):
    monkeypatch.setattr(qlis.archive.file, "BLOCK_FRONT_BYTES", 1)  # every archive is large
    tensors = {f"layer{i}.weight": torch.randn(64, 48, generator=torch.Generator().manual_seed(i))
               for i in range(3)}
    result = qlis.compress(tensors, "quant", bits=4)
    inserted = qlis.save(result, tmp_path / "inserted.qlis")
    monkeypatch.setattr(front_room, "_FALLOCATE", None)
    moved = qlis.save(result, tmp_path / "moved.qlis")
    assert inserted.read_bytes() == moved.read_bytes()
    raw = inserted.read_bytes()
    header_len = PREFIX.unpack(raw[:PREFIX.size])[3]
    assert (PREFIX.size + header_len) % ROOM_BLOCK == 0  # the header fills the room
    inflater = zlib.decompressobj()  # with spaces after its stream
    assert inflater.decompress(raw[PREFIX.size:PREFIX.size + header_len]).endswith(b"}")
    assert inflater.eof and inflater.unused_data.strip(b" ") == b""
    assert len(inflater.unused_data) > 0
    with qlis.open(inserted) as archive:
        archive.verify()
        for name, tensor in result.state_dict().items():
            assert torch.equal(archive.read(name), tensor), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inserted.qlis", "moved.qlis"]


def test_a_small_archive_has_no_room_padding(tmp_path):
    path = tmp_path / "m.qlis"
    with qlis.archive.file.ArchiveWriter(path) as writer:
        writer.add(encode_tensor("w", torch.ones(3)))
        writer.finish()
    raw = path.read_bytes()
    header_len = PREFIX.unpack(raw[:PREFIX.size])[3]
    inflater = zlib.decompressobj()
    assert inflater.decompress(raw[PREFIX.size:PREFIX.size + header_len]).endswith(b"}")
    assert inflater.eof and inflater.unused_data == b""
