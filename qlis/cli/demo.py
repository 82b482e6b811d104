"""The embedded default job: a ViT-shaped model built locally (no download), scored,
compressed with LAPQ, written as an archive, read back and verified bit for bit.

The weights are random (heavy-tailed, like trained ones) and every output says so.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import qlis
from qlis.archive.atomic import atomic_path
from qlis.cli.console import describe_rel_mse, human_bytes
from qlis.models.tensors import same_bits

VIT_SHAPES = {
    # name: (hidden, depth, mlp, patch, image)
    "vit-b16": (768, 12, 3072, 16, 224),
    "vit-l14": (1024, 24, 4096, 14, 224),
    "vit-tiny": (192, 4, 768, 16, 64),
}


@dataclass(frozen=True)
class ViTShape:
    hidden: int
    depth: int
    mlp: int
    patch: int
    image: int


def vit_state_dict(name: str = "vit-b16", seed: int = 0) -> dict[str, torch.Tensor]:
    """A ViT-shaped state dict (Hugging Face ViTModel names) with heavy-tailed random weights.

    Weights are heavy-tailed (a Gaussian scale mixture, std about 0.02) with a few large
    outliers per matrix, closer to trained transformer weights than a plain Gaussian.

    >>> sd = vit_state_dict("vit-tiny")
    >>> sd["embeddings.patch_embeddings.projection.weight"].shape
    torch.Size([192, 3, 16, 16])
    """
    s = ViTShape(*VIT_SHAPES[name])
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        # A Gaussian scale mixture: heavy tails like Student-t, but fast to draw.
        scale = torch.empty(shape).exponential_(generator=gen).sqrt_()
        w = torch.randn(shape, generator=gen).mul_(scale).mul_(0.02 / math.sqrt(2.0))
        outliers = torch.randint(w.numel(), (max(1, w.numel() // 20000),), generator=gen)
        w.view(-1)[outliers] *= 20
        return w

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + weight(s.hidden), f"{prefix}.bias": weight(s.hidden)}

    n_patches = (s.image // s.patch) ** 2
    state = {
        "embeddings.cls_token": weight(1, 1, s.hidden),
        "embeddings.position_embeddings": weight(1, n_patches + 1, s.hidden),
        "embeddings.patch_embeddings.projection.weight": weight(s.hidden, 3, s.patch, s.patch),
        "embeddings.patch_embeddings.projection.bias": weight(s.hidden),
    }
    for i in range(s.depth):
        p = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            state[f"{p}.attention.attention.{part}.weight"] = weight(s.hidden, s.hidden)
            state[f"{p}.attention.attention.{part}.bias"] = weight(s.hidden)
        state[f"{p}.attention.output.dense.weight"] = weight(s.hidden, s.hidden)
        state[f"{p}.attention.output.dense.bias"] = weight(s.hidden)
        state[f"{p}.intermediate.dense.weight"] = weight(s.mlp, s.hidden)
        state[f"{p}.intermediate.dense.bias"] = weight(s.mlp)
        state[f"{p}.output.dense.weight"] = weight(s.hidden, s.mlp)
        state[f"{p}.output.dense.bias"] = weight(s.hidden)
        state.update(norm(f"{p}.layernorm_before"))
        state.update(norm(f"{p}.layernorm_after"))
    state.update(norm("layernorm"))
    return state


def _step_label(layer) -> str:
    """How one layer was stored: pruning k, then the quantizer and its coded bits/weight."""
    pruned = f"k={layer.k:g} " if layer.k else ""
    if layer.quantizer is None:
        return f"{pruned}float"
    coded = 8 * layer.coded_bytes / max(layer.numel, 1)
    return f"{pruned}{layer.quantizer['id']} {layer.bits}b (~{coded:.0f} b coded)"


def run_demo(
    model: str = "vit-b16",
    policy: str = "rd",
    codec: str = "ans",
    out_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """inspect -> compress -> save -> load -> verify on a locally built model; returns figures.

    >>> figures = run_demo("vit-tiny", echo=lambda line: None)
    >>> figures["bit_exact"], figures["real_ratio"] > 1, figures["weight_rel_mse"] < 1e-3
    (True, True, True)
    """
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out_dir) if out_dir is not None else Path(scratch)
        folder.mkdir(exist_ok=True)
        state = vit_state_dict(model)
        source = folder / f"{model}.safetensors"
        with atomic_path(source) as tmp:
            save_file(state, str(tmp))
        n_params = sum(t.numel() for t in state.values())
        where = (f"saved to {source}" if out_dir is not None else
                 "written to a temporary file, deleted at the end (-o DIR keeps it)")
        echo(f"model: {model}-shaped, {n_params / 1e6:.1f}M parameters, RANDOM-INITIALISED "
             f"(heavy-tailed) weights built locally; {where} "
             f"({human_bytes(source.stat().st_size)} as safetensors)")

        start = time.perf_counter()
        report = qlis.inspect(state)
        inspect_s = time.perf_counter() - start
        ranked = sorted(report.layers, key=lambda layer: layer.QLIS)
        low, high = ranked[0], ranked[-1]
        echo(f"inspect: {len(report.layers)} layers in {inspect_s:.2f} s; QLIS from "
             f"{low.QLIS:.4f} ({low.name}) to {high.QLIS:.4f} ({high.name})")

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as missed:
            warnings.simplefilter("always", qlis.QualityWarning)
            result = qlis.compress(state, policy=policy)
        for warning in missed:
            echo(f"warning: {warning.message}")
        compress_s = time.perf_counter() - start
        plan = Counter(_step_label(layer) for layer in result.layers)
        levels = ", ".join(f"{label} x{n}" for label, n in sorted(plan.items()))
        rel_mse = result.distortion["weight_rel_mse"]
        quality = describe_rel_mse(rel_mse)
        echo(f"compress ({policy}): {compress_s:.2f} s "
             f"({n_params / (inspect_s + compress_s) / 1e6:.1f} M params/s with inspect); "
             f"plan: {levels}")
        echo(f"quality: {quality}")
        echo(f"paper ratios (idealised: pruned zeros count as free): CR {result.cr:.2f}  "
             f"HCR {result.hcr:.2f}, at that quality")

        archive = folder / f"{model}.qlis"
        start = time.perf_counter()
        qlis.save(result, archive, codec=codec, source_bytes=source.stat().st_size)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = qlis.load(archive)
        load_s = time.perf_counter() - start
        expected = result.state_dict()
        bit_exact = list(loaded) == list(expected) and all(
            same_bits(loaded[name], expected[name]) for name in expected
        )
        real_ratio = source.stat().st_size / archive.stat().st_size
        echo(f"archive ({codec}): {human_bytes(archive.stat().st_size)}, real ratio "
             f"{real_ratio:.2f}x vs the safetensors file at the quality above; save "
             f"{save_s:.2f} s, load {load_s:.2f} s; "
             f"read back bit-exact: {'yes' if bit_exact else 'NO'}")
        if out_dir is not None:
            echo(f"files kept: {source}, {archive}")
    return {
        "params": n_params,
        "weight_rel_mse": rel_mse,
        "cr": result.cr,
        "hcr": result.hcr,
        "real_ratio": real_ratio,
        "bit_exact": bit_exact,
        "inspect_s": inspect_s,
        "compress_s": compress_s,
    }
