"""Streaming `qlis pack` / `qlis unpack`: time against the I/O floor, peak memory, workers.

Issue 16's goals, measured side by side in one run (each command in its own process, so its
peak RSS is its own):
- ViT-L/14-shaped checkpoint (float32, 1.16 GiB): default `qlis pack` <= 2.0x the safetensors
  load + save + fsync floor, `qlis unpack` <= 1.3x; `--jobs 2` against `--jobs 1`, for the
  whole command and for the `qlis.pack` call alone.
- A 2.4 B-parameter float16 checkpoint (4.7 GB, LLM-shaped): peak RSS of `qlis pack` <=
  1.0 GB + 2x its largest tensor, and it completes inside a 1.5 GiB memory cgroup.
- A 7B-shaped float16 checkpoint (13.5 GB; `--skip-7b` leaves it out): time and memory.
Weights are RANDOM-INITIALISED (heavy-tailed); they are written tensor by tensor, so building
the checkpoints needs no more memory than the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from qlis.cli.demo import vit_state_dict
from qlis.models.checkpoints import write_safetensors
from report import command, machine, run, write_section

QLIS = [sys.executable, "-m", "qlis.cli.main"]
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
FLOOR = (
    "import os, sys\n"
    "from safetensors.torch import load_file, save_file\n"
    "save_file(load_file(sys.argv[1]), sys.argv[2])\n"
    "fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
)


def parallel_ceiling(tasks: int = 8, size: int = 1 << 22, rounds: int = 3) -> float:
    """How much faster two threads finish independent work than one, on this machine: 8
    numpy sorts of 4 M floats (they release the GIL), the fastest of ``rounds``. What the
    workers' speed-up can be compared with: a 2-vCPU virtual machine does not give 2x."""
    data = [np.random.default_rng(i).random(size, dtype=np.float32) for i in range(tasks)]

    def seconds(workers: int) -> float:
        with ThreadPoolExecutor(workers) as pool:
            start = time.perf_counter()
            list(pool.map(np.sort, data))
            return time.perf_counter() - start

    return min(seconds(1) for _ in range(rounds)) / min(seconds(2) for _ in range(rounds))


PACK_CALL = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "import torch\n"
    "import qlis\n"
    "from qlis.models.checkpoints import load_state_dict\n"
    "# lazy imports and compiled kernels: a layer that takes every path (row classes\n"
    "# from 16384 codes, float16 norms) loads them all\n"
    "qlis.pack({'w': torch.randn(256, 256), 'b': torch.randn(256)}, sys.argv[2], jobs=1)\n"
    "state = load_state_dict(Path(sys.argv[1]))\n"
    "start = time.perf_counter()\n"
    "qlis.pack(state, sys.argv[2], jobs=int(sys.argv[3]))\n"
    "print(time.perf_counter() - start)\n"
)


