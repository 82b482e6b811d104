"""The ``qlis`` commands that work on models: inspect, pack, demo (and what ``qlis info
--verify`` reads; ``qlis unpack`` is qlis.cli.unpack). Thin: parse, call the public API,
print. They load torch, so the command table (qlis.cli.main) imports this module only when
one of them runs.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import click
import torch

import qlis
from qlis.archive.atomic import atomic_path
from qlis.archive.resume import PassCache
from qlis.cli.choices import codec_names
from qlis.cli.console import (
    PATH,
    check_input,
    check_output,
    check_output_dir,
    check_policy_flags,
    errors_as_flags,
    escape,
    human_bytes,
    same_file,
    strict_json,
    table,
)
from qlis.cli.demo import VIT_SHAPES, run_demo
from qlis.cli.progress import QUIET, progress_bars
from qlis.cli.unpack import SOURCE_METADATA
from qlis.errors import InputError, QlisError
from qlis.json_input import JSONSyntaxError, parse_json_text, read_json_file
from qlis.models.calib_files import DEFAULT_BATCH as FILE_BATCH
from qlis.models.calib_files import DEFAULT_EXAMPLES as FILE_EXAMPLES
from qlis.models.calib_files import check_calibration_path, read_calibration
from qlis.models.checkpoints import (
    load_state_dict,
    model_file_bytes,
    read_metadata,
    weight_files,
)
from qlis.models.hf_model import (
    check_input_names,
    check_token_ids,
    load_hf_model,
    load_tokenizer,
    max_input_length,
    with_decoder_inputs,
)
from qlis.models.sentence_pooling import describe as describe_pooling
from qlis.models.sentence_pooling import sentence_embedding_batches
from qlis.models.synthetic_inputs import DEFAULT_BATCH as SYNTHETIC_BATCH
from qlis.models.synthetic_inputs import DEFAULT_EXAMPLES as SYNTHETIC_EXAMPLES
from qlis.models.synthetic_inputs import DEFAULT_IMAGES as SYNTHETIC_IMAGES
from qlis.models.synthetic_inputs import SYNTHETIC, synthetic_calibration
from qlis.models.tensors import tensor_layout
from qlis.plan.compress import DEFAULT_POLICY, QualityWarning
from qlis.plan.policy import PAPER_POLICIES, policy_names
from qlis.quantize.gptq import MAX_SWEEPS
from qlis.runtime.lowbit import runtime_plan
from qlis.workers.cluster import Cluster, together
from qlis.workers.memory import keep_freed_memory_for_reuse, return_freed_buffers_at_once

INSPECT_KEYS = ("name", "shape", "numel", "dtype", "sigma", "P", "E", "S", "EWDS", "QLIS")
POLICY_NAMES = [name for name in policy_names() if name != "plan"]  # --plan FILE gives one
DEMO_POLICIES = [name for name in POLICY_NAMES if name != "levels"]
"""demo takes no policy options, and "levels" does nothing without its bits/k levels."""
CODECS = click.Choice(codec_names())


def _json_option(text: str | None, what: str) -> dict | None:
    """A strategy config given as JSON (``--quantizer``, ``--pruner``): an object, bounded."""
    if text is None:
        return None
    return parse_json_text(text, what, dict, example='{"id": "group", "bits": 4}')


# Arguments that pack passes to compress itself, never policy options: the flag for each.
_NOT_SETTABLE = {"policy": "--policy", "plan": "--plan", "beta": "--beta", "eps": "--eps",
                 "select": "--select", "calib": "--calib", "progress": None}


def _set_options(pairs: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs; values are JSON when they parse as JSON, else strings (JSON
    that breaks a limit, such as NaN or deep nesting, is refused rather than kept as text)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--set takes KEY=VALUE (a policy option), got {pair!r}")
        if key in options:
            raise InputError(f"--set {key}= is given twice: give it once")
        if key in _NOT_SETTABLE:
            flag = _NOT_SETTABLE[key]
            raise InputError(f"--set {key}= is not a policy option"
                             + (f"; give {flag} instead" if flag else ""))
        try:
            options[key] = parse_json_text(value, f"--set {key}")
        except JSONSyntaxError:
            options[key] = value
    return options


def _pack_policy(policy: str, given: dict, plan_file: Path | None,
                 calibrated: bool = False) -> tuple[object, dict]:
    """The policy (or plan) and its options from the flags the user gave, checked before any
    model is loaded: an option that the policy would ignore or override is refused."""
    options = {key: value for key, value in given.items() if value is not None}
    if plan_file is not None:
        if options or policy != DEFAULT_POLICY:
            raise InputError("--plan gives every layer's settings: drop --policy and its options")
        return qlis.Plan.coerce(read_json_file(plan_file, "--plan", expected_type=dict)), {}
    check_policy_flags(policy, options)
    if "min_cosine" in options and not calibrated:
        raise InputError("--min-cosine is measured on calibration data: pass --calib FILE")
    if "max_distortion" in options and calibrated:
        raise InputError("--max-distortion is a weight-error target; with --calib ask for "
                         "--min-cosine (output quality) or a size")
    qlis.make_policy(policy, **options)  # unknown or bad options fail here, before the work
    return None, options


def _rank_zero_says(text: str) -> None:
    """A note of the job's rank 0 alone (the others would repeat it), before ranks exist."""
    if os.environ.get("RANK", "0").strip() == "0":
        click.echo(f"qlis: {text}", err=True)


