"""Running compressed: low-bit modules compute what the dequantized float model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlis
from qlis.errors import ConfigError, InputError
from qlis.runtime import lowbit as runtime


class Toy(nn.Module):
    """ViT-shaped in miniature: a patch conv, an MLP block, a head."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.fc2(torch.relu(self.fc1(tokens)))
        return self.head(self.norm(tokens).mean(dim=1))


QUANTIZERS = {
    "affine8-channel": ({"id": "affine", "bits": 8, "granularity": "channel"}, "int8"),
    "affine8-tensor": ({"id": "affine", "bits": 8}, "int8"),
    "uniform-8bit": ({"id": "uniform", "step": 0.001}, "int8"),
    "uniform-4bit": ({"id": "uniform", "step": 0.02}, "dequant"),
    "uniform-16bit": ({"id": "uniform", "step": 1e-4, "granularity": "channel"}, "dequant"),
    "group4": ({"id": "group", "bits": 4, "group_size": 32}, "dequant"),
    "group4-symmetric": ({"id": "group", "bits": 4, "group_size": 32, "symmetric": True},
                         "dequant"),
    "kmeans3": ({"id": "kmeans", "bits": 3}, "dequant"),
    "binary": ({"id": "binary"}, "dequant"),
    "affine2": ({"id": "affine", "bits": 2, "granularity": "channel"}, "dequant"),
}


def archive_of(tmp_path, quantizer: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = Toy().eval()
    path = tmp_path / "toy.qlis"
    qlis.save(qlis.compress(model, "quant", quantizer=quantizer), path)
    reference = Toy().eval()
    qlis.load(path, model=reference)
    with torch.device("meta"):
        low = Toy().eval()
    qlis.load(path, model=low, runtime="lowbit")
    return path, reference, low


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_lowbit_model_matches_the_dequantized_model(tmp_path, name):
    quantizer, path = QUANTIZERS[name]
    _, reference, low = archive_of(tmp_path, quantizer)
    assert low.fc1.path == path and low.patch.path == "dequant"
    assert isinstance(low.norm, nn.LayerNorm) and not low.norm.weight.is_meta
    x = torch.randn(2, 3, 16, 16)
    for module in low.modules():  # the head sees 2 rows: make it dequantize too
        if isinstance(module, runtime.Int8Linear):
            module.kernel_max_rows = 0
    with torch.no_grad():
        # the dequantize branch is bit-exact with the float model
        assert torch.equal(low(x), reference(x))
        tokens = torch.randn(3, 64)  # few rows: int8 uses torch's kernel
        expected = F.linear(tokens, reference.fc1.weight, reference.fc1.bias)
        got = low.fc1(tokens)
    if path == "int8":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_lowbit_model_under_bfloat16_autocast_matches_the_float_model_under_it(tmp_path, name):
    """bfloat16 compute (the fast CPU path) rounds what the float model rounds, nothing else:
    the int8 kernel, which would compute in float32, steps aside even for few rows."""
    _, reference, low = archive_of(tmp_path, QUANTIZERS[name][0])
    x = torch.randn(2, 3, 16, 16)
    tokens = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(x), reference(x))
        got, expected = low.fc1(tokens), reference.fc1(tokens)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    with torch.no_grad():
        exact = reference(x)
    torch.testing.assert_close(low(x), exact, rtol=1e-5, atol=1e-5)  # autocast left no trace


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_dequantized_weight_is_the_archive_weight(tmp_path, name):
    path, reference, low = archive_of(tmp_path, QUANTIZERS[name][0])
    with qlis.open(path) as archive:
        for layer in ("patch", "fc1", "fc2", "head"):
            expected = archive.read(f"{layer}.weight")
            assert torch.equal(getattr(low, layer).dequantized_weight(), expected)
            assert torch.equal(getattr(low, layer).weight, expected)  # code reading .weight


