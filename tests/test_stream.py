"""Streaming pack: ``qlis.pack`` writes the bytes ``save(compress(...))`` writes, whatever
``jobs`` is and whether the input is a dict, a mapped safetensors file or a sharded folder;
``ordered_map`` keeps order, a bounded window and torch's thread count; ``ArchiveWriter``
publishes atomically or leaves nothing behind; ``qlis pack --jobs``."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_info, threadpool_limits

import qlis
import qlis.archive.pack
import qlis.archive.resume
import qlis.measure.stats
import qlis.models.checkpoints
import qlis.plan.compress
import qlis.plan.rd
import qlis.workers.threads
from qlis.archive.atomic import STALE_SECONDS
from qlis.archive.file import ArchiveWriter, encode_tensor, write_tensors
from qlis.cli.main import cli
from qlis.errors import ConfigError, InputError
from qlis.models.checkpoints import MappedState, load_state_dict, write_sharded_safetensors
from qlis.quantize.quantizers import QuantizedTensor, get_quantizer
from qlis.workers.threads import (
    GROUP_ITEMS,
    SWITCH_INTERVAL_S,
    check_jobs,
    default_jobs,
    ordered_map,
)

PLAN = {
    "0.weight": {"quantizer": {"id": "affine", "bits": 4}},
    "1.weight": {"pruner": {"id": "fraction", "fraction": 0.3},
                 "quantizer": {"id": "kmeans", "bits": 3}},
    "conv.weight": {"pruner": {"id": "sigma", "k": 1.0}},  # pruned, stored as floats
    "embed.weight": {"quantizer": {"id": "uniform", "rel_mse": 1e-3}},
}
POLICIES = {
    "rd": {},
    "rd-3-bits": {"target_bits_per_weight": 3},
    "lapq": {"policy": "lapq"},
    "plan": {"plan": PLAN},
}


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few layers of several kinds and dtypes. ``embed.weight`` takes 2 MiB, so a MappedState
    maps it from the file instead of reading it into memory."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return {
        "0.bias": randn(96, scale=0.01),
        "0.weight": randn(96, 64, scale=0.05),
        "1.bias": randn(32, scale=0.01),
        "1.weight": randn(32, 96, scale=0.1),
        "conv.weight": randn(8, 3, 3, 3, scale=0.2),
        "embed.weight": randn(512, 1024, scale=0.02),
        "half.weight": randn(24, 32, scale=0.05).half(),
        "norm.weight": 1 + randn(32, scale=0.01),
        "steps": torch.tensor([7, 11], dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return make_state()


@pytest.fixture(scope="module")
def model_file(state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture
def torch_threads():
    """Set torch's thread count for the test; the previous one is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def same_quantized(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (
        a.codes.dtype == b.codes.dtype and np.array_equal(a.codes, b.codes)
        and a.n_levels == b.n_levels and a.quantizer == b.quantizer and a.dtype == b.dtype
        and sorted(a.params) == sorted(b.params)
        and all(np.asarray(a.params[k]).tobytes() == np.asarray(b.params[k]).tobytes()
                for k in a.params)
    )


# -- pack == save(compress) -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dict", "mapped"])
@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
def test_pack_writes_the_bytes_of_save_compress(state, model_file, tmp_path, source, options):
    given = state if source == "dict" else load_state_dict(model_file)
    assert isinstance(given, dict if source == "dict" else MappedState)
    expected = qlis.save(qlis.compress(given, **options), tmp_path / "saved.qlis").read_bytes()
    done: list[int] = []
    result = qlis.pack(given, tmp_path / "packed.qlis", progress=done.append, **options)
    assert (tmp_path / "packed.qlis").read_bytes() == expected
    assert len(done) == len(state)  # one call per tensor written, with its size
    assert sum(done) == sum(t.numel() for t in state.values())
    assert result.layers, "the policy planned no layer: nothing was compared"
    if "plan" in options:
        assert [layer.name for layer in result.layers] == list(PLAN)


def test_pack_counts_the_archive_estimate_only_when_asked(state, tmp_path, monkeypatch):
    counted = []
    unplanned_bytes = qlis.plan.compress.unplanned_bytes
    monkeypatch.setattr(qlis.plan.compress, "unplanned_bytes",
                        lambda tensor: counted.append(1) or unplanned_bytes(tensor))
    result = qlis.pack(state, tmp_path / "m.qlis")
    assert not counted  # the float16 norms were written, not encoded once more for a guess
    estimate = result.estimated_bytes
    assert counted and estimate == qlis.compress(state).estimated_bytes


def test_a_mapped_file_packs_as_the_dict_it_was_saved_from(state, model_file, tmp_path):
    mapped = load_state_dict(model_file)
    assert sorted(mapped) == sorted(state)
    state = {name: state[name] for name in mapped}  # the file's order: the same archive bytes
    qlis.pack(state, tmp_path / "dict.qlis", target_bits_per_weight=3)
    qlis.pack(mapped, tmp_path / "mapped.qlis", target_bits_per_weight=3)
    assert (tmp_path / "dict.qlis").read_bytes() == (tmp_path / "mapped.qlis").read_bytes()


@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
def test_a_file_is_read_once_a_pass_its_sizes_taken_from_its_header(
        model_file, tmp_path, monkeypatch, options):
    """Sizes, dtypes and shapes come from the file's header (`MappedState.layout`): a pack
    reads each tensor once in each pass that needs its values (the scores, rd's curves, the
    archive), where summing sizes read them all again (15 reads a tensor)."""
    reads: collections.Counter[str] = collections.Counter()
    read = MappedState.__getitem__

    def counted(self: MappedState, name: str) -> torch.Tensor:
        reads[name] += 1
        return read(self, name)

    monkeypatch.setattr(MappedState, "__getitem__", counted)
    mapped = load_state_dict(model_file)
    qlis.inspect(mapped)
    assert set(reads.values()) == {1}
    reads.clear()
    qlis.pack(mapped, tmp_path / "packed.qlis", **options)
    assert max(reads.values()) <= 3 and sorted(reads) == sorted(mapped)


