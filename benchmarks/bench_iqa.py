"""The IQA pipeline end to end on AGIQA-3K: train, compress, score, and the Table 1 sweep.

Measures, on this machine: images/s of feature extraction (frozen backbone), training time,
baseline vs LAPQ archive (size on disk, load time, scoring images/s), and the paper's Table 1
sweep on the fixed test split. With `--weights-dir` (a folder holding clip-vit-large-patch14/
and dino-vitb16/, or a Hugging Face cache) the pretrained backbones are used; without it the
backbones are random-initialised with the paper's shapes (ViT-L/14, ViT-B/16) and every output
says so: their correlations mean nothing, only sizes and speeds do.

    python benchmarks/bench_iqa.py                       # random-initialised, ~15 min on 2 cores
    python benchmarks/bench_iqa.py --weights-dir W --limit 0 --epochs 20   # the paper's setting

Writes its section of docs/benchmarks.md (--section) and prints the same markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from qlis_iqa.backbones import RANDOM_LABEL, save_random_backbone
from qlis_iqa.data import load_agiqa3k
from qlis_iqa.features import FeatureCache
from qlis_iqa.models import load_model
from qlis_iqa.pack import pack
from qlis_iqa.score import score_images
from qlis_iqa.sweep import (
    extra_variants,
    markdown_table,
    paper_variants,
    pick_variants,
    run_sweep,
    write_outputs,
)
from qlis_iqa.train import TrainConfig, train_run
from report import write_section

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "agiqa-3k"


def _log(message: str) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)


def _timed_scoring(
    model_file: Path, paths: list[Path], args: argparse.Namespace
) -> tuple[float, float]:
    """(load seconds, scoring images/s) of a model file, image decoding included."""
    start = time.perf_counter()
    model, _ = load_model(model_file)
    model.to(args.device)
    load_s = time.perf_counter() - start
    score_images(model, paths[: args.batch], args.batch, args.workers)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    out = score_images(model, paths, args.batch, args.workers)
    _sync(args.device)
    return load_s, len(out.scores) / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_family(family: str, args: argparse.Namespace, out: Path) -> tuple[str, str]:
    """Run one family through the pipeline; return its backbone label and markdown section."""
    if args.weights_dir:
        weights: Path = args.weights_dir
    else:
        _log(f"[{family}] writing a random-initialised full-size backbone")
        weights = save_random_backbone(family, out / "backbones" / family, "full", seed=0)
    limit = args.limit or None
    config = TrainConfig(epochs=args.epochs)
    _log(f"[{family}] train: limit {limit}, {args.epochs} epoch(s)")
    run = train_run(
        family,
        "agiqa-3k",
        args.data,
        out / f"run-{family}",
        weights=weights,
        config=config,
        limit=limit,
        feature_batch=args.batch,
        workers=args.workers,
        device=args.device,
        progress=args.progress,
        log=_log,
    )
    summary = json.loads((out / f"run-{family}" / "metrics.json").read_text())
    label = run.label
    extract_ips = summary["features_computed"] / summary["feature_seconds"]

    _log(f"[{family}] LAPQ archive")
    start = time.perf_counter()
    packed = pack(run.model, out / f"{family}-lapq.qlis", "lapq", codec=args.codec)
    pack_s = time.perf_counter() - start

    ds = load_agiqa3k(args.data)
    names = set(run.predictions.names)
    test_paths = [s.path for s in ds.samples if s.name in names][: args.score_images]
    _log(f"[{family}] scoring {len(test_paths)} images: baseline, then LAPQ archive")
    base_load, base_ips = _timed_scoring(run.checkpoint, test_paths, args)
    lapq_load, lapq_ips = _timed_scoring(packed.path, test_paths, args)

    only = args.only.get(family) if args.only else None
    extra = extra_variants(args.per_channel, args.paper_cr)
    variants = pick_variants(paper_variants() + extra, only)
    _log(f"[{family}] sweep: {len(variants)} variants on {len(names)} test images")
    start = time.perf_counter()
    test_samples = [s for s in ds.samples if s.name in names]
    rows = run_sweep(
        run.model,
        test_samples,
        out / f"sweep-{family}",
        variants,
        FeatureCache(out / f"run-{family}" / "cache"),
        baseline_file=run.checkpoint,
        codec=args.codec,
        batch_size=args.batch,
        workers=args.workers,
        progress=args.progress,
        log=_log,
    )
    sweep_s = time.perf_counter() - start
    title = f"{family.upper()}IQA, AGIQA-3K Table 1 sweep [{label}]"
    write_outputs(rows, out / f"sweep-{family}", title)

    mb = 1 / 1e6
    base_bytes = run.checkpoint.stat().st_size
    lines = [
        f"### {family.upper()}IQA ({label})",
        "",
        f"{summary['train_images']} train / {summary['test_images']} test images of AGIQA-3K "
        f"(`--limit {args.limit}`, split seed 0), {args.epochs} epoch(s), batch {args.batch}; "
        f"test SRCC {run.metrics['srcc']:.4f} [{label}].",
        "",
        "| measure | baseline (safetensors) | LAPQ archive (.qlis) |",
        "|---|---|---|",
        f"| file size | {base_bytes * mb:.1f} MB | {packed.file_bytes * mb:.1f} MB "
        f"(real ratio {packed.original_bytes / packed.file_bytes:.2f}x; paper CR "
        f"{packed.result.cr:.2f}, HCR {packed.result.hcr:.2f}) |",
        f"| load time | {base_load:.2f} s | {lapq_load:.2f} s (compress + write: {pack_s:.1f} s) |",
        f"| scoring ({len(test_paths)} images, whole model) | {base_ips:.2f} img/s | "
        f"{lapq_ips:.2f} img/s |",
        "",
        f"Feature extraction (frozen part, {summary['features_computed']} images, batch "
        f"{args.batch}): {extract_ips:.2f} img/s; head training: {summary['train_seconds']:.1f} s; "
        f"sweep ({len(variants)} variants): {sweep_s:.0f} s. The compressed model computes with "
        "dequantized float weights, so it scores at the baseline's speed: the gain is storage "
        "and transfer, not compute.",
        "",
        markdown_table(rows, title).replace("### ", "#### Sweep: ", 1),
    ]
    return label, "\n".join(lines)


def _only(text: str) -> dict[str, str]:
    """'clip=Baseline,LAPQ;dino=LAPQ' -> {'clip': 'Baseline,LAPQ', 'dino': 'LAPQ'}."""
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AGIQA-3K folder.")
    parser.add_argument("--weights-dir", type=Path, help="Pretrained backbones (else random).")
    parser.add_argument("--families", default="dino,clip")
    parser.add_argument("--limit", type=int, default=80, help="Images used (0: all 2,982).")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--score-images", type=int, default=16)
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--paper-cr", type=float, action="append", default=[])
    parser.add_argument("--codec", default="huffman")
    parser.add_argument("--only", type=_only, help="Rows per family: 'clip=Baseline,LAPQ;dino=…'.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers.")
    parser.add_argument("--out", type=Path, help="Work folder (default: a temporary one).")
    parser.add_argument("--section", default="bench_iqa",
                        help="The section of docs/benchmarks.md to write (e.g. bench_iqa_gpu).")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "data.csv").is_file():
        parser.error(f"{args.data}: no AGIQA-3K data.csv (use --data)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_iqa-"))
    start = time.perf_counter()
    results = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        results.append(bench_family(family, args, out))
        text = _document(args, argv, results, time.perf_counter() - start)
        if not args.no_write:
            write_section(args.section, text)  # after each family: partial runs count
    print(text)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
        _log("work folder removed; pass --out DIR to keep the sweep CSV/plot and the archives")


def _document(
    args: argparse.Namespace, argv: list[str] | None, results: list[tuple[str, str]], total: float
) -> str:
    random_init = any(label == RANDOM_LABEL for label, _ in results)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/bench_iqa.py", *given])
    header = [
        f"## IQA pipeline on {args.device} (`benchmarks/bench_iqa.py`)",
        "",
        (
            f"**{RANDOM_LABEL}s** (no pretrained weights here): the correlations below say "
            "nothing about image quality and are not comparable with the paper; sizes, ratios "
            "and speeds are real."
            if random_init
            else f"Pretrained backbones from `{args.weights_dir}`."
        ),
        "",
        f"Command: `{command}` — {total / 60:.1f} min on {_machine(args.device)} "
        f"(torch {torch.__version__}, {platform.python_implementation()} "
        f"{platform.python_version()}).",
        "",
    ]
    return "\n".join(header + [section for _, section in results]) + "\n"


def _machine(device: str) -> str:
    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} ({cpu} for decoding and compression)"
    return cpu


if __name__ == "__main__":
    main()
