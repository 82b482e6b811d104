"""Independent per-tensor work on every core, in order, with bounded memory.

Tensors are independent in the data-free paths (inspect, rd's curves, quantize + encode), so
they run on a pool of threads: torch, numpy and the numba codecs release the GIL. Results come
back in input order with at most ``window`` items in flight, so a consumer that writes them
one by one holds a bounded working set. While the pool runs, torch computes each op on one
thread: a reduction's rounding depends on how many threads split it, so fixing that number
makes every result the same bytes whatever ``jobs`` is. The BLAS that numpy and scipy load
(OpenBLAS) is held to one thread there too: its factorizations also round by thread count.
And the GIL changes hands sooner than Python's default (`SWITCH_INTERVAL_S`).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from threadpoolctl import ThreadpoolController

from qlis.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_ELEMENTS = 1 << 27
"""Elements of the tensors worked on at once (each holds its codes, its dequantized copy and
its encoded records while it is worked on), besides one large tensor (`ordered_map`): 128 M,
so memory stays near a GB plus the largest tensor's."""

SMALL_TENSOR_ELEMENTS = 1 << 16
"""Tensors smaller than this run in groups (`ordered_map`'s ``group_below``) in the per-tensor
passes: their work is ~0.1 ms or less, as much as a task's cost in the pool."""

COSTED_WINDOW = 32
"""Items submitted ahead per thread when a cost budget bounds their memory (a count still
bounds the bookkeeping of many tiny ones)."""


def default_jobs() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_jobs(jobs: int | None) -> int:
    """``jobs`` as a worker count (None: every core), refused unless a positive integer."""
    if jobs is None:
        return default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or not 1 <= jobs <= 1024:
        raise ConfigError(f"jobs must be an integer from 1 to 1024, got {jobs!r}")
    return int(jobs)  # a numpy integer too, as the options take them


SWITCH_INTERVAL_S = 2e-4
"""How long a thread may hold the GIL in Python while another waits for it, while a pool runs
(Python's default is 5 ms). Workers alternate short Python steps with compiled code that
releases the GIL; at the default, a worker coming back from compiled code waited for the
other's Python step up to 5 ms: a ViT-L/14 pack's tasks on two threads waited 0.6 s of their
5.8 s (0.4 s at 0.2 ms; the call 3.05-3.25 s against 2.93-3.04 s)."""


class _ProcessSetting:
    """A process-wide setting held while any caller is inside it (pools may nest, or run on
    several threads): the first in applies it, the last out restores what was there."""

    def __init__(self, apply: Callable[[], Callable[[], None]]) -> None:
        self._apply = apply  # applies the setting; returns what restores the previous one
        self._lock = threading.Lock()
        self._inside = 0
        self._restore: Callable[[], None] | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._restore = self._apply()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._restore()
                    self._restore = None