@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
def test_pack_bytes_do_not_depend_on_jobs(state, model_file, tmp_path, options):
    mapped = load_state_dict(model_file)
    archives = []
    for jobs in (1, 2, 3):
        path = tmp_path / f"jobs{jobs}.qlis"
        qlis.pack(mapped, path, jobs=jobs, **options)
        archives.append(path.read_bytes())
    assert archives[0] == archives[1] == archives[2]
    with qlis.open(tmp_path / "jobs1.qlis") as archive:
        assert archive.names() == list(mapped)


# -- pack's result ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
def test_pack_result_is_compress_result_and_holds_the_archived_codes(
        state, tmp_path, options, torch_threads):
    # One torch thread in the caller too, so a layer recomputed here rounds its reductions as
    # the pool did; the next test covers a caller with more threads.
    torch_threads(1)
    compressed = qlis.compress(state, **options)
    path = tmp_path / "m.qlis"
    result = qlis.pack(state, path, **options)
    assert result.summary() == compressed.summary()
    assert result.config == compressed.config
    assert list(result.tensors) == list(state)
    planned = [layer.name for layer in result.layers]
    assert planned == [layer.name for layer in compressed.layers]
    quantized = 0
    with qlis.open(path) as archive:
        for name in planned:
            ours, archived = result.tensors[name], archive.read_quantized(name)
            if isinstance(ours, QuantizedTensor):
                quantized += 1
                assert archived is not None, name
                assert same_quantized(ours, archived), name
                assert same_quantized(ours, compressed.tensors[name]), name
            else:  # pruned only: stored as floats
                assert archived is None, name
                assert same_tensor(ours, archive.read(name)), name
        for name in state:
            if name not in planned:  # kept as they are, or narrowed to float16 (rd)
                ours, archived = result.tensors[name], archive.read_quantized(name)
                if isinstance(ours, QuantizedTensor):
                    assert same_quantized(ours, archived), name
                    assert same_quantized(ours, compressed.tensors[name]), name
                else:
                    assert same_tensor(ours, state[name]), name
    assert quantized >= 2


def _uniform_layers(count: int) -> dict[str, torch.Tensor]:
    """Layers large enough (48K elements) that torch splits their reductions across threads."""
    gen = torch.Generator().manual_seed(1)
    return {f"{i}.weight": torch.randn(48, 1024, generator=gen) for i in range(count)}


def test_pack_result_holds_the_archived_codes_whatever_the_callers_threads(
        tmp_path, torch_threads):
    state = _uniform_layers(24)
    config = {"id": "uniform", "rel_mse": 1e-4}
    plan = {name: {"quantizer": config} for name in state}
    quantizer = get_quantizer(config)

    def steps() -> list[bytes]:
        return [quantizer.quantize(w).params["step"].tobytes() for w in state.values()]

    torch_threads(1)
    one_thread = steps()
    torch_threads(4)
    if steps() == one_thread:
        pytest.skip("on this machine torch's reductions round alike on 1 and 4 threads")
    path = tmp_path / "m.qlis"
    result = qlis.pack(state, path, plan=plan, jobs=2)
    with qlis.open(path) as archive:
        differ = [name for name in state
                  if not same_quantized(result.tensors[name], archive.read_quantized(name))]
    assert differ == []


# -- ordered_map ------------------------------------------------------------------------------


def test_ordered_map_yields_in_input_order_when_later_items_finish_first():
    n = 5
    done = [threading.Event() for _ in range(n)]
    finished: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> str:
        if i + 1 < n:  # each item waits until the next one has finished
            assert done[i + 1].wait(10), f"item {i + 1} never ran alongside item {i}"
        with lock:
            finished.append(i)
        done[i].set()
        return f"r{i}"

    assert list(ordered_map(fn, range(n), jobs=n, window=n)) == [f"r{i}" for i in range(n)]
    assert finished == list(reversed(range(n)))


@pytest.mark.parametrize(("jobs", "window"), [(4, 3), (1, 2), (2, None)])
def test_ordered_map_keeps_at_most_window_items_in_flight(jobs, window):
    limit = window or 2 * jobs
    n = 24
    lock = threading.Lock()
    pulled = 0
    running = peak = 0

    def items():
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i

    def fn(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.001)
        return -i

    ahead = []
    for k, value in enumerate(ordered_map(fn, items(), jobs=jobs, window=window)):
        assert value == -k
        ahead.append(pulled - k)  # taken from the input, not yet yielded (counting k)
        with lock:
            running -= 1
        time.sleep(0.002)  # a slow consumer: an unbounded pool would run far ahead
    assert max(ahead) == limit and min(ahead) >= 1
    assert 1 <= peak <= limit


def test_with_a_cost_budget_a_worker_runs_on_past_a_slow_oldest_item():
    """The budget bounds memory, so the window is wide: while the oldest item (a large
    tensor) runs, the other worker goes on through the small ones after it (a window of
    twice the workers stopped it after three)."""
    tenth_done = threading.Event()

    def fn(i: int) -> int:
        if i == 0:
            assert tenth_done.wait(10), "the other worker stopped behind the oldest item"
        if i == 10:
            tenth_done.set()
        return i

    assert list(ordered_map(fn, range(12), jobs=2, cost=lambda _: 1.0, budget=100.0)) \
        == list(range(12))


def test_a_large_item_starts_before_the_smaller_ones_ahead_of_it_and_one_at_a_time():
    """Items costlier than half the budget start as soon as they are in the window, one at a
    time and in their order, and the others stay within the budget: on one thread the start
    order shows it, and what is started and not yet yielded never costs more than the budget
    plus the largest item."""
    costs = {i: 10.0 for i in range(12)} | {3: 70.0, 8: 60.0}
    lock = threading.Lock()
    started: list[int] = []

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        return -i

    held = []
    for k, value in enumerate(ordered_map(fn, range(12), jobs=1, cost=costs.__getitem__,
                                          budget=100.0)):
        assert value == -k
        with lock:
            held.append(sum(costs[i] for i in started if i >= k))
    assert started[0] == 3  # before items 0-2, ahead of it in the input
    assert started.index(8) > started.index(3) + 1 and started.index(8) > started.index(11)
    assert sorted(started) == list(range(12))
    assert max(held) <= 100.0 + 70.0


