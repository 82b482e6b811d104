"""Calibrated `qlis pack --calib` in one process and over the ranks of a torchrun job.

A BERT-shaped Hugging Face folder with RANDOM-INITIALISED weights (no download) is packed
with the default policy (rd) and a size target on random-token batches, side by side in one
run: one process on every core, one process on one thread, and `torchrun --nproc_per_node=2`
(one thread per rank, as torchrun starts them). Issue 16's goal: the job's archive is the
bytes one process writes; the table also says whether one process on every core wrote them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from bench_calib_blocks import BATCH, bert_folder, calibration_file, sampled

from report import command, machine, write_section

QLIS = [sys.executable, "-m", "qlis"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "qlis"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--bits", type=float, default=3.0, help="target bits per weight")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="Where the model folder goes.")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    runs = {"one process, every core": (QLIS, {}),
            "one process, one thread": (QLIS, {"OMP_NUM_THREADS": "1"}),
            "torchrun --nproc_per_node=2 (one thread each)": (TORCHRUN, {})}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    digests: dict[str, str] = {}
    reports: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "bert"
        model = bert_folder(folder, args.layers, args.hidden)
        params = sum(p.numel() for p in model.parameters())
        calib = Path(tmp) / "calib.safetensors"
        calibration_file(calib, args.examples, model.config.vocab_size)
        del model
        for _ in range(args.rounds):  # interleaved: the machine's drift hits all alike
            for name, (start, env) in runs.items():
                archive = Path(tmp) / f"{len(digests)}.qlis"
                took, _, _, out = sampled(
                    [*start, "pack", str(folder), "-o", str(archive), "--calib", str(calib),
                     "--calib-examples", str(args.examples), "--calib-batch-size", str(BATCH),
                     "--target-bits-per-weight", str(args.bits), "--force"],
                    {**os.environ, **env})
                seconds[name].append(took)
                digests[name] = hashlib.sha256(archive.read_bytes()).hexdigest()
                reports[name] = out
                archive.unlink()
    reference = digests["one process, one thread"]
    lines = ["## Calibrated pack over ranks (`benchmarks/bench_calib_ranks.py`)", "",
             f"BERT-shaped folder with RANDOM-INITIALISED weights ({args.layers} blocks of "
             f"width {args.hidden}, {params / 1e6:.1f} M parameters), `qlis pack --calib` "
             f"(rd, --target-bits-per-weight {args.bits}) on {args.examples} examples of "
             f"random tokens in batches of {BATCH}, each run in its own process, "
             f"{args.rounds} rounds interleaved, fastest shown. Machine: {machine()}. "
             f"Command: `{command()}`.", "",
             "| run | seconds | archive | output cosine (held out) | same bytes as one "
             "process on one thread |", "|---|---|---|---|---|"]
    for name in runs:
        found = re.search(r"real ratio ([\d.]+)x.*?: cosine ([\d.]+)",
                          reports[name], re.S)
        ratio, cosine = (found.group(1), found.group(2)) if found else ("-", "-")
        lines.append(f"| {name} | {min(seconds[name]):.1f} | {ratio}x | {cosine} | "
                     f"{'yes' if digests[name] == reference else 'no'} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("bench_calib_ranks", text)


if __name__ == "__main__":
    main()
