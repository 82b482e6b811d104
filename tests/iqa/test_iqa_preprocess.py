"""Preprocessing equals the checkpoints' own image processors (the PIL ones of transformers)."""

from __future__ import annotations

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