PLOT_LABELS = 192
"""Layers named on the plot at most (0.25 inch each): a model of more has one in every few
named, so that the figure's memory is bounded (thousands of layers took gigabytes)."""


def _plot(report: qlis.InspectionReport, policy: str, path: Path, force: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'qlis[plot]'") from None
    scores = [layer.QLIS for layer in report.layers]
    plan = qlis.make_policy(policy).assign(scores)
    labels = [
        "/".join(p for p in (f"k{k:g}" if k else "", f"{b}b" if b else "") if p) or "fp"
        for k, b in plan
    ]
    every = -(-len(scores) // PLOT_LABELS)  # label one layer in `every`
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(scores[::every])), 4.5))
    if every == 1:
        ax.bar(range(len(scores)), scores, color="tab:blue")
    else:  # one collection of lines: thousands of bars are thousands of patches
        ax.vlines(range(len(scores)), 0, scores, color="tab:blue", linewidth=0.5)
    for x in range(0, len(scores), every):
        ax.annotate(labels[x], (x, scores[x]), ha="center", va="bottom", fontsize=6,
                    rotation=90)
    ax.set_xticks(range(0, len(scores), every),
                  [escape(layer.name) for layer in report.layers[::every]], rotation=90,
                  fontsize=6, parse_math=False)  # a name is text, not a formula ($x^2$)
    ax.set_ylabel("QLIS")
    ax.set_title(f"QLIS per layer (beta={report.beta}) and the {policy} plan (k / bits)")
    fig.tight_layout()
    try:
        with atomic_path(path, overwrite=force) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    except OSError as err:  # a full disk: the plot's name, as the other writers say it
        raise InputError(f"{path}: could not be written ({err.strerror or err}); free space "
                         "or write elsewhere") from None
    finally:
        plt.close(fig)


_beta = click.option("--beta", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                     help="Weight of the parameter share P in QLIS.")
_eps = click.option("--eps", type=click.FloatRange(min=0), default=1e-3, show_default=True,
                    help="|w| below this counts as zero in the sparsity S.")
_select = click.option("--select", "select", multiple=True, metavar="GLOB",
                       help="Layers: names matching GLOB (repeatable); default: float, ndim>=2.")
_jobs = click.option("--jobs", "-j", type=click.IntRange(1, 1024),
                     help="Threads that measure, quantize and encode tensors side by side "
                          "(default: every core); the archive is the same bytes whatever N.")
_codec = click.option("--codec", type=CODECS, default="ans", show_default=True,
                      help="How quantized codes are stored; auto: the smallest per tensor.")


@click.command()
@click.argument("path", type=PATH)
@_beta
@_eps
@_select
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--plot", type=PATH, help="Write a PNG of QLIS per layer.")
@click.option("--policy", type=click.Choice(PAPER_POLICIES),
              help="The paper policy whose per-layer plan the plot shows.  [default: lapq]")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
