"""Offline backbone loading, the two models' split forward pass, fingerprints, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qlis_iqa.backbones import (
    RANDOM_LABEL,
    is_random_init,
    load_backbone,
    random_backbone,
    weights_label,
)
from qlis_iqa.errors import IQAError, WeightsNotFoundError
from qlis_iqa.models import load_model, make_model, read_metadata, save_checkpoint
from qlis_iqa.pack import compress_model, write_archive


def test_load_from_folder_and_from_parent(backbones: dict[str, Path], tmp_path: Path) -> None:
    model = load_backbone("dino", backbones["dino"])
    assert is_random_init(model.config) and weights_label(model, None) == RANDOM_LABEL
    parent = tmp_path / "weights"
    shutil.copytree(backbones["clip"], parent / "clip-vit-large-patch14")
    assert load_backbone("clip", parent).config.hidden_size == 32


def test_load_from_a_hugging_face_cache(backbones: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--facebook--dino-vitb16"
    shutil.copytree(backbones["dino"], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    assert load_backbone("dino", cache_dir=tmp_path / "hub").config.hidden_size == 32
    assert load_backbone("dino", tmp_path / "hub").config.hidden_size == 32


def test_missing_weights_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone("clip", cache_dir=tmp_path / "empty-cache")
    msg = str(err.value)
    assert str(tmp_path / "empty-cache" / "models--openai--clip-vit-large-patch14") in msg
    assert "hf download openai/clip-vit-large-patch14" in msg and "save_pretrained" in msg
    (tmp_path / "w").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"w/dino-vitb16 \(no config.json\)"):
        load_backbone("dino", tmp_path / "w")
    with pytest.raises(IQAError, match="no such folder"):
        load_backbone("dino", "./not-here")


def test_wrong_family_is_refused(backbones: dict[str, Path]) -> None:
    with pytest.raises(IQAError, match="do not fit the CLIPIQA"):
        load_backbone("clip", backbones["dino"])


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_split_forward_and_trainable_parts(family: str) -> None:
    model = make_model(family, random_backbone(family, "tiny"))
    size = model.preprocess.size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.trainable_forward(model.frozen_forward(x)))
    assert model(x).shape == (3,)
    keys = model.state_dict().keys()
    assert any(k.startswith("backbone.") for k in keys) and "head.0.weight" in keys
    assert model.head[0].in_features == model.feature_dim and model.head[0].out_features == 256
    trainable = {id(p) for p in (p for m in model.trainable_modules() for p in m.parameters())}
    for p in model.parameters():
        assert p.requires_grad == (id(p) in trainable)
    if family == "dino":  # last block and final norm train with the head
        assert {id(p) for p in model.blocks[-1].parameters()} <= trainable
        assert {id(p) for p in model.backbone.layernorm.parameters()} <= trainable
    else:
        assert trainable == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_fingerprint_tracks_frozen_tensors_only(family: str) -> None:
    model = make_model(family, random_backbone(family, "tiny"))
    before = model.fingerprint()
    with torch.no_grad():
        for p in (p for m in model.trainable_modules() for p in m.parameters()):
            p.add_(1.0)
    assert model.fingerprint() == before
    with torch.no_grad():
        next(model.frozen_modules()[0].parameters()).add_(1e-3)
    assert model.fingerprint() != before


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    model = make_model(family, random_backbone(family, "tiny", seed=2))
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"qlis_iqa.dataset": "agiqa-3k"})
    loaded, meta = load_model(path)
    assert meta["qlis_iqa.dataset"] == "agiqa-3k" and meta["qlis_iqa.backbone"] == RANDOM_LABEL
    assert loaded.random_init and loaded.preprocess == model.preprocess
    x = torch.randn(2, 3, model.preprocess.size, model.preprocess.size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.fingerprint() == model.fingerprint()


def test_bad_model_files(tmp_path: Path) -> None:
    with pytest.raises(IQAError, match="no such model file"):
        load_model(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(IQAError, match="not a safetensors checkpoint"):
        read_metadata(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(IQAError, match="not a qlis-iqa model"):
        load_model(tmp_path / "plain.safetensors")


def test_an_archive_named_in_capitals_is_read_as_an_archive(tmp_path: Path) -> None:
    """Read by its suffix, compared case by case: model.QLIS was read as a safetensors file."""
    model = make_model("dino", random_backbone("dino", "tiny", seed=2))
    path = tmp_path / "M.QLIS"
    write_archive(model, compress_model(model, policy="quant", bits=8), path)
    loaded, _ = load_model(path, runtime="lowbit")
    x = torch.randn(2, 3, model.preprocess.size, model.preprocess.size)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=0.05)
