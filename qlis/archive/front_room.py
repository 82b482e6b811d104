"""Room at the front of a file written from its start, for what must precede its bytes.

An archive's records are written as they are encoded, before the header that goes in front
of them is known. Copying them behind the header afterwards took 11 s of a 2.4 B-parameter
pack's 32 (a 2 GB archive, on the benchmark VM). Where the file system can, the room is
inserted in front of the records without moving them (Linux ``fallocate`` with
``FALLOC_FL_INSERT_RANGE``: ext4, XFS; the room a multiple of the file system's block);
elsewhere the records are moved up in place, from the end, a chunk at a time: what the copy
cost, without a second file.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

from qlis.write_behind import write_at

ROOM_BLOCK = 4096
"""Rooms of a multiple of this can be inserted on the usual file systems (4 KiB blocks)."""

_INSERT_RANGE = 0x20  # FALLOC_FL_INSERT_RANGE (linux/falloc.h)
_CHUNK = 1 << 24  # bytes moved at once where the room cannot be inserted


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate`` (Linux only), None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _fallocate()


def make_room(fd: int, room: int, size: int) -> None:
    """Move the ``size`` bytes at the start of ``fd`` (open for reading and writing, exactly
    ``size`` bytes long) ``room`` bytes up; the caller then writes the room."""
    if room <= 0 or size <= 0:
        return
    if not _inserted(fd, room):
        _move_up(fd, room, size)


def _inserted(fd: int, room: int) -> bool:
    """Whether the file system inserted ``room`` bytes at the start of ``fd``."""
    if _FALLOCATE is None:
        return False
    try:
        block = os.fstatvfs(fd).f_bsize
    except OSError:
        return False
    if block <= 0 or room % block:
        return False
    return _FALLOCATE(fd, _INSERT_RANGE, 0, room) == 0


def _move_up(fd: int, room: int, size: int) -> None:
    end = size
    while end > 0:
        start = max(0, end - _CHUNK)
        write_at(fd, memoryview(_read_exactly(fd, end - start, start)), start + room)
        end = start


def _read_exactly(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length:
        part = os.pread(fd, length, offset)
        if not part:
            raise OSError(f"the file ended {length} bytes early while it was being moved")
        parts.append(part)
        length, offset = length - len(part), offset + len(part)
    return b"".join(parts)