def inspect(path, beta, eps, select, fmt, plot, policy, force) -> None:
    """Per-layer importance report of a model (.pt/.pth, .safetensors, or a HF folder)."""
    if not plot and (policy is not None or force):
        raise InputError(f"{'--policy' if policy is not None else '--force'} is for the plot: "
                         "give --plot PATH too")
    check_input(path)
    if plot:
        check_output(plot, force, (".png",), inputs=[path, *weight_files(path)])
    report = qlis.inspect(load_state_dict(path), beta=beta, eps=eps, select=select or None)
    records = report.records()
    if fmt == "json":
        click.echo(strict_json(records))
    elif fmt == "csv":
        # Names escaped as the table shows them: one row per line, no terminal control codes;
        # commas and quotes left to the csv module's quoting.
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=INSPECT_KEYS, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "name": escape(r["name"]),
                             "shape": "x".join(map(str, r["shape"]))})
        click.echo(buffer.getvalue(), nl=False)
    else:
        rows = [
            (r["name"], f"{r['numel']:,}", f"{r['P']:.4f}", f"{r['E']:.3f}", f"{r['S']:.3f}",
             f"{r['EWDS']:.3f}", f"{r['QLIS']:.4f}")
            for r in records
        ]
        headers = ("layer", "params", "P", "E", "S", "EWDS", "QLIS")
        click.echo(table(headers, rows, right=range(1, len(headers))))
        t = report.totals
        click.echo(
            f"{t['layers']} layers, {t['layer_params']:,} of {t['total_params']:,} parameters; "
            f"QLIS {t['min_QLIS']:.4f}..{t['max_QLIS']:.4f} (beta={beta}, eps={eps})"
        )
    if report.masks:
        click.echo(f"{len(report.masks)} tensor(s) of infinities left out of the layers "
                   f"(masks, stored as they are): {', '.join(map(escape, report.masks[:5]))}"
                   f"{' ...' if len(report.masks) > 5 else ''}", err=True)
    if plot:
        _plot(report, policy or "lapq", plot, force)
        click.echo(f"plot written to {escape(str(plot))}", err=True)


@click.command()
@click.argument("path", type=PATH)
@click.option("-o", "--output", type=PATH, required=True,
              help="The .qlis archive to write.")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=DEFAULT_POLICY,
              show_default=True,
              help="rd: rate–distortion (quality or size target); prune/quant/lap/laq/lapq: "
                   "the paper's.")
@click.option("--target-bits-per-weight", type=click.FloatRange(min=0, min_open=True),
              help="rd: archive bits per model element.")
@click.option("--target-bytes", type=click.IntRange(min=1), help="rd: archive size in bytes.")
@click.option("--target-ratio", type=click.FloatRange(min=1),
              help="rd: original tensor bytes / archive bytes (real).")
@click.option("--paper-cr", type=click.FloatRange(min=1),
              help="The paper's policies: reach this idealised CR (budget mode).")
@click.option("--max-distortion", type=click.FloatRange(min=0, min_open=True),
              help="rd: the layers' mean relative weight MSE (default 1e-4).")
@_beta
@_eps
@_select
@click.option("--k", type=click.FloatRange(min=0, max=1e6), help="Uniform k (policy prune).")
@click.option("--bits", type=click.IntRange(1, 8), help="Uniform bits (policy quant).")
@click.option("--granularity", type=click.Choice(["tensor", "channel"]),
              help="Per-tensor (the paper) or per-channel scales [quant, laq, lapq].")
@click.option("--method", help="Quantizer id used for each bits level [quant, laq, lapq].")
@click.option("--pruner", "pruner_json", metavar="JSON",
              help='A pruner config for every layer, e.g. \'{"id": "fraction", "fraction": 0.3}\'.')
@click.option("--quantizer", "quantizer_json", metavar="JSON",
              help='A quantizer config for every layer, e.g. \'{"id": "group", "bits": 4}\'.')
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other policy option (JSON value), e.g. --set granularities=[\"channel\"].")
@click.option("--plan", "plan_file", type=PATH,
              help="A JSON plan: layer name -> {pruner, quantizer} (instead of a policy).")
@click.option("--calib", "calib_file", type=PATH,
              help="Calibration data for a Hugging Face model folder: a .txt file of one "
                   "example per line (tokenized by the folder's tokenizer), .safetensors/.pt "
                   "tensors named as the model's forward names its inputs (input_ids, "
                   "attention_mask, ...; one example per row), or "
                   f"'{SYNTHETIC}': random token sequences from a text model's vocabulary, "
                   "or uniform-noise images for a vision model (pixel_values), when there "
                   "is no data (the quality is then measured on them).")
@click.option("--calib-examples", type=click.IntRange(min=1, max=1 << 16),
              help=f"Calibration examples to use at most [default: {FILE_EXAMPLES}; "
                   f"{SYNTHETIC_EXAMPLES} synthetic sequences, {SYNTHETIC_IMAGES} images].")
@click.option("--calib-batch-size", type=click.IntRange(min=1, max=4096),
              help=f"Calibration examples per forward pass [default: {FILE_BATCH}; "
                   f"{SYNTHETIC_BATCH} synthetic ones].")
