"""The grid contract: grids round and decode consistently (per block, per column, transposed),
every built-in quantizer is its grid, and a quantizer defined here, not in qlis, works end to
end: compress, error feedback, save, load and the low-bit runtime."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlis
import qlis.quantize.grid
from qlis.quantize.grid import AffineGrid, CodebookGrid, matrix_shape
from qlis.quantize.quantizers import QuantizedTensor, Quantizer, get_quantizer, quantizer_registry
from qlis.runtime import lowbit as runtime

BUILTIN = [
    {"id": "affine", "bits": 3}, {"id": "affine", "bits": 5, "granularity": "channel"},
    {"id": "uniform", "rel_mse": 1e-3}, {"id": "uniform", "step": 0.3, "rounding": 0.3},
    {"id": "group", "bits": 4, "group_size": 8}, {"id": "group", "bits": 3, "symmetric": True},
    {"id": "kmeans", "bits": 3}, {"id": "binary"}, {"id": "binary", "granularity": "channel"},
]


def weight_with_zeros(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.15, 0.0, weight)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BUILTIN), st.sampled_from([(5,), (4, 9), (3, 2, 3, 3), (7, 20)]),
       st.integers(0, 2**31 - 1))
def test_every_builtin_quantizer_is_its_grid(config, shape, seed):
    """Codes are the grid's rounding of the weight; values are the grid's decoding."""
    weight = weight_with_zeros(shape, seed)
    q = get_quantizer(config).quantize(weight)
    grid = q.grid
    matrix = weight.reshape(matrix_shape(shape))
    codes = q.matrix_codes().float()
    offset = 0.0
    if q.quantizer["id"] == "uniform":  # an unbounded grid: codes rebased to start at 0
        offset = float(q.params["offset"][0])
        grid = get_quantizer(config).grid(q.shape, q.n_levels,
                                          {**q.params, "offset": np.zeros(1, np.float32)})
    assert torch.equal(grid.encode(matrix) + offset, codes)
    assert torch.equal(q.grid.decode(codes).reshape(shape), q.dequantize())
    assert bool((q.dequantize()[weight == 0] == 0).all())
    for j in range(matrix.shape[1]):  # a column's grid rounds that column alike
        assert torch.equal(q.grid.column(j).encode(matrix[:, j:j + 1])[:, 0],
                           q.grid.encode(matrix)[:, j])
    transposed = q.grid.transposed()
    assert torch.equal(transposed.encode(matrix.T), q.grid.encode(matrix).T)
    assert torch.equal(transposed.decode(codes.T), q.grid.decode(codes).T)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 17), st.integers(1, 4), st.integers(1, 6),
       st.integers(0, 2**31 - 1))
def test_affine_blocks_round_to_nearest_within_range(rows, cols, br, bc, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = (-(-rows // br), -(-cols // bc))
    scale = torch.rand(blocks, generator=gen) + 0.1
    zero = torch.randint(0, 8, blocks, generator=gen).float()
    grid = AffineGrid((br, bc), scale, zero, top=7)
    grid.check((rows, cols))
    full_scale = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    full_zero = zero.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    inside = (torch.rand(rows, cols, generator=gen) * 7 - full_zero) * full_scale
    codes = grid.encode(inside)
    assert bool(((codes >= 0) & (codes <= 7)).all())
    assert bool(((grid.decode(codes) - inside).abs() <= full_scale / 2 * (1 + 1e-5)).all())
    assert torch.equal(grid.decode(codes), (codes - full_zero) * full_scale)


def test_codebook_rounds_to_the_nearest_entry_and_keeps_an_exclusive_zero():
    book = torch.tensor([[[-1.0, 0.0, 2.0]], [[-3.0, 0.0, 3.0]]])  # one codebook per row
    grid = CodebookGrid((1, 4), book, zero_code=1)
    values = torch.tensor([[-0.6, -0.4, 0.0, 1.1], [-1.4, 1.6, 0.0, 9.0]])
    assert grid.encode(values).tolist() == [[0, 1, 1, 2], [1, 2, 1, 2]]
    exclusive = CodebookGrid((1, 4), book, zero_code=1, exclusive_zero=True)
    assert exclusive.encode(values).tolist() == [[0, 0, 1, 2], [0, 2, 1, 2]]
    assert grid.decode(torch.tensor([[0, 1, 2, 2], [0, 0, 1, 2]])).tolist() == [
        [-1.0, 0.0, 2.0, 2.0], [-3.0, -3.0, 0.0, 3.0]]


def test_parameters_that_do_not_fit_the_grid_are_refused():
    q = get_quantizer({"id": "group", "bits": 4, "group_size": 4}).quantize(torch.randn(3, 8))
    q.params["scale"] = q.params["scale"][:2]
    with pytest.raises(qlis.ArchiveError, match="holds 4 values"):
        q.dequantize()
    with pytest.raises(qlis.ArchiveError, match="parameter blocks"):
        AffineGrid((1, 4), torch.ones(3, 1), torch.zeros(3, 1)).check((3, 8))


class BlockTernaryQuantizer(Quantizer):
    """A user's quantizer, defined here and not in qlis: ternary codes {-s, 0, +s} with one
    float32 scale per block of 2 rows x 8 columns (a block no built-in quantizer uses)."""

    strategy_id = "test-block-ternary"

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        matrix = weight.detach().float().reshape(matrix_shape(weight.shape))
        blocks = (-(-matrix.shape[0] // 2), -(-matrix.shape[1] // 8))
        padded = torch.zeros(blocks[0] * 2, blocks[1] * 8)
        padded[: matrix.shape[0], : matrix.shape[1]] = matrix.abs()
        peak = padded.reshape(blocks[0], 2, blocks[1], 8).amax(dim=(1, 3))
        params = {"scale": torch.where(peak > 0, peak * 0.6, 1.0).numpy()}
        codes = self.grid(tuple(weight.shape), 3, params).encode(matrix)
        return QuantizedTensor(codes.to(torch.uint8).reshape(weight.shape).numpy(), 3,
                               self.get_config(), params, weight.dtype)

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> AffineGrid:
        scale = torch.from_numpy(np.asarray(params["scale"], dtype=np.float32))
        return AffineGrid((2, 8), scale, torch.ones_like(scale), top=2)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 32), nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def third_party(monkeypatch):
    monkeypatch.setattr(quantizer_registry, "_classes", dict(quantizer_registry._classes))
    qlis.register_quantizer(BlockTernaryQuantizer)


def test_a_third_party_quantizer_works_end_to_end(tmp_path, third_party):
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(64, 24) @ torch.randn(24, 24)  # correlated inputs: feedback has work
    config = {"id": "test-block-ternary"}
    plain = qlis.compress(model, "quant", quantizer=config)
    fed = qlis.compress(model, "quant", quantizer=config, calib=[x], error_feedback=True)
    reference = model(x)
    errors = {}
    for label, result in (("plain", plain), ("fed", fed)):
        path = qlis.save(result, tmp_path / f"{label}.qlis")
        state = qlis.load(path)
        for name, tensor in result.state_dict().items():
            assert torch.equal(state[name], tensor)
        with torch.device("meta"):
            low = Tiny().eval()
        qlis.load(path, model=low, runtime="lowbit")
        assert isinstance(low.fc1, runtime.DequantLinear)
        assert isinstance(low.fc2, runtime.DequantLinear)
        dense = Tiny().eval()
        dense.load_state_dict(state)
        with torch.no_grad():
            assert torch.equal(low(x), dense(x))
            errors[label] = float((dense(x) - reference).square().mean())
    assert errors["fed"] < errors["plain"]
    with qlis.open(tmp_path / "fed.qlis") as archive:
        assert {row["path"] for row in runtime.runtime_plan(archive)} == {"dequant"}


def test_a_codebook_out_of_order_or_with_a_false_zero_code_is_refused():
    """Nearest-entry rounding and `neighbour` assume each block's entries sorted and the zero
    code holding 0.0: error feedback on such a grid rounded to the wrong entries, silently."""
    good = torch.tensor([[[-1.0, 0.0, 2.0]], [[-3.0, 0.0, 3.0]]])
    CodebookGrid((1, 4), good, zero_code=1).check((2, 4))
    with pytest.raises(qlis.ArchiveError, match="sorted"):
        CodebookGrid((1, 4), good[..., [0, 2, 1]]).check((2, 4))
    for zero_code in (0, 3, -1):
        with pytest.raises(qlis.ArchiveError, match="zero code"):
            CodebookGrid((1, 4), good, zero_code=zero_code).check((2, 4))
    with pytest.raises(qlis.ArchiveError, match="codebook must be"):
        CodebookGrid((1, 4), good[0]).check((2, 4))


class OwnDequantize(BlockTernaryQuantizer):
    """A user's quantizer whose dequantize does not follow its own grid."""

    strategy_id = "test-own-dequantize"

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return (super().dequantize(q) * 1.5).to(q.dtype)