def test_a_large_item_started_early_that_fails_raises_at_its_own_turn():
    costs = {i: 1.0 for i in range(10)} | {6: 80.0}

    def fn(i: int) -> int:
        if i == 6:
            raise ValueError("the large item failed")
        return i

    got = []
    with pytest.raises(ValueError, match="the large item failed"):
        for value in ordered_map(fn, range(10), jobs=2, cost=costs.__getitem__, budget=100.0):
            got.append(value)
    assert got == list(range(6))  # everything before it, in order


def test_small_items_run_as_one_task_until_their_cost_adds_up(monkeypatch):
    """Consecutive items cheaper than ``group_below`` are one task while their cost stays
    within it (and `GROUP_ITEMS` at most); a costlier item is a task of its own; the results
    are the same, in order."""
    tasks = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            tasks.append(args[-1] if args else None)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(qlis.workers.threads, "ThreadPoolExecutor", CountingPool)
    costs = {i: 1.0 for i in range(100)} | {50: 1000.0}
    got = list(ordered_map(lambda i: -i, range(100), jobs=2, cost=costs.__getitem__,
                           budget=1e6, group_below=10))
    assert got == [-i for i in range(100)]
    assert [len(items) for items in tasks] == [10] * 5 + [1] + [10] * 4 + [9]
    assert tasks[5] == [50]
    tasks.clear()
    assert list(ordered_map(lambda i: i, range(200), jobs=2, cost=lambda _: 0.0,
                            group_below=10)) == list(range(200))
    assert [len(items) for items in tasks] == [GROUP_ITEMS] * 3 + [200 - 3 * GROUP_ITEMS]


def test_an_item_that_fails_inside_a_group_raises_after_the_ones_before_it():
    ran = []

    def fn(i: int) -> int:
        ran.append(i)
        if i == 13:
            raise ValueError("item 13 failed")
        return i

    got = []
    with pytest.raises(ValueError, match="item 13 failed"):
        for value in ordered_map(fn, range(40), jobs=1, cost=lambda _: 1.0, group_below=10):
            got.append(value)
    assert got == list(range(13))
    assert 14 not in ran and 19 not in ran  # the rest of its group never ran


def test_ordered_map_raises_at_the_failing_items_turn_and_starts_nothing_far_beyond():
    lock = threading.Lock()
    started: list[int] = []
    k, window = 5, 3

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i == k:
            raise ValueError(f"item {i} failed")
        time.sleep(0.02 if i < k else 0)  # earlier items finish after item k has failed
        return i

    got = []
    with pytest.raises(ValueError, match=f"item {k} failed"):
        for value in ordered_map(fn, range(1000), jobs=4, window=window):
            got.append(value)
    assert got == list(range(k))
    time.sleep(0.05)  # anything still being started would show up now
    assert k in started and max(started) < k + window


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_ordered_map_runs_fn_on_one_torch_thread_and_restores_the_count(torch_threads):
    torch_threads(3)
    with threadpool_limits(limits=2, user_api="blas"):
        seen = list(ordered_map(lambda _: (torch.get_num_threads(), _blas_threads()),
                                range(8), jobs=3))
        assert _blas_threads() and _blas_threads() == [2] * len(_blas_threads())
    assert seen == [(1, [1] * len(_blas_threads()))] * 8  # numpy's and scipy's BLAS too
    assert torch.get_num_threads() == 3

    def fail_at_2(i: int) -> int:
        if i == 2:
            raise RuntimeError("boom")
        return torch.get_num_threads()

    with pytest.raises(RuntimeError, match="boom"):
        list(ordered_map(fail_at_2, range(8), jobs=2))
    assert torch.get_num_threads() == 3

    gen = ordered_map(lambda _: torch.get_num_threads(), range(8), jobs=2)
    assert next(gen) == 1
    gen.close()  # a consumer that stops early
    assert torch.get_num_threads() == 3


def test_ordered_map_hands_the_gil_over_promptly_and_restores_the_interval():
    before = sys.getswitchinterval()
    assert before != SWITCH_INTERVAL_S
    seen = list(ordered_map(lambda _: sys.getswitchinterval(), range(8), jobs=2))
    assert seen == pytest.approx([SWITCH_INTERVAL_S] * 8)
    assert sys.getswitchinterval() == before
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda i: 1 / 0 if i == 2 else i, range(8), jobs=2))
    assert sys.getswitchinterval() == before


def test_a_pools_setting_is_restored_when_the_last_of_overlapping_pools_ends():
    """Pools may overlap (from two threads, or one inside another's task): the first to end
    must leave the setting to the one still running."""
    before = sys.getswitchinterval()
    outer = ordered_map(lambda i: i, range(4), jobs=1)
    assert next(outer) == 0
    inner = list(ordered_map(lambda _: sys.getswitchinterval(), range(4), jobs=2))
    assert inner == pytest.approx([SWITCH_INTERVAL_S] * 4)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)  # the outer pool still runs
    assert list(outer) == [1, 2, 3]
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("jobs", [0, -1, True, False, 1.5, "2", 1025])
def test_check_jobs_refuses_what_is_not_a_worker_count(jobs, tmp_path):
    with pytest.raises(ConfigError, match="jobs"):
        check_jobs(jobs)
    with pytest.raises(ConfigError, match="jobs"):
        next(ordered_map(lambda i: i, [1, 2], jobs=jobs))
    with pytest.raises(ConfigError, match="jobs"):
        qlis.pack(make_state(), tmp_path / "m.qlis", jobs=jobs)
    assert os.listdir(tmp_path) == []


def test_check_jobs_takes_positive_ints_and_none_as_every_core():
    assert check_jobs(None) == default_jobs() >= 1
    assert [check_jobs(j) for j in (1, 2, 7, 1024)] == [1, 2, 7, 1024]
    assert type(check_jobs(np.int32(2))) is int  # as every option takes numpy integers


# -- ArchiveWriter ----------------------------------------------------------------------------