@click.option("--rounding-sweeps", type=click.IntRange(min=0, max=MAX_SWEEPS), default=0,
              help="With --calib: passes of learned rounding after GPTQ (each layer's codes "
                   "re-chosen for output error + coded length; slower).")
@click.option("--min-cosine", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="rd with --calib: the least mean output cosine to the original model.")
@_codec
@_jobs
@click.option("--resume", is_flag=True,
              help="Reuse the first pass that an interrupted pack of the same input with the "
                   "same options saved beside OUTPUT (data-free, one process).")
@QUIET
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def pack(path, output, policy, target_bits_per_weight, target_bytes, target_ratio, paper_cr,
         max_distortion, beta, eps, select, k, bits, granularity, method, pruner_json,
         quantizer_json, settings, plan_file, calib_file, calib_examples, calib_batch_size,
         rounding_sweeps, min_cosine, codec, jobs, resume, quiet, force) -> None:
    """Compress a model and write it as a .qlis archive.

    By default the rd policy keeps the model close to the original (weight error under
    1e-4 per layer on average); ask for a size with --target-bits-per-weight,
    --target-bytes or --target-ratio. With --calib (a Hugging Face model folder), layers
    are reconstructed on the calibration data and the output quality is measured.
    """
    # joined first: a rank that finds a mistake in its input tells the others, which
    # waited out the rendezvous for it otherwise (ranks started by hand, on several machines)
    cluster = Cluster.from_environment(waiting=_rank_zero_says)  # rank 0 writes, reports
    with together(cluster):
        check_input(path)
        # a file the pack reads is never its output (a plan or calibration file replaced by it,
        # or a folder's weights, which a link may name as the output)
        inputs = [path, *weight_files(path),
                  *(given for given in (plan_file, calib_file) if given is not None)]
        check_output(output, force, (".qlis",), inputs=inputs)
        cache = PassCache.path_for(output)  # written and removed by the pack: never an input
        if any(same_file(cache, given) for given in inputs):
            raise InputError(f"{escape(str(cache))}: is an input, and the name of the pass cache "
                             "the pack writes beside its output; rename it or the output")
        flags = {
            "target_bits_per_weight": target_bits_per_weight, "target_bytes": target_bytes,
            "target_ratio": target_ratio, "paper_cr": paper_cr, "max_distortion": max_distortion,
            "k": k, "bits": bits,
            "granularity": granularity, "method": method, "min_cosine": min_cosine,
            "pruner": _json_option(pruner_json, "--pruner"),
            "quantizer": _json_option(quantizer_json, "--quantizer"),
        }
        settable = _set_options(settings)
        if twice := [key for key in settable if flags.get(key) is not None]:
            raise InputError(f"--set {twice[0]}= and --{twice[0].replace('_', '-')} both give "
                             f"{twice[0]}: give it once")
        given = {**flags, **settable}
        # the library's messages name its keywords; here they are this command's flags
        in_flags = partial(errors_as_flags, flags,
                           [key for key, value in flags.items() if value is not None],
                           "see 'qlis pack -h'")
        with in_flags():
            plan, options = _pack_policy(policy, given, plan_file,
                                         calibrated=calib_file is not None)
        if calib_file is None and (calib_examples or calib_batch_size):
            raise InputError("--calib-examples and --calib-batch-size size the calibration: "
                             "pass --calib FILE")
        if resume and calib_file is not None:
            raise InputError("--resume reuses the first pass of a data-free pack; with --calib "
                             "every pack measures on its data: leave --resume out")
        if rounding_sweeps:
            if calib_file is None:
                raise InputError("--rounding-sweeps refines reconstruction on calibration data: "
                                 "pass --calib FILE")
            options["rounding_sweeps"] = rounding_sweeps
        calib = pooling = None
        synthetic = calib_file is not None and str(calib_file) == SYNTHETIC
        if calib_file is not None:
            if not synthetic:
                check_calibration_path(calib_file)
            return_freed_buffers_at_once()  # the calibrated pack's memory: see its doc
            model = load_hf_model(path)
            if synthetic:
                batches = _synthetic_batches(model, path, calib_examples,
                                             calib_batch_size or SYNTHETIC_BATCH)
            else:
                batches = read_calibration(calib_file, path, calib_examples or FILE_EXAMPLES,
                                           calib_batch_size or FILE_BATCH, max_input_length(model))
                if Path(calib_file).suffix.lower() != ".txt":  # a text's: the tokenizer's names
                    check_input_names(model, batches, escape(str(calib_file)))
                check_token_ids(model, batches, escape(str(calib_file)))
                batches = with_decoder_inputs(model, batches)
            examples = sum(len(next(iter(batch.values()))) for batch in batches)
            calib, pooling = sentence_embedding_batches(path, batches)
            state = model.state_dict()
        else:
            keep_freed_memory_for_reuse()  # the streaming pack: see its doc
            model = state = load_state_dict(path)
        total = sum(t.numel() for t in tensor_layout(state).values())
        source_bytes = model_file_bytes(path)
        metadata = {"source": path.name}
        metadata.update({f"{SOURCE_METADATA}{k}": v
                         for k, v in (read_metadata(path) or {}).items()})
    leader = cluster is None or cluster.leader
    bars = progress_bars(quiet) if leader else nullcontext(lambda *_: None)
    with bars as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", QualityWarning)  # printed below, once, as a qlis line
        options["planning_progress"] = bar(
            "measuring" if calib is None else "compressing (calibrated passes)", None)
        writing = bar("writing", total)
        with in_flags():
            result = qlis.pack(model, output, policy=policy, beta=beta, eps=eps,
                               select=select or None, plan=plan, calib=calib, codec=codec,
                               metadata=metadata, source_bytes=source_bytes, overwrite=force,
                               progress=writing, jobs=jobs, cluster=cluster, resume=resume,
                               **options)
    if not leader:
        return
    for warning in result.warnings:
        click.echo(f"qlis: warning: {warning}", err=True)
    archive_bytes = output.stat().st_size
    click.echo(  # the tensors' ratio is the one a --target-ratio (and its warning) counts
        f"{escape(str(output))}: {human_bytes(archive_bytes)} from {human_bytes(source_bytes)}, "
        f"real ratio {source_bytes / archive_bytes:.2f}x "
        f"({result.original_bytes / archive_bytes:.2f}x of its tensors' bytes, "
        f"{8 * archive_bytes / max(result.numel, 1):.2f} bits per element); "
        f"policy {result.policy.strategy_id}"
    )
    click.echo(f"quality: {result.describe_quality()}")
    if result.calibration_cost is not None:
        kind = "synthetic " if synthetic else ""
        compared = (f"compared as sentence embeddings ({describe_pooling(pooling)} pooling, "
                    "as the folder's modules.json says), " if pooling else "")
        click.echo(f"calibration: {examples} {kind}examples, {compared}"
                   f"{result.calibration_cost['passes']} passes, "
                   f"{result.calibration_cost['seconds']:.1f} s")
    click.echo(f"idealised paper ratios (no index or metadata cost, pruned zeros free): "
               f"CR {result.cr:.2f}, HCR {result.hcr:.2f}")


