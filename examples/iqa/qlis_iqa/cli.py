"""`qlis-iqa`: train, evaluate, compress, sweep (the paper's Table 1) and score image folders.

Thin: every command checks its paths and options first (before transformers is imported or a
model is loaded), then calls the package and prints. A user mistake (bad path, an output that
exists, wrong columns, missing weights) is one line on stderr and exit code 2, never a traceback.
Outputs follow qlis's rule (`qlis.cli.console.check_output`): never replaced without --force,
never a missing parent folder created, never one of the inputs.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click
import torch

from qlis import InputError, QlisError, QualityWarning
from qlis.cli.choices import codec_names, parse_device
from qlis.cli.console import (
    PATH,
    CommandGroup,
    check_input,
    check_output,
    check_output_dir,
    check_policy_flags,
    errors_as_flags,
    escape,
    human_bytes,
    same_file,
)
from qlis.json_input import read_json_file
from qlis.plan.policy import make_policy, policy_names
from qlis_iqa.created_paths import RUN_FILES, SWEEP_FILES, removed_on_failure, top_missing
from qlis_iqa.data import dataset_paths

CONTEXT = {"help_option_names": ["-h", "--help"]}
COMPRESS_POLICIES = [name for name in policy_names() if name not in ("plan", "levels")]
"""What compress's flags configure: "plan" (a plan file) and "levels" (its bits/k levels) take
options it has no flags for, and without them store the model as it is."""
FAMILY = click.Choice(["clip", "dino"])
DATASET = click.Choice(["agiqa-3k", "agiqa-1k"])
MAX_WORKERS = 64  # each worker is a process holding a model's preprocessing: more only thrash
MAX_EPOCHS = 100_000  # a head trains in seconds per thousand epochs; more is a typo, not a run
MAX_BATCH = 1 << 16  # images per batch: a whole dataset at most; more is a typo
MAX_RD_RATIO = 1000  # 0.03 bits per float32 weight: no size target beyond is reachable
SEED = click.IntRange(0, 2**63 - 1)  # what torch.manual_seed takes without overflowing


class _TextPath(type(PATH)):
    """qlis's path type, refusing a name that is not valid UTF-8: qlis-iqa writes its paths into
    CSV and JSON outputs, which hold text (such a name would fail only once the work is done)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{escape(str(path))} is not valid UTF-8; rename it", param, ctx)
        return path


TEXT_PATH = _TextPath(path_type=Path)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities: NaN passes every comparison of a range
    (``--lr nan`` would train a NaN model) and an unbounded range takes inf."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def _err(message: str) -> None:
    if message:
        click.echo(message, err=True)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _start_work() -> None:
    """Import transformers (seconds) only once every check has passed, and quiet it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _model_file(path: Path) -> Path:
    """The model a MODEL argument names (a run folder stands for its model.safetensors)."""
    file = path / "model.safetensors" if path.is_dir() else path
    return check_input(file, "model file")


def _check_split_file(split_file: Path) -> None:
    """A split file is JSON read later by the data module: refuse one that is not a bounded,
    regular JSON file holding an object now, before any work."""
    read_json_file(split_file, "--split", expected_type=dict)


def _check_eval_set(root: Path | None, split_file: Path | None) -> None:
    if root is not None:
        check_input(root, "dataset folder")
    if split_file is not None:
        check_input(split_file, "split file")
        _check_split_file(split_file)


def _check_cache_dir(cache_dir: Path | None, output_dir: Path | None = None,
                     writes: Collection[str] = ()) -> None:
    """--cache-dir is reused as it is (its entries accumulate, so no --force), but like any
    output it is never a file, and its missing parent folder is never created (unless it is
    `output_dir`, the folder this command makes), nor is it `output_dir` or one of the
    ``writes`` (names) the command puts there: a whole run was done before writing its
    model.safetensors onto the cache failed."""
    if cache_dir is None:
        return
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"--cache-dir {cache_dir} exists and is not a folder")
    if output_dir is not None and cache_dir.resolve() in {
            output_dir.resolve() / name for name in ("", *writes)}:
        raise InputError(f"--cache-dir {cache_dir} is {output_dir} or a file this command "
                         "writes there; give the cache a folder of its own")
    made = output_dir is not None and cache_dir.parent.resolve() == output_dir.resolve()
    if not cache_dir.parent.is_dir() and not made:
        raise InputError(f"{cache_dir.parent}: no such folder (create it first)")


def _feature_cache(cache_dir: Path | None, model: Path, images: Path) -> Path:
    """--cache-dir, or the folder ``cache`` beside the model, which must not lie among the
    dataset's images (nothing is written there)."""
    if cache_dir is not None:
        return cache_dir
    default = model.parent / "cache"
    if images.is_dir() and default.resolve().is_relative_to(images.resolve()):
        raise InputError(f"{model} lies among the dataset's images, where its default feature "
                         f"cache ({default}) would be written; pass --cache-dir")
    return default


