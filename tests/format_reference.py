"""Writes the pinned reference archives into tests/data/format/.

Run ``python tests/format_reference.py`` (optionally with another folder, and archive names
to write only those from the committed inputs).

In the manner of numcodecs' ``check_backwards_compatibility``: small archives that cover every
codec, quantizer and stored dtype (plus an empty and a 0-d tensor), the inputs they were made
from and the tensors they decode to, all committed. tests/test_format_pinned.py checks that
this version decodes them to the committed tensors bit for bit and re-encodes the committed
inputs to the same file (version 5: its header deflated). Regenerate only with a format
version bump (docs/format.md), moving the files the earlier version wrote to a folder of
their own (tests/data/format-v2-v4 holds versions 2-4: aliases.qlis version 3, tied tensors;
row-classes.qlis version 4, an ans stream in row classes; the others version 2).
Inputs come from numpy's legacy seeded generator, whose stream numpy keeps stable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import qlis
from qlis.archive.file import write_tensors
from qlis.quantize.quantizers import quantizer_registry

FOLDER = Path(__file__).parent / "data" / "format"
QUANTIZED_CODECS = ("raw", "bitpack", "huffman", "ans")
QUANTIZERS = {
    "affine-tensor": {"id": "affine", "bits": 4, "granularity": "tensor"},
    "affine-channel": {"id": "affine", "bits": 3, "granularity": "channel"},
    "binary": {"id": "binary", "granularity": "channel"},
    "kmeans": {"id": "kmeans", "bits": 3},
    "uniform": {"id": "uniform", "step": 0.25, "granularity": "tensor", "rounding": 0.5},
    "uniform-uint16": {"id": "uniform", "step": 0.004, "granularity": "channel", "rounding": 0.4},
    "group": {"id": "group", "bits": 4, "group_size": 32, "symmetric": False},
}


def make_inputs() -> dict[str, torch.Tensor]:
    """The source tensors, deterministic and small (4 x 32 weights)."""
    rng = np.random.RandomState(20240611)
    weight = torch.from_numpy(rng.standard_normal((4, 32)).astype(np.float32))
    pruned = weight.clone()
    pruned[torch.from_numpy(rng.random_sample((4, 32)) < 0.6)] = 0.0
    return {
        "weight": weight,
        "pruned": pruned,
        "weight_f16": weight.half(),
        "bf16": torch.from_numpy(rng.standard_normal(24).astype(np.float32)).bfloat16(),
        "int64": torch.from_numpy(rng.randint(-(2**40), 2**40, size=(3, 5)).astype(np.int64)),
        "bool": torch.from_numpy(rng.random_sample(11) < 0.5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.25),
        # rows of three spreads, enough codes for ans to code them in row classes (version 4)
        "rows": torch.from_numpy((rng.standard_normal((256, 64)) * rng.choice(
            [0.05, 0.5, 4.0], size=(256, 1))).astype(np.float32)),
    }


def available_quantizers() -> dict[str, dict]:
    """The reference quantizer settings whose ids this qlis registers."""
    known = set(quantizer_registry.names())
    return {name: config for name, config in QUANTIZERS.items() if config["id"] in known}


def archives(inputs: dict[str, torch.Tensor]) -> dict[str, tuple[dict, dict]]:
    """File name -> (tensors, write_tensors options), rebuilt from the inputs by this qlis."""
    quantized: dict[str, object] = {}
    for name, config in available_quantizers().items():
        quantizer = qlis.get_quantizer(config)
        quantized[name] = quantizer.quantize(inputs["weight"])
        quantized[f"{name}-pruned"] = quantizer.quantize(inputs["pruned"])
    affine = qlis.get_quantizer(QUANTIZERS["affine-tensor"])
    quantized["affine-float16"] = affine.quantize(inputs["weight_f16"])
    quantized["affine-empty"] = affine.quantize(inputs["empty"])
    quantized["affine-scalar"] = affine.quantize(inputs["scalar"])
    files = {
        f"quantized-{codec}.qlis": (quantized, {"codec": codec, "metadata": {"case": codec}})
        for codec in QUANTIZED_CODECS
    }
    plain = {name: inputs[name] for name in ("weight", "pruned", "weight_f16", "bf16", "int64",
                                              "bool", "empty", "scalar")}
    plan = {"k": 0.5, "bits": None, "qlis": 0.25, "pruner": {"id": "sigma", "k": 0.5},
            "quantizer": None}
    files["plain.qlis"] = (plain, {"plans": {"pruned": plan}, "summary": {"cr": 1.5}})
    tied = {"weight": quantized["affine-channel"], "bf16": inputs["bf16"]}  # version 3
    files["aliases.qlis"] = (tied, {"aliases": {"head.weight": "weight", "bf16.tied": "bf16"}})
    rows = {"rows": qlis.get_quantizer(QUANTIZERS["uniform"]).quantize(inputs["rows"])}
    files["row-classes.qlis"] = (rows, {"codec": "ans"})  # version 4
    return files


def write(folder: Path = FOLDER, only: list[str] | None = None) -> list[Path]:
    """Write inputs, archives and expected tensors into ``folder`` (``only``: these archives,
    from the committed inputs); returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if only:
        inputs = load_file(folder / "inputs.safetensors")
    else:
        inputs = make_inputs()
        written.append(folder / "inputs.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items()}, written[0])
    for name, (tensors, options) in archives(inputs).items():
        if only and name not in only:
            continue
        path = write_tensors(folder / name, tensors, **options)
        with qlis.open(path) as archive:
            # tied names share one tensor: a copy each, which safetensors can hold
            expected = {k: v.contiguous().clone() for k, v in archive.load().items()}
        written += [path, folder / f"{Path(name).stem}.expected.safetensors"]
        save_file(expected, written[-1])
    return written


if __name__ == "__main__":  # python tests/format_reference.py [FOLDER [ARCHIVE ...]]
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER
    for path in write(folder, sys.argv[2:]):
        print(f"{path}  {path.stat().st_size} bytes")