@pytest.mark.parametrize("name", ["affine8-channel", "group4", "kmeans3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_converted_lowbit_model_computes_as_the_converted_float_model(tmp_path, name, dtype):
    """``.to(dtype)`` builds the weight in that dtype, as it converts a float layer's weight,
    and leaves the codes and grid exact: converting back restores the float32 model."""
    _, reference, low = archive_of(tmp_path, QUANTIZERS[name][0])
    layers = ("patch", "fc1", "fc2", "head")
    weights = {layer: getattr(low, layer).weight for layer in layers}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        exact = low(x)
        # not torch.equal: float64 F.linear's sums vary with the weight's address here
        torch.testing.assert_close(low.to(dtype)(x.to(dtype)), reference.to(dtype)(x.to(dtype)))
        assert low.fc1.weight.dtype == dtype
        low.float()  # the float layer's weight stays rounded; the codes lost nothing
        assert all(torch.equal(getattr(low, layer).weight, weights[layer]) for layer in layers)
        if dtype == torch.float64:  # nothing else was rounded either: the same model
            torch.testing.assert_close(low(x), exact, rtol=0, atol=0)


def test_backward_through_the_int8_kernel_branch_reaches_the_input(tmp_path):
    """A few rows take torch's int8 kernel, which has no derivative: with an input that needs
    a gradient the layer dequantizes instead, and the gradient is the float model's."""
    _, reference, low = archive_of(tmp_path, QUANTIZERS["affine8-channel"][0])
    grads = []
    for model in (reference, low):
        tokens = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
        tokens.requires_grad_(True)
        model.fc1(tokens).square().sum().backward()
        grads.append(tokens.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_int8_kernel_branch_handles_an_uncentred_zero_point():
    """Codes far from 128 and zero points far from 128: the correction term carries them."""
    weight = torch.rand(32, 48) * 3 + 1  # all positive: zero point 0, codes 0..255
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(weight)
    module = runtime.Int8Linear(q, torch.randn(32))
    x = torch.randn(4, 48)
    expected = F.linear(x, q.dequantize(), module.bias)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-4)
    module.kernel_max_rows = 0
    assert torch.equal(module(x), expected)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_int8_kernel_branch_keeps_a_row_of_zeros_zero(granularity):
    """A zero-initialised layer (or a dead row) has codes and zero point 0: an offset of 128
    cancelled 128 sum(x) scale against itself, 0.875 where the layer gives 0 (inputs 1e4)."""
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    weight[3] = 0
    if granularity == "tensor":
        weight.zero_()
    q = qlis.AffineQuantizer(bits=8, granularity=granularity).quantize(weight)
    module = runtime.Int8Linear(q, None)
    x = torch.rand(4, 64) * 1e4
    assert x.abs().amax() <= module.kernel_input_limit  # the kernel branch
    out = module(x)
    assert torch.equal(out[:, 3], torch.zeros(4))
    terms = F.linear(x, q.dequantize().abs()).amax()  # float32 rounding is relative to these
    torch.testing.assert_close(out, F.linear(x, q.dequantize()), rtol=0, atol=1e-6 * terms)


def test_zero_points_past_float32_integers_take_the_dequantize_path():
    """A valid archive's offset of -3e9 made offset - zero round apart from code - zero: the
    int8 module's weight was 1 ulp off the archive's in a quarter of the layer."""
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(16, 32))
    assert runtime.choose_path(q.grid, q.n_levels, q.shape) == "int8"
    far = q.grid.replace(zero=q.grid.zero + 3e9)
    assert runtime.choose_path(far, q.n_levels, q.shape) == "dequant"


def test_int8_kernel_branch_gives_what_float_gives_for_infinite_and_huge_inputs():
    """The kernel's terms are larger than the result they cancel to: an inf made NaN, 3e37
    made infinities of either sign, where F.linear gives +-inf and numbers near 1e37."""
    torch.manual_seed(0)
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(32, 32))
    module = runtime.Int8Linear(q, torch.randn(32))
    weight = q.dequantize()
    infinite = torch.randn(1, 32)
    infinite[0, 3] = float("inf")
    for x in (infinite, torch.full((2, 32), 3e37), torch.full((1, 32), -1e36)):
        expected = F.linear(x, weight, module.bias)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=0, equal_nan=True)
    assert 1e30 < module.kernel_input_limit < 3e37  # ordinary inputs still take the kernel


