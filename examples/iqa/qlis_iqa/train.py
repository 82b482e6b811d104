"""Training with the paper's settings: Adam, lr 1e-4, weight decay 1e-5, 20 epochs, batch 16, MSE.

Only the trainable part runs during the epochs: the frozen outputs of every image are computed
(or read from the cache) first, so an unreadable image is skipped before training starts and
never stops an epoch halfway.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from qlis.archive.atomic import atomic_path
from qlis.cli.console import same_file
from qlis_iqa.backbones import load_backbone, weights_label
from qlis_iqa.created_paths import RUN_FILES, removed_on_failure, top_missing
from qlis_iqa.data import Sample, Split, load_dataset, make_split, split_samples
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import (
    Log,
    Predictions,
    predict_features,
    predict_samples,
    sample_features,
    skipped_report,
)
from qlis_iqa.features import FeatureCache
from qlis_iqa.models import KEY, IQAModel, make_model, save_checkpoint, with_result


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the paper's."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-5
    seed: int = 0


def fit(
    model: IQAModel,
    features: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    progress: bool = False,
) -> list[float]:
    """Train the model's trainable part on cached frozen outputs; returns the mean loss per epoch.

    The head's output bias starts at the mean training score, so the epochs are spent on
    ranking images rather than on learning the offset of the MOS scale.
    """
    if len(features) == 0:
        raise IQAError("no training image could be read")
    with torch.no_grad():
        model.head[-1].bias.fill_(float(targets.mean()))
    losses = _epochs(model.trainable_modules(), model.trainable_forward, features, targets,
                     config, progress, "train")
    model.eval()
    return losses


HEAD_INPUT_BATCH = 64
"""Images whose head inputs are made at once by `refit_head` (DINO runs its last block)."""


def refit_head(
    model: IQAModel,
    features: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    progress: bool = False,
) -> list[float]:
    """Train the MLP head again, alone, on what the model's layers before it now give
    (``features``: frozen outputs of the training images): what a user who trains a head on
    a compressed backbone does. It starts from the head the model holds; returns the mean
    loss per epoch."""
    if len(features) == 0:
        raise IQAError("no training image could be read")
    device = next(model.head.parameters()).device
    model.eval()
    with torch.no_grad(), model.inference_context():
        inputs = torch.cat([
            model.head_inputs(features[i:i + HEAD_INPUT_BATCH].to(device)).float().cpu()
            for i in range(0, len(features), HEAD_INPUT_BATCH)])
    losses = _epochs([model.head], lambda x: model.head(x).squeeze(-1), inputs, targets,
                     config, progress, "refit head")
    model.eval()
    return losses


@dataclass
class HeadRefit:
    """A compression whose MLP head was trained again on its compressed backbone: the result
    it was made from, the result holding that head (`CompressionResult.with_tensors`), the
    model it holds, and the mean squared error of its training images' scores with the head
    before and after."""

    compressed: Any
    result: Any
    model: IQAModel
    images: int
    mse_before: float
    mse_after: float


def refit_compressed(
    model: IQAModel,
    result: Any,
    samples: Sequence[Sample],
    cache: FeatureCache | None = None,
    config: TrainConfig = TrainConfig(),
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
) -> HeadRefit:
    """`result` (a compression of `model`) with the float `model`'s MLP head trained again
    (`refit_head`) on the compressed backbone's outputs of `samples` (training images), and
    stored as the head it replaces was; its scores' error on them measured before and after
    with the head as stored."""
    compressed = with_result(model, result, "compressed")
    found = sample_features(compressed, samples, cache, batch_size, workers, progress,
                            "features (refit)")
    if not found.samples:
        why = f" ({found.skipped[0][1]})" if found.skipped else ""
        raise IQAError(f"no training image could be read{why}")
    targets = torch.tensor([s.mos for s in found.samples], dtype=torch.float32)
    before = _score_mse(compressed, found.values, targets)
    compressed.head.load_state_dict(model.head.state_dict())
    refit_head(compressed, found.values, targets, config, progress)
    head = {f"head.{name}": t.detach().cpu().to(result.tensors[f"head.{name}"].dtype)
            for name, t in compressed.head.state_dict().items()}
    refitted = result.with_tensors(head)
    stored = with_result(model, refitted, "refit")
    return HeadRefit(result, refitted, stored, len(found.samples), before,
                     _score_mse(stored, found.values, targets))


def _score_mse(model: IQAModel, features: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean squared error of the scores the model gives cached frozen outputs."""
    return float(((predict_features(model, features).float() - targets) ** 2).mean())


