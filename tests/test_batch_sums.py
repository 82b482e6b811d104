"""Sums over calibration batches that are the same bits however the batches are split over
ranks (`qlis.measure.batch_sums`), the layer messages ranks exchange, and the pieces of a
calibrated job that need no process group."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlis
from qlis.errors import ClusterError, ConfigError
from qlis.measure import batch_sums, layer_inputs
from qlis.measure.batch_sums import FixedPointSum, OrderedSum, gather_totals
from qlis.measure.calibrate import Calibration
from qlis.measure.layer_inputs import float64_parts
from qlis.models.tensors import same_bits
from qlis.plan.layer_message import error_message, layer_message, read_layer_message
from qlis.quantize import reconstruct as rec
from qlis.workers.cluster import Cluster


def _parts(seed: int, count: int, width: int = 6) -> list[torch.Tensor]:
    """Parts of input rows of very different scales: float sums of their X^T X depend on the
    order they are added in."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, width, generator=gen, dtype=torch.float64) * 10.0 ** (i % 7 - 3)
            for i in range(count)]


def _trace(rows: torch.Tensor) -> float:
    return float(rows.square().sum())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), count=st.integers(1, 12), data=st.data())
def test_a_fixed_point_sum_is_the_same_bits_in_any_order_and_split(seed, count, data):
    parts = _parts(seed, count)
    largest = max(_trace(rows) for rows in parts)
    whole = FixedPointSum((1, 6, 6), largest, count)
    for rows in parts:
        whole.add_gram(0, rows, _trace(rows))
    order = data.draw(st.permutations(range(count)))
    cut = data.draw(st.integers(0, count))
    ranks = [FixedPointSum((1, 6, 6), largest, count) for _ in range(2)]
    for position, index in enumerate(order):
        ranks[position >= cut].add_gram(0, parts[index], _trace(parts[index]))
    for mine, theirs in zip(ranks[0].bands, ranks[1].bands, strict=True):
        mine += theirs  # what the ranks' integer reduction (`reduce_onto`) does
    exact = whole.take([5 * count])
    assert torch.equal(ranks[0].take([5 * count]), exact)
    float_sum = torch.stack([rows.T @ rows for rows in parts]).sum(dim=0) / (5 * count)
    assert exact.dtype == torch.float32
    assert torch.allclose(exact.double(), float_sum, rtol=1e-6, atol=1e-7 * largest)
    assert torch.equal(exact, exact.T)  # mirrored from the upper triangle


def test_a_wide_sum_is_added_a_band_at_a_time_and_mirrored(monkeypatch):
    monkeypatch.setattr(batch_sums, "_CHUNK", 3 * 10)  # bands of 3 rows of a width of 10
    parts = _parts(1, 3, width=10)
    largest = max(_trace(rows) for rows in parts)
    grid = FixedPointSum((2, 10, 10), largest, 3)
    assert [tuple(band.shape) for band in grid.bands] == [(2, 3, 10), (2, 3, 7), (2, 3, 4),
                                                          (2, 1, 1)]  # upper triangle only
    for group, rows in zip((1, 0, 1), parts, strict=True):  # every term through one buffer
        grid.add_gram(group, rows, _trace(rows))
    total = grid.take([1, 2])
    assert grid.bands is None  # freed as they were converted
    expected = [parts[1].T @ parts[1], (parts[0].T @ parts[0] + parts[2].T @ parts[2]) / 2]
    for group in (0, 1):
        assert torch.allclose(total[group].double(), expected[group], rtol=1e-6,
                              atol=1e-7 * largest)
        assert torch.equal(total[group], total[group].T)


def test_float64_parts_are_the_rows_a_bounded_part_at_a_time(monkeypatch):
    monkeypatch.setattr(layer_inputs, "PART_ELEMENTS", 2 * 3)  # parts of 2 rows of width 3
    rows = torch.randn(5, 3)
    parts = [part.clone() for part in float64_parts(rows)]  # one buffer: each valid in turn
    assert [len(part) for part in parts] == [2, 2, 1]
    assert torch.equal(torch.cat(parts), rows.double())
    wide = rows.double()
    assert all(part.data_ptr() == wide[2 * i].data_ptr()  # already float64: no copy
               for i, part in enumerate(float64_parts(wide)))
    assert list(float64_parts(torch.empty(0, 3))) == []