def _refuse_inputs(outputs: Iterable[Path], files: Iterable[Path], trees: Iterable[Path] = (),
                   folders: Iterable[Path] = ()) -> None:
    """--force replaces an output, never an input. Refused, by resolved path: an output that is
    one of the input `files` (through a link too), is or lies in one of the input `trees` (a
    dataset's images: nothing is written among them), or is one of the input `folders` (a
    backbone's weights, whose model.safetensors a run folder would replace)."""
    trees, existing = list(trees), [f for f in files if f.exists()]
    input_folders = [f.resolve() for f in [*trees, *folders] if f.is_dir()]
    resolved_trees = [(f, f.resolve()) for f in trees if f.is_dir()]
    for output in outputs:
        for file in existing:
            if same_file(output, file):
                through = f" ({file})" if Path(file) != Path(output) else ""  # a link's target
                raise InputError(f"{output} is one of the inputs{through}; write the output "
                                 "somewhere else")
        target = output.resolve()
        if target in input_folders:
            raise InputError(f"{output} is an input folder of this command; write the output "
                             "somewhere else")
        for tree, where in resolved_trees:
            if where in target.parents:
                raise InputError(f"{output} is inside {tree}, an input folder of this command; "
                                 "write the output somewhere else")


def _dataset_inputs(name: str, root: Path, split_file: Path | None) -> tuple[list[Path], Path]:
    """A dataset's input files (annotations, the split file) and its images folder."""
    annotations, images = dataset_paths(name, root)
    return annotations + ([split_file] if split_file else []), images


def _metrics_line(metrics: dict[str, float], label: str) -> str:
    parts = [f"{k.upper().replace('_', ' ')} {v:.4f}" for k, v in metrics.items()]
    return "  ".join(parts) + f"  [{label}]"


def _options(*decorators: Callable) -> Callable:
    """Several click options as one decorator, in the order given."""

    def apply(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def output_option(text: str, required: bool = True) -> Callable:
    """``-o/--output``, the one spelling of an output in both tools."""
    return click.option("-o", "--output", type=TEXT_PATH, required=required,
                        help=text)


force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
progress_option = click.option(
    "--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a tty)."
)
device_option = click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=lambda _ctx, _param, text: parse_device(text),
    help="cpu, cuda, cuda:N or mps (when this machine has it).",
)
workers_option = click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0, MAX_WORKERS),
    help=f"DataLoader worker processes (at most {MAX_WORKERS}; 0: read images in this one).",
)
cache_option = click.option(
    "--cache-dir",
    type=TEXT_PATH,
    help="Feature cache folder (default: the run folder's cache/).",
)
batch_option = click.option("--batch-size", default=16, show_default=True,
                            type=click.IntRange(1, MAX_BATCH))
logistic_option = click.option(
    "--logistic", is_flag=True, help="Also PLCC after the 4-parameter logistic fit."
)
beta_option = click.option("--beta", type=FiniteFloatRange(0, 1), default=0.5, show_default=True,
                           help="Weight of the parameter share P in QLIS.")
