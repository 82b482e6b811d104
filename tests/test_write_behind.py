"""Write-behind: every byte lands at its offset (from several threads, through short writes),
each range is sent to the disk as soon as it is written and leaves the page cache once a
window's worth has been written after it; advice the system refuses changes nothing."""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import qlis.write_behind
from qlis.write_behind import WriteBehind

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")


def chunks(count: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


def written_in_order(path, data: list[np.ndarray], window: int, advise_bytes: int = 1):
    """``data`` written one chunk after the other through a `WriteBehind`, then an empty
    write past the end (nothing to write: no advice)."""
    with open(path, "wb") as f:
        out = WriteBehind(f.fileno(), window=window, advise_bytes=advise_bytes)
        offset = 0
        for chunk in data:
            out.write(chunk, offset)
            offset += chunk.size
        out.write(np.empty(0, dtype=np.uint8), offset)
    return path


def test_ranges_are_written_back_at_once_and_dropped_a_window_later(tmp_path, monkeypatch):
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice:
                        advised.append((offset, length, advice)))
    data = chunks(10, 100)
    path = written_in_order(tmp_path / "out.bin", data, window=250)
    assert path.read_bytes() == b"".join(c.tobytes() for c in data)
    assert {advice for _, _, advice in advised} == {os.POSIX_FADV_DONTNEED}
    # each write is advised at once (written back); the window holds two of them, so from
    # the third on each also drops the one two back
    expected = []
    for i in range(10):
        expected += [(100 * i, 100)] + ([(100 * (i - 2), 100)] if i >= 2 else [])
    assert [(offset, length) for offset, length, _ in advised] == expected


def test_short_writes_are_written_back_together_once_they_add_up(tmp_path, monkeypatch):
    """Writes shorter than ``advise_bytes`` are advised as the span that covers them once
    they add up to it (one system call for many small records), and dropped as one range a
    window later; a long write is advised alone, at once."""
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice:
                        advised.append((offset, length)))
    data = chunks(9, 100) + chunks(1, 400)
    path = written_in_order(tmp_path / "out.bin", data, window=500, advise_bytes=300)
    assert path.read_bytes() == b"".join(c.tobytes() for c in data)
    assert advised == [(0, 300), (300, 300), (0, 300), (600, 300), (300, 300), (900, 400),
                       (600, 300)]


def test_threads_and_short_writes_put_every_byte_in_place(tmp_path, monkeypatch):
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, data[:7], offset))
    data = chunks(40, 50)
    path = tmp_path / "out.bin"
    with open(path, "wb") as f:
        out = WriteBehind(f.fileno(), window=120)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: out.write(data[i], 50 * i), reversed(range(40))))
    assert path.read_bytes() == b"".join(c.tobytes() for c in data)


def test_refused_advice_changes_nothing(tmp_path, monkeypatch):
    def refuse(*args: object) -> None:
        raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    data = chunks(5, 30)
    path = written_in_order(tmp_path / "out.bin", data, window=40)
    assert path.read_bytes() == b"".join(c.tobytes() for c in data)


def test_the_window_default_is_a_bounded_slice_of_memory():
    assert 1 << 20 <= qlis.write_behind.WINDOW_BYTES <= 1 << 28
