"""The allocator settings the commands make for their own process (qlis/workers/memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qlis.workers import memory

_SCRIPT = textwrap.dedent("""
    import ctypes, torch
    from qlis.workers import memory

    def in_heap(tensor):
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if low <= tensor.data_ptr() < high:
                    return True
        return False

    ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # what every command starts with
    before = torch.empty(1 << 18)
    memory.return_freed_buffers_at_once()
    after = torch.empty(1 << 18)
    print(in_heap(before), in_heap(after))
""")


@pytest.mark.skipif(memory._MALLOPT is None, reason="glibc's mallopt (Linux) is what is set")
def test_a_buffer_made_once_freed_buffers_return_at_once_is_a_mapping_of_its_own():
    """Under the commands' 8 MiB threshold a 1 MiB buffer is cut from the heap, which keeps
    its pages once it is freed; after `return_freed_buffers_at_once` it is mapped apart (and
    unmapped when freed). In a process of its own: the setting is the process's."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["True", "False"]


_THREAD_SCRIPT = textwrap.dedent("""
    import ctypes, sys, threading
    import numpy as np

    def in_heap(address):
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if low <= address < high:
                    return True
        return False

    if sys.argv[1] == "command":  # what `qlis` does before its command runs
        from qlis.cli.main import main
        sys.argv = ["qlis", "--version"]
        try:
            main()
        except SystemExit:
            pass
    else:
        ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)
    found = []
    thread = threading.Thread(target=lambda: found.append(in_heap(
        np.empty(1 << 17).ctypes.data)))  # 1 MiB: below the threshold, from an arena
    thread.start()
    thread.join()
    print(found[0])
""")


@pytest.mark.skipif(memory._MALLOPT is None, reason="glibc's mallopt (Linux) is what is set")
def test_a_commands_threads_allocate_from_the_one_arena():
    """A worker thread's buffer comes from the main arena (the heap) once `qlis` has started,
    where by default the thread gets an arena of its own that keeps what it frees."""
    def thread_buffer_in_heap(how: str) -> str:
        return subprocess.run([sys.executable, "-c", _THREAD_SCRIPT, how], capture_output=True,
                              text=True, check=True, timeout=120).stdout.split()[-1]

    assert thread_buffer_in_heap("default") == "False"
    assert thread_buffer_in_heap("command") == "True"