def _tensors() -> dict[str, QuantizedTensor | torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 24, generator=gen)
    return {
        "q": get_quantizer({"id": "affine", "bits": 3}).quantize(weight),
        "u": get_quantizer({"id": "uniform", "rel_mse": 1e-3}).quantize(weight * 2),
        "f": torch.randn(17, generator=gen),
        "h": torch.randn(3, 5, generator=gen).bfloat16(),
        "i": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }


class Interrupted(Exception):
    pass


def test_archive_writer_leaves_nothing_when_the_block_fails(tmp_path):
    path = tmp_path / "m.qlis"
    with pytest.raises(Interrupted), ArchiveWriter(path) as writer:
        for name, tensor in _tensors().items():
            writer.add(encode_tensor(name, tensor))
        raise Interrupted
    assert os.listdir(tmp_path) == []


def test_archive_writer_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "m.qlis"
    path.write_bytes(b"the previous archive")
    with pytest.raises(Interrupted), ArchiveWriter(path, overwrite=True) as writer:
        writer.add(encode_tensor("f", _tensors()["f"]))
        raise Interrupted
    assert os.listdir(tmp_path) == ["m.qlis"]
    assert path.read_bytes() == b"the previous archive"


def test_pack_failing_midway_leaves_the_old_archive(state, tmp_path):
    path = tmp_path / "m.qlis"
    path.write_bytes(b"the previous archive")
    plan = {"0.weight": {"quantizer": {"id": "affine", "bits": 4}},
            "embed.weight": {"quantizer": {"id": "uniform", "step": 1e-9}}}  # too many levels
    written: list[int] = []
    with pytest.raises(ConfigError, match="levels"):
        qlis.pack(state, path, plan=plan, jobs=2, progress=written.append)
    assert written  # it failed while streaming, after some tensors were written
    assert os.listdir(tmp_path) == ["m.qlis"]
    assert path.read_bytes() == b"the previous archive"


def test_archive_writer_finish_publishes_what_was_added(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.qlis"
    with ArchiveWriter(path) as writer:
        for name, tensor in tensors.items():
            writer.add(encode_tensor(name, tensor, "huffman"))
        assert not path.exists()  # nothing under the name before finish
        assert writer.finish(metadata={"origin": "test"}) == path
    assert os.listdir(tmp_path) == ["m.qlis"]
    with qlis.open(path) as archive:
        archive.verify()
        assert archive.names() == list(tensors)
        assert archive.metadata == {"origin": "test"}
        for name, tensor in tensors.items():
            if isinstance(tensor, QuantizedTensor):
                assert same_quantized(archive.read_quantized(name), tensor), name
                assert same_tensor(archive.read(name), tensor.dequantize()), name
            else:
                assert archive.read_quantized(name) is None
                assert same_tensor(archive.read(name), tensor), name
    write_tensors(tmp_path / "w.qlis", tensors, codec="huffman", metadata={"origin": "test"},
                  jobs=2)
    assert (tmp_path / "w.qlis").read_bytes() == path.read_bytes()


def test_archive_writer_without_overwrite_refuses_an_existing_path(tmp_path):
    path = tmp_path / "m.qlis"
    path.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists"):
        ArchiveWriter(path, overwrite=False)
    assert path.read_bytes() == b"keep"


def test_archive_writer_without_overwrite_keeps_a_file_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "m.qlis"
    with ArchiveWriter(path, overwrite=False) as writer:
        writer.add(encode_tensor("f", _tensors()["f"]))
        path.write_bytes(b"someone else's")
        with pytest.raises(InputError, match="appeared|exists"):
            writer.finish()
    assert os.listdir(tmp_path) == ["m.qlis"]
    assert path.read_bytes() == b"someone else's"


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_pack_bytes_do_not_depend_on_jobs(model_file, tmp_path):
    archives = []
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}.qlis"
        result = run(cli, "pack", model_file, "-o", out, "--jobs", jobs,
                     "--target-bits-per-weight", 3)
        assert result.exit_code == 0, result.output
        archives.append(out.read_bytes())
    assert archives[0] == archives[1]
    with qlis.open(tmp_path / "j1.qlis") as archive:
        assert archive.metadata["source"] == model_file.name
        assert any(archive.read_quantized(name) is not None for name in archive.names())


@pytest.mark.parametrize("jobs", ["0", "-1", "1025", "x"])
def test_cli_pack_refuses_a_bad_jobs_in_one_error_line(model_file, tmp_path, jobs):
    out = tmp_path / "m.qlis"
    result = run(cli, "pack", model_file, "-o", out, "--jobs", jobs, prog_name="qlis")
    assert result.exit_code == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "rror" in line]
    assert len(errors) == 1 and "--jobs" in errors[0] and repr(jobs).strip("'") in errors[0]
    assert not out.exists()


# -- sharded folders --------------------------------------------------------------------------


def test_a_sharded_folder_packs_as_one_file(state, tmp_path):
    single = tmp_path / "single.safetensors"
    save_file(state, str(single))
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],  # interleaved: the shards'
              "model-00002-of-00002.safetensors": names[1::2]}  # order is not the file's
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: state[n] for n in members}, str(folder / shard))
        weight_map.update(dict.fromkeys(members, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    loaded = load_state_dict(folder)
    assert isinstance(loaded, MappedState) and sorted(loaded) == sorted(state)
    assert all(same_tensor(loaded[n], state[n]) for n in state)
    for options in ({}, {"target_bits_per_weight": 3}, {"plan": PLAN}):
        qlis.pack(load_state_dict(single), tmp_path / "single.qlis", **options)
        qlis.pack(loaded, tmp_path / "sharded.qlis", jobs=2, **options)
        one, two = qlis.load(tmp_path / "single.qlis"), qlis.load(tmp_path / "sharded.qlis")
        assert sorted(one) == sorted(two) == sorted(state)
        assert all(same_tensor(one[n], two[n]) for n in state), options
        assert not all(same_tensor(one[n], state[n]) for n in state)  # it did compress


# Sharded unpack


def test_unpack_into_shards_gives_a_folder_that_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    archive, out = tmp_path / "bert.qlis", tmp_path / "unpacked"
    packed = run(cli, "pack", tmp_path / "bert", "-o", archive, "--target-bits-per-weight", 4)
    assert packed.exit_code == 0, packed.output
    result = run(cli, "unpack", archive, "-o", out, "--max-shard-size", "20KB", "--jobs", 2)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    sizes = [(out / s).stat().st_size for s in shards]
    assert index["metadata"]["total_size"] <= sum(sizes)
    (out / "config.json").write_text((tmp_path / "bert" / "config.json").read_text())
    model = transformers.BertModel.from_pretrained(out)
    expected = qlis.load(archive)
    for name, tensor in model.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
    assert set(index["weight_map"]) == set(expected)


@pytest.mark.parametrize("size", ["0", "five", "5XB", "-1GB", "1e400"])
def test_unpack_refuses_a_shard_size_that_is_not_one(model_file, tmp_path, size):
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    result = run(cli, "unpack", archive, "-o", tmp_path / "out", "--max-shard-size", size)
    assert result.exit_code == 2 and "--max-shard-size" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model-00001-of-00001.safetensors",
                                  "model.safetensors.index.json", "model.safetensors"])
