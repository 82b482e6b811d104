"""Speed of policy "rd": data-free on ViT-B/16 and ViT-L/14 shapes (beside the paper's LAPQ, in
the same run), and calibrated on a ViT-B/16-shaped vision transformer.

Data-free: state dicts with ViT-B/16 (85.8M) and ViT-L/14 (303.3M) tensor shapes, RANDOM-
INITIALISED heavy-tailed weights (qlis.cli.demo). Calibrated: a transformers ViTModel with the
ViT-B/16 configuration (the DINO backbone's), RANDOM-INITIALISED, calibrated on a few
224x224 images of random pixels — the cost of calibration does not depend on what the
images show. Timings only: no quality number here comes from a trained model.

    python benchmarks/bench_rd_speed.py                  # writes its section of docs/benchmarks.md
    python benchmarks/bench_rd_speed.py --no-write --models vit-b
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import qlis
from qlis.cli.demo import vit_state_dict
from report import command, machine, write_section

GOAL_FREE = 10.0  # M parameters/s, data-free rd
GOAL_CALIB_S = 120.0  # seconds, calibrated rd on a ViT-B/16-shaped model
MODELS = {"vit-b": "vit-b16", "vit-l": "vit-l14"}


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - start


def data_free(name: str) -> list[str]:
    state = vit_state_dict(MODELS[name])
    numel = sum(t.numel() for t in state.values())
    qlis.compress({"w": torch.randn(64, 64)})  # warm up before timing
    rows = []
    for label, policy, options in [("rd (default target)", "rd", {}),
                                   ("rd target 4 b/w", "rd", {"target_bits_per_weight": 4.0}),
                                   ("lapq (paper)", "lapq", {})]:
        result, seconds = _timed(qlis.compress, state, policy, **options)
        rows.append(f"| {name} | {numel / 1e6:.1f} | {label} | {seconds:.2f} | "
                    f"{numel / seconds / 1e6:.1f} | "
                    f"{result.distortion['weight_rel_mse']:.2e} |")
    return rows


def calibrated(images: int) -> tuple[str, float]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(), add_pooling_layer=False).eval()  # ViT-B/16 configuration
    numel = sum(p.numel() for p in model.parameters())
    pixels = torch.randn(images, 3, 224, 224)
    calib = [{"pixel_values": pixels}]
    result, seconds = _timed(qlis.compress, model, "rd", calib=calib,
                             target_bits_per_weight=4.0)
    output = result.distortion["output"]
    row = (f"| ViT-B/16 config (transformers ViTModel) | {numel / 1e6:.1f} | {images} | "
           f"target 4 b/w | {seconds:.1f} | {len(result.layers)} | "
           f"{output['cosine']:.5f} |")
    return row, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-b,vit-l")
    parser.add_argument("--images", type=int, default=8, help="calibration images")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    free_rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        free_rows += data_free(name)
        print(free_rows[-3:], flush=True)
    calib_row, calib_s = calibrated(args.images)
    print(calib_row, flush=True)
    speeds = [float(r.split("|")[5]) for r in free_rows if "rd" in r.split("|")[3]]
    lines = [
        "## rd: speed",
        "",
        f"Machine: {machine()}. Command: `{command()}`. RANDOM-INITIALISED models (timings "
        "only). Data-free rows include `inspect` (QLIS is always scored); the paper's LAPQ "
        "is timed in the same run for comparison.",
        "",
        "| model | M params | policy | seconds | M params/s | weight rel. MSE (layer mean) |",
        "|---|---:|---|---:|---:|---:|",
        *free_rows,
        "",
        "Calibrated rd: the reference pass, rd's gradient passes, then the allocation, whose "
        "every execution reconstructs the layers (GPTQ on every reached layer, block by "
        f"block) (`calib=[{{'pixel_values': {args.images} images}}]`):",
        "",
        "| model | M params | images | target | seconds | layers | output cosine |",
        "|---|---|---:|---|---:|---:|---:|",
        calib_row,
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| data-free rd >= {GOAL_FREE:g} M params/s | slowest {min(speeds):.1f} M/s | "
        f"{'met' if min(speeds) >= GOAL_FREE else 'not met'} |",
        f"| calibrated rd on ViT-B/16 < {GOAL_CALIB_S:g} s | {calib_s:.1f} s | "
        f"{'met' if calib_s < GOAL_CALIB_S else 'not met'} |",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("bench_rd_speed", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