codec_option = click.option(
    "--codec",
    type=click.Choice(codec_names()),
    default="ans",
    show_default=True,
    help="How quantized codes are stored; auto: the smallest per tensor.",
)
eval_set_options = _options(
    click.option("--dataset", type=DATASET, help="Default: the one the model was trained on."),
    click.option("--root", type=TEXT_PATH, help="Default: the training root."),
    click.option(
        "--split",
        "split_file",
        type=TEXT_PATH,
        help="Default: the split file the model was trained with.",
    ),
)
runtime_options = _options(device_option, workers_option, progress_option)
lowbit_option = click.option(
    "--runtime",
    type=click.Choice(["float", "lowbit"]),
    default="float",
    show_default=True,
    help="lowbit: an archive's compressed layers stay packed in memory (docs/runtime.md).",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="What inference computes in: bfloat16 (torch.autocast) is several times faster on "
    "CPUs with AVX512-BF16 or AMX, for either runtime (docs/runtime.md).",
)


@click.group(cls=CommandGroup, name="qlis-iqa", context_settings=CONTEXT)
def cli() -> None:
    """Image-quality models (CLIPIQA, DINOIQA) on AGIQA-1K/3K, compressed with qlis."""


@cli.command("make-backbone")
@click.option("--family", type=FAMILY, required=True)
@click.option(
    "--size",
    type=click.Choice(["tiny", "full"]),
    default="full",
    show_default=True,
    help="'full' = the paper's ViT-L/14 (clip) or ViT-B/16 (dino) shape.",
)
@click.option("--seed", default=0, show_default=True, type=SEED)
@output_option("The backbone folder to write.")
@force_option
def make_backbone(family: str, size: str, seed: int, output: Path, force: bool) -> None:
    """Write a RANDOM-INITIALISED backbone folder.

    For runs without pretrained weights; every result from it is labelled as such.
    """
    check_output_dir(output, force)
    _start_work()
    from qlis_iqa.backbones import RANDOM_LABEL, save_random_backbone

    save_random_backbone(family, output, size, seed)
    click.echo(f"{escape(str(output))}: {family} {size} backbone [{RANDOM_LABEL}]")


@cli.command()
@click.option("--family", type=FAMILY, required=True)
@click.option("--dataset", type=DATASET, default="agiqa-3k", show_default=True)
@click.option("--root", type=TEXT_PATH, required=True, help="Dataset folder.")
@click.option("--weights", help="Backbone folder or hub id (HF cache); default: the paper's.")
@output_option("The run folder (its parent must exist).")
@click.option(
    "--split",
    "split_file",
    type=TEXT_PATH,
    help="Split file to reuse, or to create (default: OUTPUT/split.json).",
)
@click.option("--limit", type=click.IntRange(2), help="Use this many annotated images only.")
@click.option("--test-fraction", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the images in the test split of a new split.  [default: 0.2]")
@click.option("--split-seed", type=SEED, help="Seed of a new split.  [default: 0]")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1, MAX_EPOCHS),
              help=f"Passes over the training features (at most {MAX_EPOCHS:,}).")
@batch_option
@click.option("--lr", default=1e-4, show_default=True,
              type=FiniteFloatRange(0, 1, min_open=True), help="Adam's learning rate, in (0, 1].")
@click.option("--weight-decay", default=1e-5, show_default=True, type=FiniteFloatRange(0, 1),
              help="Adam's L2 penalty, in [0, 1].")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the head's "
              "initialisation and of the batch order.")
@logistic_option
@cache_option
@runtime_options
@force_option
def train(
    family: str,
    dataset: str,
    root: Path,
    weights: str | None,
    output: Path,
    split_file: Path | None,
    limit: int | None,
    test_fraction: float | None,
    split_seed: int | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    logistic: bool,
    cache_dir: Path | None,
    device: torch.device,
    workers: int,
    progress: bool | None,
    force: bool,
) -> None:
    """Train a model, then evaluate it on the test split.

    CLIPIQA or DINOIQA, with the paper's settings by default. An existing split file (the run
    folder's split.json, or --split) is reused as it is: options that contradict it are an
    error, or a warning with --force.
    """
    check_input(root, "dataset folder")
    check_output_dir(output, force)
    _check_cache_dir(cache_dir, output, RUN_FILES)
    inputs, images = _dataset_inputs(dataset, root, split_file)
    weights_folder = [Path(weights)] if weights else []
    new_split = [split_file] if split_file is not None and not split_file.exists() else []
    _refuse_inputs([output, *([cache_dir] if cache_dir else []), *new_split], inputs, [images],
                   weights_folder)
    if split_file is not None and not split_file.exists() and not split_file.parent.is_dir():
        raise InputError(f"{split_file.parent}: no such folder (create it first)")
    if split_file is not None and split_file.exists():
        _check_split_file(split_file)
    _start_work()
    from qlis_iqa.train import TrainConfig, train_run

    config = TrainConfig(epochs, batch_size, lr, weight_decay, seed)
    run = train_run(
        family,
        dataset,
        root,
        output,
        weights=weights,
        split_file=split_file,
        cache_dir=cache_dir,
        config=config,
        limit=limit,
        test_fraction=test_fraction,
        split_seed=split_seed,
        feature_batch=batch_size,
        workers=workers,
        device=str(device),
        progress=_progress(progress),
        logistic=logistic,
        overwrite=force,
        split_conflict="warn" if force else "error",
        log=_err,
    )
    click.echo(f"checkpoint: {escape(str(run.checkpoint))}")
    n = len(run.predictions.names)
    click.echo(f"test ({n} images): {_metrics_line(run.metrics, run.label)}")
    if note := run.predictions.undefined(run.metrics):
        _err(f"qlis-iqa: warning: {note}")