def test_unpack_into_shards_never_replaces_its_own_input(model_file, tmp_path, name):
    """An archive under a name the shards take, in the folder they go to: refused, even with
    --force, before anything is written (it was replaced by the shard it was read into). As
    model.safetensors, which loaders read before an index, it was kept and the unpack said
    nothing: the folder loaded as the archive, which is no safetensors file."""
    archive = tmp_path / name
    qlis.pack(load_state_dict(model_file), archive)
    before = archive.read_bytes()
    link = tmp_path / "link.qlis"
    link.symlink_to(archive)
    for given in (archive, link):
        result = run(cli, "unpack", given, "-o", tmp_path, "--max-shard-size", "1GB", "--force")
        assert result.exit_code == 2 and "is the input" in result.stderr, result.output
    assert archive.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "link.qlis"])


@pytest.mark.parametrize("target", ["loop", "nowhere"])
def test_unpack_into_shards_says_a_link_that_leads_nowhere_is_not_a_folder(model_file, tmp_path,
                                                                          target):
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    (tmp_path / "loop").symlink_to(tmp_path / target)
    result = run(cli, "unpack", archive, "-o", tmp_path / "loop", "--max-shard-size", "1GB")
    assert result.exit_code == 2 and "exists and is not a folder" in result.stderr


# Resuming an interrupted pack


def _interrupt_second_pass(monkeypatch):
    def fail(*_args, **_kwargs):
        raise Interrupted

    monkeypatch.setattr(sys.modules["qlis.archive.pack"], "encode_tensor", fail)


def _count_measures(monkeypatch) -> list[str]:
    """The layers whose statistics or rd curves are measured from now on."""
    measured: list[str] = []
    layer_measures, candidates = qlis.measure.stats._layer_measures, qlis.plan.rd._layer_candidates

    def counted_measures(tensor, eps, score, masks):
        measured.append("inspect")
        return layer_measures(tensor, eps, score, masks)

    def counted_candidates(weight, policy, seed, **options):
        measured.append("rd")
        return candidates(weight, policy, seed, **options)

    monkeypatch.setattr(qlis.measure.stats, "_layer_measures", counted_measures)
    monkeypatch.setattr(qlis.plan.rd, "_layer_candidates", counted_candidates)
    return measured


def test_an_interrupted_pack_resumes_from_its_first_pass(model_file, tmp_path, monkeypatch):
    fresh, out = tmp_path / "fresh.qlis", tmp_path / "out.qlis"
    qlis.pack(load_state_dict(model_file), fresh, target_bits_per_weight=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.qlis"]  # nothing left over
    with monkeypatch.context() as patch:
        _interrupt_second_pass(patch)
        with pytest.raises(Interrupted):
            qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3)
    saved = tmp_path / ".out.qlis-pass1.json"
    assert saved.is_file() and not out.exists()
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert measured == []  # every layer's statistics and curves came from the saved pass
    assert out.read_bytes() == fresh.read_bytes() and not saved.exists()


@pytest.mark.parametrize("change", ["options", "input", "garbled", "no-resume"])
def test_a_saved_pass_that_does_not_match_is_measured_again(model_file, tmp_path, monkeypatch,
                                                            change):
    model = tmp_path / "m.safetensors"
    model.write_bytes(model_file.read_bytes())
    out = tmp_path / "out.qlis"
    with monkeypatch.context() as patch:
        _interrupt_second_pass(patch)
        with pytest.raises(Interrupted):
            qlis.pack(load_state_dict(model), out, target_bits_per_weight=3)
    saved = tmp_path / ".out.qlis-pass1.json"
    bits = 3.5 if change == "options" else 3
    if change == "input":
        os.utime(model, ns=(0, model.stat().st_mtime_ns + 10**9))
    if change == "garbled":
        saved.write_text('{"fingerprint": [1, 2], "results": ')
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model), out, target_bits_per_weight=bits,
              resume=change != "no-resume")
    assert "inspect" in measured and "rd" in measured
    expected = tmp_path / "expected.qlis"
    qlis.save(qlis.compress(load_state_dict(model), target_bits_per_weight=bits), expected)
    assert out.read_bytes() == expected.read_bytes() and not saved.exists()


def _interrupted_pack(model: Path, out: Path, monkeypatch) -> Path:
    """A 3-bit pack of ``model`` into ``out`` stopped in its second pass: the first pass it
    saved beside ``out``."""
    with monkeypatch.context() as patch:
        _interrupt_second_pass(patch)
        with pytest.raises(Interrupted):
            qlis.pack(load_state_dict(model), out, target_bits_per_weight=3)
    return out.with_name(f".{out.name}-pass1.json")


def _saved_document(saved: Path) -> dict:
    """The saved first pass's document (after its digest line)."""
    return json.loads(saved.read_bytes().split(b"\n", 1)[1])


