"""`qlis info` on an archive with 100,000 tensors (issue: <= 2 s and <= 200 MB), beside the
cost of starting the command at all and of opening the archive for loading (`qlis.open`:
torch, every codec and quantizer config built).

Usage: python bench_info.py [--tensors N] [--rounds R] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from qlis.archive.file import write_tensors
from qlis.quantize.quantizers import AffineQuantizer
from report import command, machine, run, write_section

GOAL_SECONDS, GOAL_BYTES = 2.0, 200 * 2**20
STARTUP = "start-up of the command (Python, click, qlis' header reader)"
PYTHON = sys.executable


def many_tensors(n: int) -> dict:
    """``n`` small tensors as a large checkpoint's header lists them: every fourth a 4-bit
    affine weight (with its scale and zero point), the rest float vectors."""
    gen = torch.Generator().manual_seed(0)
    quantizer = AffineQuantizer(bits=4, granularity="channel")
    tensors = {}
    for i in range(n):
        value = torch.randn(4, 8, generator=gen)
        name = f"model.layers.{i // 8}.block.{i % 8}.weight"
        tensors[name] = quantizer.quantize(value) if i % 4 == 0 else value[0]
    return tensors


def qlis_command(*args: str) -> list[str]:
    return [PYTHON, "-c", "from qlis.cli.main import main; main()", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "many.qlis"
        write_tensors(archive, many_tensors(args.tensors))
        size = archive.stat().st_size
        commands = {
            STARTUP: [PYTHON, "-c", "import qlis.cli.main"],
            "`qlis info`": qlis_command("info", str(archive)),
            "`qlis info --format json`": qlis_command("info", str(archive), "--format", "json"),
            "`qlis.open` (the loaders' open: torch, configs built; in Python)": [
                PYTHON, "-c", f"import qlis; qlis.open({str(archive)!r}).close()"],
        }
        best = {label: (float("inf"), 0) for label in commands}
        for _ in range(args.rounds):
            for label, argv in commands.items():
                seconds, peak, _ = run(argv)
                best[label] = (min(best[label][0], seconds), max(best[label][1], peak))
    start_s, start_b = best[STARTUP]
    rows = [f"| {label} | {s:.2f} | {s - start_s:+.2f} | {b / 2**20:.0f} |"
            for label, (s, b) in best.items()]
    info_s, info_b = best["`qlis info`"]
    met = "met" if info_s <= GOAL_SECONDS and info_b <= GOAL_BYTES else "not met"
    markdown = "\n".join([
        "## `qlis info` on 100,000 tensors (`benchmarks/bench_info.py`)",
        "",
        f"Machine: {machine()}. Command: `{command()}`; fastest of {args.rounds} rounds, "
        "each command in a fresh process.",
        "",
        f"Archive: {args.tensors:,} tensors ({size / 2**20:.1f} MiB; a quarter of them 4-bit "
        "affine 4x8 weights with per-row scale and zero point, the rest float vectors), "
        "written by `qlis.archive.file.write_tensors`.",
        "",
        "| command | seconds | beyond start-up | peak RSS (MiB) |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Goal (issue 15: <= {GOAL_SECONDS:.0f} s and <= {GOAL_BYTES >> 20} MB): {met} "
        f"({info_s:.2f} s, {info_b / 2**20:.0f} MiB). `qlis info` reads the header alone, "
        "without torch; `--verify` reads every record (torch).",
    ])
    print(markdown)
    if not args.no_write:
        write_section("bench_info", markdown)


if __name__ == "__main__":
    main()
