"""Hostile models and backbone folders of qlis-iqa: weights that are not finite, stored
preprocessing that divides pixels into infinities, backbone configs that would allocate without
bound. Each is one clear error (or an image reported unscored), never a NaN score or metric
printed as a result, nor a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from iqa_helpers import write_image
from safetensors.torch import load_file, save_file

from qlis_iqa.backbones import load_backbone, random_backbone
from qlis_iqa.cli import cli
from qlis_iqa.data import Sample, Split
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import Predictions, predict_samples
from qlis_iqa.features import FeatureCache, extract_features
from qlis_iqa.models import load_model, make_model, save_checkpoint
from qlis_iqa.preprocess import Preprocess
from qlis_iqa.score import list_images, score_images


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return make_model("clip", random_backbone("clip", "tiny", seed=2))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_checkpoints_with_non_finite_weights_are_refused(
    tiny_model: torch.nn.Module, tmp_path: Path, value: float
) -> None:
    with torch.no_grad():
        tiny_model.head[2].weight[0, 0] = value
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(IQAError, match=r"1 tensor\(s\) hold NaN or infinite values.*head.2"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_checkpoint_storing_weights_as_integers_is_refused(
    tiny_model: torch.nn.Module, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Weights cast to int64 are zeros: the model gave every image one score, exit 0."""
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    state = load_file(path)
    state["head.2.weight"] = state["head.2.weight"].to(dtype)
    save_file(state, path, metadata=tiny_model.metadata())
    with pytest.raises(IQAError, match="'head.2.weight' is stored as integers"):
        load_model(path)


def test_a_backbone_folder_with_non_finite_weights_is_refused_not_trained_on(
    backbones: dict[str, Path], tmp_path: Path, sample_root: Path
) -> None:
    """Training on it "diverged", advising a lower learning rate."""
    folder = shutil.copytree(backbones["dino"], tmp_path / "w")
    weights = load_file(folder / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and t.ndim == 2)
    weights[name][0, 0] = math.nan
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(IQAError, match=rf"the weights in {folder}: 1 tensor\(s\) hold NaN"):
        load_backbone("dino", folder)
    line = one_line_error(cli, "qlis-iqa: error:", "train", "--family", "dino", "--root",
                          sample_root, "--weights", folder, "-o", tmp_path / "run")
    assert "hold NaN or infinite values" in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["clip", "dino"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_backbone_folder_storing_weights_as_integers_is_refused(
    backbones: dict[str, Path], tmp_path: Path, family: str, dtype: torch.dtype
) -> None:
    """from_pretrained cast them back to floats: every image got one score, exit 0."""
    folder = shutil.copytree(backbones[family], tmp_path / "w")
    weights = load_file(folder / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and t.ndim == 2)
    weights[name] = weights[name].to(dtype)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(IQAError, match=f"tensor '{name}' is stored as integers or booleans"):
        load_backbone(family, folder)


@pytest.mark.parametrize("family, prefix", [("clip", ""), ("dino", ""), ("dino", "vit.")])
def test_a_backbone_config_of_fewer_layers_than_its_weights_is_refused(
    backbones: dict[str, Path], tmp_path: Path, family: str, prefix: str
) -> None:
    """The extra layers' tensors were dropped: a shortened model, trained and saved (also
    from a task model's checkpoint, whose names carry its base model's prefix)."""
    folder = shutil.copytree(backbones[family], tmp_path / "w")
    weights = load_file(folder / "model.safetensors")
    save_file({prefix + name: t for name, t in weights.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] >= 2
    config["num_hidden_layers"] -= 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IQAError, match="hold more layers than its config.json"):
        load_backbone(family, folder)


def test_stored_preprocessing_std_is_bounded_below() -> None:
    text = json.dumps({"size": 28, "mode": "square", "resample": "bilinear",
                       "mean": [0, 0, 0], "std": [1e-300, 1, 1]})
    with pytest.raises(IQAError, match="std must be at least"):
        Preprocess.from_json(text)


def _overflowing(model: torch.nn.Module) -> torch.nn.Module:
    """Finite weights whose product overflows float32: every score is infinite or NaN."""
    with torch.no_grad():
        model.head[2].weight.fill_(3e38)
    return model


def test_non_finite_scores_are_reported_not_written(tiny_model: torch.nn.Module,
                                                    tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", 0)
    scores = score_images(_overflowing(tiny_model), [path])
    assert scores.scores == {}
    assert "the model's score is" in scores.errors[0]


def test_non_finite_predictions_are_skipped_not_correlated(tiny_model: torch.nn.Module,
                                                           tmp_path: Path) -> None:
    samples = [Sample(f"{i}.png", write_image(tmp_path / f"{i}.png", i), float(i))
               for i in range(3)]
    good = predict_samples(tiny_model, samples, None)
    assert np.isfinite(good.pred).all() and not good.skipped
    with pytest.raises(IQAError, match="no finite score"):
        predict_samples(_overflowing(tiny_model), samples, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 10**9}, "hidden_size = 1000000000 is out of bounds"),
        ({"num_hidden_layers": "two"}, "cannot be used: .*num_hidden_layers"),
        ({"num_hidden_layers": 64, "hidden_size": 2048, "intermediate_size": 8192},
         r"builds 3,\d{3},\d{3},\d{3} parameters"),
        ({"hidden_size": 64}, "do not fit its config.json"),
        (None, "cannot be used: .*must be a mapping"),
    ],
)
def test_weights_folders_with_hostile_configs_are_refused(
    backbones: dict[str, Path], tmp_path: Path, changes: dict | None, message: str
) -> None:
    folder = shutil.copytree(backbones["clip"], tmp_path / "w")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps([config] if changes is None
                                                   else {**config, **changes}))
    with pytest.raises(IQAError, match=message):
        load_backbone("clip", folder)