def _forge(saved: Path, document: dict) -> None:
    """Save ``document`` as the first pass with a digest that matches it: a forgery, which
    the digest cannot tell (the values must be checked for themselves)."""
    text = json.dumps(document).encode()
    saved.write_bytes(hashlib.sha256(text).hexdigest().encode() + b"\n" + text)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(size="x"), lambda c: c.update(size=-1.0), lambda c: c.update(rel_mse=-1),
    lambda c: c.update(rel_mse=True), lambda c: c.update(config={"id": "nonesuch"}),
    lambda c: c.pop("pruner"), lambda c: c.update(rel_mse=0.0),
    lambda c: c.update(pruner={"id": "fraction", "fraction": 0.99}),
    lambda c: c.update(config={"id": "group", "bits": 4, "group_size": 1}),
    lambda c: c["config"].update(granularity="channel"),
], ids=["string", "negative-size", "negative-error", "bool", "unknown-quantizer", "key-missing",
        "lossless", "pruner-not-offered", "grid-not-offered", "granularity-not-offered"])
def test_a_saved_pass_with_forged_values_is_measured_again(model_file, tmp_path, monkeypatch,
                                                          edit):
    """A cache of the right fingerprint whose values are not what the first pass writes was
    read as it was: "x" a ValueError deep in the allocation (a traceback), negative sizes
    and errors allocated on, candidates the options never make (a pruner keeping 1%, groups
    of one weight, a rounded layer without error) planned with: a destroyed model, exit 0."""
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model_file, out, monkeypatch)
    document = _saved_document(saved)
    key = next(k for k in document["results"] if k.startswith("rd "))
    edit(document["results"][key][0][-1])
    _forge(saved, document)
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert "rd" in measured and "inspect" not in measured  # the layers' statistics were fine
    expected = tmp_path / "expected.qlis"
    qlis.save(qlis.compress(load_state_dict(model_file), target_bits_per_weight=3), expected)
    assert out.read_bytes() == expected.read_bytes()


def test_a_saved_pass_without_a_layers_candidates_is_measured_again(model_file, tmp_path,
                                                                    monkeypatch):
    """An empty list of candidates passed every check and failed the allocation ("a curve
    needs as many sizes as distortions, at least one"), at every rerun with --resume."""
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model_file, out, monkeypatch)
    document = _saved_document(saved)
    key = next(k for k in document["results"] if k.startswith("rd "))
    document["results"][key][0] = []
    _forge(saved, document)
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert "rd" in measured and "inspect" not in measured


def test_a_pack_that_fails_after_using_a_saved_pass_measures_again(model_file, tmp_path,
                                                                   monkeypatch):
    """A saved candidate every check accepts and no first pass makes (a step so fine that
    the layer's codes cannot be stored) failed the pack with an error that never named the
    saved pass, at every rerun with --resume, until the user found the hidden file."""
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model_file, out, monkeypatch)
    document = _saved_document(saved)
    key = next(k for k in document["results"] if k.startswith("rd "))
    for layer in document["results"][key]:
        # free and all but exact, of a step family the options offer: always chosen
        layer.append({"config": {"id": "uniform", "rel_mse": 1e-61, "granularity": "tensor",
                                 "rounding": qlis.plan.rd.RDPolicy().rounding},
                      "size": 0.0, "rel_mse": 1e-60, "pruner": None})
    _forge(saved, document)
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert "rd" in measured and "inspect" in measured  # measured again from the start
    expected = tmp_path / "expected.qlis"
    qlis.save(qlis.compress(load_state_dict(model_file), target_bits_per_weight=3), expected)
    assert out.read_bytes() == expected.read_bytes() and not saved.exists()


@pytest.mark.parametrize("change", ["damaged", "model-copied-with-its-times", "junk"])
def test_a_damaged_saved_pass_or_a_model_copied_over_is_measured_again(
        model_file, tmp_path, monkeypatch, change):
    """One digit of the saved pass changed the plan; a model copied over with its size and
    times kept (cp -p) was taken for the one measured; a file of junk under the pass's name
    was parsed whole (8 GB for 256 MiB) before it was found not to match."""
    model = tmp_path / "m.safetensors"
    model.write_bytes(model_file.read_bytes())
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model, out, monkeypatch)
    if change == "damaged":
        data = saved.read_bytes()
        at = data.index(b"rel_mse") + 12
        saved.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    elif change == "junk":
        saved.write_bytes(b"[]," * 1000)

        def never(*_args, **_kwargs):
            raise AssertionError("parsed")

        monkeypatch.setattr(qlis.archive.resume, "parse_json_text", never)
    else:
        times = model.stat()
        state = load_file(model)
        state = {name: tensor.flip(0).contiguous() for name, tensor in state.items()}
        save_file(state, tmp_path / "other.safetensors")
        os.replace(tmp_path / "other.safetensors", model)
        os.utime(model, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert model.stat().st_size == times.st_size
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model), out, target_bits_per_weight=3, resume=True)
    assert "inspect" in measured and "rd" in measured
    expected = tmp_path / "expected.qlis"
    qlis.save(qlis.compress(load_state_dict(model), target_bits_per_weight=3), expected)
    assert out.read_bytes() == expected.read_bytes()


def test_a_first_pass_too_large_to_save_is_not_saved_and_the_pack_goes_on(
        model_file, tmp_path, monkeypatch):
    """A model of 100,000 small layers made 4 M rd candidates, whose JSON, made all at once
    to be saved, ran out of memory (a traceback): the file is written a result at a time
    and given up past the size that reading it back allows."""
    monkeypatch.setattr(qlis.archive.resume, "MAX_CACHE_BYTES", 2000)
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model_file, out, monkeypatch)
    kept = _saved_document(saved)["results"]  # the layers' statistics fit, rd's not
    assert len(saved.read_bytes()) <= 2000 and [k.split()[0] for k in kept] == ["inspect"]
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert "rd" in measured and "inspect" not in measured
    expected = tmp_path / "expected.qlis"
    qlis.save(qlis.compress(load_state_dict(model_file), target_bits_per_weight=3), expected)
    assert out.read_bytes() == expected.read_bytes()


