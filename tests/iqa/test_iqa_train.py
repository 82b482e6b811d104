"""Training: the paper's defaults, files of a run, cache reuse, bad images skipped up front."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from iqa_helpers import make_agiqa3k

from qlis.errors import QlisError
from qlis_iqa.backbones import RANDOM_LABEL, random_backbone
from qlis_iqa.data import Split
from qlis_iqa.errors import IQAError
from qlis_iqa.models import load_model, make_model
from qlis_iqa.train import TrainConfig, fit, train_run


def test_paper_defaults() -> None:
    assert TrainConfig() == TrainConfig(epochs=20, batch_size=16, lr=1e-4, weight_decay=1e-5)


def test_fit_learns_a_learnable_target() -> None:
    torch.manual_seed(0)
    model = make_model("clip", random_backbone("clip", "tiny"))
    feats = torch.randn(64, model.feature_dim)
    targets = feats[:, :4].sum(1) + 2.5
    losses = fit(model, feats, targets, TrainConfig(epochs=30, lr=3e-3))
    assert len(losses) == 30 and losses[-1] < 0.2 * losses[0]
    backbone_before = model.backbone.state_dict()["visual_projection.weight"].clone()
    fit(model, feats, targets, TrainConfig(epochs=1))
    assert torch.equal(model.backbone.state_dict()["visual_projection.weight"], backbone_before)


def test_run_folder(runs: dict, sample_root: Path) -> None:
    run = runs["dino"]
    out = run.checkpoint.parent
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "split.json",
        "predictions_test.csv",
        "metrics.json",
        "train_log.csv",
        "cache",
    }
    split = Split.load(out / "split.json")
    assert len(split.train) == 6 and len(split.test) == 6
    with (out / "predictions_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == run.predictions.names and len(rows) == 6
    assert {r["backbone"] for r in rows} == {RANDOM_LABEL}
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["backbone"] == RANDOM_LABEL and set(summary["test"]) == {"srcc", "krcc", "plcc"}
    model, meta = load_model(run.checkpoint)
    assert meta["qlis_iqa.split_sha256"] == split.digest()
    assert Path(meta["qlis_iqa.split_file"]) == (out / "split.json").resolve()


def test_rerun_reuses_split_and_cache(tmp_path: Path, backbones: dict, sample_root: Path) -> None:
    kwargs = dict(weights=backbones["clip"], config=TrainConfig(epochs=1), log=lambda m: None)
    first = train_run("clip", "agiqa-3k", sample_root, tmp_path / "a", limit=10, **kwargs)
    shared = dict(split_file=first.split_file, cache_dir=tmp_path / "a" / "cache")
    second = train_run("clip", "agiqa-3k", sample_root, tmp_path / "b", **shared, **kwargs)
    assert second.predictions.names == first.predictions.names  # the same 2 test images
    summary = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert summary["features_computed"] == 0 and summary["features_cached"] == 8
    assert not (tmp_path / "b" / "split.json").exists()


def test_bad_images_are_reported_before_training(tmp_path: Path, backbones: dict) -> None:
    root = make_agiqa3k(tmp_path / "data", 20, bad={3: "corrupt", 7: "missing", 11: "corrupt"})
    messages: list[str] = []
    run = train_run(
        "dino",
        "agiqa-3k",
        root,
        tmp_path / "run",
        weights=backbones["dino"],
        config=TrainConfig(epochs=2, batch_size=4),
        log=messages.append,
    )
    text = "\n".join(messages)
    assert "1 annotated image(s) missing" in text and "sd1.5_normal_007.jpg" in text
    assert "image(s) skipped" in text and "unreadable" in text
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["train_images"] + summary["test_images"] == 17 and summary["skipped"] == 3
    assert len(run.losses) == 2


def test_an_existing_run_is_not_overwritten_silently(
    tmp_path: Path, backbones: dict, sample_root: Path
) -> None:
    messages: list[str] = []
    kwargs = dict(weights=backbones["clip"], config=TrainConfig(epochs=1), log=messages.append)
    old_umask = os.umask(0o027)
    try:
        first = train_run("clip", "agiqa-3k", sample_root, tmp_path / "a", limit=10, **kwargs)
    finally:
        os.umask(old_umask)
    for name in ("model.safetensors", "split.json", "metrics.json", "predictions_test.csv"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o640, name  # the umask
    before = first.checkpoint.read_bytes()
    with pytest.raises(IQAError, match="exists; pass --force"):
        train_run("clip", "agiqa-3k", sample_root, tmp_path / "a", **kwargs)
    assert first.checkpoint.read_bytes() == before
    with pytest.raises(IQAError, match=r"already fixes the split .*limit 6 \(stored: 10\)"):
        train_run(
            "clip", "agiqa-3k", sample_root, tmp_path / "a", overwrite=True, limit=6, **kwargs
        )
    again = train_run(
        "clip",
        "agiqa-3k",
        sample_root,
        tmp_path / "a",
        overwrite=True,
        limit=6,
        split_conflict="warn",
        **kwargs,
    )
    assert any("limit 6 (stored: 10) is ignored" in m for m in messages)
    assert again.predictions.names == first.predictions.names  # the stored split, as warned
    same = train_run(
        "clip", "agiqa-3k", sample_root, tmp_path / "a", overwrite=True, limit=10, **kwargs
    )
    assert same.predictions.names == first.predictions.names  # asking for what is stored is fine


def test_a_missing_parent_is_refused_before_any_work(
    tmp_path: Path, backbones: dict, sample_root: Path
) -> None:
    with pytest.raises(IQAError, match="no such folder"):
        train_run(
            "clip", "agiqa-3k", sample_root, tmp_path / "no" / "run", weights=backbones["clip"]
        )
    assert not (tmp_path / "no").exists()


def test_a_test_split_too_small_to_correlate_is_refused_before_training(
    tmp_path: Path, backbones: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 images at 20 % test leave 1 test image: refused before the backbone loads (not after
    the whole training), and nothing is left under the run folder's name."""
    import qlis_iqa.train as train_module

    root = make_agiqa3k(tmp_path / "data", 3)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(train_module, "load_backbone", no_backbone)
    with pytest.raises(IQAError, match="test split has 1 image.*at least 2"):
        train_run("clip", "agiqa-3k", root, tmp_path / "run", weights=backbones["clip"],
                  config=TrainConfig(epochs=1), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_undefined_test_metrics_are_written_as_strict_json(
    tmp_path: Path, backbones: dict
) -> None:
    """Test images that all have the same MOS: SRCC etc. are undefined. metrics.json and the
    checkpoint header hold null (not the bare NaN that strict JSON readers refuse), and
    metrics.json says why."""
    root = make_agiqa3k(tmp_path / "data", 8)
    with (root / "data.csv").open("w", newline="") as f:
        names = sorted(p.name for p in (root / "images").iterdir())
        csv.writer(f).writerows([["name", "mos_quality"], *[[n, "2.5"] for n in names]])
    run = train_run("clip", "agiqa-3k", root, tmp_path / "run", weights=backbones["clip"],
                    config=TrainConfig(epochs=1), test_fraction=0.5, log=lambda m: None)

    def strict(text: str) -> dict:
        def refuse(constant: str) -> None:
            raise ValueError(constant)

        return json.loads(text, parse_constant=refuse)

    summary = strict((tmp_path / "run" / "metrics.json").read_text())
    assert summary["test"] == {"srcc": None, "krcc": None, "plcc": None}
    assert "same MOS" in summary["test_undefined"]
    _, meta = load_model(run.checkpoint)
    assert strict(meta["qlis_iqa.test_metrics"])["srcc"] is None


def test_a_moved_run_finds_its_split_beside_its_model(runs: dict, tmp_path: Path) -> None:
    """The split file's recorded path is absolute: a moved run folder could not evaluate."""
    import shutil

    from qlis_iqa.evaluate import recorded_split
    from qlis_iqa.models import KEY

    run = runs["dino"]
    moved = shutil.copytree(run.checkpoint.parent, tmp_path / "moved")
    meta = {**load_model(run.checkpoint)[1],
            KEY + "split_file": str(tmp_path / "gone" / "split.json")}
    _, split, path = recorded_split(meta, model_file=moved / run.checkpoint.name)
    assert path == moved / "split.json" and split.digest() == meta[KEY + "split_sha256"]
    text = json.loads(path.read_text())
    text["test"] = text["test"][:-1]
    path.write_text(json.dumps(text))
    with pytest.raises(IQAError, match="changed since the model was trained"):
        recorded_split(meta, model_file=moved / run.checkpoint.name)
    with pytest.raises(QlisError, match="split.json: no such file"):
        recorded_split(meta)  # without the model's place: the recorded path alone
