"""Predict the scores of annotated images (through the feature cache) and measure correlations."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qlis.archive.atomic import atomic_path
from qlis.cli.console import escape
from qlis_iqa.data import IQADataset, Sample, Split, load_dataset, shown_name, split_samples
from qlis_iqa.errors import IQAError
from qlis_iqa.features import FeatureCache, extract_features
from qlis_iqa.metrics import correlations, logistic_fit
from qlis_iqa.models import KEY, IQAModel

Log = Callable[[str], None]


def skipped_report(what: str, items: Sequence[tuple[str, str]]) -> str:
    """'' or one line: how many images were skipped and the first few, with why."""
    if not items:
        return ""
    first = "; ".join(f"{shown_name(name)}: {escape(why)}" for name, why in items[:3])
    return f"{what}: {len(items)} image(s) skipped (first: {first})"


@dataclass
class Predictions:
    """Predicted scores of the readable images of a sample list, and the skipped ones."""

    names: list[str]
    mos: np.ndarray
    pred: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def metrics(self, logistic: bool = False) -> dict[str, float]:
        return correlations(self.pred, self.mos, logistic=logistic)

    def undefined(self, metrics: dict[str, float]) -> str:
        """Why some of `metrics` are NaN ("" when none is): a correlation of constant scores is
        undefined, and a bare "nan" beside the others would read as a result."""
        names = [k.upper().replace("_", " ") for k, v in metrics.items() if math.isnan(v)]
        if not names:
            return ""
        n = len(self.pred)
        if np.ptp(self.pred) == 0:
            why = f"the model gives all {n} images the same score"
        elif np.ptp(self.mos) == 0:
            why = f"all {n} images have the same MOS"
        else:  # the fit's own reason (too few points, a step function, a failed fit...)
            reason = logistic_fit(self.pred, self.mos).reason or "a step function"
            why = f"the logistic fit is degenerate ({reason})"
        return f"{', '.join(names)} undefined (nan): {why}"

    def write_csv(self, path: str | Path, label: str, overwrite: bool = False) -> Path:
        """name, mos, prediction, backbone label — one row per scored image. A file at `path`
        is replaced only with `overwrite`, also one that appeared during the evaluation."""
        path = Path(path)
        with (
            atomic_path(path, overwrite) as tmp,
            tmp.open("w", newline="", encoding="utf-8") as f,
        ):
            w = csv.writer(f)
            w.writerow(["name", "mos", "prediction", "backbone"])
            for n, m, p in zip(self.names, self.mos, self.pred, strict=True):
                w.writerow([n, f"{m:.6f}", f"{p:.6f}", label])
        return path


@torch.inference_mode()
def predict_features(model: IQAModel, values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Run the trainable part of the model on cached frozen outputs."""
    model.eval()
    device = next(model.parameters()).device
    with model.inference_context():
        out = [
            model.trainable_forward(values[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(values), batch_size)
        ]
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class SampleFeatures:
    """Frozen outputs of the readable samples (in order) and the samples that were skipped."""

    samples: list[Sample]
    values: torch.Tensor
    skipped: list[tuple[str, str]]
    computed: int
    cached: int


def sample_features(
    model: IQAModel,
    samples: Sequence[Sample],
    cache: FeatureCache | None,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    fingerprint: str | None = None,
) -> SampleFeatures:
    """Frozen outputs of annotated samples; unreadable images are returned as skipped."""
    feats = extract_features(
        model,
        [s.path for s in samples],
        cache,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        desc=desc,
        fingerprint=fingerprint,
    )
    good = [samples[i] for i in feats.index]
    skipped = [(samples[i].name, why) for i, why in feats.bad]
    return SampleFeatures(good, feats.values, skipped, feats.computed, feats.cached)


def predict_samples(
    model: IQAModel,
    samples: Sequence[Sample],
    cache: FeatureCache | None,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    desc: str = "evaluate",
    fingerprint: str | None = None,
) -> Predictions:
    """Scores of annotated samples; frozen outputs come from (and go to) the cache."""
    sf = sample_features(model, samples, cache, batch_size, workers, progress, desc, fingerprint)
    if not sf.samples:
        raise IQAError(f"{desc}: no readable image among {len(samples)} ({sf.skipped[0][1]})")
    pred = predict_features(model, sf.values).numpy().astype(np.float64)
    finite = np.isfinite(pred)  # an overflow inside the model is no score, not a NaN metric
    skipped = sf.skipped + [(s.name, f"the model's score is {p}")
                            for s, p, ok in zip(sf.samples, pred, finite, strict=True) if not ok]
    if not finite.any():
        raise IQAError(f"{desc}: the model gave no finite score on {len(sf.samples)} image(s)")
    good = [s for s, ok in zip(sf.samples, finite, strict=True) if ok]
    mos = np.array([s.mos for s in good], dtype=np.float64)
    return Predictions([s.name for s in good], mos, pred[finite], skipped)


@dataclass
class EvalSet:
    """The test images of a model's fixed split, as recorded when it was trained."""

    dataset: IQADataset
    split: Split
    split_file: Path
    samples: list[Sample]
    absent: list[str]


def recorded_split(
    metadata: dict[str, str],
    root: str | Path | None = None,
    split_path: str | Path | None = None,
    dataset: str | None = None,
    model_file: str | Path | None = None,
) -> tuple[IQADataset, Split, Path]:
    """The data set and split a checkpoint/archive was trained with, and the split's file;
    arguments override what it recorded. A recorded split file that is gone is looked for
    beside ``model_file`` under its name (a run folder moved or copied elsewhere): its digest
    must then be the recorded one."""
    split_given = split_path is not None
    dataset = dataset or metadata.get(KEY + "dataset")
    root = root or metadata.get(KEY + "dataset_root")
    split_path = split_path or metadata.get(KEY + "split_file")
    if not split_given and split_path and model_file is not None and not Path(split_path).exists():
        moved = Path(model_file).parent / Path(split_path).name
        if moved.is_file():
            split_path = moved
    if not dataset or not root or not split_path:
        raise IQAError(
            "this model does not record its dataset/split; pass --dataset, --root and --split"
        )
    split = Split.load(split_path)
    if split.dataset != dataset:
        raise IQAError(f"split {split_path} is for {split.dataset}, not {dataset}")
    recorded = metadata.get(KEY + "split_sha256")
    if recorded and recorded != split.digest() and not split_given:
        raise IQAError(f"split {split_path} changed since the model was trained")
    return load_dataset(dataset, root), split, Path(split_path)


def eval_set_for(
    metadata: dict[str, str],
    root: str | Path | None = None,
    split_path: str | Path | None = None,
    dataset: str | None = None,
    model_file: str | Path | None = None,
) -> EvalSet:
    """The test split a checkpoint/archive was trained with (see `recorded_split`)."""
    ds, split, split_file = recorded_split(metadata, root, split_path, dataset, model_file)
    samples, absent = split_samples(ds, split.test)
    if not samples:
        raise IQAError(f"none of the {len(split.test)} test images of {split_file} is in "
                       f"{ds.root}")
    return EvalSet(ds, split, split_file, samples, absent)
