"""Hostile inputs found by a fuzz run (2026-12-06): sheets openpyxl parses lazily, backbone
folders transformers cannot load, feature-cache entries that are no files, images whose
conversion or size would take gigabytes, names that are not UTF-8, eager attention."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, within_5_s
from iqa_helpers import write_image
from PIL import Image
from safetensors.torch import load_file, save_file

from qlis_iqa import preprocess as preprocess_module
from qlis_iqa.backbones import attention, load_backbone, save_random_backbone
from qlis_iqa.cli import cli
from qlis_iqa.data import load_agiqa1k
from qlis_iqa.errors import IQAError
from qlis_iqa.features import FeatureCache
from qlis_iqa.preprocess import ImageReadError, read_image, to_rgb
from qlis_iqa.score import Scores


def _sheet(cell: str) -> bytes:
    """An .xlsx of a header and one row whose score cell holds ``cell`` as a number."""
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Image", "MOS"])  # AGIQA-1K's columns
    book.active.append(["a.jpg", 1.5])
    packed = io.BytesIO()
    book.save(packed)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(packed.getvalue())) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data.replace(b"<v>1.5</v>", f"<v>{cell}</v>".encode())
            dst.writestr(item, data)
    return out.getvalue()


def test_a_sheet_whose_cells_openpyxl_cannot_parse_is_refused_in_one_line(tmp_path: Path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "AIGC_MOS_Zscore.xlsx").write_bytes(_sheet("abc"))
    with pytest.raises(IQAError, match="not a readable .xlsx file"):
        load_agiqa1k(root)


def test_a_fifo_in_the_feature_cache_is_recomputed_not_waited_on(tmp_path: Path):
    os.mkfifo(tmp_path / "key.npy")
    got = within_5_s(lambda: repr(FeatureCache.get(tmp_path, "key", (4,))), tmp_path / "key.npy")
    assert got == "None"


@pytest.mark.parametrize("case", ["damaged weights", "index outside", "deep config",
                                  "huge config"])
def test_backbone_folders_that_cannot_load_are_one_line(tmp_path: Path, case: str):
    folder = save_random_backbone("clip", tmp_path / "bb")
    if case == "damaged weights":
        (folder / "model.safetensors").write_bytes(os.urandom(256))
    elif case == "index outside":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"x": "../../etc/passwd"}}))
    elif case == "deep config":
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "pad": "x" * (1 << 20)}))
    with pytest.raises(IQAError, match="backbone config|cannot be loaded"):
        load_backbone("clip", folder)


def test_half_precision_weights_run_on_float32_inputs_with_sdpa(tmp_path: Path):
    folder = save_random_backbone("dino", tmp_path / "bb")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(
        {**config, "dtype": "float16", "attn_implementation": "eager"}))
    backbone = load_backbone("dino", folder)
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert backbone.config._attn_implementation == attention("dino") == "sdpa"
    size = backbone.config.image_size
    assert torch.isfinite(backbone(torch.randn(1, 3, size, size)).last_hidden_state).all()


def test_a_deep_grey_image_converts_a_slice_at_a_time_to_the_same_pixels(monkeypatch):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 65535, (37, 29)).astype(np.int32), "I")
    whole = np.asarray(to_rgb(image))
    monkeypatch.setattr(preprocess_module, "_CONVERTED_AT_ONCE", 100)
    assert np.array_equal(np.asarray(to_rgb(image)), whole)


def test_an_image_file_past_the_size_bound_is_not_read(tmp_path: Path, monkeypatch):
    path = write_image(tmp_path / "a.png", 0)
    monkeypatch.setattr(preprocess_module, "MAX_IMAGE_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ImageReadError, match="bytes; at most"):
        read_image(path)


def test_names_that_are_not_utf8_are_refused_or_escaped(tmp_path: Path):
    root = os.fsdecode(bytes(tmp_path) + b"/ds\xff")
    line = one_line_error(cli, "qlis-iqa: error:", "train", "--family", "clip", "--root",
                          root, "-o", tmp_path / "run")
    assert "not valid UTF-8" in line
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xe9.png"))
    scores = Scores([odd], {0: 0.5})
    out = scores.write_csv(tmp_path / "out.csv", tmp_path, "label")
    assert "\\udce9.png,0.500000" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("option", [["sweep", "--rd-ratio", "1e308"],
                                    ["score", "--batch-size", "99999999999999999999"]])
def test_options_past_any_use_are_refused_before_work(tmp_path: Path, option: list[str]):
    command, *values = option
    args = {"sweep": [tmp_path, "-o", tmp_path / "sw"],
            "score": [tmp_path, "--model", tmp_path / "m.qlis", "-o", tmp_path / "s.csv"]}
    line = one_line_error(cli, "qlis-iqa: error:", command, *args[command], *values)
    assert "is not in the range" in line