class UnsortedCodebook(Quantizer):
    """A user's quantizer whose codebook grid lists its entries out of order (``how``), or
    holds more entries than its codes have levels."""

    strategy_id = "test-codebook"

    def __init__(self, how: str = "unsorted") -> None:
        self.how = how

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        matrix = weight.detach().float().reshape(matrix_shape(weight.shape))
        peak = float(matrix.abs().max())
        book = np.linspace(-peak, peak, 8 if self.how == "more entries" else 4)
        if self.how == "unsorted":
            book = book[[0, 2, 1, 3]]
        params = {"codebook": book.astype(np.float32)}
        codes = self.grid(tuple(weight.shape), 4, params).encode(matrix).clamp(0, 3)
        return QuantizedTensor(codes.to(torch.uint8).reshape(weight.shape).numpy(), 4,
                               self.get_config(), params, weight.dtype)

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> CodebookGrid:
        rows, cols = matrix_shape(shape)
        book = torch.from_numpy(np.asarray(params["codebook"], np.float32))
        return CodebookGrid((max(rows, 1), max(cols, 1)), book.reshape(1, 1, -1))


def test_a_dequantize_that_does_not_follow_its_grid_is_refused(third_party):
    """The state dict and ``qlis.load`` took the quantizer's dequantize, the reported error,
    ``qlis unpack`` and the low-bit runtime its grid: the same archive computed differently
    (1.0 apart on a Linear's outputs), silently."""
    qlis.register_quantizer(OwnDequantize)
    with pytest.raises(qlis.ConfigError, match=r"fc1.weight: quantizer 'test-own-dequantize': "
                                               r"its dequantize gives other values"):
        qlis.compress(Tiny().eval(), "quant", quantizer={"id": "test-own-dequantize"})