def _epochs(
    modules: list[nn.Module],
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    progress: bool,
    desc: str,
) -> list[float]:
    """Adam on the MSE of ``forward(inputs)`` to ``targets``, training ``modules``' parameters
    (seeded batches); the mean loss per epoch."""
    device = next(modules[0].parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        TensorDataset(inputs, targets.float()),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.Adam(
        [p for module in modules for p in module.parameters()], lr=config.lr,
        weight_decay=config.weight_decay
    )
    loss_fn = nn.MSELoss()
    for module in modules:
        module.train()
    losses: list[float] = []
    with tqdm(total=config.epochs * len(loader), desc=desc, disable=not progress) as bar:
        for epoch in range(config.epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(forward(x), y)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(x)
                count += len(x)
                bar.update(1)
            losses.append(total / count)
            if not math.isfinite(losses[-1]):
                raise IQAError(
                    f"training diverged: the mean loss of epoch {epoch + 1} is {losses[-1]}; "
                    f"lower the learning rate (lr {config.lr:g}) or check the scores"
                )
            bar.set_postfix(epoch=epoch + 1, mse=f"{losses[-1]:.4f}")
    return losses


SPLIT_CONFLICT = ("error", "warn")


def _check_reused_split(
    split: Split, path: Path, asked: dict[str, float | None], on_conflict: str, log: Log
) -> None:
    """Raise (or log) when options asked for now contradict the split file being reused."""
    stored = {"limit": split.limit, "test_fraction": split.test_fraction, "split_seed": split.seed}
    differ = [
        f"{k} {v} (stored: {stored[k]})"
        for k, v in asked.items()
        if v is not None and v != stored[k]
    ]
    if not differ:
        return
    if on_conflict == "warn":
        log(f"warning: {path} is reused as it is, so {', '.join(differ)} is ignored")
        return
    raise IQAError(
        f"{path} already fixes the split and this run asks for {', '.join(differ)}; "
        "drop those options to reuse it, or train into a new run folder (or --split NEW.json) "
        "to draw a new split"
    )


@dataclass
class TrainResult:
    """What `train_run` produced: the model, its files and its test metrics."""

    model: IQAModel
    checkpoint: Path
    split_file: Path
    predictions: Predictions
    metrics: dict[str, float]
    losses: list[float]
    label: str


def _check_split_path(split_path: Path, out: Path) -> None:
    """Refuse a split file (to reuse or to create) that is one of the files the run writes,
    before any work: a new one was written over by the run's metrics.json (the run said it
    succeeded, and could then be neither evaluated nor compressed), or refused only once the
    whole run was done (model.safetensors). Compared by resolved path, since the files need
    not exist yet, and as files (a hard link to one of them)."""
    target = split_path.resolve()
    for name in RUN_FILES:
        written = out / name
        if name != "split.json" and (target == written.resolve()
                                     or same_file(split_path, written)):
            raise IQAError(f"{split_path} is one of the files this run writes; the split file "
                           "must be somewhere else")


def train_run(
    family: str,
    dataset: str,
    root: str | Path,
    out_dir: str | Path,
    weights: str | Path | None = None,
    split_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    config: TrainConfig = TrainConfig(),
    limit: int | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    feature_batch: int = 16,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = False,
    logistic: bool = False,
    head_hidden: int = 256,
    overwrite: bool = False,
    split_conflict: str = "error",
    log: Log = print,
) -> TrainResult:
    """Load data and backbone, train, evaluate on the fixed test split, and write the run folder.

    OUT_DIR (its parent must exist) receives model.safetensors (the whole model, its metadata
    in the header), split.json (unless an existing split file is given), predictions_test.csv,
    metrics.json and train_log.csv. Frozen outputs are cached under `cache_dir` (default
    OUT_DIR/cache). An existing checkpoint is replaced only with `overwrite`.

    `limit`, `test_fraction` and `split_seed` (None: not asked for; a new split uses all
    images, 0.2 and 0) draw a new split; when the split file already exists it is reused, and
    a request that contradicts it is a `split_conflict`: "error" (raise) or "warn" (log it and
    keep the stored split).
    """
    out = Path(out_dir)
    checkpoint = out / "model.safetensors"
    if checkpoint.exists() and not overwrite:
        raise IQAError(
            f"{checkpoint} exists; pass --force (overwrite=True) to retrain over it, "
            "or choose a new run folder"
        )
    if split_conflict not in SPLIT_CONFLICT:
        raise IQAError(f"split_conflict must be one of {SPLIT_CONFLICT}, got {split_conflict!r}")
    if not out.is_dir() and not out.parent.is_dir():
        raise IQAError(f"{out.parent}: no such folder (create it first)")
    split_path = Path(split_file) if split_file else out / "split.json"
    _check_split_path(split_path, out)
    ds = load_dataset(dataset, root)
    if report := ds.missing_report():
        log(report)
    new_split = not (split_path.exists() or split_path.is_symlink())
    if new_split:
        names = [s.name for s in ds.samples] + ds.missing
        split = make_split(
            ds.name,
            names,
            0 if split_seed is None else split_seed,
            0.2 if test_fraction is None else test_fraction,
            limit,
        )
    else:
        split = Split.load(split_path)
        if split.dataset != ds.name:
            raise IQAError(f"split {split_path} is for {split.dataset}, not {ds.name}")
        asked = {"limit": limit, "test_fraction": test_fraction, "split_seed": split_seed}
        _check_reused_split(split, split_path, asked, split_conflict, log)
    train_samples, train_absent = split_samples(ds, split.train)
    test_samples, test_absent = split_samples(ds, split.test)
    if len(test_samples) < 2:  # before the backbone loads and the model trains, not after
        raise IQAError(
            f"the test split has {len(test_samples)} image(s) on disk; its correlations need at "
            "least 2: raise --limit or --test-fraction (or give a --split with more test images)")

    backbone = load_backbone(family, weights)
    label = weights_label(backbone, weights)
    cache_root = Path(cache_dir or out / "cache")
    created = [p for p in (top_missing(out), split_path if new_split else None,
                           top_missing(cache_root)) if p is not None]
    with removed_on_failure(created):
        out.mkdir(exist_ok=True)
        if new_split:
            split.save(split_path)
        torch.manual_seed(config.seed)
        model = make_model(family, backbone, head_hidden).to(device)
        log(f"{model.family}: {label}; {len(train_samples)} train / {len(test_samples)} test "
            "images")
        cache = FeatureCache(cache_root)
        fingerprint = model.fingerprint()

        start = time.perf_counter()
        train_feats = sample_features(
            model,
            train_samples,
            cache,
            feature_batch,
            workers,
            progress,
            "features (train)",
            fingerprint,
        )
        if train_feats.skipped:
            log(skipped_report("train", train_feats.skipped))
        feature_seconds = time.perf_counter() - start
        targets = torch.tensor([s.mos for s in train_feats.samples], dtype=torch.float32)
        start = time.perf_counter()
        losses = fit(model, train_feats.values, targets, config, progress)
        train_seconds = time.perf_counter() - start

        preds = predict_samples(
            model,
            test_samples,
            cache,
            feature_batch,
            workers,
            progress,
            "features (test)",
            fingerprint,
        )
        if preds.skipped:
            log(skipped_report("test", preds.skipped))
        metrics = preds.metrics(logistic)
        # JSON has no NaN: an undefined correlation is written null, and why beside it
        stored = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
        undefined = preds.undefined(metrics)

        extra = {
            KEY + "dataset": ds.name,
            KEY + "dataset_root": str(Path(root).resolve()),
            KEY + "split_file": str(split_path.resolve()),
            KEY + "split_sha256": split.digest(),
            KEY + "weights": str(weights) if weights else backbone.config.name_or_path,
            KEY + "train_config": json.dumps(asdict(config), sort_keys=True),
            KEY + "test_metrics": json.dumps(stored, sort_keys=True, allow_nan=False),
        }
        save_checkpoint(model, checkpoint, extra, overwrite=overwrite)
        preds.write_csv(out / "predictions_test.csv", label, overwrite=True)  # the run's own
        with (
            atomic_path(out / "train_log.csv") as tmp,
            tmp.open("w", newline="", encoding="utf-8") as f,
        ):
            w = csv.writer(f)
            w.writerow(["epoch", "train_mse", "backbone"])
            w.writerows([i + 1, f"{loss:.6f}", label] for i, loss in enumerate(losses))
        summary = {
            "family": family,
            "dataset": ds.name,
            "backbone": label,
            "train_images": len(train_feats.samples),
            "test_images": len(preds.names),
            "skipped": len(train_absent)
            + len(test_absent)
            + len(train_feats.skipped)
            + len(preds.skipped),
            "features_computed": train_feats.computed,
            "features_cached": train_feats.cached,
            "feature_seconds": feature_seconds,
            "train_seconds": train_seconds,
            "config": asdict(config),
            "test": stored,
            **({"test_undefined": undefined} if undefined else {}),
            "final_train_mse": losses[-1],
        }
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n",
                           encoding="utf-8")
        return TrainResult(model, checkpoint, split_path, preds, metrics, losses, label)
