"""`qlis pack`, `inspect` and `unpack` of a checkpoint of many small tensors (a mixture of
experts' many expert matrices and norms), beside the safetensors load + save floor, and
optionally beside another checkout's code in the same run (``--before DIR``).

Usage: python bench_many_tensors.py [--tensors N] [--before CHECKOUT] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from report import command, machine, run, write_section

PYTHON = sys.executable


def experts(n: int) -> dict[str, torch.Tensor]:
    """``n`` tensors named as an MoE checkpoint's: three of four an expert's (16, 32)
    projection, the fourth a norm's 32 weights."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n):
        block, expert, kind = i // 256, (i // 4) % 64, i % 4
        name = f"model.layers.{block}.experts.{expert}.{('w1', 'w2', 'w3', 'norm')[kind]}"
        shape = (32,) if kind == 3 else (16, 32)
        tensors[f"{name}.weight"] = torch.randn(*shape, generator=gen) * 0.05
    return tensors


def qlis_command(code: Path | None, *args: str) -> list[str]:
    python = [PYTHON, "-c", "from qlis.cli.main import main; main()", *args]
    return ["env", f"PYTHONPATH={code}", *python] if code is not None else python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--before", type=Path, help="A checkout of other code to time too.")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    codes = {"this code": None} | ({"before": args.before} if args.before else {})
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "experts.safetensors"
        save_file(experts(args.tensors), str(model))
        floor = [PYTHON, "-c", "from safetensors.torch import load_file, save_file; "
                 f"save_file(load_file({str(model)!r}), {str(model.with_suffix('.copy'))!r})"]
        rows = [("safetensors load_file + save_file (the floor)", "-", *run(floor)[:2])]
        archives = {}
        warm = Path(scratch) / "warm.safetensors"
        save_file(experts(8), str(warm))
        for label, code in codes.items():
            for argv in (["pack", str(warm), "-o", str(warm.with_suffix(".qlis")), "-q",
                          "--force"], ["unpack", str(warm.with_suffix(".qlis")), "-o",
                                       str(warm.with_suffix(".out.safetensors")), "--force"]):
                run(qlis_command(code, *argv))  # kernels compiled and cached before timing
            archive = Path(scratch) / f"{label.replace(' ', '_')}.qlis"
            steps = {
                "`qlis pack` (default rd)": ["pack", str(model), "-o", str(archive), "-q"],
                "`qlis inspect`": ["inspect", str(model)],
                "`qlis unpack`": ["unpack", str(archive), "-o", str(archive.with_suffix(
                    ".safetensors")), "-q"],
            }
            for step, argv in steps.items():
                seconds, peak, _ = run(qlis_command(code, *argv))
                rows.append((step, label, seconds, peak))
            archives[label] = run_info(code, archive)
    table = ["| command | code | seconds | peak RSS (MiB) |", "|---|---|---:|---:|"]
    table += [f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3] / 2**20:.0f} |" for row in rows]
    notes = [f"- {label}: {described}" for label, described in archives.items()]
    markdown = "\n".join([
        "## Many small tensors (`benchmarks/bench_many_tensors.py`)", "",
        f"Machine: {machine()}. Command: `{command()}`; one round, each command in a fresh "
        "process.", "",
        f"Checkpoint: {args.tensors:,} float32 tensors named as a mixture of experts' (three "
        f"of four (16, 32) projections, the fourth a norm's 32 weights; "
        f"{model_bytes(args.tensors) / 2**20:.1f} MiB of values), random values.", "",
        *table, "",
        "Archives (`qlis info`):", *notes,
    ])
    print(markdown)
    if not args.no_write:
        write_section("bench_many_tensors", markdown)


def model_bytes(n: int) -> int:
    return sum(4 * (32 if i % 4 == 3 else 512) for i in range(n))


def run_info(code: Path | None, archive: Path) -> str:
    """The archive's size, ratio and weight error as `qlis info` states them."""
    out = subprocess.run(qlis_command(code, "info", str(archive), "--format", "json"),
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    totals, distortion = info["totals"], info["distortion"]
    return (f"{totals['archive_bytes'] / 2**20:.2f} MiB, real ratio "
            f"{totals['real_ratio']:.2f}x of the values, "
            f"{totals['real_ratio_vs_source_file']:.2f}x of the file (the paper's idealised CR "
            f"{totals['paper_cr']:.2f}, HCR {totals['paper_hcr']:.2f}); weight relative MSE "
            f"{distortion['weight_rel_mse']:.2e} per layer on average")


if __name__ == "__main__":
    main()
