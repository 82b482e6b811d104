"""Run compressed: put an archive's quantized layers into a model as low-bit modules.

``qlis.load(path, model=m, runtime="lowbit")`` reads the archive one tensor at a time and
replaces every quantized ``nn.Linear`` / ``nn.Conv2d`` of ``m`` by a module that keeps the
integer codes in memory (the bits their levels need: 1 byte on the int8 path) and computes
from them; the float32 weight is never built for the whole model. ``m`` may be built on the
meta device (``with torch.device("meta"): m = Model()``): then nothing but the packed model is
allocated.

Path per layer (``runtime_plan`` lists them without decoding any code). The path follows the
weight's grid (qlis/quantize/grid.py), never its quantizer's id, so a third-party quantizer that
describes its grid runs packed too:

=================================================  ===========  ================================
grid of the weight                                 path         held in memory per weight
=================================================  ===========  ================================
Linear: one (scale, zero) per row, 17..256 levels  ``int8``     1 byte (code - a row's offset)
(8-bit affine per tensor or channel, uniform)                   + a float32 scale and shift per row
Linear: any other grid (group-wise, codebooks,     ``dequant``  ceil(log2(levels)) bits (bit
<= 16 or > 256 levels, third-party grids); every                planes, `pack_codes`); the
quantized Conv2d                                                grid's tensors as buffers
plain (pruned only, or never quantized), a         ``float``    the float tensor, as today
quantizer without a grid, and quantized tensors
of other modules (embeddings)
=================================================  ===========  ================================

Forward: ``int8`` calls torch's int8 weight-only CPU kernel (``aten._weight_int8pack_mm``)
for inputs of at most ``kernel_max_rows`` rows; for larger inputs (one image is already
197 tokens) it dequantizes the weight on the fly and calls ``F.linear``, which is many times
faster on CPU for many rows. ``dequant`` decodes the codes on the grid at every call, caching
nothing (torch ops, in place, on the module's device).
Exactness: the dequantize branch equals ``F.linear(x, archive_weight, bias)`` to the bit;
the kernel branch equals it to float32 rounding.

Lower-precision compute: every path honours ``torch.autocast``. Under
``torch.autocast("cpu", dtype=torch.bfloat16)`` the weight is dequantized in float32 (the
archive's exact values), then ``F.linear`` / ``F.conv2d`` round it and the input to bfloat16
as they do for a float model: the output equals the dequantized float model's under the same
autocast, to the bit (the int8 kernel branch steps aside). On a CPU with AVX512-BF16 or AMX
this runs ViT-sized matmuls several times faster than float32 (docs/runtime.md).

torch's int4 group-wise CPU kernel (``aten._weight_int4pack_mm_for_cpu``) maps exactly onto
qlis' group codes (kernel zero = (8 - zero_point) * scale) but is 30-60x slower than F.linear
for ViT-sized inputs here, and its packed layout is block-permuted by output size, so 4-bit
group layers keep two codes per byte in qlis' own layout on the ``dequant`` path
(docs/runtime.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qlis.errors import ConfigError, InputError
from qlis.models.tensors import renormed_tables
from qlis.quantize.grid import Grid, in_dtype, matrix_shape, tensors_traced
from qlis.quantize.quantizers import QuantizedTensor
from qlis.workers.memory import allocation_failed, release_freed_memory

RUNTIMES = ("float", "lowbit")
KERNEL_MAX_ROWS = 8


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


HAS_INT8_KERNEL = _has_op("_weight_int8pack_mm")


def int8_possible(n_levels: int, shape: Iterable[int], dtype: str = "float32") -> bool:
    """Whether a quantized weight could take the int8 path at all, from its header alone:
    a 2-D float32 weight of 17..256 levels, on a machine with the kernel."""
    return (len(tuple(shape)) == 2 and dtype == "float32" and HAS_INT8_KERNEL
            and 16 < n_levels <= 256)


def choose_path(grid: Grid, n_levels: int, shape: Iterable[int], dtype: str = "float32") -> str:
    """The path ("int8" or "dequant") a quantized Linear weight of ``shape`` on ``grid`` takes:
    int8 for 17..256 levels on a grid with one (scale, zero) per row whose zero points float32
    holds with integers to spare (below 2**24: code - zero is exact, as the archive computes
    it; a valid archive's offset of -3e9 rounded twice, 1 ulp off in a quarter of a layer),
    else dequant."""
    shape = tuple(shape)
    if not int8_possible(n_levels, shape, dtype):
        return "dequant"
    affine = grid.row_affine(shape[0])
    if affine is None or not bool(affine[1].abs().max() < _EXACT_ZERO_POINTS):
        return "dequant"
    return "int8"


_EXACT_ZERO_POINTS = 2.0 ** 24 - 256
"""Zero points below this, and codes below 256, keep code - zero an exact float32 integer."""


# -- bit packing for the dequantize path -------------------------------------------------------


def _pack_width(n_levels: int) -> int:
    """Bits per code: the fewest that hold ``n_levels`` codes (1..16)."""
    return max(1, (n_levels - 1).bit_length())


def _planes(width: int) -> list[tuple[int, int]]:
    """(plane width, shift) per bit plane of a code, least significant first: the binary
    digits of ``width`` (11 bits = an 8-, a 2- and a 1-bit plane)."""
    planes, shift = [], 0
    for plane in (8, 4, 2, 1):
        if width & plane:
            planes.append((plane, shift))
            shift += plane
    return planes


def _pack_plane(values: np.ndarray, width: int) -> np.ndarray:
    """uint8 values below 2**width (width 1, 2, 4 or 8), 8 // width per byte, little end first."""
    if width == 8:
        return values
    per_byte = 8 // width
    padded = np.zeros(-(-values.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: values.size] = values
    lanes = padded.reshape(-1, per_byte) << (np.arange(per_byte, dtype=np.uint8) * width)
    return np.bitwise_or.reduce(lanes, axis=1).astype(np.uint8)


def _unpack_plane(packed: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    if width == 8:
        return packed
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    values = packed[:, None] >> shifts
    return values.bitwise_and_((1 << width) - 1).reshape(-1)[:numel]


def pack_codes(codes: np.ndarray, n_levels: int) -> torch.Tensor:
    """Flat codes in exactly ``_pack_width(n_levels)`` bits each, as uint8 bit planes.

    16-bit codes stay int16 and 8-bit codes uint8; any other width is split into planes of
    8, 4, 2 and 1 bits (its binary digits), each stored 8 // plane codes per byte, one plane
    after the other: a 300-level uniform layer takes 9 bits per weight, not 16, and unpacking
    stays a few whole-array shifts (no code straddles a byte).
    """
    width = _pack_width(n_levels)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if width == 16:
        return torch.from_numpy(flat.astype(np.uint16).view(np.int16).copy())
    parts = [_pack_plane(((flat >> shift) & ((1 << plane) - 1)).astype(np.uint8), plane)
             for plane, shift in _planes(width)]
    return torch.from_numpy(np.concatenate(parts))  # a copy: never the caller's array


def unpack_codes(packed: torch.Tensor, n_levels: int, numel: int) -> torch.Tensor:
    """The inverse of `pack_codes`, on the packed codes' device (torch ops only): flat codes
    as uint8 up to 256 levels, int16 up to 2**15, int32 beyond."""
    width = _pack_width(n_levels)
    if width == 16:
        return packed.to(torch.int32) & 0xFFFF  # the int16 holds uint16 bit patterns
    dtype = torch.uint8 if width <= 8 else torch.int16
    codes, start = None, 0
    for plane, shift in _planes(width):
        size = -(-numel * plane // 8)
        values = _unpack_plane(packed[start : start + size], plane, numel)
        start += size
        if codes is None:  # the least significant plane: shift 0 (a view of the buffer only
            codes = values.to(dtype)  # when it is the only plane, never written to)
        else:  # a fresh tensor of this plane's codes (a view only for the 8-bit plane,
            codes |= values.to(dtype).bitwise_left_shift_(shift)  # and then a copy: int16)
    return codes


# -- the low-bit modules -----------------------------------------------------------------------


class _LowBit(nn.Module):
    """What every low-bit layer shares: its bias, and its dequantized weight on demand
    (``dequantized_weight()``), so a user can always compare with the float layer."""

    path = ""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, bias: torch.Tensor | None):
        super().__init__()
        self.shape = shape
        self.weight_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """``.half()``, ``.to(torch.bfloat16)``, ``.double()`` set the dtype the weight is built
        in (and convert the bias), as they do a float layer's weight; the buffers (codes, and
        the grid's scales, zeros, codebooks) keep the archive's exact values and follow the
        device only. Converted with the rest, the weight came out float32 against a float16
        input (an error), and a round trip through float16 rounded every scale."""
        buffers = {id(t) for t in self._buffers.values() if t is not None}
        anchor = next(t for t in self._buffers.values() if t is not None)
        target = fn(anchor.new_empty(0, dtype=self.weight_dtype))
        if target.dtype.is_floating_point:
            self.weight_dtype = target.dtype

        def keep_values(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in buffers:
                return fn(t)
            moved = fn(t.detach().reshape(-1)[:0])  # where and as what fn would put it
            return fn(t) if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_values, recurse)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, built at each access (for code that reads ``.weight.dtype``,
        as Hugging Face's CLIP embedding does); forward never uses it."""
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, path={self.path}, bias={self.bias is not None}"


class DequantLinear(_LowBit):
    """Any quantizer that describes its grid: codes packed at their bit width, the grid's
    tensors kept as buffers, and the weight decoded from them at every call (torch ops on the
    module's device, bit-exact with the quantizer's own dequantization)."""

    path = "dequant"

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__(q.shape, q.dtype, bias)
        self.n_levels = q.n_levels
        self.register_buffer("codes", pack_codes(q.codes, q.n_levels))
        self.grid = q.grid
        self.grid.check(matrix_shape(q.shape))
        self.grid_fields = sorted(self.grid.tensors())
        for key, tensor in self.grid.tensors().items():
            self.register_buffer(f"grid_{key}", tensor.contiguous())

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_codes(self.codes, self.n_levels, math.prod(self.shape))
        grid = self.grid.replace(**{key: getattr(self, f"grid_{key}") for key in self.grid_fields})
        values = grid.decode(codes.reshape(matrix_shape(self.shape)))
        return in_dtype(values.reshape(self.shape), self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class DequantConv2d(DequantLinear):
    """A Conv2d whose weight is dequantized at every call (bit-exact with the archive). It
    keeps the Conv2d's attributes, which model code reads (Hugging Face's MobileNetV2 pads
    by ``kernel_size``)."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> None:
        super().__init__(q, bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding_mode = conv.kernel_size, conv.padding_mode
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Int8Linear(_LowBit):
    """8-bit row-affine codes as int8 (code - offset); torch's int8 weight-only kernel.

    The kernel computes x (code - offset) scale, and the correction x (offset - zero) scale
    is added: each row's integer ``offset`` is the one nearest its zero point that keeps its
    codes within int8, so that the two terms are no larger than the weights make them. A
    fixed offset of 128 cancelled 128 sum(x) scale against itself on a row of zeros (codes
    and zero point 0): outputs of 0.875 where the layer gives 0, for inputs of 1e4.
    """

    path = "int8"

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__(q.shape, q.dtype, bias)
        codes = torch.from_numpy(np.ascontiguousarray(q.codes, dtype=np.uint8))
        scale, zero = q.grid.row_affine(q.shape[0])
        self.register_buffer("scale", scale.float())
        offset = _int8_offsets(codes, zero.float())
        # code - offset lies in int8, so uint8 arithmetic (modulo 256) read as int8 gives it
        # exactly, in one byte per weight (through float32: four)
        wrapped = offset.to(torch.int16).remainder(256).to(torch.uint8)
        self.register_buffer("weight_int8", codes.sub(wrapped[:, None]).view(torch.int8))
        self.register_buffer("shift", (offset - zero.float()))  # offset - zero, per row
        self.kernel_max_rows = KERNEL_MAX_ROWS
        # the kernel's sums (the inputs against the int8 codes, at most 128 each, and the
        # inputs' own sum against the shift, each then scaled) are larger than the result they
        # cancel to: inputs past this could overflow float32 where F.linear's result would not
        # (3e37 gave infinities of either sign; so did 1e37 against scales of 1e-22)
        largest = float((self.scale * (128.0 + self.shift.abs())).max()) if len(
            self.scale) else 0.0
        terms = max(q.shape[1], 1) * max(largest, 128.0)
        self.kernel_input_limit = 1e37 / terms

    def dequantized_weight(self) -> torch.Tensor:
        # int8 code + (offset - zero) is the archive's integer code - zero, exactly
        weight = self.weight_int8.float()  # one allocation, then in place
        weight = weight.add_(self.shift[:, None]).mul_(self.scale[:, None])
        return weight.to(self.weight_dtype)  # float32 unless the module was converted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (rows > self.kernel_max_rows or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.ndim == 0 or x.shape[-1] != self.shape[1]  # F.linear says what is wrong
                or self.weight_dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)
                or (x.requires_grad and torch.is_grad_enabled())  # the kernel has no backward
                or tensors_traced()  # nor a rule for torch.func; and amax is a value below
                or not x.numel() or not bool(x.abs().amax() <= self.kernel_input_limit)):
            return F.linear(x, self.dequantized_weight(), self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel reads rows as laid out
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        out = out + flat.sum(dim=1, keepdim=True) * (self.shift * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _int8_offsets(codes: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per row, the integer nearest its zero point from which every code of the row (uint8)
    lies within int8 (codes - offset in [-128, 127]); float32, exact."""
    if not codes.numel():
        return torch.full((codes.shape[0],), 128.0)
    lowest = codes.amax(dim=1).float() - 127.0
    highest = codes.amin(dim=1).float() + 128.0
    return torch.minimum(torch.maximum(zero.round(), lowest), highest)


def lowbit_module(q: QuantizedTensor, bias: torch.Tensor | None, module: nn.Module) -> _LowBit:
    """The low-bit replacement of a Linear or Conv2d whose weight the archive holds as ``q``."""
    if type(module) is nn.Conv2d:
        return DequantConv2d(q, bias, module)
    path = choose_path(q.grid, q.n_levels, q.shape, str(q.dtype).removeprefix("torch."))
    packed = Int8Linear(q, bias) if path == "int8" else DequantLinear(q, bias)
    # read by model code (heads, adapters), as a Conv2d's attributes are
    packed.in_features, packed.out_features = module.in_features, module.out_features
    return packed


# -- loading -----------------------------------------------------------------------------------


def _replaceable(module: nn.Module) -> bool:
    """Whether a low-bit module computes what ``module`` does: a plain Linear, or a plain
    Conv2d padded with zeros; a subclass may compute otherwise in its own ``forward`` (a
    weight-standardised convolution) and stays a float layer."""
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros"
    return type(module) is nn.Linear


def runtime_plan(archive) -> list[dict]:  # noqa: ANN001 - a qlis.Archive (import cycle)
    """Per weight of the archive that could run packed: layer name, path and kernel.

    Decided from the header, and from a weight's grid (its parameters read and checked by
    ``Archive.read_grid``) only where the int8 path depends on it; no code is decoded (a 2-D
    quantized weight is taken for a Linear, a 4-D one for a Conv2d); loading into a model may
    still keep a layer float when it is neither.
    """
    kernels = {"int8": "aten._weight_int8pack_mm (<= 8 rows), else F.linear on the "
               "dequantized weight", "dequant": "F.linear on the dequantized weight",
               "float": "F.linear"}
    rows = []
    for name in archive.names():
        entry = archive.entry(name)
        if not name.endswith("weight") or len(entry.shape) not in (2, 4):
            continue
        quantizer = archive.quantizer(name)
        if quantizer is None or entry.numel == 0 or not quantizer.has_grid():
            path = "float"
        elif int8_possible(entry.n_levels, entry.shape, entry.dtype):
            path = choose_path(archive.read_grid(name), entry.n_levels, entry.shape, entry.dtype)
        else:
            path = "dequant"
        kernel = kernels[path]
        if len(entry.shape) == 4:
            kernel = "F.conv2d" + ("" if path == "float" else " on the dequantized weight")
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        rows.append({"layer": layer, "shape": list(entry.shape), "path": path,
                     "kernel": kernel})
    return rows


def _packable(archive, name: str) -> bool:  # noqa: ANN001 - a qlis.Archive
    """A quantized, non-empty tensor whose quantizer describes its grid (from the header)."""
    quantizer = archive.quantizer(name)
    return quantizer is not None and archive.entry(name).numel > 0 and quantizer.has_grid()


_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")
"""nn.Module's records of the hooks its calls run (torch's own attribute names)."""


def _take_over(old: nn.Module, new: _LowBit) -> _LowBit:
    """``new`` with the replaced layer's call hooks and training flag: a hook the user (or a
    library) placed on the layer still runs, and its handle still removes it (the same
    dicts); the model computes what it did, with the layer packed."""
    for attr in _CALL_HOOKS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    return new.train(old.training)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def load_lowbit(archive, model: nn.Module) -> dict[str, str]:  # noqa: ANN001 - qlis.Archive
    """Put the archive into ``model`` with quantized Linear/Conv2d layers kept packed.

    Reads one tensor at a time, its parameters checked before its codes are decoded
    (``Archive.read_quantized``); the model changes only after every tensor was read (on any
    error it is untouched). Returns {layer: path} for the layers now low-bit.
    """
    persistent = model.state_dict()
    if _replaceable(model) and archive.entry("weight").quantizer is not None:
        raise InputError("the model is a bare Linear/Conv2d: wrap it in a module to run it packed")
    check_meta_buffers(model, persistent)
    renormed = {id(table) for table in renormed_tables(model)}
    packed_once: dict[int, _LowBit] = {}  # by the replaced module: one registered twice
    replacements: dict[str, _LowBit] = {}  # is one low-bit module under both names
    for name, module in model.named_modules(remove_duplicate=False):
        weight = f"{name}.weight"
        if id(module) in packed_once:
            replacements[name] = packed_once[id(module)]
            continue
        if not name or not _replaceable(module) or weight not in persistent:
            continue
        if id(module.weight) in renormed:
            continue  # tied to a table its lookups rescale in place: it multiplies by those
        if not _packable(archive, weight):
            continue
        q = archive.read_quantized(weight)
        bias = None
        if module.bias is not None:
            bias = archive.read(f"{name}.bias")
        try:
            packed = lowbit_module(q, bias, module)
            if not module.weight.is_meta:  # where the layer was (on the meta device: the CPU)
                packed = packed.to(module.weight.device)
        except (MemoryError, RuntimeError) as err:
            if not allocation_failed(err):
                raise
            raise InputError(f"not enough memory to keep layer {name!r} packed "
                             f"({q.codes.size:,} codes)") from None
        replacements[name] = packed_once[id(module)] = _take_over(module, packed)
        del packed, q, bias
        release_freed_memory()  # the freed temporaries of the layer's decode
    covered = {f"{n}.{p}" for n in replacements for p in ("weight", "bias")}
    rest = {name: archive.read(name) for name in persistent if name not in covered}
    ties = tied_names(model)
    for name, new in replacements.items():
        setattr(*_parent(model, name), new)
    # copied into the model's own tensors (an optimizer made before still holds them), as the
    # float runtime does; a model on the meta device takes the archive's instead
    on_meta = any(tensor.is_meta for tensor in persistent.values())
    model.load_state_dict(rest, strict=False, assign=on_meta)
    if on_meta:
        retie(model, ties)
    return {name: module.path for name, module in replacements.items()}


def check_not_packed(model: nn.Module) -> None:
    """Refuse to compress a model whose layers run packed: its state holds codes and grid
    scales, which would be taken for weights and quantized again (no error, wrong outputs)."""
    packed = [name for name, module in model.named_modules() if isinstance(module, _LowBit)]
    if packed:
        raise InputError(f"layer {packed[0]!r} runs packed (loaded with runtime=\"lowbit\"): "
                         "load the archive with runtime=\"float\" to compress the model again")


def check_meta_buffers(model: nn.Module, persistent: dict[str, torch.Tensor]) -> None:
    """Refuse a model left unusable after loading: no archive holds a non-persistent buffer,
    so one on the meta device would stay there (the first call fails far from the cause)."""
    for name, buffer in model.named_buffers():
        if name not in persistent and buffer.is_meta:
            raise InputError(
                f"{name!r} is a non-persistent buffer on the meta device and no archive holds "
                "it; build that part of the model on the CPU (or pass a model built on the CPU)"
            )


def tied_names(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter or buffer (tied weights), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Tie again what `load_state_dict(assign=True)` untied (it wraps each name in its own
    Parameter): every name of a group that is still a parameter or buffer takes the first's."""
    for names in groups:
        slots = []
        for name in names:
            module, attr = _parent(model, name)
            for table in (module._parameters, module._buffers):
                if attr in table:
                    slots.append((table, attr))
        for table, attr in slots[1:]:
            table[attr] = slots[0][0][slots[0][1]]


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
