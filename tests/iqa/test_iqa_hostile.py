"""Hostile inputs of qlis-iqa: crafted model descriptions, image bombs, damaged cache entries.

A crafted archive or checkpoint must be refused with one IQAError before the model it
describes is built; an image bomb is reported as an unreadable image; a damaged cache entry is
recomputed. No case may take noticeable memory or time.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iqa_helpers import write_image
from PIL import Image

import qlis
from qlis_iqa import features as features_module
from qlis_iqa import preprocess as preprocess_module
from qlis_iqa.backbones import random_backbone
from qlis_iqa.errors import IQAError
from qlis_iqa.features import FeatureCache, extract_features
from qlis_iqa.models import (
    check_declared_shapes,
    load_model,
    make_model,
    model_from_spec,
    save_checkpoint,
)
from qlis_iqa.preprocess import ImageReadError, for_family, read_image
from qlis_iqa.schema import ARCH_KEYS, parse_metadata
from qlis_iqa.score import score_images

CONFIG = "qlis_iqa.backbone_config"
PRE = "qlis_iqa.preprocess"


@pytest.fixture(scope="module")
def tiny() -> dict:
    """A tiny CLIP model, its metadata, its declared shapes and an 8-bit compression of it."""
    model = make_model("clip", random_backbone("clip", "tiny", seed=3))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return {
        "model": model,
        "meta": model.metadata(),
        "shapes": {k: tuple(v.shape) for k, v in state.items()},
        "result": qlis.compress(state, "quant", bits=8),
    }


def _with_config(meta: dict[str, str], **changes: object) -> dict[str, str]:
    config = json.loads(meta[CONFIG])
    config.update(changes)
    return {**meta, CONFIG: json.dumps(config)}


def _with_pre(meta: dict[str, str], **changes: object) -> dict[str, str]:
    pre = json.loads(meta[PRE])
    pre.update(changes)
    return {**meta, PRE: json.dumps(pre)}


def _cases(meta: dict[str, str]) -> list[tuple[dict[str, str], str]]:
    return [
        (_with_config(meta, hidden_size=2**20), "hidden_size .* out of bounds"),
        (_with_config(meta, image_size=10**6), "image_size .* out of bounds"),
        (_with_config(meta, num_hidden_layers=100000), "num_hidden_layers"),
        (_with_config(meta, hidden_size=True), "hidden_size"),
        (_with_config(meta, layer_norm_eps=float("nan")), "layer_norm_eps"),
        (_with_config(meta, attn_implementation="flash_attention_2"), "attn_implementation"),
        (_with_config(meta, _attn_implementation="flex_attention"), "attn_implementation"),
        (_with_config(meta, return_dict=False), "return_dict"),
        (_with_config(meta, hidden_act="os.system"), "hidden_act"),
        (_with_config(meta, model_type="vit"), "model_type"),
        (_with_config(meta, hidden_size=33), "not a multiple"),
        (_with_config(meta, patch_size=1, image_size=1024), "patches"),
        ({**meta, "qlis_iqa.head_hidden": "1000000000"}, "head_hidden"),
        ({**meta, "qlis_iqa.head_hidden": "-3"}, "head_hidden"),
        (_with_pre(meta, resample="lanczos9"), "resample"),
        (_with_pre(meta, size=0), "outside"),
        (_with_pre(meta, size=30000), "outside"),
        (_with_pre(meta, size=56), "differs from the backbone"),
        (_with_pre(meta, std=[0, 1, 1]), "std"),
        (_with_pre(meta, mean=[1, 2]), "mean"),
        ({**meta, PRE: "[" * 5000}, "preprocessing"),
        ({**meta, CONFIG: "[" * 50000}, "not JSON"),
        ({**meta, CONFIG: '{"hidden_size": ' + "9" * 5000 + "}"}, "not JSON"),
        ({**meta, CONFIG: "[]"}, "not a JSON object"),
        ({**meta, CONFIG: " " * 70000}, "characters"),
        ({**meta, "qlis_iqa.family": "resnet"}, "unknown model family"),
        ({**meta, "qlis_iqa.format": "2"}, "format"),
    ]


def test_hostile_descriptions_are_refused_before_building(tiny: dict) -> None:
    for meta, message in _cases(tiny["meta"]):
        with pytest.raises(IQAError, match=message):
            spec = parse_metadata(meta)
            check_declared_shapes(spec, tiny["shapes"], "x")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 3}, r"1\d* tensor\(s\) missing"),
        ({"num_hidden_layers": 1}, "unexpected tensor"),
        ({"hidden_size": 64, "intermediate_size": 128}, "of another shape"),
        ({"num_hidden_layers": 64, "hidden_size": 8192, "intermediate_size": 32768}, "parameters"),
    ],
)
def test_descriptions_must_match_the_declared_shapes(
    tiny: dict, changes: dict, message: str
) -> None:
    spec = parse_metadata(_with_config(tiny["meta"], **changes))
    with pytest.raises(IQAError, match=message):
        check_declared_shapes(spec, tiny["shapes"], "m.qlis")
    with pytest.raises(IQAError, match="of another shape"):
        spec = parse_metadata({**tiny["meta"], "qlis_iqa.head_hidden": "128"})
        check_declared_shapes(spec, tiny["shapes"], "m.qlis")


def test_hostile_archive_and_checkpoint_files(tiny: dict, tmp_path: Path) -> None:
    meta = _with_config(tiny["meta"], hidden_size=2**20)
    path = qlis.save(tiny["result"], tmp_path / "bad.qlis", metadata=meta)
    with pytest.raises(IQAError, match="out of bounds"):
        load_model(path)
    meta = _with_config(tiny["meta"], num_hidden_layers=4)
    ckpt = save_checkpoint(tiny["model"], tmp_path / "bad.safetensors", {CONFIG: meta[CONFIG]})
    with pytest.raises(IQAError, match="does not match the model it describes"):
        load_model(ckpt)
    good = qlis.save(tiny["result"], tmp_path / "good.qlis", metadata=tiny["meta"])
    model, _ = load_model(good)
    assert model.preprocess == tiny["model"].preprocess


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(0, 64), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
RUNTIME_KEYS = {"attn_implementation", "_attn_implementation", "return_dict", "pruned_heads"}
keys = st.sampled_from(sorted({*ARCH_KEYS["clip"], *RUNTIME_KEYS, "model_type", "torchscript"}))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(keys, json_values, min_size=1, max_size=3))
def test_fuzzed_configs_raise_only_iqa_errors(tiny: dict, changes: dict) -> None:
    try:
        spec = parse_metadata(_with_config(tiny["meta"], **changes))
        check_declared_shapes(spec, tiny["shapes"], "fuzz")
    except IQAError:
        return
    model = model_from_spec(spec)  # accepted: it is exactly the stored architecture
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == tiny["shapes"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height grey pixels, with one byte of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_image_bombs_are_unreadable_images(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(9000, 9000))  # 81 M pixels: under PIL's own limit
    with pytest.raises(ImageReadError, match="at most"):
        read_image(bomb)
    thin = tmp_path / "thin.png"
    Image.new("L", (1, 100000)).save(thin)
    assert thin.stat().st_size < 2000
    image = read_image(thin)  # decoding 100,000 pixels is fine; resizing to 22.4M x 224 is not
    with pytest.raises(ImageReadError, match="aspect ratio"):
        for_family("clip", 224)(image)
    assert for_family("dino", 32)(image).shape == (3, 32, 32)  # a square resize is harmless


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_whatever_a_format_plugin_raises_makes_an_unreadable_image(tmp_path: Path) -> None:
    dds = bytearray(128)  # a DDS header whose pixel format PIL does not know
    dds[0:4] = b"DDS "
    struct.pack_into("<7I", dds, 4, 124, 0x1007, 8, 8, 0, 0, 0)
    struct.pack_into("<2I", dds, 76, 32, 0x2000)
    (tmp_path / "dds.png").write_bytes(bytes(dds) + bytes(256))  # NotImplementedError
    pixels = zlib.compress(bytes(range(256)) * 23)  # rows of 48 x 3 bytes and a filter byte
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 48, 40, 8, 2, 0, 0, 0))
    split = (b"\x89PNG\r\n\x1a\n" + header
             + _png_chunk(b"IDAT", pixels[:40]) + _png_chunk(b"\0\0IE", pixels[40:])
             + _png_chunk(b"IEND", b""))
    (tmp_path / "split.png").write_bytes(split)  # SyntaxError: a damaged chunk type
    for name in ("dds.png", "split.png"):
        with pytest.raises(ImageReadError, match=f"{name}: unreadable"):
            read_image(tmp_path / name)


def test_header_bound_is_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(tmp_path / "a.png", 0, size=(48, 40))
    monkeypatch.setattr(preprocess_module, "MAX_IMAGE_PIXELS", 48 * 40 - 1)
    with pytest.raises(ImageReadError, match="48x40 pixels"):
        read_image(path)


def test_scoring_goes_on_past_image_bombs(tiny: dict, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = [write_image(folder / f"{i}.png", i) for i in range(2)]
    Image.new("L", (1, 100000)).save(folder / "thin.png")
    (folder / "bomb.png").write_bytes(_png_header(9000, 9000))
    paths = [*good, folder / "thin.png", folder / "bomb.png"]
    scores = score_images(tiny["model"], paths, batch_size=4)
    assert sorted(scores.scores) == [0, 1]
    assert "thin.png" in scores.errors[2] and "aspect ratio" in scores.errors[2]
    assert "unreadable" in scores.errors[3]


def test_features_cached_by_an_older_decoding_are_not_served(tmp_path: Path,
                                                             monkeypatch) -> None:
    model = make_model("dino", random_backbone("dino", "tiny"))
    cache = FeatureCache(tmp_path / "cache")
    current = cache.folder(model)
    monkeypatch.setattr(features_module, "DECODING", features_module.DECODING - 1)
    assert cache.folder(model) != current  # e.g. 16-bit PNGs once read clipped


def test_damaged_cache_entries_are_recomputed(tmp_path: Path) -> None:
    model = make_model("dino", random_backbone("dino", "tiny"))
    folder = tmp_path / "img"
    folder.mkdir()
    paths = [write_image(folder / f"{i}.png", i) for i in range(4)]
    cache = FeatureCache(tmp_path / "cache")
    first = extract_features(model, paths, cache)
    entries = sorted(cache.folder(model).glob("*.npy"))
    assert len(entries) == 4
    np.save(entries[0], np.zeros((3, 5), dtype=np.float32))  # wrong shape
    np.save(entries[1], first.values[0].numpy().astype(np.float64))  # wrong dtype
    entries[2].write_bytes(entries[2].read_bytes()[:100])  # truncated
    again = extract_features(model, paths, cache)
    assert (again.computed, again.cached) == (3, 1)
    assert torch.equal(again.values, first.values)
    assert extract_features(model, paths, cache).cached == 4  # rewritten correctly


def test_importing_the_package_does_not_import_transformers() -> None:
    code = (
        "import sys\n"
        "import qlis_iqa.evaluate, qlis_iqa.features, qlis_iqa.models, qlis_iqa.pack\n"
        "import qlis_iqa.schema, qlis_iqa.score, qlis_iqa.sweep, qlis_iqa.train\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