@cli.command()
@click.argument("model", type=TEXT_PATH)
@eval_set_options
@output_option("Predictions CSV.", required=False)
@logistic_option
@batch_option
@cache_option
@runtime_options
@lowbit_option
@precision_option
@force_option
def evaluate(
    model: Path,
    dataset: str | None,
    root: Path | None,
    split_file: Path | None,
    output: Path | None,
    logistic: bool,
    batch_size: int,
    cache_dir: Path | None,
    device: torch.device,
    workers: int,
    progress: bool | None,
    runtime: str,
    precision: str,
    force: bool,
) -> None:
    """Evaluate a model on its fixed test split.

    MODEL: a run folder, a checkpoint or a .qlis archive.
    """
    path = _model_file(model)
    _check_eval_set(root, split_file)
    if output:
        check_output(output, force, (".csv",), inputs=[path])
    _check_cache_dir(cache_dir)
    _start_work()
    from qlis_iqa.evaluate import eval_set_for, predict_samples, skipped_report
    from qlis_iqa.features import FeatureCache
    from qlis_iqa.models import load_model

    iqa, meta = load_model(path, runtime, precision)
    es = eval_set_for(meta, root, split_file, dataset, path)
    inputs, images = _dataset_inputs(es.dataset.name, es.dataset.root, es.split_file)
    cache_dir = _feature_cache(cache_dir, path, images)
    _refuse_inputs([p for p in (output, cache_dir) if p is not None], inputs, [images])
    _err(skipped_report("test", [(n, "missing") for n in es.absent]))
    cache = FeatureCache(cache_dir)
    preds = predict_samples(
        iqa.to(device), es.samples, cache, batch_size, workers, _progress(progress)
    )
    _err(skipped_report("test", preds.skipped))
    metrics = preds.metrics(logistic)  # before the output replaces a file: it may refuse
    if output:
        preds.write_csv(output, iqa.label, force)
    click.echo(f"test ({len(preds.names)} images): {_metrics_line(metrics, iqa.label)}")
    if note := preds.undefined(metrics):
        _err(f"qlis-iqa: warning: {note}")


@cli.command()
@click.argument("model", type=TEXT_PATH)
@output_option("The .qlis archive to write.")
@click.option("--policy", type=click.Choice(COMPRESS_POLICIES), default="rd", show_default=True,
              help="rd: rate–distortion, calibrated on training images; lapq etc.: the paper's.")
@beta_option
@click.option("--k", type=FiniteFloatRange(min=0), help="Pruning level (policy prune).")
@click.option("--bits", type=click.IntRange(1, 8), help="Bits (policy quant).")
@click.option("--granularity", type=click.Choice(["tensor", "channel"]))
@click.option("--target-ratio", type=FiniteFloatRange(min=1),
              help="rd: real archive ratio (original bytes / archive bytes).")
@click.option("--paper-cr", type=FiniteFloatRange(min=1),
              help="The paper's policies: reach this idealised CR (budget mode).")
@click.option("--target-bits-per-weight", type=FiniteFloatRange(min=0, min_open=True),
              help="rd: archive bits per model element.")