def pack_call_seconds(checkpoint: Path, archive: Path, jobs: int) -> float:
    """The ``qlis.pack`` call alone (file mapped, not yet read), in a fresh process after a
    first pack of a small layer and a norm (start-up, imports and compiled kernels left out): the
    pipeline's own throughput."""
    out = subprocess.run([sys.executable, "-c", PACK_CALL, str(checkpoint), str(archive),
                          str(jobs)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def speedup(one: list[float], two: list[float]) -> tuple[float, float]:
    """Two workers against one from interleaved rounds: the fastest against the fastest, and
    the median of each round's own ratio. The second is the goal's measure: a round's two runs
    share the machine's drift of the moment (on the shared VM, the same one-worker call took
    4.8-5.6 s within ten minutes), where the two fastest may come from different moments."""
    return min(one) / min(two), statistics.median(a / b for a, b in zip(one, two, strict=True))


def throughput_note(checkpoint: Path, archive: Path, rounds: int) -> str:
    """Two workers against one on ``checkpoint``: `qlis pack` commands and the `qlis.pack`
    call, ``rounds`` rounds interleaved (the machine's drift hits both alike), fastest
    shown."""
    commands: dict[int, list[float]] = {1: [], 2: []}
    calls: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for jobs in (1, 2):
            seconds, _, _ = run([*QLIS, "pack", str(checkpoint), "-o", str(archive), "--force",
                                 "--jobs", str(jobs)])
            commands[jobs].append(seconds)
            calls[jobs].append(pack_call_seconds(checkpoint, archive, jobs))
    command_x, command_paired = speedup(commands[1], commands[2])
    call_x, call_paired = speedup(calls[1], calls[2])
    return (f"- Throughput on the {checkpoint.stem} checkpoint, 2 workers against 1 ({rounds} "
            f"rounds interleaved, fastest shown; goal 1.7x, `speedup`): `qlis pack --jobs 1` "
            f"{min(commands[1]):.1f} s, `--jobs 2` {min(commands[2]):.1f} s: {command_x:.2f}x, "
            f"{command_paired:.2f}x the median of the rounds (start-up included); the goal's "
            f"measure, the `qlis.pack` call alone "
            f"(start-up left out, as above) {min(calls[1]):.1f} s and {min(calls[2]):.1f} s: "
            f"{call_x:.2f}x, {call_paired:.2f}x the median of the rounds "
            f"({'met' if call_paired >= 1.7 else 'NOT met'}).")


def llm_layout(hidden: int, layers: int, intermediate: int, vocab: int,
               ) -> list[tuple[str, str, list[int]]]:
    """A decoder's float16 tensors (Llama names): embeddings, attention, MLP, norms."""
    layout = [("model.embed_tokens.weight", "float16", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}"
        layout += [(f"{p}.self_attn.{n}_proj.weight", "float16", [hidden, hidden])
                   for n in "qkvo"]
        layout += [(f"{p}.mlp.gate_proj.weight", "float16", [intermediate, hidden]),
                   (f"{p}.mlp.up_proj.weight", "float16", [intermediate, hidden]),
                   (f"{p}.mlp.down_proj.weight", "float16", [hidden, intermediate]),
                   (f"{p}.input_layernorm.weight", "float16", [hidden]),
                   (f"{p}.post_attention_layernorm.weight", "float16", [hidden])]
    return layout + [("model.norm.weight", "float16", [hidden]),
                     ("lm_head.weight", "float16", [vocab, hidden])]


def write_llm(path: Path, layout: list[tuple[str, str, list[int]]]) -> None:
    """Heavy-tailed random float16 weights, generated and written one tensor at a time."""
    gen = torch.Generator().manual_seed(0)

    def make(name: str) -> torch.Tensor:
        shape = next(s for n, _, s in layout if n == name)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.float16)
        w = torch.randn(shape, generator=gen)
        w.mul_(torch.empty(shape).exponential_(generator=gen).sqrt_()).mul_(0.014)
        return w.half()

    write_safetensors(path, layout, make)


def read_into_page_cache(path: Path, chunk: int = 64 << 20) -> None:
    """Read a checkpoint once, so that every timed command (the floor included) starts with it
    in the page cache: qlis writes its files behind (out of the cache as they reach the
    disk), so the first command after writing would otherwise alone pay for the disk."""
    with path.open("rb") as f:
        while f.read(chunk):
            pass


def archive_quality(archive: Path) -> tuple[int, float]:
    """(archive bytes, layers' mean relative weight MSE as the archive records it)."""
    info = json.loads(subprocess.run([*QLIS, "info", str(archive), "--format", "json"],
                                     capture_output=True, text=True, check=True).stdout)
    return archive.stat().st_size, info["distortion"]["weight_rel_mse"]


def cgroup(limit: int) -> Path | None:
    """A v1 memory cgroup limited to ``limit`` bytes (None where this machine has none)."""
    folder = CGROUP_V1 / f"qlis-bench-{limit}"
    try:
        folder.mkdir(exist_ok=True)
        (folder / "memory.limit_in_bytes").write_text(str(limit))
        swap = folder / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
    except OSError:
        return None
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    parser.add_argument("--workdir", type=Path, help="Where the checkpoints go (large).")
    args = parser.parse_args()
    lines = ["## Streaming pack and unpack (`benchmarks/bench_stream.py`)", "",
             "Checkpoints with RANDOM-INITIALISED heavy-tailed weights (no download), each "
             "command in its own process. "
             f"Machine: {machine()}. Command: `{command()}`.", ""]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        vit = folder / "vit-l14.safetensors"
        state = vit_state_dict("vit-l14")
        params = sum(t.numel() for t in state.values())
        write_safetensors(vit, [(n, str(t.dtype).removeprefix("torch."), list(t.shape))
                                for n, t in state.items()], state.__getitem__)
        del state
        read_into_page_cache(vit)
        archive, out = folder / "vit.qlis", folder / "out.safetensors"
        steps = {
            "floor: safetensors load_file + save_file + fsync": [
                sys.executable, "-c", FLOOR, str(vit), str(folder / "floor.safetensors")],
            "qlis pack --jobs 1": [*QLIS, "pack", str(vit), "-o", str(archive), "--force",
                                   "--jobs", "1"],
            "qlis pack (default: every core)": [*QLIS, "pack", str(vit), "-o", str(archive),
                                                "--force"],
            "qlis unpack --jobs 1": [*QLIS, "unpack", str(archive), "-o", str(out), "--force",
                                     "--jobs", "1"],
            "qlis unpack (default: every core)": [*QLIS, "unpack", str(archive), "-o", str(out),
                                                  "--force"],
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        peaks: dict[str, int] = {}
        calls: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):  # rounds interleaved: the machine's drift hits all alike
            for name, cmd in steps.items():
                seconds, peak, _ = run(cmd)
                times[name].append(seconds)
                peaks[name] = max(peaks.get(name, 0), peak)
            for jobs in calls:
                calls[jobs].append(pack_call_seconds(vit, archive, jobs))
        size, rel_mse = archive_quality(archive)
        floor = min(times[next(iter(steps))])
        ceiling = parallel_ceiling()
        lines += [
            f"### ViT-L/14 shape, float32, {vit.stat().st_size / 2**30:.2f} GiB "
            f"({args.rounds} rounds, fastest shown)", "",
            "| step | seconds | x floor | peak RSS GB |", "|---|---|---|---|",
        ]
        for name in steps:
            best = min(times[name])
            lines.append(f"| {name} | {best:.1f} | {best / floor:.2f} | "
                         f"{peaks[name] / 1e9:.2f} |")
        pack_x = min(times["qlis pack (default: every core)"]) / floor
        unpack_x = min(times["qlis unpack (default: every core)"]) / floor
        pack_jobs = min(times["qlis pack --jobs 1"]) / min(times["qlis pack (default: every "
                                                                   "core)"])
        unpack_jobs = min(times["qlis unpack --jobs 1"]) / min(
            times["qlis unpack (default: every core)"])
        call_x, call_paired = speedup(calls[1], calls[2])
        lines += [
            "",
            f"Archive: {size / 2**20:.1f} MiB, real ratio {vit.stat().st_size / size:.2f}x, "
            f"weight error (layers' mean relative MSE) {rel_mse:.2e}, default policy rd.",
            f"- Goal: pack <= 2.0x the floor: {'met' if pack_x <= 2 else 'NOT met'} "
            f"({pack_x:.2f}x).",
            f"- Goal: unpack <= 1.3x the floor: {'met' if unpack_x <= 1.3 else 'NOT met'} "
            f"({unpack_x:.2f}x).",
            f"- Every core against one, whole commands: pack {pack_jobs:.2f}x, unpack "
            f"{unpack_jobs:.2f}x faster (their start-up, imports and compiled kernels, runs on "
            f"one core whatever the workers: the goal's measure is the call, below); this "
            f"machine's own ceiling, independent numpy sorts on 2 threads against 1 in the "
            f"same run: {ceiling:.2f}x.",
            f"- The `qlis.pack` call alone (in its own process, after a first pack of one "
            f"256x256 layer and a norm: start-up, imports and compiled kernels left out): "
            f"{min(calls[1]):.1f} s with 1 worker, {min(calls[2]):.1f} s with 2: "
            f"{params / min(calls[1]) / 1e6:.0f} and {params / min(calls[2]) / 1e6:.0f} M "
            f"parameters/s, {call_x:.2f}x; the median of the rounds' own ratios "
            f"{', '.join(f'{a / b:.2f}' for a, b in zip(calls[1], calls[2], strict=True))}: "
            f"{call_paired:.2f}x (goal 1.7x, `speedup`: "
            f"{'met' if call_paired >= 1.7 else 'NOT met'}).",
            "",
        ]
        vit.unlink()
        out.unlink(missing_ok=True)
        (folder / "floor.safetensors").unlink(missing_ok=True)

        llms = [("2.4B", llm_layout(2560, 28, 6912, 50304))]
        if not args.skip_7b:
            llms.append(("7B", llm_layout(4096, 32, 11008, 32000)))
        lines += ["### LLM-shaped float16 checkpoints", "",
                  "| model | parameters | file GB | largest tensor MB | pack seconds | "
                  "peak RSS GB | bound: 1 GB + 2x largest | archive MB | real ratio | "
                  "weight rel MSE |", "|---|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for label, layout in llms:
            path = folder / f"{label}.safetensors"
            write_llm(path, layout)
            read_into_page_cache(path)
            largest = max(math.prod(s) * 2 for _, _, s in layout)
            params = sum(math.prod(s) for _, _, s in layout)
            archive = folder / f"{label}.qlis"
            seconds, peak, _ = run([*QLIS, "pack", str(path), "-o", str(archive), "--force"])
            bound = 1e9 + 2 * largest
            # the bound is the 2.4B's goal; the 7B's is to pack here, its time and memory shown
            verdict = f" ({'met' if peak <= bound else 'NOT met'})" if label == "2.4B" else ""
            size, rel_mse = archive_quality(archive)
            lines.append(f"| {label} | {params / 1e9:.2f} B | {path.stat().st_size / 1e9:.2f} | "
                         f"{largest / 1e6:.0f} | {seconds:.0f} | {peak / 1e9:.2f} | "
                         f"{bound / 1e9:.2f}{verdict} | "
                         f"{size / 1e6:.0f} | {path.stat().st_size / size:.2f} | "
                         f"{rel_mse:.2e} |")
            if label == "2.4B":  # long enough that start-up and first calls hardly count
                notes.append(throughput_note(path, archive, args.rounds))
                group = cgroup(int(1.5 * 2**30))
                if group is None:
                    notes.append("- 1.5 GiB memory cgroup: not measured (no writable v1 "
                                 "memory cgroup here).")
                else:
                    archive.unlink()
                    seconds, peak, code = run([*QLIS, "pack", str(path), "-o", str(archive),
                                               "--force"], cgroup=group)
                    done = code == 0 and archive.exists()
                    notes.append(f"- Goal: the 2.4B pack completes inside a 1.5 GiB memory "
                                 f"cgroup: {'met' if done else 'NOT met'} (exit code {code}, "
                                 f"{seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB).")
                    group.rmdir()
            path.unlink()
            archive.unlink(missing_ok=True)
        lines += ["", *notes]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("bench_stream", markdown)


if __name__ == "__main__":
    main()
