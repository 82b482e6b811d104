"""Image preprocessing of CLIP and DINO, with PIL and torch (no torchvision).

CLIP: shortest side resized to the input size (bicubic), centre crop, CLIP mean/std.
DINO: resized to size x size (bilinear), ImageNet mean/std — what the checkpoints' own image
processors do. The config is plain JSON: it is part of the feature-cache key and is stored in
every checkpoint and archive, so a deployed model preprocesses exactly as it was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qlis_iqa.errors import IQAError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageReadError(IQAError):
    """An image file is missing, truncated or not an image (reported and skipped, never fatal)."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a (3, size, size) float tensor for the backbone."""

    size: int
    mode: str  # "shortest-crop" (CLIP) or "square" (DINO)
    resample: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        try:
            d = json.loads(text)
            return cls(
                size=int(d["size"]),
                mode=str(d["mode"]),
                resample=str(d["resample"]),
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IQAError(f"stored preprocessing config cannot be read: {exc}") from None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        resample = _RESAMPLE[self.resample]
        if self.mode == "square":
            image = image.resize((self.size, self.size), resample)
        else:
            w, h = image.size
            scale = self.size / min(w, h)
            new_w, new_h = max(self.size, int(w * scale)), max(self.size, int(h * scale))
            image = image.resize((new_w, new_h), resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()


def for_family(family: str, size: int) -> Preprocess:
    """The preprocessing of the family's checkpoint at the backbone's input size."""
    if family == "clip":
        return Preprocess(size, "shortest-crop", "bicubic", CLIP_MEAN, CLIP_STD)
    if family == "dino":
        return Preprocess(size, "square", "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    raise IQAError(f"unknown model family {family!r}")


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into an ImageReadError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: missing") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: unreadable ({exc})") from None