@click.option("--min-cosine", type=FiniteFloatRange(0, 1, max_open=True),
              help="rd: the least cosine (= Pearson correlation) of the calibration scores to "
                   "the original model's (default 0.999).")
@click.option("--calib-images", type=click.IntRange(min=0), default=32, show_default=True,
              help="rd: training-split images to calibrate on (0: data-free).")
@click.option("--refit-head", is_flag=True,
              help="Train the MLP head again (from the float model's, the paper's settings) "
                   "on the compressed backbone's outputs of the training split's images.")
@eval_set_options
@codec_option
@force_option
def compress(
    model: Path,
    output: Path,
    policy: str,
    beta: float,
    k: float | None,
    bits: int | None,
    granularity: str | None,
    target_ratio: float | None,
    paper_cr: float | None,
    target_bits_per_weight: float | None,
    min_cosine: float | None,
    calib_images: int,
    refit_head: bool,
    dataset: str | None,
    root: Path | None,
    split_file: Path | None,
    codec: str,
    force: bool,
) -> None:
    """Compress a model into a self-contained archive.

    The whole model (backbone and head) is compressed; `score` needs nothing else. With the
    default policy rd, the model is calibrated on a few images of its training split.
    """
    path = _model_file(model)
    check_output(output, force, (".qlis",), inputs=[path, *([split_file] if split_file else [])])
    _check_eval_set(root, split_file)
    given = {"k": k, "bits": bits, "granularity": granularity, "target_ratio": target_ratio,
             "paper_cr": paper_cr, "target_bits_per_weight": target_bits_per_weight,
             "min_cosine": min_cosine}
    options = {key: v for key, v in given.items() if v is not None}
    calibrated = policy == "rd" and calib_images > 0
    if min_cosine is not None and not calibrated:
        raise QlisError("--min-cosine needs --policy rd and --calib-images > 0")
    check_policy_flags(policy, options, levels_hint=False)
    with _as_flags(given, options):  # options the policy refuses: before the model loads
        make_policy(policy, **options)
    _start_work()
    from qlis_iqa.models import load_model
    from qlis_iqa.pack import calibration, constant_output, pack

    iqa, meta = load_model(path)
    calib = samples = None
    if calibrated or refit_head:
        samples = _training_samples(meta, root, split_file, dataset, [output], path)
    if calibrated:
        calib = calibration(iqa, samples, calib_images)
    keep = {key: v for key, v in meta.items() if key.startswith("qlis_iqa.")}
    with warnings.catch_warnings():  # printed below, once, as a qlis-iqa line
        warnings.simplefilter("ignore", QualityWarning)
        with _as_flags(given, options):
            packed = pack(iqa, output, policy, beta, codec, keep, overwrite=force, calib=calib,
                          refit=samples if refit_head else None, **options)
    compressed = packed.refit.compressed if packed.refit else packed.result
    for warning in packed.result.warnings:
        _err(f"qlis-iqa: warning: {warning}")
    if calib is not None and constant_output(compressed):
        _err(f"qlis-iqa: warning: the compressed model gives all {calib.images} calibration "
             "images the same score: the correlation of its scores to the original model's is "
             "undefined (its output cosine reads 0); it cannot rank images: ask for a larger "
             "size (--target-ratio) or a quality target (--min-cosine)")
    click.echo(
        f"{escape(str(output))}: {human_bytes(packed.file_bytes)}, real ratio "
        f"{packed.real_ratio:.2f}x; policy {policy}"
        + (f", calibrated on {calib.images} training images "
           f"({packed.result.calibration_cost['passes']} passes, "
           f"{packed.result.calibration_cost['seconds']:.1f} s)" if calib else "")
        + f"  [{iqa.label}]"
    )
    if packed.refit:
        click.echo(f"quality before the head refit: {compressed.describe_quality()}")
        click.echo(f"head refit on {packed.refit.images} training images: the mean squared "
                   f"error of their scores {packed.refit.mse_before:.4g} with the compressed "
                   f"head, {packed.refit.mse_after:.4g} refit (as stored)")
    click.echo(f"quality: {packed.result.describe_quality()}")
    click.echo(f"idealised paper ratios (pruned zeros count as free): CR {packed.result.cr:.2f}, "
               f"HCR {packed.result.hcr:.2f}")