def test_a_term_beyond_the_grid_is_not_added_and_says_how_large_it_was():
    parts = _parts(0, 3)
    traces = [_trace(rows) for rows in parts]
    grid = FixedPointSum((1, 6, 6), min(traces), 3)
    big = parts[0] * 2.0 ** (batch_sums.HEADROOM_BITS / 2 + 1)
    grid.add_gram(0, big, _trace(big))
    grid.add_gram(0, parts[1], float("nan"))
    assert grid.overflow == float("inf")
    assert torch.equal(grid.take([3]), torch.zeros(6, 6))  # one group: no group axis


def _thread_ranks(world: int) -> list[Cluster]:
    """Ranks in threads of this process that exchange bytes as the real ones do."""
    board: list[bytes | None] = [None] * world
    barrier = threading.Barrier(world, timeout=30)

    class ThreadRank(Cluster):
        def all_gather_bytes(self, data: bytes) -> list[bytes]:
            board[self.rank] = data
            barrier.wait()
            seen = list(board)
            barrier.wait()
            return seen

    return [ThreadRank(rank, world) for rank in range(world)]


def _on_ranks(world: int, work) -> list:
    results: list = [None] * world
    errors: list[BaseException] = []

    def run(rank: Cluster) -> None:
        try:
            results[rank.rank] = work(rank)
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in _thread_ranks(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_ordered_sums_over_ranks_are_the_bits_of_one_process(world):
    gen = torch.Generator().manual_seed(world)
    values = [torch.randn(4, generator=gen, dtype=torch.float64) * 10.0 ** (i % 9 - 4)
              for i in range(11)]
    one = OrderedSum((4,))
    for i, value in enumerate(values):
        one.add((i,), value)
    assert not torch.equal(one.total(), sum(reversed(values)))  # the order matters here

    def rank_part(rank: Cluster) -> torch.Tensor:
        mine = OrderedSum((4,), distributed=True)
        for i in range(rank.rank, len(values), rank.world):  # any split: keys say the order
            mine.add((i,), values[i])
        gather_totals(rank, [mine])
        return mine.total()

    assert all(torch.equal(total, one.total()) for total in _on_ranks(world, rank_part))


def test_ordered_sums_refuse_terms_out_of_order_and_a_batch_two_ranks_measured():
    ordered = OrderedSum((1,))
    ordered.add((2, 0), torch.ones(1))
    with pytest.raises(RuntimeError, match="key order"):
        ordered.add((1, 5), torch.ones(1))

    def same_batch(rank: Cluster) -> None:
        mine = OrderedSum((1,), distributed=True)
        mine.add((0,), torch.ones(1))
        gather_totals(rank, [mine])

    with pytest.raises(ClusterError, match="the same calibration batch"):
        _on_ranks(2, same_batch)


def _sums_message(head: object, tail: bytes = b"") -> bytes:
    text = json.dumps(head).encode()
    return len(text).to_bytes(8, "little") + text + tail


@pytest.mark.parametrize("garble", [
    lambda data: data[:-3],
    lambda data: data + b"\0",
    lambda data: _sums_message([[1, [0]]], bytes(16)),
    lambda data: _sums_message([[-1, [0]]], bytes(16)),
    lambda data: _sums_message([[0, ["x"]]], bytes(16)),
    lambda data: _sums_message({"a": 1}),
    lambda data: b"\xff" * 12,
], ids=["cut", "trailing", "no-such-sum", "negative-sum", "text-key", "dict-head", "bytes"])
def test_garbled_sums_from_a_rank_are_a_cluster_error(garble):
    class Garbling(Cluster):
        def all_gather_bytes(self, data: bytes) -> list[bytes]:
            return [data, garble(data)]

    mine = OrderedSum((2,), distributed=True)
    mine.add((0,), torch.ones(2))
    with pytest.raises(ClusterError, match="rank 1 sent sums that do not parse"):
        gather_totals(Garbling(0, 2), [mine])


def _quantized_layer():
    model = nn.Sequential(nn.Linear(12, 8))
    result = qlis.compress(model, "quant", bits=3)
    layer = result.layers[0]
    return result.tensors[layer.name], layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_message_round_trips_quantized_and_float_layers_with_their_bias(dtype):
    stored, layer = _quantized_layer()
    bias = torch.randn(8).to(dtype)
    got, got_layer, got_bias = read_layer_message(layer_message(stored, layer, bias), 1)
    assert got_layer == layer and torch.equal(got_bias, bias) and got_bias.dtype == dtype
    assert got.quantizer == stored.quantizer and got.n_levels == stored.n_levels
    assert (got.codes == stored.codes).all() and got.codes.dtype == stored.codes.dtype
    assert torch.equal(got.dequantize(), stored.dequantize())
    plain = torch.randn(3, 4).to(dtype)
    got, _, none = read_layer_message(layer_message(plain, layer, None), 1)
    assert torch.equal(got, plain) and got.dtype == dtype and none is None


def test_a_cut_or_garbled_layer_message_is_a_cluster_error_and_an_error_is_raised():
    stored, layer = _quantized_layer()
    message = layer_message(stored, layer, torch.zeros(8))
    for cut in range(0, len(message), 7):
        with pytest.raises(ClusterError, match="rank 1 sent a layer that does not parse"):
            read_layer_message(message[:cut], 1)
    with pytest.raises(ClusterError, match="does not parse"):
        read_layer_message(message + b"\0", 1)
    with pytest.raises(ClusterError, match="^rank 3: the covariance is not positive$"):
        read_layer_message(error_message("the covariance is not positive"), 3)


def test_a_callable_or_too_few_batches_cannot_be_split_over_ranks():
    model = nn.Sequential(nn.Linear(4, 2))
    # refused before any exchange: no process group exists here
    with pytest.raises(ConfigError, match="cannot be split over ranks"):
        Calibration(model, lambda m: m(torch.ones(2, 4)), cluster=Cluster(0, 2))
    with pytest.raises(ConfigError, match="1 calibration batches to fit on for 2 ranks"):
        Calibration(model, [torch.ones(2, 4)], cluster=Cluster(0, 2))


def _wide_mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    return model, [torch.randn(128, 256) for _ in range(4)]


def _small_convnet() -> tuple[nn.Module, list[torch.Tensor]]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),  # depthwise
        nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 8))
    return model, [torch.randn(8, 3, 48, 48) for _ in range(4)]