def _one_thread_per_op() -> Callable[[], None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    # selected first: a limit on every library would restore torch's OpenMP too
    blas = ThreadpoolController().select(user_api="blas").limit(limits=1)

    def restore() -> None:
        torch.set_num_threads(saved)
        blas.restore_original_limits()
    return restore


def _short_switch_interval() -> Callable[[], None]:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return partial(sys.setswitchinterval, saved)


single_threaded_ops = _ProcessSetting(_one_thread_per_op)
"""``with single_threaded_ops():`` torch and the loaded BLAS libraries run each op on one
thread inside (as in every pool: see the module doc); work done there gives the same bytes as
the pools' work."""

prompt_gil_handoff = _ProcessSetting(_short_switch_interval)
"""``with prompt_gil_handoff():`` the GIL changes hands after `SWITCH_INTERVAL_S` at most."""


def ordered_map(fn: Callable[[T], R], items: Iterable[T], jobs: int | None = None,
                window: int | None = None, cost: Callable[[T], float] | None = None,
                budget: float = math.inf, group_below: float = 0.0) -> Iterator[R]:
    """``fn`` over ``items`` on ``jobs`` threads, yielding results in input order.

    At most ``window`` tasks (an item, or a group of small ones: below) are taken from
    ``items`` ahead of the one being yielded. With
    ``cost``, the items started and not yet yielded cost at most ``budget``, besides one
    large item (costlier than half the budget: two would not fit in it): memory is bounded
    by the budget plus the largest item, whatever the number of items. A large item is
    started as soon as it is in the window, before the smaller ones ahead of it, and its
    result waits for its turn: it runs beside them instead of alone (a 2.4 B checkpoint's
    output layer, last in its order, ran alone for the last 4 s of a 13 s pass on 2
    threads). The default window is twice ``jobs`` without ``cost``, and `COSTED_WINDOW`
    times ``jobs`` with it, where the budget bounds the memory: a short window leaves a
    worker idle whenever the oldest item is a large tensor and the few after it are done
    (ViT-L/14 pack, second pass on 2 threads: 3.9 s with a window of 4, 2.5-2.8 s with 64).
    Consecutive items cheaper than ``group_below`` run as one task, up to that cost or
    `GROUP_ITEMS` of them: a task costs the pool ~0.1 ms, more than a tiny tensor's work
    (10,000 tensors of one element: 30,000 tasks in a pack). An exception from ``fn`` is
    raised here, at that item's turn, and nothing more is started. The generator must be
    consumed or closed (a ``for`` loop or ``list``)."""
    jobs = check_jobs(jobs)
    window = max(1, window or (COSTED_WINDOW if cost is not None else 2) * jobs)
    groups = _grouped(iter(items), cost, group_below)
    with single_threaded_ops(), prompt_gil_handoff(), \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        slots: deque[_Slot] = deque()  # taken from ``items``, not yet yielded, in order
        try:
            while True:
                while len(slots) < window:
                    slot = next(groups, None)
                    if slot is None:
                        break
                    slots.append(slot)
                if not slots:
                    return
                _start(slots, lambda slot: pool.submit(_run, fn, slot.items), budget)
                results, error = slots.popleft().future.result()
                yield from results
                if error is not None:
                    raise error
        finally:
            for slot in slots:
                if slot.future is not None:
                    slot.future.cancel()


GROUP_ITEMS = 64
"""Items run as one task at most (`ordered_map`): enough to make the pool's cost per item
small, few enough that a few thousand tiny tensors still spread over every worker."""


@dataclass
class _Slot:
    """Items taken by `ordered_map` to run as one task, their cost, and the task once
    started."""

    items: list[Any]
    weight: float
    future: Future | None = None


def _grouped(source: Iterator[T], cost: Callable[[T], float] | None,
             group_below: float) -> Iterator[_Slot]:
    """``source`` in slots: an item alone, or consecutive items cheaper than ``group_below``
    together while their cost stays under it (`GROUP_ITEMS` at most)."""
    group: list[T] = []
    weight = 0.0
    for item in source:
        item_cost = cost(item) if cost is not None else 0.0
        if group and (item_cost >= group_below or weight + item_cost > group_below
                      or len(group) == GROUP_ITEMS):
            yield _Slot(group, weight)
            group, weight = [], 0.0
        if item_cost >= group_below:
            yield _Slot([item], item_cost)
        else:
            group.append(item)
            weight += item_cost
    if group:
        yield _Slot(group, weight)


def _run(fn: Callable[[T], R], items: list[T]) -> tuple[list[R], BaseException | None]:
    """``fn`` over ``items`` in order, up to the first exception, which is returned beside the
    results before it (raised at its own turn by `ordered_map`)."""
    results = []
    for item in items:
        try:
            results.append(fn(item))
        except Exception as err:  # raised by ordered_map, at its turn
            return results, err
    return results, None


def _start(slots: deque[_Slot], submit: Callable[[_Slot], Future], budget: float) -> None:
    """Start what the budget allows: first the earliest large item (costlier than half
    ``budget``) if no other is started, then the others in order while their started total
    stays within ``budget``. Large items start in their order too, so the oldest slot can
    always start: nothing started can be waiting for it."""
    large = [s for s in slots if s.weight > budget / 2]
    if large and all(s.future is None for s in large):
        large[0].future = submit(large[0])
    small = [s for s in slots if s.weight <= budget / 2]
    started = sum(s.weight for s in small if s.future is not None)
    for slot in small:
        if slot.future is None:
            if started + slot.weight > budget:
                return
            slot.future = submit(slot)
            started += slot.weight
