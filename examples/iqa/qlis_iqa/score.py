"""Score every image of a folder with a model rebuilt from its archive (or checkpoint) alone.

The deployment case of the paper: a compressed model on an edge device monitoring generated
images. Unreadable files are listed in the output (empty score, the reason) and on stderr,
never fatal.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlis.archive.atomic import atomic_path
from qlis_iqa.errors import IQAError
from qlis_iqa.features import image_loader
from qlis_iqa.models import IQAModel, load_model

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder (by suffix), sorted; an empty or absent folder is an error.

    Every entry with an image suffix but a folder is listed: a FIFO, a device or a dangling
    link named *.png is reported unreadable by `score_images`, not silently left out; so is,
    with ``recursive``, a sub-folder that cannot be listed (links to folders are not
    followed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IQAError(f"{folder}: no such folder of images")
    entries: list[Path] = []
    unlisted: list[OSError] = []
    for root, _, files in os.walk(folder, onerror=unlisted.append):
        entries += [Path(root) / name for name in files]
        if not recursive:
            break
    if any(Path(err.filename) == folder for err in unlisted):
        raise IQAError(f"{folder}: cannot be read ({unlisted[0].strerror})")
    paths = sorted(
        [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
        + [Path(err.filename) for err in unlisted]
    )
    if not paths:
        raise IQAError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


@dataclass
class Scores:
    """Scores of the readable images and the reasons the others were skipped."""

    paths: list[Path]
    scores: dict[int, float] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def write_csv(self, path: str | Path, root: Path, label: str,
                  overwrite: bool = False) -> Path:
        """image, score, error, backbone — one row per file, in folder order. A file at
        `path` is replaced only with `overwrite`, also one that appeared while the folder was
        being scored (the command checked for one long before)."""
        path = Path(path)
        with (
            atomic_path(path, overwrite) as tmp,
            tmp.open("w", newline="", encoding="utf-8", errors="backslashreplace") as f,  # any name
        ):
            w = csv.writer(f)
            w.writerow(["image", "score", "error", "backbone"])
            for i, p in enumerate(self.paths):
                score = f"{self.scores[i]:.6f}" if i in self.scores else ""
                w.writerow([p.relative_to(root).as_posix(), score, self.errors.get(i, ""), label])
        return path


@torch.inference_mode()
def score_images(
    model: IQAModel,
    paths: Sequence[Path],
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
) -> Scores:
    """Run the whole model on each image; unreadable images are recorded, not raised."""
    model.eval()
    device = next(model.parameters()).device
    out = Scores(list(paths))
    with tqdm(total=len(out.paths), desc="score", disable=not progress, unit="img") as bar:
        for idx, pixels, errors in image_loader(out.paths, model.preprocess, batch_size, workers):
            out.errors.update(errors)
            if pixels is not None:
                with model.inference_context():
                    values = model(pixels.to(device)).float().cpu().tolist()
                for i, value in zip(idx, values, strict=True):
                    if math.isfinite(value):
                        out.scores[i] = value
                    else:  # an overflow inside the model: no score, never "nan" as one
                        out.errors[i] = f"{out.paths[i]}: the model's score is {value}"
            bar.update(len(idx) + len(errors))
    return out


def score_folder(
    images_dir: str | Path,
    model_path: str | Path,
    out_csv: str | Path,
    batch_size: int = 16,
    workers: int = 0,
    recursive: bool = False,
    device: str = "cpu",
    progress: bool = False,
    runtime: str = "float",
    precision: str = "float32",
    overwrite: bool = False,
) -> tuple[Scores, str]:
    """Score a folder with the model stored in `model_path`; returns the scores and its label.

    ``runtime="lowbit"``: the archive's compressed layers stay packed (less memory);
    ``precision="bfloat16"``: matmuls in bfloat16 (faster on recent CPUs). An existing
    `out_csv` is replaced only with ``overwrite``."""
    root = Path(images_dir)
    paths = list_images(root, recursive)
    model, _ = load_model(model_path, runtime, precision)
    scores = score_images(model.to(device), paths, batch_size, workers, progress)
    scores.write_csv(out_csv, root, model.label, overwrite)
    return scores, model.label