def test_int8_kernel_branch_keeps_tiny_weights_against_huge_inputs_finite():
    """The kernel sums the inputs against the int8 codes before it scales them: with scales
    of 1e-22 the sum of inputs of 1e37 overflowed where the layer's outputs are near 1e17."""
    torch.manual_seed(0)
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(4, 64) * 1e-20)
    module = runtime.Int8Linear(q, None)
    x = torch.full((1, 64), 1e37)
    expected = F.linear(x, q.dequantize())
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=0)
    assert module.kernel_input_limit > 1e30  # ordinary inputs still take the kernel


def test_int8_kernel_branch_reads_inputs_of_any_layout():
    """The kernel reads its input's rows as laid out in memory: a transposed or strided
    input of a few rows was a RuntimeError ("A must be contiguous on the last dimension")."""
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(5, 8))
    module = runtime.Int8Linear(q, torch.randn(5))
    wide = torch.randn(8, 4)
    for x in (wide.t(), torch.randn(4, 16)[:, ::2], wide[:1, :1].expand(3, 8)):
        assert x.stride(-1) != 1
        torch.testing.assert_close(module(x), F.linear(x.contiguous(), q.dequantize(),
                                                       module.bias), rtol=1e-5, atol=1e-5)


def test_int8_codes_take_one_byte_per_weight_while_packing(monkeypatch):
    """``code - offset`` was computed through int16 codes and float32 offsets (4 bytes per
    weight, more than the float runtime's weight): every tensor made while packing is now
    at most a byte per weight."""
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(64, 96))
    made = []
    sub = torch.Tensor.sub

    def recorded(self, *args, **kwargs):
        out = sub(self, *args, **kwargs)
        made.append(out.element_size() * out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "sub", recorded)
    module = runtime.Int8Linear(q, None)
    monkeypatch.undo()
    assert made and max(made) <= q.codes.size
    assert torch.equal(module.dequantized_weight(), q.dequantize())


@pytest.mark.parametrize("name", ["affine8-channel", "group4"])
def test_torch_func_transforms_run_through_packed_layers(tmp_path, name):
    """grad and jacrev met numba's decode (tensors without storage), vmap the int8 branch's
    test of the inputs' magnitude (data-dependent control flow): both now stay in torch ops."""
    _, reference, low = archive_of(tmp_path, QUANTIZERS[name][0])
    x = torch.randn(5, 64)
    for transform in (lambda f: torch.func.vmap(f)(x), lambda f: torch.func.jacrev(f)(x[0]),
                      lambda f: torch.func.grad(lambda v: f(v).sum())(x)):
        torch.testing.assert_close(transform(low.fc1), transform(reference.fc1),
                                   rtol=1e-5, atol=1e-5)


def test_packed_linears_keep_their_features_and_parameters_their_identity(tmp_path):
    """A head reads ``in_features``; an optimizer made before loading holds the model's own
    tensors: the float parameters are copied into, not replaced, as the float runtime does."""
    path, reference, _ = archive_of(tmp_path, QUANTIZERS["group4"][0])
    model = Toy().eval()
    norm_bias = model.norm.bias
    qlis.load(path, model=model, runtime="lowbit")
    assert (model.fc1.in_features, model.fc1.out_features) == (64, 128)
    assert model.norm.bias is norm_bias and torch.equal(norm_bias, reference.norm.bias)


def test_a_module_registered_twice_is_packed_once_under_both_names(tmp_path):
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    path = tmp_path / "twice.qlis"
    qlis.save(qlis.compress(model, "quant", quantizer=QUANTIZERS["group4"][0]), path)
    reference = nn.Sequential(shared2 := nn.Linear(32, 32), nn.ReLU(), shared2)
    qlis.load(path, model=reference)
    qlis.load(path, model=model, runtime="lowbit")
    assert isinstance(model[0], runtime.DequantLinear) and model[2] is model[0]
    x = torch.randn(3, 32)
    assert torch.equal(model(x), reference(x))


def test_a_packed_model_is_refused_by_compress(tmp_path):
    """Its codes and grid scales would be quantized as weights: wrong outputs, no error."""
    _, _, low = archive_of(tmp_path, QUANTIZERS["group4"][0])
    with pytest.raises(InputError, match=r"'patch' runs packed .* runtime=.float."):
        qlis.compress(low)


def test_an_input_of_the_wrong_width_gets_the_message_a_linear_layer_gives():
    q = qlis.AffineQuantizer(bits=8, granularity="channel").quantize(torch.randn(16, 32))
    module = runtime.Int8Linear(q, None)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied "
                                           r"\(2x31 and 32x16\)"):
        module(torch.randn(2, 31))


