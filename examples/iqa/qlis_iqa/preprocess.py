"""Image preprocessing of CLIP and DINO, with PIL and torch (no torchvision).

CLIP: shortest side resized to the input size (bicubic), centre crop, CLIP mean/std.
DINO: resized to size x size (bilinear), ImageNet mean/std — what the checkpoints' own image
processors do. The config is plain JSON: it is part of the feature-cache key and is stored in
every checkpoint and archive, so a deployed model preprocesses exactly as it was trained; it is
validated on construction (a stored one comes from an untrusted file).

Images are untrusted too: a file whose header announces more than MAX_IMAGE_PIXELS is refused
before it is decoded, and the CLIP resize refuses an aspect ratio above MAX_ASPECT (a 1x100000
PNG of 370 bytes would otherwise be resized to 22.4M x 224 pixels). Both are reported as
unreadable images, never fatal.

An image is read as it is shown, as transformers' own `load_image` and `convert_to_rgb` do: its
EXIF orientation is applied (a phone photo stored sideways is scored upright) and transparency
is composited onto white (the colour hidden under a transparent pixel is never seen). Only the
first frame of an animation is read.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from qlis_iqa.errors import IQAError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
MODES = ("shortest-crop", "square")
MIN_SIZE, MAX_SIZE = 16, 1024
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded size bound, checked on the header before decoding
MAX_IMAGE_FILE_BYTES = 4 * MAX_IMAGE_PIXELS  # an uncompressed 8-bit RGBA image of that size:
# a larger file is refused unread (decoders take a minute per GiB of a padded file)
_CONVERTED_AT_ONCE = 1 << 20  # pixels of a deep grey image widened to float64 at once
MIN_STD = 1e-3  # pixels in [0, 1] over a smaller std: scores far off, or infinite
MAX_ASPECT = 32  # longest / shortest side accepted by the shortest-side resize


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

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise IQAError(f"preprocessing size {self.size!r} is not an integer")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise IQAError(f"preprocessing size {self.size} is outside {MIN_SIZE}..{MAX_SIZE}")
        if self.mode not in MODES:
            raise IQAError(f"preprocessing mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.resample not in _RESAMPLE:
            known = ", ".join(sorted(_RESAMPLE))
            raise IQAError(f"preprocessing resample {self.resample!r} is not one of {known}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(number(v) and abs(v) <= 1e3 for v in values):
                raise IQAError(f"preprocessing {name} must be 3 finite numbers, got {values!r}")
        if not all(v >= MIN_STD for v in self.std):  # 1e-300 divides pixels into infinities
            raise IQAError(f"preprocessing std must be at least {MIN_STD}, got {self.std!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        try:
            d = json.loads(text)
            return cls(
                size=d["size"],
                mode=d["mode"],
                resample=d["resample"],
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
            )
        except IQAError as exc:
            raise IQAError(f"stored preprocessing config cannot be used: {exc}") from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise IQAError(f"stored preprocessing config cannot be read: {exc}") from None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        resample = _RESAMPLE[self.resample]
        if self.mode == "square":
            image = image.resize((self.size, self.size), resample)
        else:
            w, h = image.size
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise ImageReadError(
                    f"unreadable ({w}x{h} pixels: aspect ratio above {MAX_ASPECT}:1)"
                )
            scale = self.size / min(w, h)
            new_w, new_h = max(self.size, int(w * scale)), max(self.size, int(h * scale))
            image = image.resize((new_w, new_h), resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()


_INT16_MAX, _INT32_MAX = 65535, 2**31 - 1
DECODING = 3  # how a file becomes pixels (2: high-bit-depth grey scaled, see to_rgb; 3: EXIF
# orientation applied, transparency onto white); a change is part of the feature-cache key, so
# features cached by the old decoding are never served
WHITE = (255, 255, 255, 255)
_ORIENTATION = {  # EXIF orientation -> the transpose that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image. PIL's own conversion clips high-bit-depth grey modes to 0..255 (a
    16-bit PNG comes out nearly all white, a float one black), so they are scaled by their
    range first: I;16 by 65535; I by 65535 when its values fit in 16 bits (how PIL holds
    16-bit PNG, PGM and TIFF data), else by 2^31-1; F by 1 (float images' 0..1). Transparency
    (an alpha band, or a palette's or colour's tRNS) is composited onto white: PIL's conversion
    drops it, showing whatever colour the transparent pixels happen to hold."""
    mode = image.mode
    deep = mode in ("I", "F") or mode.startswith("I;16")
    if not deep and ({"A", "a"} & set(image.getbands()) or "transparency" in image.info):
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        onto = Image.new("RGB", rgba.size, WHITE[:3])  # pasted through alpha: the pixels of
        onto.paste(rgba, mask=rgba.getchannel("A"))  # alpha_composite, in 2 copies fewer
        return onto
    if mode.startswith("I;16"):
        top = _INT16_MAX
    elif mode not in ("I", "F"):
        return image.convert("RGB")  # 8-bit modes (16-bit RGB PNGs PIL reads as 8-bit RGB)
    values = np.asarray(image)  # as stored (a 64 M pixel image: 0.5 GB in float64)
    if mode == "F":
        top = 1.0
    elif mode == "I":
        top = _INT16_MAX if values.size and values.max() <= _INT16_MAX else _INT32_MAX
    flat = values.reshape(-1)
    grey = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, _CONVERTED_AT_ONCE):
        part = flat[start:start + _CONVERTED_AT_ONCE].astype(np.float64)
        if mode == "F":
            part = np.nan_to_num(part, nan=0.0)
        grey[start:start + part.size] = np.rint(np.clip(part / top, 0.0, 1.0) * 255.0)
    return Image.fromarray(grey.reshape(values.shape), "L").convert("RGB")