def test_a_pack_refused_after_its_first_pass_leaves_nothing_beside_the_output(
        model_file, tmp_path, monkeypatch):
    """A user's error found in the second pass (a tensor of more dimensions than an archive
    holds) left the saved first pass beside the output, which a rerun could not use."""
    def refused(*_args, **_kwargs):
        raise InputError("w: 64 dimensions; archives hold 32 (simulated)")

    monkeypatch.setattr(sys.modules["qlis.archive.pack"], "encode_tensor", refused)
    with pytest.raises(InputError, match="simulated"):
        qlis.pack(load_state_dict(model_file), tmp_path / "out.qlis")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [["x", 1.0, 0.0], [1.0, float("nan"), 0.0], [1.0, 2.0, 1.5],
                                   [1.0, None, 0.0], [1.0, 2.0]])
def test_saved_layer_statistics_that_no_pass_makes_are_measured_again(model_file, tmp_path,
                                                                      monkeypatch, value):
    out = tmp_path / "out.qlis"
    saved = _interrupted_pack(model_file, out, monkeypatch)
    document = _saved_document(saved)
    key = next(k for k in document["results"] if k.startswith("inspect"))
    document["results"][key][0] = value
    _forge(saved, document)  # NaN as JSON's NaN: Python reads it back
    measured = _count_measures(monkeypatch)
    qlis.pack(load_state_dict(model_file), out, target_bits_per_weight=3, resume=True)
    assert "inspect" in measured


