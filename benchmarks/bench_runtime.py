"""Running compressed on this CPU: peak RSS of load + scoring and images/s of the qlis-iqa
models, float32 checkpoint vs `.qlis` archives loaded with `runtime="lowbit"`, each in
float32 and in bfloat16 compute, side by side in one run.

Models: CLIPIQA (CLIP ViT-L/14 image encoder + the paper's MLP head) and DINOIQA (DINO
ViT-B/16 + head) as qlis-iqa builds them (transformers), RANDOM-INITIALISED (speed and memory
do not depend on the values). Weights: the float32 safetensors checkpoint; 8-bit affine per
channel (the int8 path); 4-bit group-wise, groups of 64 (dequantize-on-the-fly path); rd at
4 bits/weight, data-free (uniform steps, entropy-coded: what `qlis pack` writes). Every
configuration runs in a fresh process through `qlis_iqa.models.load_model` (the path of
`qlis-iqa score`): load, score batch 1, then batch 8; its peak RSS (VmHWM) covers import +
load + both batches; "above floor" is the same ratio after subtracting each process's RSS
before any weight exists (Python, torch, qlis and the transformers model code imported).
Goals (issue 9): int8 and 4-bit >= 1.0x float32 images/s at batch 8; peak RSS <= 0.35x
float32 for 4-bit, <= 0.5x for int8.

    python benchmarks/bench_runtime.py                # both models, ~10 min on 2 cores
    python benchmarks/bench_runtime.py --models dino --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from report import command, machine, write_section

MODELS = {"clip": "CLIPIQA, ViT-L/14", "dino": "DINOIQA, ViT-B/16"}
ROUNDS = {"clip": 1, "dino": 2}
ITERATIONS = {"clip": (2, 1), "dino": (3, 2)}  # timed batches of 1 and of 8, after a warm-up
WEIGHTS = {  # label: qlis_iqa.pack.pack options; None = the float32 checkpoint
    "float32": None,
    "int8 (affine 8-bit, per channel)": {
        "policy": "quant", "quantizer": {"id": "affine", "bits": 8, "granularity": "channel"}},
    "4-bit group (64)": {
        "policy": "quant", "quantizer": {"id": "group", "bits": 4, "group_size": 64}},
    "rd 4 b/w (uniform steps, ans)": {"policy": "rd", "target_bits_per_weight": 4.0},
}
GOALS = {"int8 (affine 8-bit, per channel)": 0.5, "4-bit group (64)": 0.35}
PRECISIONS = ("float32", "bfloat16")


def high_water() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss would carry the parent's peak
    across fork + exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(path: str, runtime: str, precision: str, iters1: int, iters8: int) -> None:
    """One configuration in this process: load, score; print a JSON line."""
    import qlis  # noqa: F401 - part of the floor, as in `qlis-iqa score`
    from qlis_iqa.models import load_model, model_from_spec, parse_metadata, read_header

    model_from_spec(parse_metadata(read_header(path)[0]), meta=True)  # imports the model code
    floor = high_water()
    start = time.perf_counter()
    model, _ = load_model(path, runtime, precision)
    load_s = time.perf_counter() - start
    side = model.preprocess.size
    speeds = {}
    with torch.inference_mode(), model.inference_context():
        for batch, iters in ((1, iters1), (8, iters8)):
            images = torch.randn(batch, 3, side, side)
            model(images)  # warm-up
            start = time.perf_counter()
            for _ in range(iters):
                model(images)
            speeds[batch] = batch * iters / (time.perf_counter() - start)
    print(json.dumps({"load_s": load_s, "img_s_1": speeds[1], "img_s_8": speeds[8],
                      "peak": high_water(), "floor": floor}))


def make_files(family: str, folder: Path) -> dict[str, Path]:
    """The float32 checkpoint and one archive per compressed configuration."""
    from qlis_iqa.backbones import random_backbone
    from qlis_iqa.models import make_model, save_checkpoint
    from qlis_iqa.pack import pack

    model = make_model(family, random_backbone(family, "full"))
    files = {}
    for index, (label, options) in enumerate(WEIGHTS.items()):
        if options is None:
            files[label] = save_checkpoint(model, folder / f"{family}.safetensors")
            continue
        options = dict(options)
        policy = options.pop("policy")
        path = folder / f"{family}{index}.qlis"
        packed = pack(model, path, policy, **options)
        files[label] = packed.path
        print(f"{family} {label}: {packed.file_bytes / 2**20:.0f} MiB, "
              f"{packed.result.describe_quality()}", file=sys.stderr, flush=True)
    return files


def measure(path: Path, runtime: str, precision: str, iters: tuple[int, int]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), runtime, precision, *map(str, iters)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise SystemExit(f"{path} {runtime} {precision} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def goal_text(label: str, speed: float, rss: float, above: float) -> str:
    if label not in GOALS:
        return ""
    limit = GOALS[label]
    return (f"speed {'met' if speed >= 1.0 else 'not met'}, "
            f"RSS <= {limit}x {'met' if rss <= limit else 'not met'} "
            f"(above the floor: {'met' if above <= limit else 'not met'})")


def real_weights(folder: Path) -> list[str]:
    """What bfloat16 compute costs on real pretrained weights: all-MiniLM-L6-v2's sentence
    embeddings against its float32 ones, for the float model and for its default `qlis pack`
    archive run packed (the CLIP/DINO weights cannot be had here)."""
    import minilm

    import qlis

    try:
        source = minilm.model_folder()
        model, tokenizer = minilm.load(source)
    except minilm.Unavailable as exc:
        return [f"Real weights: skipped, {exc}."]
    texts = minilm.sentences()
    batches = minilm.tokenize(tokenizer, texts.evaluation)
    reference = minilm.embed(model, batches)
    archive = folder / "minilm.qlis"
    result = qlis.compress(model)
    qlis.save(result, archive)
    packed, _ = minilm.load(source)
    qlis.load(archive, model=packed, runtime="lowbit")
    lines = [
        f"bfloat16 compute on real weights (all-MiniLM-L6-v2, {len(texts.evaluation)} "
        f"sentences: {texts.source}): mean cosine of each sentence embedding to the float32 "
        f"model's. The archive is `qlis.compress(model)`'s default ({result.describe_quality()}"
        f"), loaded with `runtime=\"lowbit\"`.",
        "",
        "| weights | model MiB (parameters + buffers) | compute | mean cosine to float32 "
        "| lowest |",
        "|---|---:|---|---:|---:|",
    ]
    for label, candidate in (("float32", model), ("qlis default archive, packed", packed)):
        tensors = [*candidate.parameters(), *candidate.buffers()]
        mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        for precision in PRECISIONS:
            context = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16"
                       else contextlib.nullcontext())
            with context:
                cosine = (minilm.embed(candidate, batches) * reference).sum(-1)
            lines.append(f"| {label} | {mib:.1f} | {precision} | {float(cosine.mean()):.5f} | "
                         f"{float(cosine.min()):.5f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="clip, dino or both.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Interleaved rounds per model (default: clip 1, dino 2).")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    parser.add_argument("--skip-real", action="store_true",
                        help="Skip the real-weights (MiniLM) bfloat16 check.")
    args = parser.parse_args()
    lines = [
        "## Running compressed (bench_runtime.py)",
        "",
        f"Machine: {machine()}. Command: `{command()}`. No GPU was available to this run.",
        "",
        "**RANDOM-INITIALISED backbones**: CLIPIQA (CLIP ViT-L/14) and DINOIQA (DINO ViT-B/16) "
        "as qlis-iqa builds them, 224 x 224 inputs; only speed and memory are measured. Each row "
        "is a fresh process loading through `qlis_iqa.models.load_model` (float32: the "
        "safetensors checkpoint; the others: their `.qlis` archive with `runtime=\"lowbit\"`), "
        "then scoring batch 1 and batch 8 (float32 is read straight into the model, from a file "
        "in the page cache). compute bfloat16 = `torch.autocast` "
        "(`qlis-iqa score --precision bfloat16`). Peak RSS = VmHWM of the whole process; 'floor' "
        "= its RSS before any weight exists (Python, torch, qlis, qlis_iqa and the transformers "
        "model code imported, the model's shapes built on the meta device); 'x float32 above "
        "floor' = the RSS ratio once each process's floor is subtracted. 'x float32' compares "
        "with the float32 checkpoint computing in float32, 'x float bf16' with the float32 "
        "checkpoint computing in bfloat16. The machine is shared: configurations run "
        "interleaved, best images/s of the rounds kept.",
        "",
        "| model | weights | compute | load s | img/s b1 | img/s b8 | x float32 b8 "
        "| x float bf16 b8 | peak RSS MiB | x float32 RSS | floor MiB | x float32 above floor "
        "| goals |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.models.split(","):
            files = make_files(family, Path(tmp))
            runs = [(label, precision) for label in WEIGHTS for precision in PRECISIONS]
            best: dict[tuple[str, str], dict] = {}
            for _ in range(args.rounds or ROUNDS[family]):  # interleaved: noise hits all alike
                for label, precision in runs:
                    runtime = "float" if WEIGHTS[label] is None else "lowbit"
                    row = measure(files[label], runtime, precision, ITERATIONS[family])
                    if (label, precision) in best:
                        for key in ("img_s_1", "img_s_8"):
                            row[key] = max(row[key], best[label, precision][key])
                    best[label, precision] = row
            base, base16 = best["float32", "float32"], best["float32", "bfloat16"]
            for label, precision in runs:
                row = best[label, precision]
                speed, rss = row["img_s_8"] / base["img_s_8"], row["peak"] / base["peak"]
                above = (row["peak"] - row["floor"]) / (base["peak"] - base["floor"])
                lines.append(
                    f"| {MODELS[family]} | {label} | {precision} | {row['load_s']:.1f} | "
                    f"{row['img_s_1']:.2f} | {row['img_s_8']:.2f} | {speed:.2f} | "
                    f"{row['img_s_8'] / base16['img_s_8']:.2f} | {row['peak'] / 2**20:.0f} | "
                    f"{rss:.2f} | {row['floor'] / 2**20:.0f} | {above:.2f} | "
                    f"{goal_text(label, speed, rss, above)} |"
                )
                print(lines[-1], flush=True)
        if not args.skip_real:
            lines += ["", *real_weights(Path(tmp))]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("bench_runtime", text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