def _as_flags(names: Iterable[str], given: Collection[str]) -> AbstractContextManager:
    """The library's option errors in the words of this command: its flags, not the Python
    keywords (``--target-ratio``, not ``target_ratio=``)."""
    return errors_as_flags(names, given, "see 'qlis-iqa compress -h' for the options of each "
                           "policy")


def _training_samples(meta, root, split_file, dataset, written: list[Path], model_file: Path):
    """The training-split images of the data set the model in ``model_file`` was trained on
    (for calibration); the ``written`` files must not lie among its images."""
    from qlis_iqa.data import split_samples
    from qlis_iqa.evaluate import recorded_split

    ds, split, split_path = recorded_split(meta, root, split_file, dataset, model_file)
    inputs, images = _dataset_inputs(ds.name, ds.root, split_path)
    _refuse_inputs(written, inputs, [images])
    samples = split_samples(ds, split.train)[0]
    if not samples:
        raise QlisError(f"none of the {len(split.train)} training images of {split_path} is "
                        f"in {ds.root} for calibration; pass --root, or --calib-images 0 for a "
                        "data-free compression")
    return samples


@cli.command()
@click.argument("model", type=TEXT_PATH)
@output_option("The output folder (its parent must exist).")
@eval_set_options
@beta_option
@click.option("--per-channel", is_flag=True, help="Add per-channel LAQ/LAPQ rows.")
@click.option(
    "--paper-cr",
    type=FiniteFloatRange(min=1),
    multiple=True,
    help="Add a LAPQ row in budget mode at this paper CR (repeatable).",
)
@click.option("--rd-ratio", type=FiniteFloatRange(min=1, max=MAX_RD_RATIO), multiple=True,
              default=(8.0, 12.0, 16.0, 22.0), show_default=True,
              help="rd rows (calibrated and reconstructed) at these real archive ratios "
                   "(repeatable; giving it replaces the default; --only to skip them).")
@click.option("--rd-srcc-drop", type=FiniteFloatRange(0, 1, max_open=True), multiple=True,
              help="Add an rd row allowed to lose this much validation SRCC (repeatable).")
@click.option("--calib-images", type=click.IntRange(min=3), default=32, show_default=True,
              help="rd rows: training images to calibrate on.")
@click.option("--val-images", type=click.IntRange(min=3), default=64, show_default=True,
              help="rd SRCC-drop rows: training images (disjoint from calibration) to tune on.")
@click.option("--refit-head", is_flag=True,
              help="Beside each rd row, one whose MLP head (the float model's) is trained "
                   "again on the compressed backbone's outputs of the training images, with "
                   "the paper's settings, and stored as the rd row stored its head.")