def _synthetic_batches(model: torch.nn.Module, folder: Path, examples: int | None,
                       batch_size: int) -> list[dict]:
    """`synthetic_calibration` for a model folder (``examples`` None: its default), framed by
    its tokenizer where it has one (a folder of weights alone gets bare token sequences)."""
    try:
        tokenizer = load_tokenizer(folder)
    except InputError:
        tokenizer = None
    return synthetic_calibration(model, tokenizer, examples, batch_size)


@click.command()
@click.option("--model", type=click.Choice(list(VIT_SHAPES)), default="vit-b16", show_default=True)
@click.option("--policy", type=click.Choice(DEMO_POLICIES), default=DEFAULT_POLICY,
              show_default=True)
@_codec
@click.option("-o", "--output-dir", type=PATH,
              help="Keep the model file and the archive in this folder (default: temporary "
                   "files, deleted at the end).")
@click.option("--force", is_flag=True, help="Replace the two files in --output-dir if they exist.")
def demo(model, policy, codec, output_dir, force) -> None:
    """The embedded default job: inspect, compress, pack, read back and verify a local ViT."""
    if output_dir is not None:
        check_output_dir(output_dir, force=True)
        if output_dir.is_dir():
            for suffix in (".safetensors", ".qlis"):
                check_output(output_dir / f"{model}{suffix}", force)
    figures = run_demo(model, policy=policy, codec=codec, out_dir=output_dir, echo=click.echo)
    if not figures["bit_exact"]:
        raise QlisError("the archive did not read back bit-exact")


def verified_runtime(path: Path) -> list[dict]:
    """Read and check every record of the archive at ``path``; per weight that could run
    packed, how it would (`qlis.runtime.lowbit.runtime_plan`)."""
    with qlis.open(path) as archive:
        archive.verify()
        return runtime_plan(archive)
