"""Quantizer grids as data: how a value rounds to a code, and what each code is worth.

A quantizer fixes its grid from a weight; everything else that handles codes (error feedback,
reconstruction, the low-bit runtime, dequantization itself) works from the grid alone, never
from a quantizer's id, so a third-party quantizer that describes its grid works everywhere.

Grids live on the weight's matrix view ``(shape[0], prod(shape[1:]))`` (a 0-d or 1-D tensor
is one row), the view that per-tensor, per-channel and group-wise parameters share. Like
torchao's ``AffineQuantizedTensor``, a grid has one parameter set per block of
``block_size = (rows, columns)`` elements: ``(rows, columns)`` of the whole matrix is per
tensor, ``(1, columns)`` per output channel, ``(1, 32)`` group-wise; a block at the matrix's
edge may be shorter. Codes are returned as float32 integers (exact below 2**24).

>>> grid = AffineGrid(scale=torch.tensor([[0.5]]), zero=torch.tensor([[2.0]]),
...                   block_size=(1, 3), top=3)
>>> codes = grid.encode(torch.tensor([[-1.0, 0.1, 9.0]]))
>>> codes.tolist(), grid.decode(codes).tolist()
([[0.0, 2.0, 3.0]], [[-1.0, 0.0, 0.5]])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from qlis.compiled import njit
from qlis.errors import ArchiveError


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The matrix view of a weight of ``shape``: (shape[0], prod(shape[1:])), or one row."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def in_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decoded float32 ``values`` (clamped in place) cast to a tensor's ``dtype``, saturating
    (docs/format.md): a grid's top code may lie past a narrow dtype's range (float16 weights
    near 65504 rounded to a coarse step), which a plain cast makes inf."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(values.dtype).max:
        limit = torch.finfo(dtype).max
        values = values.clamp_(-limit, limit)
    return values.to(dtype)


def round_with_offset(scaled: torch.Tensor, rounding: float) -> torch.Tensor:
    """sign(x) * floor(|x| + rounding): nearest at 0.5, a dead zone around 0 below it."""
    magnitude = scaled.abs().add_(rounding).floor_()
    return torch.copysign(magnitude, scaled, out=magnitude)


@njit(cache=True, nogil=True)
def rounded_level(scaled: np.float32, rounding: np.float32) -> np.float32:
    """`round_with_offset` of one float32 value, for compiled loops (same float32 steps)."""
    return np.copysign(np.floor(np.abs(scaled) + rounding), scaled)


@njit(cache=True, nogil=True)
def _decode_affine(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, block_rows: int,
                   block_cols: int, out: np.ndarray) -> None:
    # (code - zero) * scale in float32, block by block: torch's steps on each element, in
    # one pass without the float copies of the codes. The inner loop runs over a block's
    # slice of a row, which LLVM vectorises (indexing the rows in place it does not).
    rows, cols = codes.shape
    for r in range(rows):
        rb = r // block_rows
        for b in range(-(-cols // block_cols)):
            z, s = zero[rb, b], scale[rb, b]
            src = codes[r, b * block_cols : (b + 1) * block_cols]
            dst = out[r, b * block_cols : (b + 1) * block_cols]
            for k in range(src.size):
                dst[k] = (np.float32(src[k]) - z) * s


_INTEGER_CODES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_EXACT_IN_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


def tensors_traced() -> bool:
    """Whether torch.func transforms (grad, jacrev, vmap) are running: their tensors have no
    storage that numba or a value-dependent branch could read, so only torch ops may follow."""
    return torch._C._are_functorch_transforms_active()


def _blocks(matrix: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """(row blocks, rows per block, column blocks, columns per block); edges padded with 0.
    A block larger than the matrix is the whole matrix (no padding to its size)."""
    rows, cols = matrix.shape
    br, bc = min(block_size[0], max(rows, 1)), min(block_size[1], max(cols, 1))
    n_r, n_c = -(-rows // br), -(-cols // bc)
    pad_r, pad_c = n_r * br - rows, n_c * bc - cols
    if pad_r or pad_c:
        matrix = torch.nn.functional.pad(matrix, (0, pad_c, 0, pad_r))
    return matrix.reshape(n_r, br, n_c, bc)


def _unblock(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    n_r, br, n_c, bc = blocks.shape
    return blocks.reshape(n_r * br, n_c * bc)[: shape[0], : shape[1]]


@dataclass(frozen=True, eq=False)
class Grid:
    """What every grid shares: its matrix shape and its block size (see the module doc)."""

    block_size: tuple[int, int]

    def encode(self, matrix: torch.Tensor) -> torch.Tensor:
        """The code of every value of ``matrix`` (float32 integers); exact zeros take the code
        whose value is 0 where the grid has one."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 value of every code (a matrix of the grid's shape)."""
        raise NotImplementedError

    @property
    def n_blocks(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def levels(self) -> int | None:
        """How many codes the grid decodes (0..levels-1); None when any integer decodes (an
        unbounded grid). A reader refuses codes a grid cannot decode before decoding them."""
        return None

    def peak(self, n_levels: int) -> float | None:
        """The largest magnitude that a code below ``n_levels`` decodes to, worked out in
        float64 (a reader refuses a grid whose values float32 cannot hold: forged parameters,
        each finite, whose products are not); None when the grid cannot say."""
        return None

    def column(self, j: int) -> Grid:
        """The grid of column ``j`` of the matrix, as a one-column matrix."""
        raise NotImplementedError

    def transposed(self) -> Grid:
        """The same grid on the transposed matrix."""
        raise NotImplementedError

    def neighbour(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The next code after each of ``codes`` in the direction of ``step`` (+1 up, -1
        down, 0 stay) in value order; a code at the grid's edge stays."""
        raise NotImplementedError

    def row_affine(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, zero) per row, each (rows,), when value = (code - zero) * scale with one
        pair per whole row (what integer matmul kernels take); None otherwise."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The grid's tensors by field name (to keep them as module buffers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def replace(self, **tensors: torch.Tensor) -> Grid:
        """The same grid with some tensors replaced (e.g. moved to another device)."""
        return dataclasses.replace(self, **tensors)

    def check(self, shape: tuple[int, int]) -> None:
        """Refuse parameters whose block count does not fit a matrix of ``shape``."""
        br, bc = self.block_size
        if br < 1 or bc < 1:
            raise ArchiveError(f"a grid's block size must be positive, got {self.block_size}")
        wanted = (-(-shape[0] // br), -(-shape[1] // bc))
        if self.n_blocks != wanted:
            raise ArchiveError(
                f"a {list(shape)} matrix in blocks of {list(self.block_size)} needs "
                f"{list(wanted)} parameter blocks, got {list(self.n_blocks)}"
            )


@dataclass(frozen=True, eq=False)
class AffineGrid(Grid):
    """value = (code - zero) * scale, one (scale, zero) per block; zero is an integer code.

    A value rounds to ``zero + round(w / scale)``, clamped to ``[0, top]`` (``top=None``: an
    unbounded grid, whose codes the quantizer rebases afterwards, as the entropy-coded uniform
    grid does). ``rounding=None`` is ``torch.round(w / scale + zero)`` (ties to even); a
    number ``r`` rounds ``sign(x) * floor(|x| + r)`` with ``x = w / scale``, a dead zone
    around the zero code for ``r < 0.5``.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    top: int | None = None
    rounding: float | None = None

    @property
    def n_blocks(self) -> tuple[int, int]:
        return tuple(self.scale.shape)

    @property
    def levels(self) -> int | None:
        return None if self.top is None else self.top + 1

    def peak(self, n_levels: int) -> float | None:
        if not self.scale.numel():
            return 0.0
        zero = self.zero.double()
        reach = torch.maximum(zero.abs(), (n_levels - 1 - zero).abs())
        return float((reach * self.scale.double().abs()).max())

    def check(self, shape: tuple[int, int]) -> None:
        super().check(shape)
        if self.zero.shape != self.scale.shape:
            raise ArchiveError(f"an affine grid's zero {list(self.zero.shape)} must match its "
                               f"scale {list(self.scale.shape)}")

    def encode(self, matrix: torch.Tensor) -> torch.Tensor:
        x = _blocks(matrix.float(), self.block_size)
        scale, zero = self.scale[:, None, :, None], self.zero[:, None, :, None]
        if self.rounding is None:
            codes = torch.round(x / scale + zero)
        else:
            codes = round_with_offset(x / scale, self.rounding).add_(zero)
        if self.top is not None:
            codes = codes.clamp_(0, self.top)
        return _unblock(codes, tuple(matrix.shape))

    def rows(self, start: int, stop: int) -> AffineGrid:
        """The grid of matrix rows ``start..stop`` (``start`` a multiple of the block rows),
        to work on a large matrix a range of rows at a time."""
        if self.scale.shape[0] == 1:  # one row of blocks: every range of rows shares it
            return self
        first, last = start // self.block_size[0], -(-stop // self.block_size[0])
        return replace(self, scale=self.scale[first:last], zero=self.zero[first:last])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self._decodes_compiled(codes):
            return self._decode_compiled(codes)
        x = _blocks(codes.float(), self.block_size)
        if codes.dtype == torch.float32:
            x = x.clone()  # never write into the caller's codes (x may be a view of them)
        values = x.sub_(self.zero[:, None, :, None]).mul_(self.scale[:, None, :, None])
        return _unblock(values, tuple(codes.shape))

    def _decodes_compiled(self, codes: torch.Tensor) -> bool:
        """Whether `_decode_compiled` gives ``decode``'s values: an integer code matrix and
        parameter matrices that float32 holds exactly (torch computes in float32 then too),
        all on the CPU, none recording gradients, under no torch.func transform."""
        return (codes.dtype in _INTEGER_CODES and codes.device.type == "cpu"
                and codes.dim() == 2 and not tensors_traced()
                and all(t.dtype in _EXACT_IN_FLOAT32 and t.device.type == "cpu"
                        and t.dim() == 2 and not t.requires_grad
                        for t in (self.scale, self.zero)))

    def _decode_compiled(self, codes: torch.Tensor) -> torch.Tensor:
        """``decode`` in one compiled pass, without float copies of the codes (what
        dequantizes an archive's layers)."""
        rows, cols = codes.shape
        br, bc = min(self.block_size[0], max(rows, 1)), min(self.block_size[1], max(cols, 1))
        blocks = (-(-rows // br), -(-cols // bc))  # as _blocks, broadcast as torch would
        scale = self.scale.float().expand(blocks).numpy()
        zero = self.zero.float().expand(blocks).numpy()
        out = torch.empty((rows, cols), dtype=torch.float32)
        _decode_affine(codes.numpy(), scale, zero, br, bc, out.numpy())
        return out

    def column(self, j: int) -> AffineGrid:
        b = j // self.block_size[1]
        return dataclasses.replace(self, scale=self.scale[:, b : b + 1],
                                   zero=self.zero[:, b : b + 1],
                                   block_size=(self.block_size[0], 1))

    def transposed(self) -> AffineGrid:
        return dataclasses.replace(self, scale=self.scale.T, zero=self.zero.T,
                                   block_size=self.block_size[::-1])

    def neighbour(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        moved = codes + step
        return moved if self.top is None else moved.clamp_(0, self.top)

    def row_affine(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.scale.shape[1] != 1 or rows == 0:
            return None
        per_row = self.scale.shape[0]
        index = torch.arange(rows) // self.block_size[0] if per_row > 1 else torch.zeros(
            rows, dtype=torch.long)
        return self.scale[index, 0].contiguous(), self.zero[index, 0].contiguous()


@dataclass(frozen=True, eq=False)
class CodebookGrid(Grid):
    """value = codebook[block, code]: a sorted table of values per block (k-means, binary).

    A value rounds to the nearest entry (ties to the lower). With ``zero_code`` set, exact
    zeros take that entry (which holds 0.0); ``exclusive_zero`` keeps every other value off
    it (binary's third symbol is for pruned zeros only).
    """

    codebook: torch.Tensor  # (row blocks, column blocks, entries), each block sorted
    zero_code: int | None = None
    exclusive_zero: bool = False

    @property
    def n_blocks(self) -> tuple[int, int]:
        return tuple(self.codebook.shape[:2])

    @property
    def levels(self) -> int:
        return self.codebook.shape[2]

    def check(self, shape: tuple[int, int]) -> None:
        """Also refuse what nearest-entry rounding and `neighbour` cannot work with (error
        feedback and reconstruction would round to the wrong entries): a block's entries
        out of order, or a zero code that is not an entry holding 0.0 in every block."""
        if self.codebook.dim() != 3:
            raise ArchiveError(f"a codebook grid's codebook must be (row blocks, column blocks, "
                               f"entries), got shape {list(self.codebook.shape)}")
        super().check(shape)
        book = self.codebook
        if bool((book[..., 1:] < book[..., :-1]).any()):
            raise ArchiveError("a codebook grid's entries must be sorted, lowest first, in "
                               "every block")
        zero = self.zero_code
        if zero is not None and not (type(zero) is int and 0 <= zero < self.levels
                                     and bool((book[..., zero] == 0).all())):
            raise ArchiveError(f"a codebook grid's zero code {zero!r} must be an entry that "
                               "holds 0.0 in every block")

    def peak(self, n_levels: int) -> float | None:
        if not self.codebook.numel():
            return 0.0
        return float(self.codebook[..., :n_levels].double().abs().max())

    def encode(self, matrix: torch.Tensor) -> torch.Tensor:
        entries = torch.arange(self.codebook.shape[2])
        if self.exclusive_zero and self.zero_code is not None:
            entries = entries[entries != self.zero_code]
        table = self.codebook[:, :, entries]
        midpoints = ((table[..., 1:] + table[..., :-1]) / 2).contiguous()

        def nearest(flat: torch.Tensor) -> torch.Tensor:
            codes = entries[torch.searchsorted(midpoints, flat.contiguous())].float()
            if self.zero_code is not None:
                codes = torch.where(flat == 0, float(self.zero_code), codes)
            return codes

        return self._per_block(matrix.float(), nearest)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._per_block(codes.long(),
                               lambda flat: torch.gather(self.codebook.float(), 2, flat)).float()

    def _per_block(self, matrix: torch.Tensor,
                   fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` on the matrix as (row blocks, column blocks, values of the block), the
        layout of the codebook, and back to the matrix."""
        if not matrix.numel():
            return matrix.float()
        x = _blocks(matrix, self.block_size)
        n_r, br, n_c, bc = x.shape
        out = fn(x.permute(0, 2, 1, 3).reshape(n_r, n_c, br * bc))
        return _unblock(out.reshape(n_r, n_c, br, bc).permute(0, 2, 1, 3), tuple(matrix.shape))

    def column(self, j: int) -> CodebookGrid:
        b = j // self.block_size[1]
        return dataclasses.replace(self, codebook=self.codebook[:, b : b + 1],
                                   block_size=(self.block_size[0], 1))

    def transposed(self) -> CodebookGrid:
        return dataclasses.replace(self, codebook=self.codebook.transpose(0, 1),
                                   block_size=self.block_size[::-1])

    def neighbour(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        moved = codes + step
        if self.exclusive_zero and self.zero_code is not None:
            moved = torch.where(moved == self.zero_code, moved + step, moved)
        inside = (moved >= 0) & (moved < self.codebook.shape[2])
        if self.exclusive_zero and self.zero_code is not None:
            inside &= moved != self.zero_code
        return torch.where(inside, moved, codes)
