"""Compress a trained model with qlis and write a self-describing .qlis archive.

The archive's metadata holds the model family, backbone config, preprocessing and head size
(strings), so `qlis-iqa score --model X.qlis` rebuilds the model from the archive alone.

Policy "rd" can measure distortion on the model's output: `calibration(model, samples)` runs a
few training images through the whole model. qlis compares outputs by cosine, and raw quality
scores all sit near the mean opinion score (cosine ~1 whatever their order), so the compared
output is the scores minus their mean: its cosine is the Pearson correlation of the compressed
model's predictions with the original's, which is what the SRCC of a compressed model follows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import qlis
from qlis_iqa.data import Sample
from qlis_iqa.errors import IQAError
from qlis_iqa.features import image_loader
from qlis_iqa.models import KEY, IQAModel, state_nbytes
from qlis_iqa.train import HeadRefit, refit_compressed


class CentredScores:
    """`calib(model)` for qlis: the model's scores on fixed pixel batches, minus their mean."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches = list(batches)

    @property
    def images(self) -> int:
        return sum(len(b) for b in self.batches)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """Differentiable (qlis runs it under inference mode, and with gradients to measure
        each layer's sensitivity in a few backward passes)."""
        device = next(model.parameters()).device
        scores = torch.cat([model(b.to(device)).double().cpu() for b in self.batches])
        return scores - scores.mean()


def constant_output(result: Any) -> bool:
    """Whether a compression calibrated on `CentredScores` gives every calibration image the
    same score: its centred scores are all zero, which qlis measures as cosine 0 and relative
    MSE exactly 1 (a correlation with a constant is undefined, not 0)."""
    output = (getattr(result, "distortion", None) or {}).get("output") or {}
    return output.get("cosine") == 0.0 and output.get("rel_mse") == 1.0


def calibration(
    model: IQAModel,
    samples: Sequence[Sample],
    images: int = 32,
    batch_size: int = 16,
    seed: int = 0,
) -> CentredScores:
    """Calibration data for policy "rd": up to `images` readable images (a seeded choice)."""
    if images < 3:  # two centred scores are (a, -a): their cosine is always +-1
        raise IQAError(f"calibration needs at least 3 images, got {images}")
    chosen = random.Random(seed).sample(list(samples), min(images, len(samples)))
    loader = image_loader([s.path for s in chosen], model.preprocess, batch_size, 0)
    batches = [pixels for _, pixels, _ in loader if pixels is not None]
    calib = CentredScores(batches)
    if calib.images < 3:
        raise IQAError(f"calibration: fewer than 3 of {len(chosen)} training images are readable")
    return calib


@dataclass
class Packed:
    """A written archive: the compression result, its path, size and ratios."""

    result: Any
    path: Path
    file_bytes: int
    original_bytes: int
    refit: HeadRefit | None = None

    @property
    def real_ratio(self) -> float:
        """Original tensor bytes / archive bytes on disk (everything included)."""
        return self.original_bytes / self.file_bytes


def compress_model(
    model: IQAModel,
    policy: str = "lapq",
    beta: float = 0.5,
    calib: CentredScores | None = None,
    **options: Any,
) -> Any:
    """`qlis.compress` of the whole model; with `calib` the model itself is run (untouched)."""
    if calib is not None:
        return qlis.compress(model, policy=policy, beta=beta, calib=calib, **options)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return qlis.compress(state, policy=policy, beta=beta, **options)


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an archive path whose folder is missing (never created) or that exists already."""
    path = Path(path)
    if not path.parent.is_dir():
        raise IQAError(f"{path.parent}: no such folder (create it first)")
    if path.exists() and not overwrite:
        raise IQAError(f"{path} exists; pass --force (overwrite=True) to replace it")
    return path


def write_archive(
    model: IQAModel,
    result: Any,
    path: str | Path,
    codec: str = "ans",
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Packed:
    """Save `result` (a compression of `model`) with the metadata that rebuilds the model."""
    path = check_target(path, overwrite)
    meta = {**model.metadata(), **(metadata or {})}
    qlis.save(result, path, codec=codec, metadata=meta, overwrite=overwrite)
    return Packed(result, path, path.stat().st_size, state_nbytes(model))


def pack(
    model: IQAModel,
    path: str | Path,
    policy: str = "lapq",
    beta: float = 0.5,
    codec: str = "ans",
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    calib: CentredScores | None = None,
    refit: Sequence[Sample] | None = None,
    **options: Any,
) -> Packed:
    """Compress the whole model (backbone and head) and write its archive.

    The target is checked before compressing: its folder must exist, and an existing file is
    replaced only with `overwrite`. `calib` (policy "rd"): see `calibration`. `refit`
    (training images): the MLP head is trained again on the compressed backbone's outputs of
    them (`refit_compressed`) before the archive is written.
    """
    check_target(path, overwrite)
    result = compress_model(model, policy, beta, calib, **options)
    extra = {KEY + "policy": policy, KEY + "beta": str(beta), **(metadata or {})}
    extra.update({KEY + f"option.{k}": str(v) for k, v in options.items()})
    if calib is not None:
        extra[KEY + "calibration"] = f"{calib.images} training images, centred scores"
    head = None
    if refit is not None:
        head = refit_compressed(model, result, refit)
        result = head.result
        extra[KEY + "head_refit"] = (f"{head.images} training images, score MSE "
                                     f"{head.mse_before:.6g} -> {head.mse_after:.6g}")
    packed = write_archive(model, result, path, codec, extra, overwrite)
    packed.refit = head
    return packed
