"""Speed of qlis.inspect + qlis.compress and the paper's CR / HCR on ViT-B/16 and ViT-L/14 shapes.

The models are state dicts with the tensor names and shapes of timm's ViT-B/16 (DINO backbone,
85.8M parameters) and ViT-L/14 (CLIP vision tower, 303.3M parameters), RANDOM-INITIALISED with
heavy-tailed Student-t weights (df=4): the timings are representative, the ratios are those of
random weights and are not comparable with the paper's trained models.

    python benchmarks/bench_compress.py                 # both models, writes the markdown
    python benchmarks/bench_compress.py --models vit-b  # one model

Prints a markdown table and writes it to its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import qlis
from report import machine, write_section

GOAL_MPARAMS_PER_S = 20.0

# name: (depth, width, mlp width, patch, tokens)
MODELS = {
    "vit-b": ("ViT-B/16", 12, 768, 3072, 16, 197),
    "vit-l": ("ViT-L/14", 24, 1024, 4096, 14, 257),
}

# (label, policy, options): the paper's settings, plus per-channel and budget variants
POLICIES = [
    ("prune k=1.5", "prune", {"k": 1.5}),
    ("prune k=1.0", "prune", {"k": 1.0}),
    ("prune k=0.5", "prune", {"k": 0.5}),
    ("prune k=0.25", "prune", {"k": 0.25}),
    ("quant 1 bit", "quant", {"bits": 1}),
    ("quant 2 bits", "quant", {"bits": 2}),
    ("quant 4 bits", "quant", {"bits": 4}),
    ("quant 8 bits", "quant", {"bits": 8}),
    ("lap", "lap", {}),
    ("laq", "laq", {}),
    ("lapq (tensor)", "lapq", {}),
    ("lapq (channel)", "lapq", {"granularity": "channel"}),
    ("lapq paper_cr=12", "lapq", {"paper_cr": 12}),
]


def student_t4(shape: tuple[int, ...], scale: float, gen: torch.Generator) -> torch.Tensor:
    """Student-t (df=4) samples: z / sqrt(chi2_4 / 4), with chi2_4 = -2 ln(u1 u2)."""
    z = torch.randn(shape, generator=gen)
    u = torch.rand((2, *shape), generator=gen).clamp_(min=1e-12).log_()
    chi2_over_df = u[0].add_(u[1]).mul_(-0.5)
    return z.div_(chi2_over_df.sqrt_()).mul_(scale)


def vit_state_dict(key: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm-named ViT state dict of the given shape, random-initialised with heavy tails."""
    _, depth, dim, hidden, patch, tokens = MODELS[key]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {
        "cls_token": student_t4((1, 1, dim), 0.02, gen),
        "pos_embed": student_t4((1, tokens, dim), 0.02, gen),
        "patch_embed.proj.weight": student_t4((dim, 3, patch, patch), 0.02, gen),
        "patch_embed.proj.bias": student_t4((dim,), 0.01, gen),
    }
    for i in range(depth):
        scale = 0.02 * (1 + i / depth)  # deeper layers a little wider, as in trained ViTs
        shapes = {
            "attn.qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "mlp.fc1": (hidden, dim),
            "mlp.fc2": (dim, hidden),
        }
        for norm in ("norm1", "norm2"):
            state[f"blocks.{i}.{norm}.weight"] = 1 + student_t4((dim,), 0.05, gen)
            state[f"blocks.{i}.{norm}.bias"] = student_t4((dim,), 0.01, gen)
        for name, shape in shapes.items():
            state[f"blocks.{i}.{name}.weight"] = student_t4(shape, scale, gen)
            state[f"blocks.{i}.{name}.bias"] = student_t4((shape[0],), 0.01, gen)
    state["norm.weight"] = 1 + student_t4((dim,), 0.05, gen)
    state["norm.bias"] = student_t4((dim,), 0.01, gen)
    return state


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used so far (Linux /proc/stat), or None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def time_inspect_compress(state: dict, runs: int) -> tuple[float, float, float | None]:
    """Best-of-``runs`` seconds of qlis.inspect and of qlis.compress(policy="lapq"), and the
    cores other processes kept busy meanwhile (so that a loaded machine shows)."""
    best_inspect = best_compress = float("inf")
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        start = time.perf_counter()
        qlis.inspect(state)
        middle = time.perf_counter()
        qlis.compress(state, policy="lapq")
        end = time.perf_counter()
        best_inspect = min(best_inspect, middle - start)
        best_compress = min(best_compress, end - middle)
    busy1, own1, wall1 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    if busy0 is None or busy1 is None:
        return best_inspect, best_compress, None
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    return best_inspect, best_compress, others