@click.option("--only", help="Comma-separated row names to run (default: all).")
@click.option(
    "--archives/--no-archives",
    default=True,
    show_default=True,
    help="Write each variant's .qlis archive (needed for the real ratio).",
)
@codec_option
@logistic_option
@batch_option
@cache_option
@runtime_options
@lowbit_option
@force_option
def sweep(
    model: Path,
    output: Path,
    dataset: str | None,
    root: Path | None,
    split_file: Path | None,
    beta: float,
    per_channel: bool,
    paper_cr: tuple[float, ...],
    rd_ratio: tuple[float, ...],
    rd_srcc_drop: tuple[float, ...],
    calib_images: int,
    val_images: int,
    refit_head: bool,
    only: str | None,
    archives: bool,
    codec: str,
    logistic: bool,
    batch_size: int,
    cache_dir: Path | None,
    device: torch.device,
    workers: int,
    progress: bool | None,
    runtime: str,
    force: bool,
) -> None:
    """The paper's Table 1 on the fixed test split.

    Baseline, P level k, Q b-bit, LAP, LAQ, LAPQ (+ per-channel and budget rows).
    """
    path = _model_file(model)
    _check_eval_set(root, split_file)
    check_output_dir(output, force)
    _check_cache_dir(cache_dir, output, [*SWEEP_FILES.values(), "archives"])
    _start_work()
    from qlis_iqa.data import split_samples
    from qlis_iqa.evaluate import eval_set_for, skipped_report
    from qlis_iqa.features import FeatureCache
    from qlis_iqa.models import load_model
    from qlis_iqa.sweep import (
        RefitData,
        extra_variants,
        output_files,
        paper_variants,
        pick_variants,
        rd_data,
        rd_variants,
        run_sweep,
        write_outputs,
    )

    variants = pick_variants(
        paper_variants() + extra_variants(per_channel, paper_cr)
        + rd_variants(rd_ratio, rd_srcc_drop),
        only,
    )
    if refit_head and not any(v.kind == "rd" for v in variants):
        raise QlisError("--refit-head refits the head of the rd rows, and none is selected "
                        "(--rd-ratio, --rd-srcc-drop, --only)")
    iqa, meta = load_model(path)
    es = eval_set_for(meta, root, split_file, dataset, path)
    inputs, images = _dataset_inputs(es.dataset.name, es.dataset.root, es.split_file)
    written = [output, *output_files(output, variants, archives, refit_head)]
    cache_dir = _feature_cache(cache_dir, path, images)
    _refuse_inputs([*written, cache_dir], [path, *inputs], [images])
    _err(skipped_report("test", [(n, "missing") for n in es.absent]))
    rd = refit = None
    if any(v.kind == "rd" for v in variants):
        train = split_samples(es.dataset, es.split.train)[0]
        rd = rd_data(iqa, train, calib_images, val_images, batch_size)
        refit = RefitData(train) if refit_head else None
    created = [p for p in (top_missing(output), top_missing(output / "archives")) if p]
    with removed_on_failure(created):  # a failed sweep leaves no folder to block its rerun
        rows = run_sweep(
            iqa.to(device),
            es.samples,
            output,
            variants,
            FeatureCache(cache_dir),
            baseline_file=path if path.suffix.lower() == ".safetensors" else None,
            model_metadata=meta,
            beta=beta,
            archives=archives,
            codec=codec,
            logistic=logistic,
            batch_size=batch_size,
            workers=workers,
            progress=_progress(progress),
            rd=rd,
            runtime=runtime,
            refit=refit,
            log=click.echo,
        )
        if not rows:
            raise InputError("every row of the sweep was skipped (the lines above say why): "
                             "no table is written")
        title = f"{iqa.family.upper()}IQA on {es.dataset.name}, Table 1 sweep [{iqa.label}]"
        files = write_outputs(rows, output, title, logistic)
    click.echo("wrote " + ", ".join(escape(str(p)) for p in files.values()))


@cli.command()
@click.argument("images_dir", type=TEXT_PATH)
@click.option(
    "--model",
    "model_path",
    type=TEXT_PATH,
    required=True,
    help=".qlis archive (or checkpoint / run folder).",
)
@output_option("Scores CSV.")
@click.option("--recursive", is_flag=True, help="Include images in subfolders.")
@batch_option
@runtime_options
@lowbit_option
@precision_option
@force_option
def score(
    images_dir: Path,
    model_path: Path,
    output: Path,
    recursive: bool,
    batch_size: int,
    device: torch.device,
    workers: int,
    progress: bool | None,
    runtime: str,
    precision: str,
    force: bool,
) -> None:
    """Score every image of a folder.

    The model is rebuilt from its .qlis archive alone; bad images are listed, not fatal.
    """
    check_input(images_dir, "folder of images")
    path = _model_file(model_path)
    check_output(output, force, (".csv",), inputs=[path])
    _start_work()
    from qlis_iqa.evaluate import skipped_report
    from qlis_iqa.score import score_folder

    scores, label = score_folder(
        images_dir,
        path,
        output,
        batch_size,
        workers,
        recursive,
        str(device),
        _progress(progress),
        runtime,
        precision,
        force,
    )
    bad = [(escape(scores.paths[i].name), why) for i, why in sorted(scores.errors.items())]
    _err(skipped_report("score", bad))
    click.echo(
        f"scored {len(scores.scores)} image(s), skipped {len(bad)}: "
        f"{escape(str(output))}  [{label}]"
    )


def main() -> None:
    """Console entry point."""
    cli(prog_name="qlis-iqa")


if __name__ == "__main__":  # `python -m qlis_iqa.cli` ran nothing and exited 0 without this
    main()