@pytest.mark.parametrize(("how", "match"), [
    ("unsorted", "sorted, lowest first"),
    ("more entries", "its grid decodes 8 codes but its codes have 4 levels"),
])
def test_error_feedback_refuses_a_grid_it_cannot_round_to(third_party, how, match):
    """Error feedback took a user's grid as it came: an unsorted codebook rounded weights to
    the wrong entries, silently; more entries than levels gave codes past them."""
    qlis.register_quantizer(UnsortedCodebook)
    torch.manual_seed(0)
    x = torch.randn(64, 24)
    with pytest.raises(qlis.ConfigError, match=f"fc1.weight: quantizer 'test-codebook'.*{match}"):
        qlis.compress(Tiny().eval(), "quant", quantizer={"id": "test-codebook", "how": how},
                      calib=[x], error_feedback=True)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 23), st.integers(0, 37), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]),
       st.booleans(), st.booleans(), st.integers(-30, 10), st.integers(0, 2**31 - 1))
def test_affine_decode_of_integer_codes_is_that_of_float_codes(
        rows, cols, br, bc, param_dtype, code_dtype, one_row_of_blocks, transposed, exponent,
        seed):
    """Integer codes decode in a compiled pass; float codes in torch's steps. Both give the
    same bits: every block size and edge, parameters broadcast over the rows, float16 and
    bfloat16 parameters, codes far from the zero point, strided codes, empty matrices."""
    gen = torch.Generator().manual_seed(seed)
    blocks = (1 if one_row_of_blocks else -(-rows // min(br, max(rows, 1))),
              -(-cols // min(bc, max(cols, 1))))
    scale = (torch.randn(blocks, generator=gen) * 2.0**exponent).to(param_dtype)
    zero = torch.randint(-300, 70000, blocks, generator=gen).float().to(param_dtype)
    top = 255 if code_dtype == torch.uint8 else 32767
    shape = (cols, rows) if transposed else (rows, cols)
    codes = torch.randint(0, top + 1, shape, generator=gen).to(code_dtype)
    codes = codes.T if transposed else codes
    grid = AffineGrid((br, bc), scale, zero)
    ours, torchs = grid.decode(codes), grid.decode(codes.float())
    assert ours.dtype == torchs.dtype == torch.float32 and ours.shape == torchs.shape
    assert torch.equal(ours.contiguous().view(torch.int32), torchs.contiguous().view(torch.int32))


def test_docstring_examples():
    result = doctest.testmod(qlis.quantize.grid, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


def test_a_block_larger_than_the_matrix_allocates_nothing_more(monkeypatch):
    """A crafted group size of 2**26 on a small tensor decodes without padding to it."""
    q = get_quantizer({"id": "group", "bits": 4, "group_size": 1 << 26}).quantize(
        torch.randn(3, 40))
    assert q.params["scale"].shape == (3, 1)
    padded = []
    original = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad",
                        lambda x, pad, *a, **k: padded.append(pad) or original(x, pad, *a, **k))
    assert q.dequantize().shape == (3, 40) and not padded