@pytest.mark.parametrize("kind", ["fifo", "device", "nowhere", "folder"])
def test_a_config_json_that_is_not_a_file_is_said_to_be_so_not_missing(
    backbones: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    folder = shutil.copytree(backbones["clip"], tmp_path / "w")
    config = folder / "config.json"
    config.unlink()
    {"fifo": lambda: os.mkfifo(config), "device": lambda: config.symlink_to("/dev/zero"),
     "nowhere": lambda: config.symlink_to(config), "folder": config.mkdir}[kind]()
    with pytest.raises(IQAError, match=r"config.json is not a regular file"):
        load_backbone("clip", folder)


def test_a_pickled_backbone_is_refused_and_never_unpickled(
    backbones: dict[str, Path], sample_root: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = shutil.copytree(backbones["dino"], tmp_path / "w")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cache = tmp_path / "hub" / "models--facebook--dino-vitb16"  # the same in a HF cache
    shutil.copytree(folder, cache / "snapshots" / "0123abc")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for weights in (folder, tmp_path / "hub"):
        with pytest.raises(IQAError, match="holds only pytorch_model.bin, a pickle"):
            load_backbone("dino", weights)
    line = one_line_error(cli, "qlis-iqa: error:", "train", "--family", "dino", "--root",
                          sample_root, "--weights", folder, "-o", tmp_path / "run")
    assert f"{folder} holds only pytorch_model.bin" in line


def test_undefined_metrics_say_why() -> None:
    mos = np.array([1.0, 2.0, 3.0])
    constant = Predictions(["a", "b", "c"], mos, np.full(3, 2.5))
    assert constant.undefined(constant.metrics()) == (
        "SRCC, KRCC, PLCC undefined (nan): the model gives all 3 images the same score")
    same_mos = Predictions(["a", "b", "c"], np.full(3, 2.0), mos)
    assert same_mos.undefined(same_mos.metrics()).endswith("all 3 images have the same MOS")
    fine = Predictions(["a", "b", "c"], mos, mos)
    assert fine.undefined(fine.metrics()) == ""


def test_fifos_devices_and_dangling_links_are_unreadable_images(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", 0)
    os.mkfifo(folder / "fifo.png")  # PIL would wait on it forever
    (folder / "zero.png").symlink_to("/dev/zero")  # and read this without end
    (folder / "gone.png").symlink_to(tmp_path / "absent.png")
    (folder / "text.jpg").write_text("hello")
    (folder / "empty.png").write_bytes(b"")
    paths = list_images(folder)
    assert [p.name for p in paths] == ["a.png", "empty.png", "fifo.png", "gone.png", "text.jpg",
                                       "zero.png"]
    scores = score_images(tiny_model, paths)
    assert list(scores.scores) == [0]
    assert scores.errors == {
        1: f"{paths[1]}: unreadable (an empty file)",
        2: f"{paths[2]}: unreadable (not a regular file)",
        3: f"{paths[3]}: missing",
        4: f"{paths[4]}: unreadable (not a JPEG, PNG, BMP, WebP, TIFF or GIF image)",
        5: f"{paths[5]}: unreadable (not a regular file)",
    }


def test_an_icon_under_an_image_suffix_is_never_decoded(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    """PIL decodes an ICO's largest picture as it opens it, before its size can be checked:
    one of 13300 x 13300 in a 688 KB file took 1.2 GB."""
    from PIL import Image

    icon = tmp_path / "icon.png"
    Image.new("RGB", (64, 64), "red").save(icon, format="ICO")
    scores = score_images(tiny_model, [icon])
    assert scores.errors == {
        0: f"{icon}: unreadable (not a JPEG, PNG, BMP, WebP, TIFF or GIF image)"}


def test_a_sub_folder_that_cannot_be_listed_is_an_unreadable_entry_not_left_out(
    tiny_model: torch.nn.Module, tmp_path: Path, monkeypatch
) -> None:
    folder = tmp_path / "imgs"
    (folder / "locked").mkdir(parents=True)
    (folder / "open").mkdir()
    write_image(folder / "a.png", 0)
    write_image(folder / "open" / "b.png", 1)
    write_image(folder / "locked" / "c.png", 2)
    scandir = os.scandir

    def refusing(path):  # what a folder of mode 000 does to a user other than root
        if Path(path).name in ("locked", "imgs") and refused_now[0] in (Path(path).name, "*"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    refused_now = ["locked"]
    monkeypatch.setattr(os, "scandir", refusing)
    paths = list_images(folder, recursive=True)
    assert [p.relative_to(folder).as_posix() for p in paths] == ["a.png", "locked", "open/b.png"]
    scores = score_images(tiny_model, paths)
    assert sorted(scores.scores) == [0, 2]
    assert scores.errors == {1: f"{paths[1]}: a folder whose files cannot be listed"}
    refused_now[0] = "*"
    with pytest.raises(IQAError, match=r"imgs: cannot be read \(Permission denied\)"):
        list_images(folder)


def test_cached_feature_keys_do_not_wait_on_fifos_or_read_devices(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    """With a feature cache each image is hashed first: that read must refuse a FIFO (whose
    open waits for a writer) and /dev/zero (which never ends) as decoding does."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.png", 0)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    paths = [folder / "a.png", folder / "fifo.png", folder / "zero.png"]
    features = extract_features(tiny_model, paths, cache=FeatureCache(tmp_path / "cache"))
    assert features.index == [0]
    assert dict(features.bad) == {1: f"{paths[1]}: unreadable (not a regular file)",
                                  2: f"{paths[2]}: unreadable (not a regular file)"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": ["a.jpg", "b.jpg"], "test": ["b.jpg", "c.jpg"]}, r"1 name\(s\) in both"),
        ({"test": ["c.jpg", "c.jpg"]}, "a name appears twice in test"),
        ({"train": "abc"}, "lists of image names"),
        ({"test": {"c.jpg": 1}}, "lists of image names"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"limit": -5}, "limit"),
        ({"seed": "0"}, "seed"),
        ({"dataset": ["agiqa-3k"]}, "dataset"),
    ],
)
def test_split_files_are_checked_by_type_and_consistency(
    tmp_path: Path, changes: dict, message: str
) -> None:
    split = {"dataset": "agiqa-3k", "seed": 0, "test_fraction": 0.5, "limit": None,
             "train": ["a.jpg", "b.jpg"], "test": ["c.jpg"]}
    Split(**split).save(tmp_path / "good.json")
    assert Split.load(tmp_path / "good.json") == Split(**split)
    (tmp_path / "bad.json").write_text(json.dumps({**split, **changes}))
    with pytest.raises(IQAError, match=f"not a usable qlis-iqa split file .*{message}"):
        Split.load(tmp_path / "bad.json")


def test_the_feature_cache_is_never_written_among_the_inputs(
    tmp_path: Path, runs: dict, sample_root: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    images = sorted(p.name for p in (root / "images").iterdir())
    model = runs["clip"].checkpoint
    (tmp_path / "file").write_text("x")
    cases = [
        (root / "images", "is an input folder"),
        (root / "images" / "cache", "is inside"),
        (tmp_path / "file", "exists and is not a folder"),
        (tmp_path / "a" / "b" / "cache", "no such folder (create it first)"),
    ]
    for cache, message in cases:
        for command in (["evaluate", model, "--root", root],
                        ["sweep", model, "--root", root, "-o", tmp_path / "sw", "--only",
                         "Baseline"]):
            assert message in one_line_error(cli, "qlis-iqa: error: ", *command,
                                             "--cache-dir", cache)
    assert sorted(p.name for p in (root / "images").iterdir()) == images
    assert not (tmp_path / "a").exists() and not (tmp_path / "sw").exists()


def test_nothing_is_written_among_the_images_by_default_either(
    tmp_path: Path, runs: dict, sample_root: Path
) -> None:
    """A model kept among the dataset's images (its default feature cache would go there), a
    new split file named there, a calibrated compression written there: all refused."""
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    shutil.copy(runs["clip"].checkpoint, root / "images" / "m.safetensors")
    images = sorted(p.name for p in (root / "images").iterdir())
    commands = [
        ["evaluate", root / "images" / "m.safetensors", "--root", root],
        ["sweep", root / "images" / "m.safetensors", "--root", root, "-o", tmp_path / "sw",
         "--only", "Baseline"],
        ["train", "--family", "clip", "--root", root, "-o", tmp_path / "run", "--split",
         root / "images" / "s.json", "--epochs", "1"],
        ["compress", runs["clip"].checkpoint, "--root", root, "-o",
         root / "images" / "x.qlis", "--calib-images", "2"],
    ]
    for command, message in zip(commands, ["pass --cache-dir", "pass --cache-dir",
                                           "is inside", "is inside"], strict=True):
        assert message in one_line_error(cli, "qlis-iqa: error: ", *command)
    assert sorted(p.name for p in (root / "images").iterdir()) == images