def for_family(family: str, size: int) -> Preprocess:
    """The preprocessing of the family's checkpoint at the backbone's input size."""
    if family == "clip":
        return Preprocess(size, "shortest-crop", "bicubic", CLIP_MEAN, CLIP_STD)
    if family == "dino":
        return Preprocess(size, "square", "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    raise IQAError(f"unknown model family {family!r}")


@contextmanager
def open_image_file(path: str | Path) -> Iterator[BinaryIO]:
    """An image file opened for reading, every failure an ImageReadError. Only a regular file
    is read: opened without blocking and checked on its descriptor, since a FIFO would wait
    forever for a writer and /dev/zero never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # open() itself blocks on a FIFO
        with open(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageReadError(f"{path}: unreadable (not a regular file)")
            if info.st_size > MAX_IMAGE_FILE_BYTES:
                raise ImageReadError(f"{path}: unreadable ({info.st_size:,} bytes; at most "
                                     f"{MAX_IMAGE_FILE_BYTES:,} are read)")
            yield f
    except FileNotFoundError:
        raise ImageReadError(f"{path}: missing") from None
    except IsADirectoryError:  # listed because its images could not be (score.list_images)
        raise ImageReadError(f"{path}: a folder whose files cannot be listed") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: unreadable ({exc.strerror or exc})") from None


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into an ImageReadError."""
    with open_image_file(path) as f:
        return _decode(path, f)


def upright(image: Image.Image) -> Image.Image:
    """A copy of the image turned by its EXIF orientation, as viewers show it. A damaged EXIF
    block (PIL's parser raises SyntaxError on a bad header, others on worse) or an orientation
    that is no EXIF value counts as none: the image is shown as stored."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except (SyntaxError, OSError, ValueError, TypeError, LookupError, struct.error):
        orientation = None
    if isinstance(orientation, int) and orientation in _ORIENTATION:
        return image.transpose(_ORIENTATION[orientation])
    return image.copy()


DECODED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
"""PIL's decoders of the image suffixes read (its JPEG one opens a camera's MPO too). Others
stay closed: an ICO's opening decodes its largest picture before its size can be
checked (a 688 KB icon decoded 177 M pixels, 1.2 GB)."""


def _decode(path: str | Path, f: BinaryIO) -> Image.Image:
    """Decode an opened image file, its size checked on the header first."""
    try:
        with warnings.catch_warnings():  # PIL warns from 89 M pixels (we refuse above 67 M) and
            warnings.simplefilter("ignore")  # on damaged EXIF: the image is decoded or reported
            im = Image.open(f, formats=DECODED_FORMATS)
            with im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS or min(w, h) < 1:
                    raise ImageReadError(
                        f"{path}: unreadable ({w}x{h} pixels; at most {MAX_IMAGE_PIXELS:,} "
                        "are decoded)"
                    )
                im.load()
                return upright(im)
    except UnidentifiedImageError:  # its text names the file object, not the file
        empty = f.seek(0, io.SEEK_END) == 0
        what = "an empty file" if empty else "not a JPEG, PNG, BMP, WebP, TIFF or GIF image"
        raise ImageReadError(f"{path}: unreadable ({what})") from None
    except Image.DecompressionBombError:  # PIL's own bound, at twice its warning's
        raise ImageReadError(
            f"{path}: unreadable (more than {MAX_IMAGE_PIXELS:,} pixels are never decoded)"
        ) from None
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:  # PIL's format plugins raise many types for a damaged file
        raise ImageReadError(f"{path}: unreadable ({exc})") from None