@pytest.mark.parametrize("make", [_wide_mlp, _small_convnet], ids=["mlp", "convnet"])
def test_a_calibrated_compression_is_the_same_bits_on_one_thread_and_on_two(make):
    """torchrun starts each rank on one thread; one process uses every core. Layers wide
    enough that torch splits their sums (and LAPACK its factorizations) over two threads."""
    torch.manual_seed(0)
    model, batches = make()
    model.eval()
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(qlis.compress(model, calib=batches, target_bits_per_weight=3.0))
    finally:
        torch.set_num_threads(threads)
    one, two = results
    assert one.layers == two.layers  # the measures (weight error, feedback) too
    assert one.distortion["output"] == two.distortion["output"]
    for name, tensor in one.state_dict().items():
        assert same_bits(tensor, two.state_dict()[name]), name


def test_a_grid_the_quantized_inputs_outgrow_is_sized_again_and_the_pass_made_again(
        monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4)).eval()
    batches = [torch.randn(8, 16) for _ in range(4)]
    passes = []
    one_pass = rec._one_pass
    monkeypatch.setattr(rec, "_one_pass", lambda *a: passes.append(1) or one_pass(*a))
    plain = qlis.compress(model, "quant", bits=2, calib=batches)
    groups = len(passes)
    passes.clear()
    monkeypatch.setattr(batch_sums, "HEADROOM_BITS", 0)  # no room above the float inputs
    tight = qlis.compress(model, "quant", bits=2, calib=batches)
    assert len(passes) > groups  # some group's inputs outgrew the float model's
    assert {layer.reconstruction for layer in tight.layers} == {rec.BIAS_CORRECTED}
    cosines = [r.distortion["output"]["cosine"] for r in (plain, tight)]
    assert cosines[1] == pytest.approx(cosines[0], abs=1e-6)


def test_a_sum_of_no_inputs_is_empty():
    grid = FixedPointSum((2, 0, 0), 0.0, 0)
    assert grid.bands == []
    assert grid.take([1, 1]).shape == (2, 0, 0)