def ratio_rows(state: dict) -> list[tuple[str, float, float, float, float]]:
    """(label, CR, HCR, kept share of layer weights, energy-weighted relative MSE) per policy."""
    energy = {name: float(t.double().square().sum()) for name, t in state.items()}
    rows = []
    for label, policy, options in POLICIES:
        result = qlis.compress(state, policy=policy, **options)
        numel = sum(p.numel for p in result.layers)
        kept = sum(p.kept for p in result.layers) / numel
        total = sum(energy[p.name] for p in result.layers)
        rel_mse = sum(p.rel_mse * energy[p.name] for p in result.layers) / total
        rows.append((label, result.cr, result.hcr, kept, rel_mse))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-b,vit-l", help="comma list of vit-b, vit-l")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")

    speed_lines = [
        "| model (random-init, Student-t df=4) | parameters | inspect (s) | compress lapq (s) "
        "| inspect + compress (s) | M parameters/s | goal >= 20 M/s | other load |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    ratio_lines: list[str] = []
    qlis.compress({"w": torch.randn(64, 64)}, "lapq")  # compile the kernels before timing
    for key in keys:
        title = MODELS[key][0]
        state = vit_state_dict(key)
        n_params = sum(t.numel() for t in state.values())
        print(f"{title}: {n_params / 1e6:.1f}M parameters, timing {args.runs} runs ...", flush=True)
        t_inspect, t_compress, others = time_inspect_compress(state, args.runs)
        load = "n/a" if others is None else f"{others:.2f} cores"
        total = t_inspect + t_compress
        rate = n_params / total / 1e6
        verdict = "met" if rate >= GOAL_MPARAMS_PER_S else "NOT met"
        speed_lines.append(
            f"| {title} | {n_params / 1e6:.1f}M | {t_inspect:.2f} | {t_compress:.2f} "
            f"| {total:.2f} | {rate:.1f} | {verdict} ({rate:.1f} M/s) | {load} |"
        )
        print(speed_lines[-1], flush=True)
        print(f"{title}: ratios for {len(POLICIES)} policies ...", flush=True)
        ratio_lines += [
            "",
            f"**{title}** ({n_params / 1e6:.1f}M parameters, random-initialised):",
            "",
            "| policy | paper CR | paper HCR | kept weights | rel. MSE |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, cr, hcr, kept, rel_mse in ratio_rows(state):
            ratio_lines.append(f"| {label} | {cr:.2f} | {hcr:.2f} | {kept:.1%} | {rel_mse:.3g} |")
        del state

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join(
        [
            "## qlis.inspect + qlis.compress: speed and the paper's ratios "
            "(`benchmarks/bench_compress.py`)",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command}`.",
            "",
            "Models: state dicts with the tensor names and shapes of ViT-B/16 (the DINO backbone)",
            "and ViT-L/14 (the CLIP vision tower), **random-initialised** with Student-t (df=4)",
            "weights. The timings are representative of real models of these shapes; the ratios",
            "are those of random weights and must not be compared with the paper's numbers.",
            "",
            f"Speed: best of {args.runs} runs of `qlis.inspect(state)` and of",
            '`qlis.compress(state, policy="lapq")` (which scores the layers again itself);',
            "M parameters/s counts every tensor of the model over the sum of both times.",
            "'Other load' is how many cores other processes kept busy during the timed runs",
            "(near 0: the machine was quiet).",
            "",
            *speed_lines,
            "",
            "Ratios: the paper's CR (b_l bits per kept weight of each layer, every other",
            "tensor at full size, no index or metadata cost) and HCR (the same with each",
            "quantized layer's non-zero codes Huffman-coded). Not file sizes: the real archive",
            "ratio is measured separately. 'kept weights' is the non-zero share of the layer",
            "weights after pruning; 'rel. MSE' is ||w_hat - w||^2 / ||w||^2 over all layers.",
            *ratio_lines,
            "",
            f"Whole benchmark run: {time.perf_counter() - started:.0f} s.",
            "",
        ]
    )
    print()
    print(text)
    if not args.no_write:
        write_section("bench_compress", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
