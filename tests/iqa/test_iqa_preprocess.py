"""Preprocessing equals the checkpoints' own image processors (the PIL ones of transformers)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from iqa_helpers import write_image
from PIL import Image

from qlis_iqa.errors import IQAError
from qlis_iqa.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    Preprocess,
    for_family,
    read_image,
    to_rgb,
)


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (64, 64)])
def test_matches_transformers_processors(tmp_path: Path, shape: tuple[int, int]) -> None:
    transformers = pytest.importorskip("transformers")
    clip_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    vit_cls = getattr(transformers, "ViTImageProcessorPil", None)
    if clip_cls is None or vit_cls is None:
        pytest.skip("this transformers has no PIL image processors")
    image = Image.open(write_image(tmp_path / "a.png", 0, size=shape)).convert("RGB")
    clip = clip_cls(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    vit = vit_cls(
        size={"height": 56, "width": 56}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    for processor, family in ((clip, "clip"), (vit, "dino")):
        ref = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])
        ours = for_family(family, 56)(image)
        assert ours.shape == (3, 56, 56)
        torch.testing.assert_close(ours, torch.from_numpy(ref), atol=1e-5, rtol=0)


def test_config_round_trip_and_errors(tmp_path: Path) -> None:
    pre = for_family("clip", 224)
    assert Preprocess.from_json(pre.to_json()) == pre
    with pytest.raises(IQAError, match="preprocessing config"):
        Preprocess.from_json('{"size": 3}')
    with pytest.raises(IQAError, match="unknown model family"):
        for_family("resnet", 224)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageReadError, match="unreadable"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageReadError, match="missing"):
        read_image(tmp_path / "none.jpg")
    gray = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8))
    assert for_family("dino", 16)(gray).shape == (3, 16, 16)  # converted to RGB


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (40, 48)).astype(np.uint16)
    grey = np.rint(deep / 257).astype(np.uint8)  # the same picture in 8 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    Image.fromarray(grey).save(tmp_path / "grey.png")
    opened = read_image(tmp_path / "deep.png")
    assert opened.mode.startswith("I;16") or opened.mode == "I"
    preprocess = for_family("dino", 32)
    expected = preprocess(read_image(tmp_path / "grey.png"))
    one_level = 1 / 255 / min(IMAGENET_STD)  # a rounding step, normalised
    for image in (opened, Image.fromarray(deep.astype(np.int32), "I"),
                  Image.fromarray((deep / 65535).astype(np.float32), "F")):
        ours = preprocess(image)
        torch.testing.assert_close(ours, expected, atol=one_level, rtol=0)
    assert to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32), "I")).getpixel((0, 0)) == (
        0, 0, 0)  # beyond 16 bits: the 32-bit range, negatives at black


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path: Path) -> None:
    stored = Image.new("RGB", (6, 2), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))  # red at the stored top left
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    stored.save(tmp_path / "turned.png", exif=exif)
    shown = read_image(tmp_path / "turned.png")
    assert shown.size == (2, 6)
    assert shown.convert("RGB").getpixel((1, 0)) == (255, 0, 0)  # now at the top right
    data = (tmp_path / "turned.png").read_bytes()
    at = data.index(b"eXIf") - 4
    (length,) = struct.unpack(">I", data[at : at + 4])
    body = b"MM\xa3*" + b"\0" * (length - 4)  # not a TIFF header: PIL raises SyntaxError
    chunk = b"eXIf" + body
    crc = struct.pack(">I", zlib.crc32(chunk))
    damaged = data[: at + 4] + chunk + crc + data[at + 12 + length :]
    (tmp_path / "damaged.png").write_bytes(damaged)
    assert read_image(tmp_path / "damaged.png").size == (6, 2)  # read as stored


def test_transparency_is_composited_onto_white(tmp_path: Path) -> None:
    white, red = (255, 255, 255), (255, 0, 0)
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))  # invisible red, then half-visible red
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    assert to_rgb(rgba).getpixel((0, 0)) == white
    assert to_rgb(rgba).getpixel((1, 0)) == (255, 127, 127)
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == white
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, *red])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    opened = to_rgb(read_image(tmp_path / "p.png"))
    assert (opened.getpixel((0, 0)), opened.getpixel((1, 0))) == (white, red)
    assert to_rgb(Image.new("RGB", (1, 1), red)).getpixel((0, 0)) == red  # opaque: unchanged
