"""Quantizers: a weight tensor -> small integer codes plus the parameters to dequantize them.

Every quantizer keeps an exact zero exactly zero (so LAPQ's pruned weights survive), returns
its codes as a uint8 (or uint16) numpy array (what the archive's codecs store) and describes
its grid as data (qlis/quantize/grid.py): how a value rounds to a code and what each code is worth.
Dequantization, error feedback, reconstruction and the low-bit runtime use only that grid, so
the archive reproduces ``CompressionResult.state_dict()`` to the bit, and a third-party
quantizer that implements ``quantize`` and ``grid`` works everywhere.
"""

from __future__ import annotations

import inspect as _inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from qlis.archive.format import code_dtype as stored_code_dtype
from qlis.compiled import njit
from qlis.config import Param, config_id
from qlis.errors import ArchiveError, ConfigError, InputError, QlisError, first_line
from qlis.measure.distortion import CHUNK_ELEMENTS, relative_unit, squared_sums
from qlis.quantize.grid import (
    AffineGrid,
    CodebookGrid,
    Grid,
    in_dtype,
    matrix_shape,
    rounded_level,
)
from qlis.registry import Registry, is_builtin
from qlis.strategy import Strategy

GRANULARITIES = ("tensor", "channel")
GRANULARITY = Param("str", choices=GRANULARITIES)
UNIFORM_GRANULARITY = Param("str", choices=(*GRANULARITIES, "column"))
"""The uniform grid's steps also come one per input column (the matrix view's columns): what
rd gives a linear layer by its inputs' energy (qlis/quantize/column_scales.py)."""
SEED = Param("int", 0, (1 << 63) - 1)
MAX_GROUP_SIZE = 1 << 31
"""The largest group a group-wise quantizer takes (a group longer than its row is the row)."""
MAX_LEVELS = 1 << 16
EXACT_FLOAT32_INTEGERS = 1 << 24  # every whole number up to this is a float32
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class QuantizedTensor:
    """Integer codes (uint8, shaped like the weight), alphabet size, and dequantization params."""

    codes: np.ndarray
    n_levels: int
    quantizer: dict
    params: dict[str, np.ndarray]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def code_bits(self) -> int:
        """Bits a fixed-width code needs (the alphabet rounded up to a power of two)."""
        return max(1, math.ceil(math.log2(max(self.n_levels, 2))))

    def dequantize(self) -> torch.Tensor:
        return get_quantizer(self.quantizer).dequantize(self)

    @property
    def grid(self) -> Grid:
        """The grid these codes live on (their quantizer's ``grid``)."""
        return get_quantizer(self.quantizer).grid(self.shape, self.n_levels, self.params)

    def matrix_codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The codes of rows ``start..stop`` of the grid's view (shape[0], prod(shape[1:])) as
        a torch matrix; uint16 codes are widened to int32 (torch's uint16 supports few
        operations), so a large tensor's are read a range of rows at a time."""
        codes = np.ascontiguousarray(self.codes).reshape(matrix_shape(self.shape))[start:stop]
        if codes.dtype == np.uint16:
            codes = codes.astype(np.int32)
        return torch.from_numpy(codes)


@dataclass(frozen=True)
class ParamSpec:
    """What one stored quantizer parameter must be, so that a reader refuses a crafted one
    before it builds anything from it: its dtype, its exact shape (derived from the tensor's
    shape and the quantizer's config, hence bounded by the tensor) and the range of its
    values, which are always finite."""

    shape: tuple[int, ...]
    dtype: str | tuple[str, ...] = "float32"  # or the dtypes it may have
    positive: bool = False  # every value > 0 (scales, steps)
    minimum: float | None = None  # every value >= minimum
    maximum: float | None = None  # every value <= maximum
    integer: bool = False  # whole numbers (zero points, offsets)
    ascending: bool = False  # sorted, lowest first (codebooks)

    def check(self, key: str, value: object) -> None:
        """Raise ArchiveError naming ``key`` unless ``value`` is such a parameter."""
        where = f"parameter {key!r}"
        array = np.asarray(value)
        allowed = (self.dtype,) if isinstance(self.dtype, str) else self.dtype
        if array.dtype.name not in allowed:
            raise ArchiveError(f"{where} must be {' or '.join(allowed)}, "
                               f"got {array.dtype.name}")
        if array.shape != self.shape:
            raise ArchiveError(
                f"{where} must have shape {list(self.shape)}, got {list(array.shape)}"
            )
        flat = array.reshape(-1)
        rules = [(flat, np.isfinite(flat), "must be finite")]  # (values, which pass, rule)
        if self.positive:
            rules.append((flat, flat > 0, "must be > 0"))
        if self.minimum is not None:
            rules.append((flat, flat >= self.minimum, f"must be >= {self.minimum:g}"))
        if self.maximum is not None:
            rules.append((flat, flat <= self.maximum, f"must be <= {self.maximum:g}"))
        if self.integer:
            rules.append((flat, np.floor(flat) == flat, "must hold whole numbers"))
        if self.ascending:
            rules.append((flat[1:], flat[1:] >= flat[:-1], "must be sorted, lowest first"))
        for values, ok, rule in rules:
            if not ok.all():
                raise ArchiveError(f"{where} {rule}, found {float(values[~ok][0]):g}")