def test_a_folder_under_the_saved_passs_name_is_left_and_the_pack_succeeds(model_file,
                                                                           tmp_path):
    """Removing the saved pass once the archive was published raised IsADirectoryError: the
    command failed (exit 2) after it had replaced the output."""
    out = tmp_path / "out.qlis"
    mine = tmp_path / ".out.qlis-pass1.json"
    mine.mkdir()
    (mine / "keep").write_text("the user's")
    result = run(cli, "pack", model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (mine / "keep").read_text() == "the user's"


def test_a_complete_set_of_shards_replaces_an_earlier_sets_and_keeps_other_files(
        model_file, tmp_path):
    """As save_pretrained does: the index names the new set only, and the earlier set's shards
    are removed once it is complete, with a model.safetensors, which loaders read before an
    index (it stood in for the new set); other files stay."""
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("model-00001-of-00009.safetensors", "model-00009-of-00009.safetensors",
                 "config.json", "model-notes.safetensors", "model.safetensors"):
        (folder / name).write_text("earlier")
    result = run(cli, "unpack", archive, "-o", folder, "--max-shard-size", "1GB", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model-notes.safetensors",
        "model.safetensors.index.json"]
    unpacked, stored = load_state_dict(folder), qlis.load(archive)
    assert all(torch.equal(unpacked[name], tensor) for name, tensor in stored.items())


@pytest.mark.parametrize("name", ["out.safetensors", "out.PT"])
def test_shards_are_not_written_into_a_new_folder_named_as_a_file(model_file, tmp_path, name):
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    result = run(cli, "unpack", archive, "-o", tmp_path / name, "--max-shard-size", "1GB")
    assert result.exit_code == 2 and "writes a folder of shards; name it without" in (
        result.stderr)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("taken", ["model.safetensors.index.json",
                                   "model-00001-of-00001.safetensors"])
def test_a_name_of_the_set_taken_by_a_folder_is_refused_before_any_shard_is_written(
        model_file, tmp_path, taken):
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    folder = tmp_path / "out"
    (folder / taken).mkdir(parents=True)
    result = run(cli, "unpack", archive, "-o", folder, "--max-shard-size", "1GB", "--force")
    assert result.exit_code == 2
    assert f"{folder / taken}: is not a file the new set can replace" in result.stderr
    assert [p.name for p in folder.iterdir()] == [taken]


def test_replaced_shards_keep_their_modes_without_setuid(model_file, tmp_path):
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    folder = tmp_path / "out"
    args = ("unpack", archive, "-o", folder, "--max-shard-size", "1GB", "--force")
    assert run(cli, *args).exit_code == 0
    shard = folder / "model-00001-of-00001.safetensors"
    os.chmod(shard, 0o4640)
    assert run(cli, *args).exit_code == 0
    assert stat.S_IMODE(os.stat(shard).st_mode) == 0o640


def test_two_sharded_unpacks_into_one_folder_leave_one_whole_set(tmp_path, monkeypatch):
    """Their hidden shards had the same names and their renames interleaved: a set of shards
    from both archives, one command exiting 0."""
    replace = os.replace

    def slow_replace(source, target):  # renames far apart: the other writer's come between
        replace(source, target)
        time.sleep(0.02)

    monkeypatch.setattr(os, "replace", slow_replace)
    folder = tmp_path / "out"
    folder.mkdir()
    states = [{f"t{i}": torch.full((64, 64), float(k)) for i in range(6)} for k in (1, 2)]
    layout = [(name, "float32", [64, 64]) for name in states[0]]

    def unpack(state):
        def read(name):
            yield state[name].reshape(-1)

        write_sharded_safetensors(folder, layout, read, 20_000)

    threads = [threading.Thread(target=unpack, args=(state,)) for state in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    values = {float(load_file(folder / shard)[name][0, 0])
              for name, shard in index["weight_map"].items()}
    assert len(values) == 1 and not list(folder.glob(".*"))


def test_a_failed_sharded_unpack_leaves_the_folder_as_it_was(model_file, tmp_path,
                                                              monkeypatch):
    """A corrupt stream found while decoding the 3rd tensor left the shards before it in the
    folder, with no index; a folder made for the shards stayed behind."""
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model-00001-of-00003.safetensors").write_text("the user's")
    calls = [0]
    read_pieces = qlis.Archive.read_pieces

    def failing(self, name):
        calls[0] += 1
        if calls[0] == 3:
            raise InputError("corrupt 'ans' stream (simulated)")
        return read_pieces(self, name)

    monkeypatch.setattr(qlis.Archive, "read_pieces", failing)
    for folder, force in ((tmp_path / "fresh", ()), (existing, ("--force",))):
        calls[0] = 0
        result = run(cli, "unpack", archive, "-o", folder, "--max-shard-size", "1KB", *force)
        assert result.exit_code == 2 and "simulated" in result.output
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in existing.iterdir()] == ["model-00001-of-00003.safetensors"]
    assert (existing / "model-00001-of-00003.safetensors").read_text() == "the user's"


def _full_set(folder: Path) -> dict[str, float]:
    """The first value of each tensor of the shard set in ``folder``, read through its index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return {name: float(load_file(folder / shard)[name][0, 0])
            for name, shard in index["weight_map"].items()}


def test_ctrl_c_while_the_shards_take_their_names_waits_for_the_whole_set(tmp_path,
                                                                          monkeypatch):
    """Ctrl-C between two of the renames that publish a set left the new first shard beside
    the earlier set's others (the same names) and index: a model of two archives, which
    loaded without a word. Held back, the interrupt comes once the set is whole."""
    layout = [(f"t{i}", "float32", [64, 64]) for i in range(4)]

    def unpack(value: float) -> None:
        write_sharded_safetensors(tmp_path, layout, lambda _: torch.full((64, 64), value),
                                  20_000)

    unpack(1.0)
    replace, renamed = os.replace, []

    def replace_then_interrupt(source, target):
        replace(source, target)
        if Path(target).name.startswith("model-"):
            renamed.append(target)
            if len(renamed) == 1:
                signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, right then

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        unpack(2.0)
    assert len(renamed) == 4 and set(_full_set(tmp_path).values()) == {2.0}
    assert not list(tmp_path.glob(".*"))


def test_a_set_that_appeared_while_shards_were_written_is_kept_without_force(
        model_file, tmp_path, monkeypatch):
    """Without --force the folder was checked empty before the work, then whatever appeared
    in it meanwhile (another unpack's set) was replaced without a word; a single-file unpack
    refuses that ("appeared while it was being written")."""
    archive = tmp_path / "m.qlis"
    qlis.pack(load_state_dict(model_file), archive)
    folder = tmp_path / "out"
    read_pieces = qlis.Archive.read_pieces

    def meanwhile(self, name):
        if not (folder / "model.safetensors.index.json").exists():  # the other unpack's
            save_file({"other": torch.ones(2, 2)}, folder / "model-00001-of-00001.safetensors")
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"other": "model-00001-of-00001.safetensors"}}))
        return read_pieces(self, name)

    monkeypatch.setattr(qlis.Archive, "read_pieces", meanwhile)
    result = run(cli, "unpack", archive, "-o", folder, "--max-shard-size", "1GB")
    assert result.exit_code == 2 and "appeared while the shards were being written" in (
        result.stderr)
    assert _full_set(folder) == {"other": 1.0}
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_finished_shards_a_killed_unpack_left_are_removed_by_a_later_write(tmp_path,
                                                                           monkeypatch):
    """The hidden shards of an unpack killed before its set was complete (SIGKILL, the OOM
    killer), each a whole shard, were named as no clean-up knew them and stayed for ever."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    layout = [("a", "float32", [64, 64]), ("b", "float32", [64, 64])]

    def killed_at_b(name):
        if name == "b":
            raise InputError("killed (simulated)")
        return torch.ones(64, 64)

    with monkeypatch.context() as killed:
        killed.setattr(os, "getpid", lambda: dead.pid)  # it wrote them, and is gone
        killed.setattr(qlis.models.checkpoints, "_remove", lambda paths: None)  # no clean-up
        with pytest.raises(InputError, match="simulated"):
            write_sharded_safetensors(tmp_path, layout, killed_at_b, 20_000)
    left = list(tmp_path.glob(".*"))
    assert left
    for path in left:
        old = time.time() - STALE_SECONDS - 60
        os.utime(path, (old, old))
    write_sharded_safetensors(tmp_path, layout, lambda _: torch.ones(64, 64), 20_000)
    assert not list(tmp_path.glob(".*")) and set(_full_set(tmp_path)) == {"a", "b"}


def test_the_cli_resumes_an_interrupted_pack(model_file, tmp_path, monkeypatch):
    out = tmp_path / "out.qlis"
    with monkeypatch.context() as patch:
        _interrupt_second_pass(patch)
        interrupted = run(cli, "pack", model_file, "-o", out)
        assert isinstance(interrupted.exception, Interrupted) and not out.exists()
    measured = _count_measures(monkeypatch)
    result = run(cli, "pack", model_file, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert measured == [] and "real ratio" in result.output


def test_ordered_map_keeps_the_cost_in_flight_within_the_budget():
    costs = [5, 1, 1, 9, 2, 2, 2, 8, 1, 1, 3, 3]
    budget = 6
    lock = threading.Lock()
    running: list[int] = []
    seen: list[list[int]] = []
    beside = threading.Event()

    def fn(i: int) -> int:
        with lock:
            running.append(i)
            seen.append(list(running))
        if costs[i] <= budget / 2:
            beside.set()
        if i == 0:  # the first large item: a small one starts while it runs
            assert beside.wait(10), "no small item ran beside the large one"
        time.sleep(0.002)
        with lock:
            running.remove(i)
        return i

    out = list(ordered_map(fn, range(len(costs)), jobs=4, cost=costs.__getitem__,
                           budget=budget))
    assert out == list(range(len(costs)))
    large = [[i for i in at_once if costs[i] > budget / 2] for at_once in seen]
    small = [sum(costs[i] for i in at_once if costs[i] <= budget / 2) for at_once in seen]
    assert max(map(len, large)) == 1  # the large items (5, 9, 8) one at a time
    assert max(small) <= budget


def test_a_mapped_tensor_is_copy_on_write_and_a_file_cut_after_opening_is_refused(
        state, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    before = path.read_bytes()
    mapped = load_state_dict(path)
    embed = mapped["embed.weight"]  # 2 MiB: mapped from the file, not read
    assert same_tensor(embed, state["embed.weight"])
    embed.add_(1.0)
    assert path.read_bytes() == before and same_tensor(mapped["embed.weight"],
                                                       state["embed.weight"])
    with path.open("r+b") as f:
        f.truncate(len(before) - 4096)
    with pytest.raises(qlis.InputError, match="changed while qlis read it"):
        mapped["embed.weight"]
