"""Executing one layer of a plan: prune, quantize (optionally with error feedback), measure.

``execute_layer`` is what ``qlis.compress`` runs per layer and what policies run to probe a
candidate, so a probe measures exactly what the result will hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from qlis.archive.codecs import optimal_huffman_bits, symbol_histogram
from qlis.errors import InputError
from qlis.measure.calibrate import Replacement
from qlis.measure.distortion import peak_abs, relative_mse
from qlis.measure.row_shares import step_factors
from qlis.models.tensors import storage_bits
from qlis.plan.plans import LayerConfig
from qlis.plan.sizes import (
    QUANTIZED_RECORD_BYTES,
    coded_code_bytes,
    kept_bytes,
    param_bytes,
)
from qlis.quantize.column_scales import column_stepped, divided_columns
from qlis.quantize.gptq import fit_with_error_feedback, output_error
from qlis.quantize.grid import matrix_shape
from qlis.quantize.pruners import get_pruner
from qlis.quantize.quantizers import (
    QuantizedTensor,
    Quantizer,
    code_dtype,
    get_quantizer,
    quantized,
)

StoredTensor = torch.Tensor | QuantizedTensor


@dataclass(frozen=True)
class LayerPlan:
    """What happened to one layer: its score, its strategies, and what they cost and saved.

    ``kept`` counts the weights the pruner did not remove (zeros that were already in the
    weight count as kept: the paper's ratios give nothing for them); ``coded_bytes`` is the
    entropy-coded size estimate of the layer as stored (codes + parameters + record);
    ``reconstruction`` says how calibration shaped it ("" without error feedback);
    ``feedback`` is the output error its error feedback left, relative to plain rounding's, on
    the layer's calibration inputs (None where the layer was rounded plainly).
    """

    name: str
    numel: int
    qlis: float | None
    pruner: dict | None
    quantizer: dict | None
    k: float | None
    bits: int | None
    sparsity: float
    rel_mse: float
    kept: int
    paper_bits: float
    huffman_bits: float
    coded_bytes: float
    reconstruction: str = ""
    feedback: float | None = None

    @property
    def unchanged(self) -> bool:
        """Neither pruned nor quantized: stored exactly as it was."""
        return self.pruner is None and self.quantizer is None


def pruned_count(weight: torch.Tensor, pruned: torch.Tensor) -> int:
    """How many weights the pruner zeroed (zeros already in the weight are not counted)."""
    return int(torch.count_nonzero((pruned == 0) & (weight != 0)))


STEPS_BY_LOOKUPS = ", a step per row by its share of the lookups"
"""Added to a table's reconstruction note where its rows were stepped by their lookups."""


def _stored_codes(codes: np.ndarray, n_levels: int) -> np.ndarray:
    """The codes, flat, in the width the archive stores them in (a third-party quantizer's
    codes of another integer type narrowed)."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    return flat if flat.dtype == code_dtype(n_levels) else flat.astype(code_dtype(n_levels))


def _symbol_counts(flat: np.ndarray, n_levels: int) -> np.ndarray:
    """How often each code occurs, for the ``n_levels`` codes (numpy's bincount would widen
    the codes to int64 first: 8 bytes per weight)."""
    return symbol_histogram(flat)[:n_levels]


def execute_layer(
    name: str, weight: torch.Tensor, config: LayerConfig, qlis: float | None = None,
    hessian: torch.Tensor | None = None, transposed: bool = False, reconstruction: str = "",
    sweeps: int = 0, overwrite_hessian: bool = False, row_shares: torch.Tensor | None = None,
    column_factors: np.ndarray | None = None,
) -> tuple[StoredTensor, LayerPlan]:
    """Prune then quantize one layer as ``config`` says, and measure what that did.

    With ``hessian`` (the layer's input covariance; per output group when 3-D) the rounding
    feeds its error forward (GPTQ, qlis/quantize/gptq.py; ``transposed`` for a weight stored
    (in, out)), then ``sweeps`` passes of learned rounding refine the codes
    (qlis/quantize/rounding.py); the stored format is the quantizer's own.
    ``overwrite_hessian``: the fit may use ``hessian``'s buffer for its factor, and frees
    it once done (``hessian`` is then empty). ``row_shares`` (an embedding table's rows'
    expected shares of the lookups, `qlis.measure.row_shares`): a quantizer with a step per row
    (`Quantizer.with_row_scales`) steps each row by it, and the fit's feedback is left
    unmeasured. ``column_factors`` (one per input, rd's: qlis/quantize/column_scales.py): an
    unpruned layer whose quantizer can carry them takes a step per input column, fitted or
    rounded.
    ``reconstruction`` is recorded in the plan row."""
    pruner = get_pruner(config.pruner) if config.pruner else None
    pruned = pruner.prune(weight)[0] if pruner else weight
    removed_mask = (pruned == 0) & (weight != 0) if pruner else None
    removed = int(torch.count_nonzero(removed_mask)) if pruner else 0
    kept = weight.numel() - removed
    width = storage_bits(weight.dtype)
    feedback = None
    if pruner is not None:
        column_factors = None  # the pruner's threshold is the weight's, not the divided one's
    if config.quantizer is None:
        stored: StoredTensor = pruned
        rel_mse = relative_mse(weight, pruned)
        paper = huffman = float(kept * width)
        coded = kept_bytes(pruned)
        bits = None
    else:
        if hessian is not None:
            if not bool(torch.isfinite(hessian).all()):  # the weight was checked finite
                raise InputError(
                    f"{name}: the covariance of its calibration inputs is not finite (their "
                    "squares sum past float32's 3.4e38, or they hold inf or NaN): it cannot be "
                    "fitted to them; compress with error_feedback=False, or calibrate with "
                    "inputs of an ordinary scale")
            stored = None
            if row_shares is not None and not transposed:
                factors = step_factors(row_shares)
                fed = fit_with_error_feedback(_rows_scaled(pruned, 1 / factors), hessian,
                                              config.quantizer, sweeps=sweeps, label=name)
                stored = get_quantizer(config.quantizer).with_row_scales(fed.quantized, factors)
            if stored is not None:
                # no feedback: weighed by the shares, the error it leaves looks small and the
                # allocation took the table's bytes away (MiniLM, 2.75 b/w: cosine 0.9770
                # against 0.9822 with the table's curve as measured)
                reconstruction += STEPS_BY_LOOKUPS
                approx = stored.dequantize()
            else:
                plain = _plain_output_error(name, weight, pruned, config, hessian, transposed,
                                            column_factors)
                # the fit measures what it leaves, except from a pruned weight or after
                # learned rounding: then the covariance is needed after the fit and must not
                # be its buffer
                measures = pruner is None and not sweeps
                fed = fit_with_error_feedback(pruned, hessian, config.quantizer,
                                              transposed=transposed, sweeps=sweeps,
                                              overwrite_hessian=overwrite_hessian and measures,
                                              label=name, column_factors=column_factors)
                stored = fed.quantized
                approx = stored.dequantize()
                left = fed.output_error if measures else output_error(approx - weight, hessian,
                                                                      transposed)
                feedback = left / plain if plain > 0 else None
            if overwrite_hessian:  # the caller's buffer, done with: its width^2 freed now,
                hessian.set_()  # not when the caller's frames let go of it
            rel_mse = relative_mse(weight, approx)
        elif pruner is None:
            quantizer = get_quantizer(config.quantizer)
            stored = _rounded(name, quantizer, weight, column_factors, transposed)
            if stored is None:
                stored, rel_mse = quantized(quantizer, weight, name)
            else:  # its grid is its stored config's (a step per column), not the plan's
                rel_mse = get_quantizer(stored.quantizer).relative_error(weight, stored)
        else:
            quantizer = get_quantizer(config.quantizer)
            stored = quantized(quantizer, pruned, name, measured=False)[0]
            rel_mse = quantizer.relative_error(weight, stored)
        if not math.isfinite(rel_mse) or not _finite_params(stored):
            raise _beyond_float32(name, weight, config)
        bits = config.bits or stored.code_bits
        paper = float(kept * bits)
        codes = _stored_codes(stored.codes, stored.n_levels)
        counts = _symbol_counts(codes, stored.n_levels)
        kept_counts = counts  # the paper's HCR codes only the weights the pruner kept
        if removed:
            kept_counts = _symbol_counts(codes[~removed_mask.numpy().reshape(-1)],
                                         stored.n_levels)
        huffman = float(optimal_huffman_bits(kept_counts))
        coded = (coded_code_bytes(counts, codes, matrix_shape(weight.shape)[1])
                 + param_bytes(stored.params) + QUANTIZED_RECORD_BYTES)
    plan = LayerPlan(
        name=name,
        numel=weight.numel(),
        qlis=qlis,
        pruner=config.pruner,
        quantizer=config.quantizer,
        k=config.k,
        bits=bits,
        sparsity=removed / max(weight.numel(), 1),
        rel_mse=rel_mse,
        kept=kept,
        paper_bits=paper,
        huffman_bits=huffman,
        coded_bytes=coded,
        reconstruction=reconstruction,
        feedback=feedback,
    )
    return stored, plan


def _plain_output_error(name: str, weight: torch.Tensor, pruned: torch.Tensor,
                        config: LayerConfig, hessian: torch.Tensor, transposed: bool,
                        column_factors: np.ndarray | None) -> float:
    """The output error of plain rounding (on the same grid: a step per input column where
    the fit takes one), what ``LayerPlan.feedback`` compares the fed-back weight's with
    (float32 products: it is a ratio)."""
    quantizer = get_quantizer(config.quantizer)
    plain = _rounded(name, quantizer, pruned, column_factors, transposed)
    if plain is None:
        plain = quantized(quantizer, pruned, name, measured=False)[0]
    plain = plain.dequantize()
    if not bool(torch.isfinite(plain).all()):
        raise _beyond_float32(name, weight, config)
    return output_error(plain - weight, hessian, transposed, dtype=torch.float32)


def _rounded(name: str, quantizer: Quantizer, weight: torch.Tensor,
             column_factors: np.ndarray | None, transposed: bool) -> QuantizedTensor | None:
    """``weight`` rounded to nearest with a step per input column by ``column_factors``;
    None without factors or where the quantizer cannot carry them."""
    if column_factors is None:
        return None
    divided = divided_columns(weight, column_factors, transposed).to(weight.dtype)
    q = quantized(quantizer, divided, name, measured=False)[0]
    return column_stepped(quantizer, q, column_factors, transposed)


def _rows_scaled(tensor: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
    """``tensor`` with each matrix row times its factor, in its own dtype."""
    rows = torch.as_tensor(factors, dtype=torch.float64).reshape(-1, 1)
    matrix = tensor.reshape(matrix_shape(tensor.shape)).to(torch.float64) * rows
    return matrix.to(tensor.dtype).reshape(tensor.shape)


def _finite_params(stored: QuantizedTensor) -> bool:
    """Whether every parameter of the grid is finite: decoding saturates a bfloat16 or float16
    weight's values at its dtype's largest, so an infinite scale leaves them finite (every
    weight at +3.4e38, its sign lost) and the relative error alone does not tell."""
    return all(bool(np.isfinite(value).all()) for value in map(np.asarray, stored.params.values())
               if value.dtype.kind == "f")


def _beyond_float32(name: str, weight: torch.Tensor, config: LayerConfig) -> InputError:
    """A quantizer whose grid, sized by the weight's range, does not fit float32 (values
    near float32's largest, or a float64 weight beyond it)."""
    return InputError(
        f"layer {name!r}: quantizer {config.quantizer.get('id')!r} cannot hold its values "
        f"(up to {peak_abs(weight):.3g}): its grid leaves float32's range; keep the layer "
        "as it is or use rd"
    )


@dataclass(frozen=True)
class Realized:
    """A plan as executed: the tensors it changed, as the model computes with them, and the
    coded bytes of its layers and of what correcting biases added to the fixed part (what a
    size target counts, besides the fixed part), and each reconstructed layer's
    ``LayerPlan.feedback``."""

    tensors: dict[str, Replacement]
    layer_bytes: float
    feedback: dict[str, float] = field(default_factory=dict)


def dequantized(stored: StoredTensor) -> torch.Tensor:
    """The tensor a stored layer computes with."""
    return stored.dequantize() if isinstance(stored, QuantizedTensor) else stored


@dataclass(frozen=True)
class Dequantized:
    """A quantized layer's values, made when a calibration pass asks for them
    (`Calibration.swapped`): all of them, or, for an embedding's table, only the rows a call
    looks up, decoded a chunk of rows at a time (a vocabulary's float table is the largest
    copy a pass would otherwise make: 119 MiB for BERT's at width 1024)."""

    stored: QuantizedTensor

    def __call__(self) -> torch.Tensor:
        return self.stored.dequantize()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (ascending, distinct, each a row of the table) of the table."""
        q = self.stored
        width = math.prod(q.shape[1:])
        out = torch.empty(len(index), width, dtype=q.dtype)
        for start, stop, values in get_quantizer(q.quantizer).dequantized_rows(q, index):
            first, last = torch.searchsorted(index, torch.tensor([start, stop])).tolist()
            out[first:last] = values[index[first:last] - start]
        return out.reshape(len(index), *q.shape[1:])


def lazily(stored: StoredTensor) -> Replacement:
    """What a calibration pass computes with for a stored layer: a quantized one is made when
    its module runs (`Dequantized`), a float one is itself."""
    return Dequantized(stored) if isinstance(stored, QuantizedTensor) else stored