class Quantizer(Strategy):
    """Maps a weight to a QuantizedTensor and describes the grid its codes live on.

    A subclass implements ``quantize`` and ``grid``; ``dequantize`` and ``with_codes``
    follow from the grid (override ``with_codes`` for a grid without bounds). It states the
    parameters it stores in ``param_specs`` and its alphabet in ``level_range``, so that
    ``check_params`` can refuse what it would never have written.
    """

    config_kind = "quantizer"
    codes_codec: ClassVar[str | None] = None
    """The codec its codes are stored with, whatever the archive's (None: the archive's)."""

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    def quantize_measured(self, weight: torch.Tensor) -> tuple[QuantizedTensor, float]:
        """``quantize`` and `relative_error` of its codes. A quantizer that can measure while
        it rounds overrides this to save the second pass (on a data-free pack, that pass was
        an eighth of the work)."""
        q = self.quantize(weight)
        return q, self.relative_error(weight, q)

    def relative_error(self, weight: torch.Tensor, q: QuantizedTensor) -> float:
        """``||w_hat - w||^2 / ||w||^2`` of ``q``'s values (0 for an all-zero weight),
        dequantized a range of rows at a time: no float copy of the whole layer."""
        rows = weight.detach().reshape(matrix_shape(weight.shape))
        unit = relative_unit(rows)
        energy = error = 0.0
        for a, b, values in self.dequantized_rows(q):
            chunk_energy, chunk_error = squared_sums(rows[a:b], values, unit)
            energy += chunk_energy
            error += chunk_error
        return error / energy if energy else 0.0

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict[str, np.ndarray]) -> Grid:
        """The grid of a tensor of ``shape`` that this quantizer made with ``params``."""
        raise NotImplementedError

    def level_range(self) -> tuple[int, int]:
        """The fewest and the most code levels this quantizer gives a tensor (with its config);
        a reader refuses any other ``n_levels``."""
        return 1, MAX_LEVELS

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec] | None:
        """Every parameter this quantizer stores for a tensor of ``shape`` with ``n_levels``
        codes, by name; None where it does not say (a third-party quantizer may not): then
        only the grid its parameters describe is checked."""
        return None

    def check_params(
        self, shape: tuple[int, ...], n_levels: int, params: dict[str, np.ndarray]
    ) -> Grid | None:
        """Refuse parameters (read from a file) that this quantizer would not have written for
        a tensor of ``shape`` with ``n_levels`` codes, before anything is built from them.

        ``n_levels`` must lie in `level_range` and the parameters match `param_specs`
        (present, nothing else, dtype, shape, finite, in range); then the grid they describe
        must fit the tensor's matrix, decode every code below ``n_levels`` and be finite.
        Raises ArchiveError naming the parameter; returns that grid (None for a quantizer
        without one, or for an empty tensor, which has nothing to decode). What a third-party
        quantizer's methods raise here, or a grid that is not a `Grid`, is an ArchiveError
        naming it: an archive read by another plugin under the same id must not crash a reader.
        """
        if is_builtin(self):
            return self._check_params(shape, n_levels, params)
        try:
            return self._check_params(shape, n_levels, params)
        except QlisError:
            raise
        except Exception as err:
            raise ArchiveError(f"quantizer {self.strategy_id!r} failed to check its parameters "
                               f"({type(err).__name__}: {first_line(err)})") from None

    def _check_params(
        self, shape: tuple[int, ...], n_levels: int, params: dict[str, np.ndarray]
    ) -> Grid | None:
        low, high = self.level_range()
        if not low <= n_levels <= high:
            allowed = str(low) if low == high else f"{low} to {high}"
            raise ArchiveError(f"n_levels is {n_levels}; {self.strategy_id} codes with this "
                               f"config have {allowed} levels")
        specs = self.param_specs(shape, n_levels)
        if specs is not None:
            unknown = sorted(set(params) - set(specs))
            if unknown:
                raise ArchiveError(f"parameter {unknown[0]!r} is not one {self.strategy_id} "
                                   f"stores ({', '.join(sorted(specs))})")
            for key, spec in specs.items():
                if key not in params:
                    raise ArchiveError(f"parameter {key!r} is missing")
                spec.check(key, params[key])
        if not self.has_grid() or not math.prod(shape):
            return None
        try:  # a third-party grid may fail on its own terms; the built-ins' cannot here
            grid = self.grid(shape, n_levels, params)
        except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as err:
            raise ArchiveError(f"the parameters do not describe a grid ({err})") from None
        if not isinstance(grid, Grid):
            raise ArchiveError(f"quantizer {self.strategy_id!r} described its grid as a "
                               f"{type(grid).__name__}, not a qlis.quantize.grid.Grid")
        grid.check(matrix_shape(shape))
        if grid.levels is not None and n_levels > grid.levels:
            raise ArchiveError(f"{n_levels} code levels on a grid of {grid.levels}")
        for key, tensor in grid.tensors().items():
            if not bool(torch.isfinite(tensor).all()):
                raise ArchiveError(f"the grid's {key} is not finite")
        peak = grid.peak(n_levels)
        if peak is not None and not peak <= _FLOAT32_MAX:
            stored = ", ".join(map(repr, sorted(params)))
            raise ArchiveError(f"the parameters ({stored}) decode codes to values up to "
                               f"{peak:.3g}, beyond float32's range")
        return grid

    @classmethod
    def config_for_bits(cls, bits: int, granularity: str = "tensor") -> dict[str, Any]:
        """The config a paper policy uses for a level of ``bits`` (and ``granularity``)."""
        accepts = _inspect.signature(cls).parameters
        if "bits" not in accepts:
            raise ConfigError(
                f"quantizer {cls.strategy_id!r} has no 'bits' parameter: pass it as "
                f'quantizer={{"id": "{cls.strategy_id}", ...}} instead of method='
            )
        config: dict[str, Any] = {"id": cls.strategy_id, "bits": bits}
        if "granularity" in accepts:
            config["granularity"] = granularity
        elif granularity != "tensor":
            raise ConfigError(f"quantizer {cls.strategy_id!r} has no granularity option")
        cls.from_config(config)
        return config

    @classmethod
    def has_grid(cls) -> bool:
        """Whether the quantizer describes its grid (what error feedback and the low-bit
        runtime need; a quantizer without one only quantizes and dequantizes)."""
        return cls.grid is not Quantizer.grid

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """The values of ``q``'s codes on its grid, in its dtype."""
        if not self.has_grid():
            raise NotImplementedError(f"{type(self).__name__} implements neither grid nor "
                                      "dequantize")
        shape = matrix_shape(q.shape)
        if not math.prod(q.shape):
            return torch.zeros(q.shape, dtype=q.dtype)
        values = None
        for a, b, rows in self.dequantized_rows(q):
            if (a, b) == (0, shape[0]):
                return rows.reshape(q.shape)
            if values is None:  # codes and float32 of one chunk at a time
                values = torch.empty(shape, dtype=q.dtype)
            values[a:b] = rows
        return values.reshape(q.shape)

    def dequantized_rows(self, q: QuantizedTensor, within: torch.Tensor | None = None,
                         ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``dequantize`` a range of rows of the matrix view at a time: (start, stop, their
        values in ``q``'s dtype), so that a large layer can be measured without a float copy
        of all of it (an affine grid's codes go a chunk at a time; other grids at once).
        ``within`` (ascending row indices): only the ranges that hold one of them."""
        shape = matrix_shape(q.shape)
        if not math.prod(q.shape):
            return
        if not self.has_grid():  # a quantizer with only its own dequantize
            yield 0, shape[0], self.dequantize(q).reshape(shape)
            return
        grid = self.grid(q.shape, q.n_levels, q.params)
        grid.check(shape)
        if not isinstance(grid, AffineGrid) or math.prod(shape) <= CHUNK_ELEMENTS:
            yield 0, shape[0], in_dtype(grid.decode(q.matrix_codes()), q.dtype)
            return
        for a, b in _grid_chunks(grid, shape):
            if within is None or _holds(within, a, b):
                yield a, b, in_dtype(grid.rows(a, b).decode(q.matrix_codes(a, b)), q.dtype)

    def with_codes(self, q: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        """``q`` with other codes on the same grid (from error feedback or reconstruction)."""
        if codes.numel() and not (float(codes.min()) >= 0 and float(codes.max()) < q.n_levels):
            raise ConfigError(f"codes outside the grid's {q.n_levels} levels")
        return QuantizedTensor(stored_codes(codes, q.n_levels).reshape(q.shape), q.n_levels,
                               q.quantizer, q.params, q.dtype)

    def with_row_scales(self, q: QuantizedTensor, factors: np.ndarray) -> QuantizedTensor | None:
        """``q`` with the values of matrix row r times ``factors[r]`` (float64), the codes
        kept: the layer quantized with its own step per row, as quantizing the weight's rows
        divided by the factors gave; None where the grid has no per-row scale to carry them."""
        return None

    def with_column_scales(self, q: QuantizedTensor,
                           factors: np.ndarray) -> QuantizedTensor | None:
        """``q`` with the values of matrix column c times ``factors[c]`` (float64), the codes
        kept: a weight quantized with its columns divided by the factors, stored with a step
        per input column (AWQ's scaling, qlis/quantize/column_scales.py); None where the
        grid has no step to carry them."""
        return None


quantizer_registry: Registry[Quantizer] = Registry("quantizer", "qlis.quantizers",
                                                  builtins=("qlis.quantize.float16",))


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Register a Quantizer subclass under its ``strategy_id`` (usable as a decorator)."""
    quantizer_registry.register(cls.strategy_id, cls)
    return cls


def get_quantizer(config: dict | str) -> Quantizer:
    """A quantizer from its config dict (or a bare id with default parameters)."""
    name, options = config_id(config, "quantizer")
    return quantizer_registry.get(name).from_config({"id": name, **options})


def quantized(quantizer: Quantizer, weight: torch.Tensor, label: str,
              measured: bool = True) -> tuple[QuantizedTensor, float | None]:
    """``quantizer.quantize_measured(weight)`` (``measured`` False: ``quantize``, error None).

    A third-party quantizer's output is checked against the weight before anything stores
    it, and what it raises is named: codes of another shape or a result of another dtype would
    be written to an archive as another tensor, and a ``dequantize`` of the wrong shape or
    dtype makes an archive that every reader refuses."""
    if is_builtin(quantizer):
        return quantizer.quantize_measured(weight) if measured else (
            quantizer.quantize(weight), None)
    where = f"{label}: quantizer {quantizer.strategy_id!r}"
    try:
        q = quantizer.quantize(weight)
        if not isinstance(q, QuantizedTensor):
            raise ConfigError(f"{where} returned a {type(q).__name__}, not a QuantizedTensor")
        if not (isinstance(q.codes, np.ndarray) and q.codes.dtype.kind in "ui"):
            raise ConfigError(f"{where} returned codes that are not a numpy integer array")
        if not (type(q.n_levels) is int and 1 <= q.n_levels <= MAX_LEVELS):
            raise ConfigError(f"{where} returned n_levels {q.n_levels!r} (an int from 1 to "
                              f"{MAX_LEVELS})")
        if q.shape != tuple(weight.shape) or q.dtype != weight.dtype:
            raise ConfigError(f"{where} returned codes of shape {list(q.shape)} and dtype "
                              f"{q.dtype} for a weight of shape {list(weight.shape)} and dtype "
                              f"{weight.dtype}")
        if q.codes.size and not (q.codes.min() >= 0 and q.codes.max() < q.n_levels):
            raise ConfigError(f"{where} returned codes from {q.codes.min()} to "
                              f"{q.codes.max()}, outside 0..{q.n_levels - 1} (its n_levels)")
        if config_id(q.quantizer, "quantizer")[0] != quantizer.strategy_id:
            raise ConfigError(f"{where} returned codes that name another quantizer "
                              f"({q.quantizer!r}); they would be read back by that one")
        if get_quantizer(q.quantizer) != quantizer:
            raise ConfigError(f"{where} returned codes that name the config {q.quantizer!r}, "
                              f"not its own {quantizer.get_config()!r}; they would be read "
                              "back by that one")
        try:  # what a reader will refuse, refused now
            grid = quantizer.check_params(q.shape, q.n_levels, q.params)
        except ArchiveError as err:
            raise ConfigError(f"{where} returned parameters that a reader refuses: {err}"
                              ) from None
        values = quantizer.dequantize(q)
        if not (isinstance(values, torch.Tensor) and values.shape == weight.shape
                and values.dtype == weight.dtype):
            raise ConfigError(f"{where}: its dequantize did not return a tensor of the "
                              f"weight's shape {list(weight.shape)} and dtype {weight.dtype}")
        if values.isnan().any():
            raise ConfigError(f"{where}: its dequantize returned NaN values")
        _check_on_grid(values, q, grid, where)
        return q, quantizer.relative_error(weight, q) if measured else None
    except QlisError:
        raise
    except Exception as err:  # the plugin's own failure, named
        raise ConfigError(f"{where} failed ({type(err).__name__}: {first_line(err)})") from None


def checked_grid(quantizer: Quantizer, q: QuantizedTensor, label: str) -> Grid:
    """The grid of ``q`` (from ``quantizer``) that error feedback rounds to. A third-party
    quantizer's is first checked as a reader checks it (`Quantizer.check_params`: it fits,
    is finite, a codebook is sorted) and must decode as many codes as ``q`` has levels:
    feedback may move a code to any of the grid's."""
    if is_builtin(quantizer) or not math.prod(q.shape):
        return quantizer.grid(q.shape, q.n_levels, q.params)
    where = f"{label}: quantizer {quantizer.strategy_id!r}"
    try:
        grid = quantizer.check_params(q.shape, q.n_levels, q.params)
    except ArchiveError as err:
        raise ConfigError(f"{where} returned parameters that a reader refuses: {err}"
                          ) from None
    if grid is None:
        raise ConfigError(f"{where} does not describe its grid")
    if grid.levels is not None and grid.levels != q.n_levels:
        raise ConfigError(f"{where}: its grid decodes {grid.levels} codes but its codes have "
                          f"{q.n_levels} levels; error feedback rounds to any of the grid's")
    return grid


def _check_on_grid(values: torch.Tensor, q: QuantizedTensor, grid: Grid | None,
                   where: str) -> None:
    """Refuse a quantizer whose ``dequantize`` (or ``dequantized_rows``) gives other values
    than its grid decodes: the archive's reader takes the first, while ``qlis unpack``, error
    feedback, the reported error and the low-bit runtime take the second, so the same archive
    would compute differently in each."""
    if grid is None:
        return
    decoded = in_dtype(grid.decode(q.matrix_codes()), q.dtype).reshape(q.shape)
    if not torch.equal(values, decoded):
        apart = float((values.double() - decoded.double()).abs().nan_to_num(math.inf).max())
        raise ConfigError(f"{where}: its dequantize gives other values than its grid decodes "
                          f"(up to {apart:.3g} apart); the low-bit runtime, error feedback and "
                          "'qlis unpack' use the grid, so make dequantize follow it")


def _rows(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 view as (groups, elements): one row per output channel, or a single row."""
    return _row_view(weight, granularity).float()


def _row_view(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """``_rows`` in the weight's own dtype (no copy; granularity ``column``: the matrix
    view's columns as rows, a transposed view)."""
    w = weight.detach()
    if granularity == "channel" and w.ndim >= 1 and w.shape[0] > 0:
        return w.reshape(w.shape[0], -1)
    if granularity == "column" and _has_columns(w.shape):
        return w.reshape(matrix_shape(w.shape)).T
    return w.reshape(1, -1)


def _has_columns(shape: tuple[int, ...]) -> bool:
    """Whether a weight of ``shape`` takes a step per column: a matrix view of elements (an
    empty one takes the tensor's single step)."""
    return min(matrix_shape(shape)) > 0




def _chunks(shape: tuple[int, int], align: int = 1) -> list[tuple[int, int]]:
    """Row ranges of a (rows, columns) matrix, about CHUNK_ELEMENTS elements each, starting
    at multiples of ``align`` (one range for a small matrix)."""
    n_rows, n_columns = shape
    align = max(1, min(align, n_rows))
    per = max(align, CHUNK_ELEMENTS // max(n_columns, 1) // align * align)
    return [(r, min(r + per, n_rows)) for r in range(0, max(n_rows, 1), per)]


def _holds(ascending: torch.Tensor, start: int, stop: int) -> bool:
    """Whether ``ascending`` (sorted indices) has one in ``start..stop``."""
    first = int(torch.searchsorted(ascending, start))
    return first < len(ascending) and int(ascending[first]) < stop


def _grid_chunks(grid: AffineGrid, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """`_chunks` of a matrix on ``grid``: row ranges that start on its blocks' rows (any row
    where one row of blocks spans the matrix), so `AffineGrid.rows` can take each."""
    return _chunks(shape, grid.block_size[0] if grid.scale.shape[0] > 1 else 1)


def _encoded(grid: Grid, matrix: torch.Tensor) -> np.ndarray:
    """``grid.encode(matrix)`` as uint8 codes; an affine grid's a chunk of rows at a time,
    so that a large layer's rounding holds float32 temporaries of one chunk, not of every
    weight (other grids encode at once)."""
    if not isinstance(grid, AffineGrid) or matrix.numel() <= CHUNK_ELEMENTS:
        return grid.encode(matrix).to(torch.uint8).numpy()
    codes = np.empty(tuple(matrix.shape), dtype=np.uint8)
    for a, b in _grid_chunks(grid, tuple(matrix.shape)):
        codes[a:b] = grid.rows(a, b).encode(matrix[a:b]).to(torch.uint8).numpy()
    return codes


def _row_extremes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (min, max) as columns; ``amin``/``amax`` apart: torch's ``aminmax`` along a
    dimension runs 20-40 times slower (torch 2.13, CPU)."""
    return rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)


def row_mean_squares(rows: torch.Tensor) -> torch.Tensor:
    """Each row's mean square (float32), from float32 copies of one chunk at a time; a single
    row longer than a chunk is summed chunk by chunk in float64."""
    if rows.shape[0] == 1 and rows.shape[1] > CHUNK_ELEMENTS:
        total = sum(float(rows[:, c:c + CHUNK_ELEMENTS].float().square().sum())
                    for c in range(0, rows.shape[1], CHUNK_ELEMENTS))
        return torch.tensor([total / rows.shape[1]], dtype=torch.float32)
    return torch.cat([rows[a:b].float().square().mean(dim=1) for a, b in _chunks(rows.shape)])


def _row_layout(
    shape: tuple[int, ...], granularity: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(block size, blocks) on the matrix view of one parameter per row of ``_rows``."""
    rows, cols = matrix_shape(shape)
    if granularity == "channel" and len(shape) >= 2 and rows > 0:
        return (1, max(cols, 1)), (rows, 1)
    if granularity == "channel" and len(shape) == 1 and cols > 0:  # one row per element
        return (1, 1), (1, cols)
    if granularity == "column" and _has_columns(shape):
        return (rows, 1), (1, cols)
    return (max(rows, 1), max(cols, 1)), (1, 1)


def _param_rows(shape: tuple[int, ...], granularity: str) -> tuple[int]:
    """The shape of a per-row parameter: one value per row of ``_rows``."""
    if granularity == "channel" and len(shape) >= 1 and shape[0] > 0:
        return (shape[0],)
    if granularity == "column" and _has_columns(shape):
        return (matrix_shape(shape)[1],)
    return (1,)


def _param(params: dict[str, np.ndarray], key: str, blocks: tuple[int, ...]) -> torch.Tensor:
    """A stored parameter in the grid's block layout (float16 or float32, as stored)."""
    if key not in params:
        raise ArchiveError(f"the quantizer's parameters lack {key!r}")
    array = np.asarray(params[key])
    if array.dtype not in (np.float16, np.float32):  # float16 stays: converting it is exact
        array = array.astype(np.float32)
    if array.size != math.prod(blocks):
        raise ArchiveError(f"parameter {key!r} holds {array.size} values, its grid needs "
                          f"{math.prod(blocks)}")
    return torch.tensor(array.reshape(blocks))


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(matrix_shape(weight.shape))


@register_quantizer
class AffineQuantizer(Quantizer):
    """Uniform affine min-max quantization to ``bits`` (2-8), per tensor or per output channel.

    The range is widened to include 0 and the zero point is an integer code, so 0 maps to 0
    exactly; every value in range is within scale/2 of its dequantized value.

    >>> q = AffineQuantizer(bits=2).quantize(torch.tensor([-1.0, 0.0, 2.0]))
    >>> q.codes.tolist(), q.dequantize().tolist()
    ([0, 1, 3], [-1.0, 0.0, 2.0])
    """

    strategy_id = "affine"
    params = {"bits": Param("int", 2, 8), "granularity": GRANULARITY}

    def __init__(self, bits: int = 8, granularity: str = "tensor") -> None:
        self.bits = bits
        self.granularity = granularity

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _rows(weight, self.granularity)
        top = (1 << self.bits) - 1
        if rows.numel():
            lo = rows.amin(dim=1).clamp(max=0.0)
            hi = rows.amax(dim=1).clamp(min=0.0)
        else:
            lo = hi = torch.zeros(rows.shape[0])
        scale = (hi - lo) / top
        if not bool(torch.isfinite(scale).all()):  # hi - lo beyond float32, as from +-3e38
            scale = ((hi.double() - lo.double()) / top).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-lo / scale).clamp(0, top)
        params = {"scale": scale.numpy(), "zero_point": zero_point.numpy()}
        grid = self.grid(tuple(weight.shape), top + 1, params)
        return QuantizedTensor(
            codes=_encoded(grid, _matrix(weight)).reshape(weight.shape),
            n_levels=top + 1,
            quantizer=self.get_config(),
            params=params,
            dtype=weight.dtype,
        )

    @classmethod
    def config_for_bits(cls, bits: int, granularity: str = "tensor") -> dict[str, Any]:
        """The paper's rule: 1 bit is binarization, more bits affine min-max."""
        if bits == 1:
            return BinaryQuantizer(granularity=granularity).get_config()
        return super().config_for_bits(bits, granularity)

    def level_range(self) -> tuple[int, int]:
        return 1 << self.bits, 1 << self.bits

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        """float32 ``scale`` > 0 and whole ``zero_point`` in [0, n_levels - 1], one per row."""
        rows = _param_rows(shape, self.granularity)
        return {"scale": ParamSpec(rows, positive=True),
                "zero_point": ParamSpec(rows, integer=True, minimum=0, maximum=n_levels - 1)}

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> AffineGrid:
        block, blocks = _row_layout(shape, self.granularity)
        return AffineGrid(block, _param(params, "scale", blocks),
                          _param(params, "zero_point", blocks), top=n_levels - 1)


@register_quantizer
class BinaryQuantizer(Quantizer):
    """1 bit: sign(w) * mean|w| (per tensor or channel); zeros stay zero as a third symbol.

    alpha is the mean magnitude of the non-zero weights, the least-squares scale for those
    signs. Without zeros the codes are {0: -alpha, 1: +alpha}; with zeros {0: -a, 1: 0, 2: +a}.

    >>> BinaryQuantizer().quantize(torch.tensor([-1.0, 3.0])).dequantize().tolist()
    [-2.0, 2.0]
    """

    strategy_id = "binary"
    params = {"granularity": GRANULARITY}

    def __init__(self, granularity: str = "tensor") -> None:
        self.granularity = granularity

    @property
    def bits(self) -> int:
        return 1

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows = _rows(weight, self.granularity)
        nonzero = rows != 0
        magnitudes = rows.abs().sum(dim=1)
        if not bool(magnitudes.isfinite().all()):  # summed past float32's range (|w| ~1e37
            # over a few thousand values, a bfloat16 weight's): in float64 there alone, as
            # float32 everywhere else keeps the scales archives were written with
            magnitudes = rows.abs().double().sum(dim=1)
        alpha = (magnitudes / nonzero.sum(dim=1).clamp(min=1)).float()
        n_levels = 3 if bool((~nonzero).any()) else 2
        params = {"alpha": alpha.numpy()}
        grid = self.grid(tuple(weight.shape), n_levels, params)
        return QuantizedTensor(
            codes=_encoded(grid, _matrix(weight)).reshape(weight.shape),
            n_levels=n_levels,
            quantizer=self.get_config(),
            params=params,
            dtype=weight.dtype,
        )

    def level_range(self) -> tuple[int, int]:
        return 2, 3

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        """float32 ``alpha`` >= 0 (0 for an all-zero row), one per row."""
        return {"alpha": ParamSpec(_param_rows(shape, self.granularity), minimum=0)}

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> CodebookGrid:
        """Codebook {-alpha, +alpha}, or {-alpha, 0, +alpha} with 0 for exact zeros only."""
        if n_levels not in (2, 3):
            raise ArchiveError(f"binary codes have 2 or 3 levels, got {n_levels}")
        block, blocks = _row_layout(shape, self.granularity)
        alpha = _param(params, "alpha", blocks).float()[..., None]
        entries = [-alpha, alpha] if n_levels == 2 else [-alpha, torch.zeros_like(alpha), alpha]
        return CodebookGrid(block, torch.cat(entries, dim=2),
                            zero_code=1 if n_levels == 3 else None, exclusive_zero=True)


@register_quantizer
class KMeansQuantizer(Quantizer):
    """Weight sharing (Deep Compression): a 2**bits-entry codebook fitted by 1-D k-means.

    When the weight holds exact zeros one entry is reserved for 0.0. The codebook is fitted on
    at most ``sample_size`` values (seeded), then every weight takes its nearest entry.

    >>> q = KMeansQuantizer(bits=1).quantize(torch.tensor([1.0, 1.1, 5.0, 5.2]))
    >>> [round(v, 2) for v in q.dequantize().tolist()]
    [1.05, 1.05, 5.1, 5.1]
    """

    strategy_id = "kmeans"
    params = {"bits": Param("int", 1, 8), "iterations": Param("int", 1, 10_000),
              "sample_size": Param("int", 1, 1 << 30), "seed": SEED}

    def __init__(
        self, bits: int = 4, iterations: int = 20, sample_size: int = 1 << 18, seed: int = 0
    ) -> None:
        self.bits = bits
        self.iterations = iterations
        self.sample_size = sample_size
        self.seed = seed

    def _fit(self, values: torch.Tensor, k: int) -> torch.Tensor:
        if values.numel() > self.sample_size:
            gen = torch.Generator().manual_seed(self.seed)
            values = values[torch.randint(values.numel(), (self.sample_size,), generator=gen)]
        distinct = torch.unique(values)
        if distinct.numel() <= k:
            return distinct
        centroids = torch.quantile(values, (torch.arange(k) + 0.5) / k).unique()
        for _ in range(self.iterations):
            assign = _nearest(values, centroids)
            sums = torch.bincount(assign, weights=values, minlength=centroids.numel())
            if not bool(sums.isfinite().all()):  # from |w| ~1e33 over 262,144 values: the
                # codebook took -inf for finite weights; summed in float64 there alone, as
                # float32 everywhere else keeps the codebooks archives were written with
                sums = torch.bincount(assign, weights=values.double(),
                                      minlength=centroids.numel())
            counts = torch.bincount(assign, minlength=centroids.numel())
            updated = torch.where(counts > 0, (sums / counts.clamp(min=1)).float(), centroids)
            updated, _ = updated.sort()
            if torch.equal(updated, centroids):
                break
            centroids = updated
        return centroids

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        flat = weight.detach().float().reshape(-1)
        nonzero = flat[flat != 0]
        has_zeros = nonzero.numel() < flat.numel()
        k = (1 << self.bits) - int(has_zeros)
        centroids = self._fit(nonzero, k) if k > 0 and nonzero.numel() else torch.zeros(0)
        if has_zeros or centroids.numel() == 0:
            centroids = torch.cat([centroids, torch.zeros(1)]).unique()
        params = {"codebook": centroids.numpy()}
        grid = self.grid(tuple(weight.shape), centroids.numel(), params)
        return QuantizedTensor(
            codes=_encoded(grid, _matrix(weight)).reshape(weight.shape),
            n_levels=centroids.numel(),
            quantizer=self.get_config(),
            params=params,
            dtype=weight.dtype,
        )

    def level_range(self) -> tuple[int, int]:
        return 1, 1 << self.bits

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        """A float32 ``codebook`` of ``n_levels`` entries, sorted (nearest-entry rounding
        needs it)."""
        return {"codebook": ParamSpec((n_levels,), ascending=True)}

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> CodebookGrid:
        """One sorted codebook for the whole tensor; 0.0, when present, is the zero code."""
        rows, cols = matrix_shape(shape)
        codebook = _param(params, "codebook", (1, 1, n_levels)).float()
        zeros = torch.nonzero(codebook.reshape(-1) == 0).reshape(-1)
        return CodebookGrid((max(rows, 1), max(cols, 1)), codebook,
                            zero_code=int(zeros[0]) if zeros.numel() else None)


_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # the smallest normal float16, 2**-14
SCALE_DTYPES = ("float16", "float32")
"""The dtypes a group-wise quantizer stores its scales in (`group_scale_dtype`)."""


def group_scale_dtype(largest: float) -> str:
    """The dtype of a tensor's group scales, from the largest (of a group not all zeros):
    float16 when it lies in float16's normal range [2**-14, 65504], else float32.

    float16 rounds a scale up by at most 2**-10 of itself, or 2**-24 below its normal range,
    so with the largest scale normal every scale is within 2**-10 of the tensor's coarsest
    step: no group is worse off than that one. A larger scale would saturate at 65504 (the
    group's extremes clip: |w| over about 65504 * 7 at 4 bits), and a tensor whose scales
    all lie below 2**-14 would be rounded far coarser than its own range (weights near
    1e-9 all round to 0): float32 holds both, exactly as computed.

    >>> group_scale_dtype(0.01), group_scale_dtype(1e5), group_scale_dtype(1e-9)
    ('float16', 'float32', 'float32')
    """
    return "float16" if largest == 0 or _FLOAT16_TINY <= largest <= _FLOAT16_MAX else "float32"


def _group_scale(scale: torch.Tensor) -> np.ndarray:
    """Each float32 scale as stored: where `group_scale_dtype` of the largest positive one is
    float16, the smallest float16 >= it (rounding up keeps the group's range inside the
    grid; one under the smallest float16 becomes that subnormal, 2**-24); else as it is.
    A scale of 0 (a group of zeros) becomes 1."""
    largest = float(scale.max()) if scale.numel() else 0.0
    wanted = torch.where(scale > 0, scale, torch.ones_like(scale)).numpy()
    if group_scale_dtype(largest) == "float32":
        return wanted.astype(np.float32)
    half = wanted.astype(np.float16)
    low = half.astype(np.float32) < wanted
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half


def _group_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(shape[0], prod(shape[1:])) view; a 0-d or 1-D tensor is one row."""
    if tensor.ndim >= 2:
        return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
    return tensor.reshape(1, -1)


def _grouped(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups, group_size), the last group of each row padded with zeros."""
    # a group past the row's end is the row: its zero padding changes no scale (0 is
    # always on the grid), and a group size of 2**31 must not pad every row to it
    group_size = min(group_size, max(rows.shape[1], 1))
    n_groups = -(-rows.shape[1] // group_size)
    pad = n_groups * group_size - rows.shape[1]
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], n_groups, group_size)


@register_quantizer
class GroupAffineQuantizer(Quantizer):
    """Group-wise affine quantization (the torchao int4 / GGUF-block family): one float16
    scale (and zero point) per ``group_size`` consecutive weights along the input dimension
    (float32 scales for a tensor whose largest scale float16 cannot hold, `group_scale_dtype`).

    The weight is viewed as (shape[0], prod(shape[1:])); a row not divisible by
    ``group_size`` ends with a shorter group. 32, 64 and 128 are the usual group sizes.
    Asymmetric: min-max with 0 exactly representable, the zero point an integer code.
    Symmetric: codes centred on ``2**(bits-1)``, scale ``max|w| / (2**(bits-1) - 1)``.
    The scale is computed in float32 and rounded up to float16, and the codes are derived
    from that stored scale, so ``(code - zero_point) * scale`` in float32 (then cast,
    saturating, to the weight's dtype) is what a reader anywhere computes; 0 stays exactly 0.

    >>> q = GroupAffineQuantizer(bits=2, group_size=2).quantize(torch.tensor([-1.0, 2, 0, 3]))
    >>> q.codes.tolist(), q.params["scale"].tolist(), q.dequantize().tolist()
    ([0, 3, 0, 3], [[1.0, 1.0]], [-1.0, 2.0, 0.0, 3.0])
    """

    strategy_id = "group"
    params = {"bits": Param("int", 2, 8), "group_size": Param("int", 1, MAX_GROUP_SIZE),
              "symmetric": Param("bool")}

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> None:
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric

    def _scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weight's float32 rows, each group's float32 scale (0 for a group of zeros)
        and lowest value, widened to 0 (asymmetric; else 0)."""
        rows = _group_rows(weight.detach().float())
        groups = _grouped(rows, self.group_size)
        if self.symmetric:
            lo = torch.zeros(())
            scale = groups.abs().amax(dim=2) / ((1 << (self.bits - 1)) - 1)
        else:
            lo = groups.amin(dim=2).clamp(max=0.0)
            scale = (groups.amax(dim=2).clamp(min=0.0) - lo) / ((1 << self.bits) - 1)
        if not bool(torch.isfinite(scale).all()):
            if not bool(torch.isfinite(rows).all()):
                if bool(torch.isfinite(weight).all()):  # a float64 weight beyond float32
                    raise InputError("group quantization computes in float32, and the "
                                     "weights reach beyond its range (|w| < 3.4e38); keep "
                                     "the layer as it is or use rd")
                raise InputError("group quantization needs finite weights (found inf or NaN)")
            raise InputError("group quantization needs each group's range (largest minus "
                             "smallest weight) within float32's; a group spans more: use a "
                             "per-tensor or per-channel quantizer")
        return rows, scale, lo

    def scale_dtype(self, weight: torch.Tensor) -> str:
        """The dtype `quantize` stores ``weight``'s scales in (`group_scale_dtype`)."""
        scale = self._scales(weight)[1]
        return group_scale_dtype(float(scale.max()) if scale.numel() else 0.0)

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        rows, scale, lo = self._scales(weight)
        top = (1 << self.bits) - 1
        stored = _group_scale(scale)
        params = {"scale": stored}
        if not self.symmetric:
            step = torch.from_numpy(stored.astype(np.float32))
            zero_point = torch.round((0.0 - lo) / step).clamp(0, top)  # never -0.0
            params["zero_point"] = zero_point.numpy().astype(np.float16)
        grid = self.grid(tuple(weight.shape), top + 1, params)
        return QuantizedTensor(
            codes=_encoded(grid, rows).reshape(weight.shape),
            n_levels=top + 1,
            quantizer=self.get_config(),
            params=params,
            dtype=weight.dtype,
        )

    def level_range(self) -> tuple[int, int]:
        return 1 << self.bits, 1 << self.bits

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        """float16 (or float32, `group_scale_dtype`) ``scale`` > 0 and (asymmetric) whole
        float16 ``zero_point`` in [0, n_levels - 1], one per group: (rows, ceil(columns /
        group_size)), at most one per weight."""
        rows, cols = matrix_shape(shape)
        groups = (rows, -(-cols // self.group_size))
        specs = {"scale": ParamSpec(groups, SCALE_DTYPES, positive=True)}
        if not self.symmetric:
            specs["zero_point"] = ParamSpec(groups, "float16", integer=True, minimum=0,
                                            maximum=n_levels - 1)
        return specs

    def check_params(self, shape: tuple[int, ...], n_levels: int,
                     params: dict[str, np.ndarray]) -> AffineGrid | None:
        """`Quantizer.check_params`, and float32 scales only where float16 could not hold
        them all: some scale lies outside float16's normal range (what `quantize` writes
        them for; a group of zeros may hold any scale, 1 as written)."""
        grid = super().check_params(shape, n_levels, params)
        scale = np.asarray(params["scale"])
        if scale.dtype == np.float32 and scale.size and bool(
                ((scale >= _FLOAT16_TINY) & (scale <= _FLOAT16_MAX)).all()):
            raise ArchiveError("parameter 'scale' is float32, but every scale lies in "
                               "float16's normal range (qlis stores float16 then)")
        return grid

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> AffineGrid:
        """(code - zero_point) * scale per group of ``group_size`` along the matrix's rows."""
        rows, cols = matrix_shape(shape)
        blocks = (rows, -(-cols // self.group_size))
        scale = _param(params, "scale", blocks)
        if self.symmetric:
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            zero = _param(params, "zero_point", blocks)
        return AffineGrid((1, self.group_size), scale, zero, top=n_levels - 1)


def _nearest(values: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (centroids sorted ascending)."""
    midpoints = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.bucketize(values, midpoints)


def make_quantizer(bits: int, granularity: str = "tensor", method: str = "affine") -> Quantizer:
    """The quantizer a policy uses for ``bits``: ``method``'s, at that many bits (the paper's
    binarization at 1 bit for "affine").

    >>> make_quantizer(1), make_quantizer(4, "channel")
    (BinaryQuantizer(granularity='tensor'), AffineQuantizer(bits=4, granularity='channel'))
    """
    return get_quantizer(quantizer_registry.get(method).config_for_bits(bits, granularity))


MAX_REL_MSE = 16.0
"""rel_mse names a step by its high-rate error, sqrt(12 * rel_mse) * RMS; from 1 up (steps
coarser than 3.5 x RMS) most weights round to 0, which is what the highest ratios need."""


def stored_codes(codes: torch.Tensor, n_levels: int) -> np.ndarray:
    """Whole-number codes in 0..n_levels-1 (any torch dtype) in the archive's width
    (`code_dtype`); straight to uint8 where that is it, with no int32 copy of a wide layer's
    codes."""
    width = code_dtype(n_levels)
    if width == np.uint8:
        return codes.to(torch.uint8).numpy()
    return codes.to(torch.int32).numpy().astype(width)


def code_dtype(n_levels: int) -> np.dtype:
    """The archive's width for codes ``< n_levels`` (uint8 or uint16, see
    `qlis.archive.format.code_dtype`), refusing an alphabet beyond MAX_LEVELS."""
    if n_levels > MAX_LEVELS:
        raise ConfigError(f"{n_levels} code levels exceed the limit of {MAX_LEVELS}")
    return stored_code_dtype(n_levels)


_BFLOAT16_MAX = np.float32(torch.finfo(torch.bfloat16).max)
_NARROWED = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""The dtypes whose values `_narrow` rounds to (0: float32 itself)."""


@njit(cache=True, nogil=True)
def _narrow(values: np.ndarray, kind: int) -> None:
    # Each float32 value (in place) -> its float16 (kind 1) or bfloat16 (kind 2) rounding,
    # to nearest, ties to even, as torch's .to() rounds (float16: subnormals too), saturating
    # at the largest finite value as `in_dtype` does.
    bits = values.view(np.uint32)
    for i in range(values.size):
        if kind == 2:
            v = values[i]
            if abs(v) > _BFLOAT16_MAX:
                values[i] = _BFLOAT16_MAX if v > 0 else -_BFLOAT16_MAX
            b = bits[i]
            bits[i] = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
                       ) & np.uint32(0xFFFF0000)
        elif kind == 1:
            v = values[i]
            if abs(v) >= np.float32(65504.0):  # the largest float16
                values[i] = np.float32(65504.0) if v > 0 else np.float32(-65504.0)
            elif abs(v) < np.float32(6.103515625e-05):  # float16 subnormals: steps of 2**-24
                values[i] = np.rint(v * np.float32(16777216.0)) / np.float32(16777216.0)
            else:
                b = bits[i]
                bits[i] = (b + np.uint32(0x0FFF) + ((b >> np.uint32(13)) & np.uint32(1))
                           ) & np.uint32(0xFFFFE000)


@njit(cache=True, nogil=True)
def _write_uniform_codes(matrix: np.ndarray, step: np.ndarray, zero: np.ndarray,
                         rounding: np.float32, low: np.float32, out: np.ndarray,
                         narrow: int, sums: np.ndarray) -> None:
    # out = the uniform grid's code of each value, less ``low``: the rounded value / step
    # (one step, or one per row) + zero, in float32 as AffineGrid.encode computes it, but in
    # one pass and straight into the stored codes. With ``narrow`` >= 0, sums += (sum of
    # value**2, sum of (decoded - value)**2) in float64, where a code decodes to level * step
    # in float32 (code - offset gives the level back exactly), as AffineGrid.decode computes
    # it, rounded to the weight's dtype (`_narrow`) as dequantize does.
    one = step.size == 1
    measure = narrow >= 0
    energy, error = 0.0, 0.0
    decoded = np.empty(matrix.shape[1] if measure else 0, dtype=np.float32)
    for r in range(matrix.shape[0]):
        s = step[0] if one else step[r]
        z = zero[0] if one else zero[r]
        for c in range(matrix.shape[1]):
            level = rounded_level(matrix[r, c] / s, rounding)
            out[r, c] = int(level + z - low)
            if measure:
                decoded[c] = level * s
        if not measure:
            continue
        if narrow:
            _narrow(decoded, narrow)
        for c in range(matrix.shape[1]):
            reference = np.float64(matrix[r, c])
            difference = np.float64(decoded[c]) - reference
            energy += reference * reference
            error += difference * difference
    sums[0] += energy
    sums[1] += error


@register_quantizer
class UniformQuantizer(Quantizer):
    """Entropy-coded uniform quantization: a fixed step, integer codes of any range.

    The scalar rate–distortion frontier: with an entropy coder behind it a uniform step is
    within 0.25 bit of the best any scalar quantizer can do at the same error. ``step`` is
    the step itself (relative to nothing), or ``rel_mse`` asks for the step whose high-rate
    error ``step**2 / 12`` is that fraction of the layer's (or channel's, or column's) mean
    square; ``granularity``: one step for the tensor, one per output row (``channel``) or
    one per input column (``column``, the matrix view's columns).
    ``rounding`` below 0.5 widens the zero bin (a dead zone) and lowers the rate. ``rel_mse``
    may exceed 1 (up to MAX_REL_MSE): a step coarser than 3.5 RMS, a very low rate.
    Value of code ``c``: ``(c - offset) * step[row or column]``; 0 stays exactly 0.

    >>> q = UniformQuantizer(step=0.5).quantize(torch.tensor([-1.0, 0.0, 0.3, 2.0]))
    >>> q.codes.tolist(), q.dequantize().tolist()
    ([0, 2, 3, 6], [-1.0, 0.0, 0.5, 2.0])
    """

    strategy_id = "uniform"
    params = {"step": Param("float", 0, _FLOAT32_MAX, low_open=True, optional=True),
              "rel_mse": Param("float", 0, MAX_REL_MSE, low_open=True, optional=True),
              "granularity": UNIFORM_GRANULARITY,
              "rounding": Param("float", 0, 0.5, low_open=True)}

    def __init__(
        self,
        step: float | None = None,
        rel_mse: float | None = None,
        granularity: str = "tensor",
        rounding: float = 0.5,
    ) -> None:
        if (step is None) == (rel_mse is None):
            raise ConfigError("uniform quantization takes exactly one of step= or rel_mse=")
        self.step = step
        self.rel_mse = rel_mse
        self.granularity = granularity
        self.rounding = rounding

    def steps(self, rows: torch.Tensor,
              extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The step of each row (float32): fixed, or from the row's mean square.
        ``extremes``: each row's (min, max) as columns where the caller has them, or those
        of the matrix whose rows ``rows`` flattens into one (a pass over the weight less)."""
        if self.step is not None:
            return torch.full((rows.shape[0],), self.step, dtype=torch.float32)
        if not rows.shape[1]:
            return torch.ones(rows.shape[0])
        if extremes is None:
            low, high = _row_extremes(rows)
        elif extremes[0].shape[0] == rows.shape[0]:
            low, high = extremes
        else:
            low, high = extremes[0].amin().reshape(1, 1), extremes[1].amax().reshape(1, 1)
        peak = torch.maximum(-low, high).float()
        if bool(((peak > 1e-10) & (peak < 1e10) | (peak == 0)).all()):
            rms = row_mean_squares(rows).sqrt()  # squares within float32
        else:  # scaled first: no under/overflow
            scale = torch.where(peak > 0, peak, torch.ones_like(peak))
            rms = (rows.float() / scale).square().mean(dim=1).sqrt() * scale.squeeze(1)
        step = (math.sqrt(12.0 * self.rel_mse) * rms).float()
        if bool(((step == 0) & (rms > 0)).any()):  # was taken for a row of zeros: step 1
            raise ConfigError(f"rel_mse={self.rel_mse:g} makes steps below float32's "
                              "smallest number: no layer can be rounded that finely")
        return torch.where(step > 0, step, torch.ones_like(step))

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        return self._round(weight, None)[0]

    def quantize_measured(self, weight: torch.Tensor) -> tuple[QuantizedTensor, float]:
        """Measured while rounding where the codes are written a range of rows at a time
        (a large float32, float16 or bfloat16 layer): the same error, summed in another
        order."""
        sums = np.zeros(2)
        q, measured = self._round(weight, sums)
        if not measured:
            return q, self.relative_error(weight, q)
        return q, float(sums[1] / sums[0]) if sums[0] else 0.0

    def _round(self, weight: torch.Tensor, sums: np.ndarray | None,
               ) -> tuple[QuantizedTensor, bool]:
        """The codes, and whether ``sums`` (when given) got the weight's energy and squared
        error: a large matrix of a dtype in _NARROWED, rounded a range of rows at a time (a
        small one is rounded at once, unmeasured)."""
        matrix = weight.detach().reshape(matrix_shape(weight.shape))
        chunks = _chunks(matrix.shape)
        # a step per column (or per element of a vector) is found from the whole matrix
        at_once = len(chunks) == 1 or self.granularity == "column" or (
            weight.ndim < 2 and self.granularity == "channel")
        extremes = None if at_once else _row_extremes(matrix)  # found once for both uses
        step = self.steps(_row_view(weight, self.granularity), extremes)
        params = {"step": step.numpy(), "offset": np.zeros(1, dtype=np.float32)}
        q = QuantizedTensor(np.zeros(0, np.uint8), 1, self.get_config(), params, weight.dtype)
        if at_once:
            levels = self.grid(tuple(weight.shape), 1, params).encode(matrix.float())
            return self.with_codes(q, levels.reshape(weight.shape)), False
        narrow = _NARROWED.get(weight.dtype, -1) if sums is not None else -1
        q = self._quantize_in_chunks(q, matrix, extremes, chunks, tuple(weight.shape), narrow,
                                     np.zeros(2) if sums is None else sums)
        return q, narrow >= 0

    def _quantize_in_chunks(self, q: QuantizedTensor, matrix: torch.Tensor,
                            extremes: tuple[torch.Tensor, torch.Tensor],
                            chunks: list[tuple[int, int]], shape: tuple[int, ...],
                            narrow: int, sums: np.ndarray) -> QuantizedTensor:
        """``quantize`` of a large matrix, row range by row range: the same codes (rounding
        is elementwise), the code range found first from each row's ``extremes`` (rounding is
        monotonic), so memory holds the uint8/uint16 codes and one chunk's floats; ``sums``
        gets the layer's energy and squared error unless ``narrow`` is -1 (see
        `_write_uniform_codes`)."""
        whole = self.grid(shape, 1, q.params)
        ends = torch.aminmax(whole.encode(torch.cat(extremes, dim=1).float()))
        probe = self.with_codes(q, torch.stack(ends))  # refuses non-finite or too many codes
        low = int(ends[0])
        codes = np.empty(matrix.shape, dtype=code_dtype(probe.n_levels))
        for a, b in chunks:
            rows = whole.rows(a, b)  # one step for the tensor, or one per row
            _write_uniform_codes(matrix[a:b].float().contiguous().numpy(),
                                 rows.scale.reshape(-1).numpy(), rows.zero.reshape(-1).numpy(),
                                 np.float32(self.rounding), np.float32(low), codes[a:b],
                                 narrow, sums)
        return QuantizedTensor(codes.reshape(shape), probe.n_levels, q.quantizer,
                               probe.params, q.dtype)

    def param_specs(self, shape: tuple[int, ...], n_levels: int) -> dict[str, ParamSpec]:
        """float32 ``step`` > 0 per row and one whole float32 ``offset`` (the code of 0.0,
        which may lie outside the codes when every weight has one sign)."""
        return {"step": ParamSpec(_param_rows(shape, self.granularity), positive=True),
                "offset": ParamSpec((1,), integer=True)}

    def with_row_scales(self, q: QuantizedTensor, factors: np.ndarray) -> QuantizedTensor | None:
        """A step per row (granularity ``channel``): each row's step times its factor; the
        config's ``step`` (or ``rel_mse``) stays what the steps were derived from."""
        rows = matrix_shape(q.shape)[0]
        if len(q.shape) < 2 or len(factors) != rows:
            return None
        steps = np.broadcast_to(np.asarray(q.params["step"], dtype=np.float64).reshape(-1),
                                (rows,))
        scaled = (steps * factors).astype(np.float32)
        if not (np.isfinite(scaled).all() and (scaled > 0).all()):
            return None
        return QuantizedTensor(q.codes, q.n_levels, {**q.quantizer, "granularity": "channel"},
                               {"step": scaled, "offset": q.params["offset"]}, q.dtype)

    def with_column_scales(self, q: QuantizedTensor,
                           factors: np.ndarray) -> QuantizedTensor | None:
        """One step for the tensor (granularity ``tensor``) becomes a step per column, the
        step times each column's factor; the config's ``step`` (or ``rel_mse``) stays what
        the steps were derived from."""
        columns = matrix_shape(q.shape)[1]
        if self.granularity != "tensor" or not _has_columns(q.shape) or len(factors) != columns:
            return None
        step = float(np.asarray(q.params["step"], dtype=np.float64).reshape(-1)[0])
        scaled = (step * np.asarray(factors, dtype=np.float64)).astype(np.float32)
        if not (np.isfinite(scaled).all() and (scaled > 0).all()):
            return None
        return QuantizedTensor(q.codes, q.n_levels, {**q.quantizer, "granularity": "column"},
                               {"step": scaled, "offset": q.params["offset"]}, q.dtype)

    def grid(self, shape: tuple[int, ...], n_levels: int, params: dict) -> AffineGrid:
        """Unbounded: (code - offset) * step, one step per tensor, row or column, codes
        rebased to 0."""
        block, blocks = _row_layout(shape, self.granularity)
        step = _param(params, "step", blocks)
        offset = _param(params, "offset", (1,))
        return AffineGrid(block, step, offset.expand_as(step).clone(), rounding=self.rounding)

    def with_codes(self, q: QuantizedTensor, codes: torch.Tensor) -> QuantizedTensor:
        """Codes of any range: shifted so the lowest is 0, the offset moved with them."""
        low, high = (float(v) for v in torch.aminmax(codes)) if codes.numel() else (0, 0)
        if not math.isfinite(low) or not math.isfinite(high):
            raise ConfigError("uniform quantization needs finite weights and steps within "
                              "float32's range (|w| < 3.4e38)")
        low, high = int(low), int(high)
        n_levels = high - low + 1
        # the user gave a step, or a rel_mse that the step came from: the message names it
        small = ("a step this small" if self.step is not None
                 else f"the step that rel_mse {self.rel_mse:g} asks for")
        if n_levels > MAX_LEVELS:
            raise ConfigError(
                f"{small} needs {n_levels} levels for this layer's range "
                f"(at most {MAX_LEVELS}); use a larger step or rel_mse"
            )
        offset = float(np.asarray(q.params["offset"]).reshape(-1)[0]) - low
        if abs(offset) > EXACT_FLOAT32_INTEGERS:
            raise ConfigError(
                f"{small} puts this layer's codes {abs(offset):.3g} steps from "
                f"zero, beyond the {EXACT_FLOAT32_INTEGERS} that the stored float32 offset "
                "holds exactly; use a larger step or rel_mse"
            )
        shifted = codes - low if codes.is_floating_point() else codes.to(torch.int32) - low
        return QuantizedTensor(
            codes=stored_codes(shifted, n_levels).reshape(codes.shape),
            n_levels=n_levels,
            quantizer=q.quantizer,
            params={"step": q.params["step"], "offset": np.array([offset], dtype=np.float32)},
            dtype=q.dtype,
        )
