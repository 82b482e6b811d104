"""Helpers of the IQA tests: where the sample data lies, synthetic images and folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_3K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "agiqa-3k"


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A smooth random RGB image (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def make_agiqa3k(root: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    """A synthetic AGIQA-3K folder of n images; `bad` maps an index to 'missing' or 'corrupt'."""
    (root / "images").mkdir(parents=True)
    bad = bad or {}
    with (root / "data.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "prompt", "mos_quality", "std_quality"])
        for i in range(n):
            name = f"sd1.5_normal_{i:03d}.jpg"
            w.writerow([name, "a prompt", f"{1 + 3 * i / n:.3f}", "0.5"])
            if bad.get(i) == "corrupt":
                (root / "images" / name).write_bytes(b"not a jpeg at all")
            elif bad.get(i) != "missing":
                write_image(root / "images" / name, i)
    return root