@settings(max_examples=60, deadline=None)
@given(n_levels=st.integers(1, 65536), size=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_pack_codes_round_trips(n_levels, size, seed):
    dtype = np.uint8 if n_levels <= 256 else np.uint16
    codes = np.random.default_rng(seed).integers(0, n_levels, size).astype(dtype)
    packed = runtime.pack_codes(codes, n_levels)
    back = runtime.unpack_codes(packed, n_levels, size)
    assert np.array_equal(back.numpy(), codes)  # the values, whatever the integer dtype
    bits = max(1, (n_levels - 1).bit_length())  # the memory the codes take, padding aside:
    stored = packed.numel() * packed.element_size() * 8  # at most a byte per bit plane
    assert size * bits <= stored < size * bits + 4 * 8


def memory_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Block(nn.Module):
    """A ViT block's Linear layers (the weight of a ViT is almost all here)."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)


@pytest.mark.parametrize(("quantizer", "limit"), [
    ({"id": "group", "bits": 4, "group_size": 64}, 0.35),
    ({"id": "affine", "bits": 8, "granularity": "channel"}, 0.5),
])
def test_packed_model_is_close_to_the_archive_codes(tmp_path, quantizer, limit):
    model = Block().eval()
    path = tmp_path / "block.qlis"
    qlis.save(qlis.compress(model, "quant", quantizer=quantizer), path, codec="bitpack")
    with torch.device("meta"):
        low = Block()
    qlis.load(path, model=low, runtime="lowbit")
    assert memory_bytes(low) <= limit * memory_bytes(model)
    with qlis.open(path) as archive:
        stored = sum(row["bytes"] for row in archive.tensor_info())
    assert memory_bytes(low) <= 1.15 * stored  # packed in memory as on disk, give or take


def test_codes_of_many_levels_take_their_bit_width_in_memory():
    """A uniform layer with some 300-1000 levels (what rd gives heavy-tailed weights) keeps
    9-10 bits per weight, not 16, and still dequantizes to the archive's weight."""
    weight = torch.linspace(-1.0, 1.0, 96 * 80).reshape(96, 80) ** 3  # heavy tails
    q = qlis.UniformQuantizer(step=2 / 400).quantize(weight)
    assert 256 < q.n_levels <= 512
    module = runtime.DequantLinear(q, None)
    bits = (q.n_levels - 1).bit_length()
    assert module.codes.numel() * module.codes.element_size() <= weight.numel() * bits / 8 + 4
    assert torch.equal(module.dequantized_weight(), q.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quantizer", [qlis.UniformQuantizer(step=0.05),
                                       qlis.AffineQuantizer(bits=6, granularity="channel")])
def test_row_affine_codes_of_half_precision_weights_dequantize_as_the_archive(dtype, quantizer):
    weight = torch.linspace(-1.0, 1.0, 24 * 16).reshape(24, 16).to(dtype)
    q = quantizer.quantize(weight)
    module = runtime.DequantLinear(q, None)
    assert module.grid.row_affine(24) is not None
    assert module.dequantized_weight().dtype == dtype
    assert torch.equal(module.dequantized_weight(), q.dequantize())


def test_runtime_plan_names_each_layer_path(tmp_path):
    path, _, _ = archive_of(tmp_path, {"id": "affine", "bits": 8, "granularity": "channel"})
    with qlis.open(path) as archive:
        plan = {row["layer"]: row for row in runtime.runtime_plan(archive)}
    assert set(plan) == {"patch", "fc1", "fc2", "head"}
    assert plan["fc1"]["path"] == "int8" and "int8pack" in plan["fc1"]["kernel"]
    assert plan["patch"]["path"] == "dequant" and "conv2d" in plan["patch"]["kernel"]


