"""The sentence embeddings of a sentence-transformers folder, as what its calibration compares.

Such a folder (``modules.json``: the Hugging Face model, then a Pooling module, often
Normalize) is used for one vector per sentence, pooled from the model's per-token states.
Calibration compares and fits what a model outputs; compared per token it spends bits on
differences the pooling averages away (all-MiniLM-L6-v2 with synthetic calibration at 3.5
bits/weight: mean cosine of the sentence embeddings 0.9888 fitted per token, 0.9902 fitted on
the pooled vectors). So a calibration batch of such a folder outputs the pooled vector, made
as sentence-transformers' Pooling makes it; the cosine a compression reports is then that of
the sentence embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from qlis.errors import InputError
from qlis.json_input import read_json_file
from qlis.measure.calibrate import first_tensor
from qlis.models.checkpoints import folder_file

POOLING_TYPE = "sentence_transformers.models.Pooling"
MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens",
         "weightedmean_tokens", "lasttoken")
"""sentence-transformers' pooling modes, in the order it concatenates them."""
_MAX_JSON_BYTES = 1 << 20


def pooling_modes(folder: str | Path) -> tuple[str, ...] | None:
    """The pooling modes of a sentence-transformers ``folder`` (its ``modules.json`` names a
    Pooling module, whose ``config.json`` says which), None for other folders."""
    folder = Path(folder)
    listing = folder / "modules.json"
    if not os.path.lexists(listing):
        return None
    modules = read_json_file(folder_file(folder, "modules.json"), "modules.json",
                             _MAX_JSON_BYTES, list)
    pooling = [m for m in modules if isinstance(m, dict) and m.get("type") == POOLING_TYPE]
    if not pooling:
        return None
    where = pooling[0].get("path")
    inside = folder.resolve()
    try:
        outside = not isinstance(where, str) or not (inside / where).resolve().is_relative_to(
            inside)
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a loop of links
        outside = True
    if outside:
        raise InputError(f"{folder}/modules.json: the Pooling module's path must be a folder "
                         f"inside the model folder, got {where!r}")
    config = read_json_file(folder_file(folder, Path(where) / "config.json"),
                            "the Pooling module's config.json", _MAX_JSON_BYTES, dict)
    modes = tuple(mode for mode in MODES if config.get(f"pooling_mode_{mode}") is True)
    if not modes:
        raise InputError(f"{folder / where}/config.json: no pooling mode is set (one of "
                         f"{', '.join('pooling_mode_' + m for m in MODES)})")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One pooling ``mode`` of per-token states (batch, tokens, width) under an attention
    mask (batch, tokens), as sentence-transformers' Pooling computes it."""
    weights = mask.to(hidden.dtype)[..., None]
    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "max_tokens":
        return hidden.masked_fill(weights == 0, -1e9).amax(1)
    if mode in ("mean_tokens", "mean_sqrt_len_tokens"):
        count = weights.sum(1).clamp(min=1e-9)
        return (hidden * weights).sum(1) / (count if mode == "mean_tokens" else count.sqrt())
    if mode == "weightedmean_tokens":
        positions = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype,
                                 device=hidden.device)[None, :, None] * weights
        return (hidden * positions).sum(1) / positions.sum(1).clamp(min=1e-9)
    if mode == "lasttoken":
        last = (mask.to(torch.long) * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise InputError(f"unknown pooling mode {mode!r}; known: {', '.join(MODES)}")


class PooledBatch:
    """A calibration batch (``qlis.compress(calib=[...])``) whose output is the sentence
    embedding: the model's per-token states pooled by ``modes``, concatenated."""

    def __init__(self, batch: dict[str, torch.Tensor], modes: tuple[str, ...]) -> None:
        self.batch = batch
        self.modes = modes
        self.synthetic = getattr(batch, "synthetic", False)  # made up (synthetic_calibration)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        hidden = first_tensor(model(**self.batch))
        if hidden.ndim != 3:
            raise InputError(f"a sentence-transformers folder's model should give per-token "
                             f"states (batch, tokens, width), it gave {list(hidden.shape)}")
        mask = self.batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return torch.cat([pool(hidden, mask, mode) for mode in self.modes], -1)


def sentence_embedding_batches(folder: str | Path, batches: list[dict[str, Any]],
                               ) -> tuple[list[Any], tuple[str, ...] | None]:
    """``batches`` as `PooledBatch` calls for a sentence-transformers ``folder`` (and its
    pooling modes), as they are (and None) for any other folder."""
    modes = pooling_modes(folder)
    if modes is None:
        return list(batches), None
    return [PooledBatch(batch, modes) for batch in batches], modes


def describe(modes: tuple[str, ...]) -> str:
    """How the pooled vectors were made, for the command's report."""
    return " + ".join(mode.removesuffix("_tokens").removesuffix("_token") for mode in modes)
