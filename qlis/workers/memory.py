"""The machine's memory: how much is free to take, and freed memory given back to the system
between the long steps of a calibrated run.

A decode sized by a file (an archive's tensor of 2**30 zeros codes in 5 bytes) asks before it
allocates: on Linux, memory is promised freely and taken when touched, so a tensor larger than
the machine ends in the kernel's out-of-memory kill, not in an error the user can read.

glibc keeps freed heap memory for reuse. Reconstruction frees buffers of every size after each
layer (covariances, GPTQ's factors, a block's activations), and the heap keeps what later
layers cannot reuse: measured on a 6-block BERT-shaped calibrated pack, the process ended
holding 250 MB it had freed, and returning it after each layer and block lowered the peak from
1302 to 1171 MiB at no measurable cost (65 s and 62 s). Loading a low-bit model leaves the
same between the packed layers that stay (a 294 MB int8 ViT-L: 1.06 GB resident untrimmed,
0.59 GB trimmed after each layer). Elsewhere than glibc, nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys


def _glibc(name: str) -> object:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            return getattr(ctypes.CDLL("libc.so.6"), name)
    return None


_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
KEPT_MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap when `keep_freed_memory_for_reuse` is in force
(glibc's largest: HEAP_MAX_SIZE / 2 on 64-bit)."""
KEPT_TRIM_THRESHOLD = 1 << 30
COMMAND_MMAP_THRESHOLD = 8 << 20
"""Allocations from this size are mapped apart in every command (`set_the_commands_allocator`)
until a command sets its own."""
RETURNED_MMAP_THRESHOLD = 256 << 10
"""Allocations from this size are mapped, and unmapped when freed, once
`return_freed_buffers_at_once` is in force."""


def release_freed_memory() -> None:
    """Ask the C allocator to return its free pages to the system (glibc's malloc_trim)."""
    if _TRIM is not None:
        _TRIM(0)


def set_the_commands_allocator() -> None:
    """What every `qlis` command sets when it starts, before any thread allocates.

    glibc's mmap threshold fixed at 8 MiB (`COMMAND_MMAP_THRESHOLD`). Its adaptive default
    moves large buffers to the heap once one is freed, and the heap keeps whole-layer
    temporaries (measured on a ViT-L/14 pack: peak memory 2.6x the checkpoint instead of
    1.6x); a chunk's temporaries (qlis.measure.distortion.CHUNK_ELEMENTS, 4 MiB of float32)
    stay below it and are reused. Measured on a 2.4 B float16 pack: 1 MiB made every chunk
    buffer a fresh mapping (105 s); 64 MiB let the heap keep layers' codes (2.27 GB peak,
    killed in a 1.5 GiB cgroup); 8 MiB: 47 s, 1.72 GB, and it completes in the cgroup.

    Every thread served from one arena. By default each thread that allocates gets an arena
    of its own, which keeps what that thread frees for that thread alone: a streaming pack's
    two workers each held their own freed buffers, and the 2.4 B float16 pack's peak went
    from 1.22 to 1.59-1.70 GB in three runs of four (one arena: 1.17-1.25 GB in eight,
    14.4-15.4 s against 15.1-15.9 s, interleaved). Set later (after torch loaded), the
    ViT-L/14 pack took 4.8 s against 4.3 s. Elsewhere than glibc, nothing is done."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, COMMAND_MMAP_THRESHOLD)
        _MALLOPT(_M_ARENA_MAX, 1)


def keep_freed_memory_for_reuse() -> None:
    """Make glibc keep freed memory for the next allocations, for the rest of the process:
    allocations up to 32 MiB come from the heap, and its top is given back only past 1 GiB
    free (`release_freed_memory` still gives it back when asked). A streaming pack or unpack
    frees and makes buffers of a few MB per tensor, thousands of times; by default glibc maps
    each one above its threshold and unmaps it when freed (page faults, and with several
    threads every unmap interrupts the others' cores) and trims the heap's top as it shrinks.
    Measured (`qlis pack`, 2 cores): a 2.4 B float16 checkpoint 19.2 -> 15.3 s with 2 workers,
    30.1 -> 24.5 s with one, peak RSS 1.137 -> 1.146 GB; ViT-L/14 4.95 -> 4.04 s (+17 MB); the
    unpack of ViT-L/14 3.31 -> 3.13 s. Not for the calibrated paths: held memory there grows
    (a 6-block calibrated pack's peak 568 -> 616 MiB) and their goal is memory. The setting
    belongs to the process, so only the commands, which own theirs, make it. Elsewhere than
    glibc, nothing is done."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
        _MALLOPT(_M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)


def return_freed_buffers_at_once() -> None:
    """Make glibc map every allocation from 256 KiB and unmap it when freed, for the rest of
    the process. A calibrated pack makes and frees activations, sums and factors of a few MiB
    per batch and per layer; cut from the heap (below the 8 MiB threshold every command starts
    with, `set_the_commands_allocator`), each freed one stays resident in a hole of the heap
    until the next trim: 40-60 MiB at the peaks of a 6-block BERT-shaped pack of width 1024 (what
    `malloc_trim` gave back at each new peak). Measured (`bench_calib_blocks.py` 6-block pack,
    2 cores, with `FixedPointSum`'s reused buffers): peak 535 -> 467 MiB, 56.3 -> 60.4 s.
    Only the calibrated pack makes it (the streaming commands keep their buffers instead:
    `keep_freed_memory_for_reuse`). Elsewhere than glibc, nothing is done."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, RETURNED_MMAP_THRESHOLD)


def allocation_failed(err: BaseException) -> bool:
    """Whether ``err`` is a failed allocation: numpy's MemoryError, or the RuntimeError
    torch's CPU allocator raises in its place (a process under a memory limit, where the
    system's free memory said it would fit)."""
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux's MemAvailable); None where it does
    not say."""
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/meminfo", encoding="ascii") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
