"""`qlis-iqa`: train, evaluate, compress, sweep (the paper's Table 1) and score image folders.

Thin: every command parses, calls the package, prints. A user mistake (bad path, wrong
columns, missing weights) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qlis import QlisError

FAMILY = click.Choice(["clip", "dino"])
DATASET = click.Choice(["agiqa-3k", "agiqa-1k"])


class UserError(click.ClickException):
    """A QlisError or OSError shown as `qlis-iqa: error: ...` with exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"qlis-iqa: error: {self.message}", err=True)


class Group(click.Group):
    """Turns errors a user can fix into one stderr line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QlisError as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


def _err(message: str) -> None:
    if message:
        click.echo(message, err=True)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_file(path: Path) -> Path:
    """A run folder stands for its model.safetensors."""
    return path / "model.safetensors" if path.is_dir() else path


def _metrics_line(metrics: dict[str, float], label: str) -> str:
    parts = [f"{k.upper().replace('_', ' ')} {v:.4f}" for k, v in metrics.items()]
    return "  ".join(parts) + f"  [{label}]"


progress_option = click.option(
    "--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a tty)."
)
device_option = click.option("--device", default="cpu", show_default=True, help="torch device.")
workers_option = click.option(
    "--workers", default=0, show_default=True, type=click.IntRange(0), help="DataLoader workers."
)
cache_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Feature cache folder (default: the run folder's cache/).",
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Image-quality models (CLIPIQA, DINOIQA) on AGIQA-1K/3K, compressed with qlis."""
    _quiet_transformers()


@cli.command("make-backbone")
@click.option("--family", type=FAMILY, required=True)
@click.option(
    "--size",
    type=click.Choice(["tiny", "full"]),
    default="full",
    show_default=True,
    help="'full' = the paper's ViT-L/14 (clip) or ViT-B/16 (dino) shape.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
def make_backbone(family: str, size: str, seed: int, out: Path) -> None:
    """Write a RANDOM-INITIALISED backbone folder.

    For runs without pretrained weights; every result from it is labelled as such.
    """
    from qlis_iqa.backbones import RANDOM_LABEL, save_random_backbone

    save_random_backbone(family, out, size, seed)
    click.echo(f"{out}: {family} {size} backbone [{RANDOM_LABEL}]")


@cli.command()
@click.option("--family", type=FAMILY, required=True)
@click.option("--dataset", type=DATASET, default="agiqa-3k", show_default=True)
@click.option("--root", type=click.Path(path_type=Path), required=True, help="Dataset folder.")
@click.option("--weights", help="Backbone folder or hub id (HF cache); default: the paper's.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Run folder.")
@click.option(
    "--split",
    "split_file",
    type=click.Path(path_type=Path),
    help="Split file to reuse, or to create (default: OUT/split.json).",
)
@click.option("--limit", type=click.IntRange(2), help="Use this many annotated images only.")
@click.option("--test-fraction", default=0.2, show_default=True)
@click.option("--split-seed", default=0, show_default=True)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--weight-decay", default=1e-5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--logistic", is_flag=True, help="Also PLCC after the 4-parameter logistic fit.")
@cache_option
@device_option
@workers_option
@progress_option
def train(
    family: str,
    dataset: str,
    root: Path,
    weights: str | None,
    out: Path,
    split_file: Path | None,
    limit: int | None,
    test_fraction: float,
    split_seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    logistic: bool,
    cache_dir: Path | None,
    device: str,
    workers: int,
    progress: bool | None,
) -> None:
    """Train a model, then evaluate it on the test split.

    CLIPIQA or DINOIQA, with the paper's settings by default.
    """
    from qlis_iqa.train import TrainConfig, train_run

    config = TrainConfig(epochs, batch_size, lr, weight_decay, seed)
    run = train_run(
        family,
        dataset,
        root,
        out,
        weights=weights,
        split_file=split_file,
        cache_dir=cache_dir,
        config=config,
        limit=limit,
        test_fraction=test_fraction,
        split_seed=split_seed,
        feature_batch=batch_size,
        workers=workers,
        device=device,
        progress=_progress(progress),
        logistic=logistic,
        log=_err,
    )
    click.echo(f"checkpoint: {run.checkpoint}")
    n = len(run.predictions.names)
    click.echo(f"test ({n} images): {_metrics_line(run.metrics, run.label)}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dataset", type=DATASET, help="Default: the one the model was trained on.")
