"""Frozen-part outputs, computed once per (backbone, preprocessing, image) and cached on disk.

Training the head for 20 epochs, re-evaluating, and evaluating compressed variants whose frozen
tensors did not change all read the cache instead of running the backbone again. The key is
the model's fingerprint (hash of the backbone config and frozen tensors), the preprocessing
config, and a hash of the image file's bytes, so a changed image or weight is never served a
stale feature. Entries are .npy files written atomically (no pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qlis import QlisError
from qlis.regular_files import open_regular_file
from qlis_iqa.errors import IQAError
from qlis_iqa.models import IQAModel
from qlis_iqa.preprocess import (
    DECODING,
    ImageReadError,
    Preprocess,
    open_image_file,
    read_image,
)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (the image part of a cache key), read as an image is read
    (`open_image_file`: a FIFO or /dev/zero in an image folder is reported, not waited on)."""
    h = hashlib.sha256()
    with open_image_file(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """A folder of cached frozen outputs: ROOT/<fingerprint>-<preprocessing>/<image hash>.npy."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, model: IQAModel, fingerprint: str | None = None) -> Path:
        """The folder of this model's frozen part and preprocessing (with an info.json)."""
        fingerprint = fingerprint or model.fingerprint()
        pre = hashlib.sha256(f"{DECODING}{model.preprocess.to_json()}".encode()).hexdigest()
        folder = self.root / f"{model.family}-{fingerprint[:24]}-{pre[:12]}"
        info = folder / "info.json"
        if not info.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(
                info,
                json.dumps(
                    {
                        "family": model.family,
                        "fingerprint": fingerprint,
                        "preprocess": json.loads(model.preprocess.to_json()),
                        "backbone": model.label,
                    },
                    indent=1,
                ),
            )
        return folder

    @staticmethod
    def get(folder: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The cached row, or None when it is absent, damaged or not a float32 `shape` array.

        The header is read first (memory-mapped), so a damaged entry announcing a huge array
        costs nothing; any entry that does not fit is recomputed and overwritten.
        """
        path = folder / f"{key}.npy"
        try:
            os.close(open_regular_file(path))  # a FIFO or device would block the load
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.shape != shape or array.dtype != np.float32:
                return None
            return torch.from_numpy(np.array(array))
        except (OSError, ValueError, EOFError, QlisError):
            return None  # absent, damaged or not a file: recompute it

    @staticmethod
    def put(folder: Path, key: str, value: torch.Tensor) -> None:
        _replaced(folder / f"{key}.npy",
                  lambda f: np.save(f, value.detach().cpu().numpy(), allow_pickle=False))


def _atomic_write_text(path: Path, text: str) -> None:
    _replaced(path, lambda f: f.write(text.encode("utf-8")))


def _replaced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``path`` made anew by ``write`` into a temporary file beside it (no fsync: a cache
    entry lost to a crash is recomputed). A write that fails (a full disk, a folder where the
    entry goes) leaves no temporary file and names the cache it could not write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise IQAError(f"{path.parent}: cannot write the feature cache ({err.strerror or err});"
                       " free some space, or pass --cache-dir elsewhere") from None


class ImageDataset(Dataset):
    """Preprocessed images; an unreadable one yields its error instead of a tensor."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = read_image(self.paths[i])
            return i, self.preprocess(image), ""
        except ImageReadError as exc:  # e.g. an aspect ratio the resize would blow up on
            text = str(exc)
            return i, None, text if text.startswith(str(self.paths[i])) else (
                f"{self.paths[i]}: {text}")
        except MemoryError:  # a large image where memory is short: the others may fit
            return i, None, f"{self.paths[i]}: unreadable (not enough memory to decode it)"


def collate_images(
    batch: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images of a batch; return the unreadable ones separately."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def image_loader(
    paths: Sequence[Path], preprocess: Preprocess, batch_size: int, workers: int
) -> DataLoader:
    """A DataLoader of (indices, pixels, errors) batches over image files, in order."""
    return DataLoader(
        ImageDataset(paths, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
    )


@dataclass
class Features:
    """Frozen outputs of the readable images, in input order, and the images that failed."""

    values: torch.Tensor
    index: list[int]  # positions in the input list that `values` rows belong to
    bad: list[tuple[int, str]] = field(default_factory=list)
    computed: int = 0
    cached: int = 0


@torch.inference_mode()
def extract_features(
    model: IQAModel,
    paths: Sequence[Path],
    cache: FeatureCache | None = None,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    fingerprint: str | None = None,
) -> Features:
    """Frozen outputs for `paths`: read from the cache where present, else computed and stored.

    The backbone runs on the device the model is on; cached rows are float32 on the CPU.
    """
    paths = [Path(p) for p in paths]
    rows: dict[int, torch.Tensor] = {}
    bad: dict[int, str] = {}
    keys: dict[int, str] = {}
    folder = cache.folder(model, fingerprint) if cache is not None else None
    shape = model.feature_shape
    todo: list[int] = []
    for i, p in enumerate(paths):
        if folder is None:
            todo.append(i)
            continue
        try:
            keys[i] = file_digest(p)
        except ImageReadError as exc:
            bad[i] = str(exc)
            continue
        hit = FeatureCache.get(folder, keys[i], shape)
        if hit is None:
            todo.append(i)
        else:
            rows[i] = hit
    n_cached = len(rows)
    model.eval()
    frozen_device = next(model.parameters()).device
    if todo:
        loader = image_loader([paths[i] for i in todo], model.preprocess, batch_size, workers)
        with tqdm(total=len(todo), desc=desc, disable=not progress, unit="img") as bar:
            for idx, pixels, errors in loader:
                for j, err in errors:
                    bad[todo[j]] = err
                if pixels is not None:
                    with model.inference_context():
                        out = model.frozen_forward(pixels.to(frozen_device)).float().cpu()
                    for j, row in zip(idx, out, strict=True):
                        i = todo[j]
                        rows[i] = row.clone()
                        if folder is not None:
                            FeatureCache.put(folder, keys[i], rows[i])
                bar.update(len(idx) + len(errors))
    index = sorted(rows)
    values = torch.stack([rows[i] for i in index]) if index else torch.empty(0)
    return Features(values, index, sorted(bad.items()), len(rows) - n_cached, n_cached)