def test_pruned_layers_stay_float(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "pruned.qlis"
    qlis.save(qlis.compress(Toy(), "prune", k=0.5), path)
    low = Toy()
    qlis.load(path, model=low, runtime="lowbit")
    assert type(low.fc1) is nn.Linear
    with qlis.open(path) as archive:
        assert {row["path"] for row in runtime.runtime_plan(archive)} == {"float"}


def test_hooks_on_a_packed_layer_still_run(tmp_path):
    """A forward hook on a Linear/Conv2d (the user's, or a library's) was dropped with the
    module it was on: the low-bit model computed something else. The hooks move to the
    packed layer, with the layer's training flag, and their handles still remove them."""
    torch.manual_seed(0)
    path = tmp_path / "toy.qlis"
    qlis.save(qlis.compress(Toy().eval(), "quant", bits=8), path)
    models = []
    for runtime_name in ("float", "lowbit"):
        model = Toy().eval()
        handle = model.fc2.register_forward_hook(lambda module, args, out: 2 * out)
        model.patch.register_forward_pre_hook(lambda module, args: (args[0].flip(-1),))
        qlis.load(path, model=model, runtime=runtime_name)
        models.append((model, handle))
    (reference, _), (low, handle) = models
    assert isinstance(low.fc2, runtime._LowBit) and not low.fc2.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # int8 kernels sum in another order than float ones on some CPUs
        torch.testing.assert_close(low(x), reference(x), rtol=1e-4, atol=1e-5)
        handle.remove()
        assert not torch.allclose(low(x), reference(x), rtol=1e-2, atol=1e-3)


def test_bad_runtime_and_missing_model_are_user_errors(tmp_path):
    path, _, _ = archive_of(tmp_path, {"id": "kmeans", "bits": 2})
    with pytest.raises(ConfigError, match="runtime"):
        qlis.load(path, model=Toy(), runtime="fast")
    with pytest.raises(ConfigError, match="model="):
        qlis.load(path, runtime="lowbit")
    bare = tmp_path / "bare.qlis"
    qlis.save(qlis.compress(nn.Linear(8, 8), "quant", bits=8), bare)
    with pytest.raises(InputError, match="wrap it"):
        qlis.load(bare, model=nn.Linear(8, 8), runtime="lowbit")


TORCH_OUT_OF_MEMORY = RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. "
                                   "DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 2147483648 bytes. Error code 12")


