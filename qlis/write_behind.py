"""Writing a large file once, at known offsets, without keeping it in the page cache.

A file that is written once and not read back (an unpacked checkpoint) would otherwise fill
the page cache with all of its pages, dirty until the final fsync, which then waits for the
disk to take every one of them. Here each written range goes to the disk at once, while the
next ones are produced, and leaves the cache a window later, so the cache holds a window
and the pages it frees are the ones the next writes take. Taking pages the process has not
touched before is what costs: on the VM the benchmarks run on, 4-5 s per GiB (the hypervisor
backs each one on first use), against 0.3 s for pages just freed. The advice is only advice:
where the system has none (not Linux) or refuses it, the writes are the same plain writes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

import numpy as np

WINDOW_BYTES = 1 << 26
"""Written bytes that stay cached (64 MiB): ranges older than that are on the disk, or nearly,
when they are dropped; a range still being written back stays cached, harmlessly."""

ADVISE_BYTES = 1 << 20
"""Writes shorter than this are advised together, once they add up to it: the advice is a
system call that starts the write-back (~40-80 us), longer than writing a small record (an
archive of 10,000 one-element tensors spent 0.8 s of 12 in it)."""

_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def write_at(fd: int, data: np.ndarray | memoryview, offset: int) -> None:
    """All of ``data`` (bytes) at ``offset``, resuming a write the kernel cuts short: a
    positional write, so threads share the file without a lock."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class WriteBehind:
    """Positional writes to ``fd`` (a regular file opened for writing), safe from several
    threads at once; each range is written back as soon as it is written (short ones once
    ``advise_bytes`` of them are, as the span that covers them) and dropped from the cache
    once ``window`` bytes have been written after it."""

    def __init__(self, fd: int, window: int = WINDOW_BYTES,
                 advise_bytes: int = ADVISE_BYTES) -> None:
        self._fd = fd
        self._window = window
        self._advise_bytes = advise_bytes
        self._lock = threading.Lock()
        self._cached: deque[tuple[int, int]] = deque()  # (offset, length), oldest first
        self._cached_bytes = 0
        self._short: list[tuple[int, int]] = []  # short writes not advised yet
        self._short_bytes = 0

    def write(self, data: np.ndarray, offset: int) -> None:
        """All of ``data`` (uint8) at ``offset`` (`write_at`)."""
        length = data.size
        write_at(self._fd, data, offset)
        if _DONTNEED is None or not length:
            return
        with self._lock:
            written = self._written(offset, length)
            if written is None:
                return
            self._cached.append(written)
            self._cached_bytes += written[1]
            old = []
            while self._cached_bytes > self._window:
                old.append(self._cached.popleft())
                self._cached_bytes -= old[-1][1]
        self._advise(*written)  # dirty pages: starts writing them back, drops none
        for range_ in old:
            self._advise(*range_)  # written back by now: dropped

    def _written(self, offset: int, length: int) -> tuple[int, int] | None:
        """The range to write back now: this write's, or the span of the short ones once
        they add up to ``advise_bytes`` (None: not yet)."""
        if length >= self._advise_bytes:
            return offset, length
        self._short.append((offset, length))
        self._short_bytes += length
        if self._short_bytes < self._advise_bytes:
            return None
        start = min(start for start, _ in self._short)
        end = max(start + length for start, length in self._short)
        self._short, self._short_bytes = [], 0
        return start, end - start

    def _advise(self, offset: int, length: int) -> None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, _DONTNEED)
