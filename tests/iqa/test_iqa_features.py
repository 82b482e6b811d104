"""The disk cache of frozen outputs: hits, misses, invalidation, and unreadable images."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch
from iqa_helpers import write_image

from qlis_iqa import features as features_module
from qlis_iqa.backbones import random_backbone
from qlis_iqa.errors import IQAError
from qlis_iqa.features import FeatureCache, extract_features
from qlis_iqa.models import make_model


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    return [write_image(folder / f"{i}.png", i) for i in range(n)]


def test_cache_hits_equal_computed_values(tmp_path: Path) -> None:
    model = make_model("dino", random_backbone("dino", "tiny"))
    paths = _images(tmp_path / "img", 5)
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(model, paths, cache, batch_size=2)
    assert (first.computed, first.cached) == (5, 0) and first.index == list(range(5))
    tokens = (model.preprocess.size // 16) ** 2 + 1
    assert first.values.shape == (5, tokens, model.feature_dim)  # DINO: tokens entering last block
    again = extract_features(model, paths, cache, batch_size=3)
    assert (again.computed, again.cached) == (0, 5)
    assert torch.equal(again.values, first.values)
    uncached = extract_features(model, paths, None, batch_size=5)
    torch.testing.assert_close(uncached.values, first.values)


def test_cache_key_follows_image_bytes_and_frozen_weights(tmp_path: Path) -> None:
    model = make_model("clip", random_backbone("clip", "tiny"))
    paths = _images(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache")
    extract_features(model, paths, cache)
    write_image(paths[1], 99)  # same name, new content
    assert extract_features(model, paths, cache).computed == 1
    with torch.no_grad():
        model.head[0].weight.add_(1.0)  # trainable: same cache
    assert extract_features(model, paths, cache).computed == 0
    with torch.no_grad():
        model.backbone.visual_projection.weight.mul_(0.5)  # frozen: new cache folder
    assert extract_features(model, paths, cache).computed == 3
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_unreadable_and_missing_images_are_skipped(tmp_path: Path) -> None:
    model = make_model("clip", random_backbone("clip", "tiny"))
    paths = _images(tmp_path / "img", 4)
    paths[1].write_bytes(b"garbage")
    paths.append(tmp_path / "img" / "gone.png")
    for cache in (FeatureCache(tmp_path / "cache"), None):
        out = extract_features(model, paths, cache, batch_size=2)
        assert out.index == [0, 2, 3] and out.values.shape[0] == 3
        assert [i for i, _ in out.bad] == [1, 4]
        assert "unreadable" in out.bad[0][1] and "missing" in out.bad[1][1]


def test_an_entry_that_cannot_be_written_names_the_cache_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "blocked.npy").mkdir()  # a folder where the entry goes
    with pytest.raises(IQAError, match=rf"^{re.escape(str(folder))}: cannot write the feature"):
        FeatureCache.put(folder, "blocked", torch.ones(3))
    monkeypatch.setattr(features_module.np, "save", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(IQAError, match=r"\(No space left on device\)"):
        FeatureCache.put(folder, "full", torch.ones(3))
    assert sorted(p.name for p in folder.iterdir()) == ["blocked.npy"]
