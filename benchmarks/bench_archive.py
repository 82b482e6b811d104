"""`qlis pack` + `qlis unpack` of a ViT-L/14-sized checkpoint: seconds and peak memory.

Goals (issue 3): each under 30 s, with peak memory under 2x the checkpoint size. The model
is built locally with random-initialised, heavy-tailed weights (no download). Each command
runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from qlis.cli.demo import vit_state_dict
from report import command, machine, run, write_section

QLIS = [sys.executable, "-m", "qlis.cli.main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit-l14", choices=["vit-b16", "vit-l14", "vit-tiny"])
    parser.add_argument("--policy", default="lapq")
    parser.add_argument("--codecs", default="huffman,ans,auto")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = folder / f"{args.model}.safetensors"
        save_file(vit_state_dict(args.model), str(checkpoint))
        size = checkpoint.stat().st_size
        for codec in args.codecs.split(","):
            archive = folder / f"{codec}.qlis"
            pack_s, pack_peak, _ = run([*QLIS, "pack", str(checkpoint), "-o", str(archive),
                                     "--policy", args.policy, "--codec", codec, "--force"])
            unpack_s, unpack_peak, _ = run([*QLIS, "unpack", str(archive), "-o",
                                         str(folder / "out.safetensors"), "--force"])
            info = json.loads(subprocess.run([*QLIS, "info", str(archive), "--format", "json"],
                                             capture_output=True, text=True, check=True).stdout)
            totals = info["totals"]
            rows.append((codec, pack_s, pack_peak / size, unpack_s, unpack_peak / size,
                         archive.stat().st_size, totals["real_ratio_vs_source_file"],
                         totals["paper_cr"], totals["paper_hcr"]))
            (folder / "out.safetensors").unlink()

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        "## Archive: pack + unpack of a full checkpoint (`benchmarks/bench_archive.py`)",
        "",
        f"Model: {args.model}-shaped, RANDOM-INITIALISED heavy-tailed weights, "
        f"checkpoint {size / 2**20:.0f} MiB (safetensors, float32); policy {args.policy}.",
        f"Machine: {machine()}. Command: `{command()}`.",
        "",
        "| codec | pack s | pack peak RSS / checkpoint | unpack s | unpack peak RSS / checkpoint "
        "| archive MiB | real ratio | paper CR | paper HCR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for codec, ps, pp, us, up, ab, real, cr, hcr in rows:
        lines.append(f"| {codec} | {ps:.1f} | {pp:.2f}x | {us:.1f} | {up:.2f}x | "
                     f"{ab / 2**20:.1f} | {real:.2f} | {cr:.2f} | {hcr:.2f} |")
    worst_time = max(max(r[1], r[3]) for r in rows)
    worst_mem = max(max(r[2], r[4]) for r in rows)
    lines += [
        "",
        f"- Goal: pack and unpack each under 30 s: {verdict(worst_time < 30)} "
        f"(slowest {worst_time:.1f} s, wall time of the whole command including Python start).",
        f"- Goal: peak memory under 2x the checkpoint: {verdict(worst_mem < 2)} "
        f"(highest {worst_mem:.2f}x).",
        "- The real ratio is file bytes / archive bytes, everything included; the paper's "
        "CR/HCR count only b_l bits per weight the pruner kept and are never the same number.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("bench_archive", markdown)


if __name__ == "__main__":
    main()