@pytest.mark.parametrize("failure", [MemoryError(), TORCH_OUT_OF_MEMORY], ids=["numpy", "torch"])
def test_memory_that_runs_out_while_packing_a_layer_is_a_user_error(tmp_path, monkeypatch,
                                                                      failure):
    """A process under a memory limit fails the allocation that the system's free memory
    said would fit: numpy raises MemoryError, torch's allocator a RuntimeError."""
    path, _, _ = archive_of(tmp_path, {"id": "uniform", "step": 0.02})

    def raising(error: Exception):
        def fail(*args, **kwargs):
            raise error
        return fail

    monkeypatch.setattr(runtime, "lowbit_module", raising(failure))
    with torch.device("meta"):
        model = Toy().eval()
    with pytest.raises(InputError, match=r"not enough memory to keep layer 'patch' packed"):
        qlis.load(path, model=model, runtime="lowbit")
    monkeypatch.setattr(runtime, "lowbit_module", raising(
        RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes"):  # not a user's error: not hidden as one
        qlis.load(path, model=model, runtime="lowbit")


def test_meta_buffer_not_in_the_archive_is_refused_before_any_change(tmp_path):
    path, _, _ = archive_of(tmp_path, {"id": "kmeans", "bits": 2})
    with torch.device("meta"):
        low = Toy()
    low.register_buffer("positions", torch.empty(4, device="meta"), persistent=False)
    with pytest.raises(InputError, match="non-persistent"):
        qlis.load(path, model=low, runtime="lowbit")
    assert type(low.fc1) is nn.Linear


class Tied(nn.Module):
    """A language model in miniature: the output layer shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.mid = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16, bias=False)
        self.out.weight = self.embed.weight
        self.head = nn.Embedding(16, 32)  # a tie of two float layers
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.embed(ids)))


def test_a_layer_tied_to_a_max_norm_table_stays_float_and_computes_as_the_float_model(
        tmp_path):
    """An nn.Embedding with max_norm rescales the rows it looks up in place; the output layer
    tied to its table multiplies by them in the float model, which a packed copy would not."""

    class Renormed(Tied):
        def __init__(self) -> None:
            super().__init__()
            self.embed.max_norm = 1.0
            with torch.no_grad():
                self.embed.weight.mul_(3)

    torch.manual_seed(0)
    qlis.save(qlis.compress(Renormed(), "quant", quantizer={"id": "affine", "bits": 8}),
              tmp_path / "renormed.qlis")
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    outputs = []
    for kind in ("float", "lowbit"):
        model = Renormed()
        qlis.load(tmp_path / "renormed.qlis", model=model, runtime=kind)
        with torch.no_grad():
            outputs.append(model(ids))
    assert isinstance(model.mid, runtime.DequantLinear | runtime.Int8Linear)
    assert type(model.out) is nn.Linear and model.out.weight is model.embed.weight
    assert torch.equal(*outputs)


def test_a_meta_model_takes_the_archive_in_the_float_runtime_too(tmp_path):
    """torch cannot copy into a meta tensor (it warns and does nothing): the model stayed on
    the meta device while qlis.load returned as if it had loaded. Assigned tensors come in
    one Parameter per name: tied weights are tied again."""
    path, reference, _ = archive_of(tmp_path, {"id": "kmeans", "bits": 2})
    with torch.device("meta"):
        model = Toy().eval()
    qlis.load(path, model=model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    qlis.save(qlis.compress(Tied(), "quant", quantizer={"id": "affine", "bits": 4}),
              tmp_path / "tied.qlis")
    with torch.device("meta"):
        tied = Tied()
    qlis.load(tmp_path / "tied.qlis", model=tied)
    assert tied.out.weight is tied.embed.weight and not tied.out.weight.is_meta
    assert tied.head.weight is tied.embed.weight
    with torch.device("meta"):
        tied = Tied()
    qlis.load(tmp_path / "tied.qlis", model=tied, runtime="lowbit")  # the float tie stays
    assert tied.head.weight is tied.embed.weight and tied.out.path == "dequant"
    with torch.device("meta"):
        model = Toy()
    model.register_buffer("positions", torch.empty(4, device="meta"), persistent=False)
    with pytest.raises(InputError, match="non-persistent"):
        qlis.load(path, model=model)
    assert model.fc1.weight.is_meta  # refused before any change


@pytest.mark.parametrize("quantizer", [
    qlis.AffineQuantizer(bits=3), qlis.UniformQuantizer(rel_mse=0.3, granularity="channel"),
    qlis.get_quantizer({"id": "group", "bits": 2, "group_size": 16})])
def test_float16_weights_near_its_largest_value_dequantize_finite(quantizer):
    """A coarse grid's top code lies past 65504: the cast to float16 saturates (as the
    archive format says) in the quantizer and in the low-bit runtime alike, where a plain
    cast made inf weights of finite ones."""
    torch.manual_seed(0)
    weight = ((torch.rand(32, 64) * 2 - 1) * 65000).half()
    weight[0, 0] = 65504
    q = quantizer.quantize(weight)
    values = q.dequantize()
    assert values.dtype == torch.float16 and bool(torch.isfinite(values).all())
    assert float((values.float() - weight.float()).norm() / weight.float().norm()) < 0.6
    assert torch.equal(runtime.DequantLinear(q, None).dequantized_weight(), values)


class StandardizedConv2d(nn.Conv2d):
    """A convolution that standardises its weight in its own forward (as BiT's does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (
            self.weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class PadsByKernel(nn.Module):
    """Model code that reads its convolutions' attributes (HF MobileNetV2's TF padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.standardized = StandardizedConv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.conv.kernel_size[0] - 1
        x = F.pad(x, (pad // 2, pad - pad // 2) * 2)
        assert self.conv.in_channels == x.shape[1]
        return self.standardized(self.conv(x))


def test_convolutions_keep_their_attributes_and_subclasses_their_own_forward(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convs.qlis"
    qlis.save(qlis.compress(PadsByKernel().eval(), "quant", bits=8), path)
    reference, low = PadsByKernel().eval(), PadsByKernel().eval()
    qlis.load(path, model=reference)
    qlis.load(path, model=low, runtime="lowbit")
    assert isinstance(low.conv, runtime.DequantConv2d)
    assert type(low.standardized) is StandardizedConv2d  # its forward is not a plain conv
    assert (low.conv.kernel_size, low.conv.out_channels) == ((3, 3), 16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(low(x), reference(x))