@click.option("--root", type=click.Path(path_type=Path), help="Default: the training root.")
@click.option(
    "--split",
    "split_file",
    type=click.Path(path_type=Path),
    help="Default: the split file the model was trained with.",
)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Predictions CSV.")
@click.option("--logistic", is_flag=True, help="Also PLCC after the 4-parameter logistic fit.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@cache_option
@device_option
@workers_option
@progress_option
def evaluate(
    model: Path,
    dataset: str | None,
    root: Path | None,
    split_file: Path | None,
    out: Path | None,
    logistic: bool,
    batch_size: int,
    cache_dir: Path | None,
    device: str,
    workers: int,
    progress: bool | None,
) -> None:
    """Evaluate a model on its fixed test split.

    MODEL: a run folder, a checkpoint or a .qlis archive.
    """
    from qlis_iqa.evaluate import eval_set_for, predict_samples, skipped_report
    from qlis_iqa.features import FeatureCache
    from qlis_iqa.models import load_model

    path = _model_file(model)
    iqa, meta = load_model(path)
    es = eval_set_for(meta, root, split_file, dataset)
    _err(skipped_report("test", [(n, "missing") for n in es.absent]))
    cache = FeatureCache(cache_dir or path.parent / "cache")
    preds = predict_samples(
        iqa.to(device), es.samples, cache, batch_size, workers, _progress(progress)
    )
    _err(skipped_report("test", preds.skipped))
    if out:
        preds.write_csv(out, iqa.label)
    metrics = preds.metrics(logistic)
    click.echo(f"test ({len(preds.names)} images): {_metrics_line(metrics, iqa.label)}")


def _policy_options(
    k: float | None, bits: int | None, granularity: str | None, target_ratio: float | None
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "k": k,
        "bits": bits,
        "granularity": granularity,
        "target_ratio": target_ratio,
    }
    return {key: v for key, v in options.items() if v is not None}


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help=".qlis file.")
@click.option(
    "--policy",
    type=click.Choice(["prune", "quant", "lap", "laq", "lapq"]),
    default="lapq",
    show_default=True,
)
@click.option("--beta", default=0.5, show_default=True)
@click.option("--k", type=float, help="Pruning level (policy prune).")
@click.option("--bits", type=click.IntRange(1, 8), help="Bits (policy quant).")
@click.option("--granularity", type=click.Choice(["tensor", "channel"]))
@click.option("--target-ratio", type=float, help="Budget mode: the paper CR to reach.")
@click.option("--codec", default="huffman", show_default=True)
def compress(
    model: Path,
    out: Path,
    policy: str,
    beta: float,
    k: float | None,
    bits: int | None,
    granularity: str | None,
    target_ratio: float | None,
    codec: str,
) -> None:
    """Compress a model into a self-contained archive.

    The whole model (backbone and head) is compressed; `score` needs nothing else.
    """
    from qlis_iqa.models import load_model
    from qlis_iqa.pack import pack

    iqa, meta = load_model(_model_file(model))
    keep = {key: v for key, v in meta.items() if key.startswith("qlis_iqa.")}
    options = _policy_options(k, bits, granularity, target_ratio)
    packed = pack(iqa, out, policy, beta, codec, keep, **options)
    click.echo(
        f"{out}: {packed.file_bytes:,} bytes; CR {packed.result.cr:.2f}, HCR "
        f"{packed.result.hcr:.2f} (paper); real ratio {packed.real_ratio:.2f}  [{iqa.label}]"
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--dataset", type=DATASET, help="Default: the one the model was trained on.")
@click.option("--root", type=click.Path(path_type=Path), help="Default: the training root.")
@click.option(
    "--split",
    "split_file",
    type=click.Path(path_type=Path),
    help="Default: the split file the model was trained with.",
)
@click.option("--beta", default=0.5, show_default=True)
@click.option("--per-channel", is_flag=True, help="Add per-channel LAQ/LAPQ rows.")
@click.option(
    "--target-ratio",
    type=float,
    multiple=True,
    help="Add a LAPQ row in budget mode at this paper CR (repeatable).",
)
@click.option("--only", help="Comma-separated row names to run (default: all).")
@click.option(
    "--archives/--no-archives",
    default=True,
    show_default=True,
    help="Write each variant's .qlis archive (needed for the real ratio).",
)
@click.option("--codec", default="huffman", show_default=True)
@click.option("--logistic", is_flag=True, help="Also PLCC after the 4-parameter logistic fit.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@cache_option
@device_option
@workers_option
@progress_option
def sweep(
    model: Path,
    out: Path,
    dataset: str | None,
    root: Path | None,
    split_file: Path | None,
    beta: float,
    per_channel: bool,
    target_ratio: tuple[float, ...],
    only: str | None,
    archives: bool,
    codec: str,
    logistic: bool,
    batch_size: int,
    cache_dir: Path | None,
    device: str,
    workers: int,
    progress: bool | None,
) -> None:
    """The paper's Table 1 on the fixed test split.

    Baseline, P level k, Q b-bit, LAP, LAQ, LAPQ (+ per-channel and budget rows).
    """
    from qlis_iqa.evaluate import eval_set_for, skipped_report
    from qlis_iqa.features import FeatureCache
    from qlis_iqa.models import load_model
    from qlis_iqa.sweep import (
        extra_variants,
        paper_variants,
        pick_variants,
        run_sweep,
        write_outputs,
    )

    path = _model_file(model)
    iqa, meta = load_model(path)
    es = eval_set_for(meta, root, split_file, dataset)
    _err(skipped_report("test", [(n, "missing") for n in es.absent]))
    variants = pick_variants(paper_variants() + extra_variants(per_channel, target_ratio), only)
    rows = run_sweep(
        iqa.to(device),
        es.samples,
        out,
        variants,
        FeatureCache(cache_dir or path.parent / "cache"),
        baseline_file=path if path.suffix == ".safetensors" else None,
        model_metadata=meta,
        beta=beta,
        archives=archives,
        codec=codec,
        logistic=logistic,
        batch_size=batch_size,
        workers=workers,
        progress=_progress(progress),
        log=click.echo,
    )
    title = f"{iqa.family.upper()}IQA on {es.dataset.name}, Table 1 sweep [{iqa.label}]"
    files = write_outputs(rows, out, title, logistic)
    click.echo("wrote " + ", ".join(str(p) for p in files.values()))


@cli.command()
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    required=True,
    help=".qlis archive (or checkpoint / run folder).",
)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Scores CSV.")
@click.option("--recursive", is_flag=True, help="Include images in subfolders.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@device_option
@workers_option
@progress_option
def score(
    images_dir: Path,
    model_path: Path,
    out: Path,
    recursive: bool,
    batch_size: int,
    device: str,
    workers: int,
    progress: bool | None,
) -> None:
    """Score every image of a folder.

    The model is rebuilt from its .qlis archive alone; bad images are listed, not fatal.
    """
    from qlis_iqa.evaluate import skipped_report
    from qlis_iqa.score import score_folder

    scores, label = score_folder(
        images_dir,
        _model_file(model_path),
        out,
        batch_size,
        workers,
        recursive,
        device,
        _progress(progress),
    )
    bad = [(scores.paths[i].name, why) for i, why in sorted(scores.errors.items())]
    _err(skipped_report("score", bad))
    click.echo(f"scored {len(scores.scores)} image(s), skipped {len(bad)}: {out}  [{label}]")


def main() -> None:
    """Console entry point."""
    cli(prog_name="qlis-iqa")
