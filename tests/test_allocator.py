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
