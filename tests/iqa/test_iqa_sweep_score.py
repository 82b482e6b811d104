"""The Table 1 sweep (rows, columns, outputs) and archive-based scoring of image folders."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from iqa_helpers import write_image

import qlis
from qlis_iqa.backbones import RANDOM_LABEL
from qlis_iqa.data import Split, load_agiqa3k, split_samples
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import predict_samples
from qlis_iqa.features import FeatureCache, image_loader
from qlis_iqa.models import load_model, load_state, model_from_metadata
from qlis_iqa.pack import calibration, pack
from qlis_iqa.score import list_images, score_folder, score_images
from qlis_iqa.sweep import (
    COSINE_LADDER,
    CSV_FIELDS,
    RDData,
    RefitData,
    _QualitySearch,
    extra_variants,
    paper_variants,
    pick_variants,
    rd_data,
    rd_variants,
    run_sweep,
    write_outputs,
)
from qlis_iqa.train import TrainConfig, refit_head

TABLE_1 = [
    "Baseline",
    "P level 1.5",
    "P level 1.0",
    "P level 0.5",
    "P level 0.25",
    "Q 1-bit",
    "Q 2-bit",
    "Q 4-bit",
    "Q 8-bit",
    "LAP",
    "LAQ",
    "LAPQ",
]


def test_variants() -> None:
    assert [v.name for v in paper_variants()] == TABLE_1
    extra = extra_variants(per_channel=True, paper_crs=[20.0])
    assert [v.name for v in extra] == [
        "LAQ [channel]",
        "LAPQ [channel]",
        "LAPQ [budget 20x, channel]",
    ]
    assert extra[-1].options == {"paper_cr": 20.0, "granularity": "channel"}
    assert [v.name for v in pick_variants(paper_variants(), "lapq, baseline")] == [
        "Baseline",
        "LAPQ",
    ]
    with pytest.raises(IQAError, match="unknown row"):
        pick_variants(paper_variants(), "LAPQ,foo")
    with pytest.raises(IQAError, match="paper-cr"):
        extra_variants(paper_crs=[0.5])
    picked = pick_variants(extra, "LAPQ [budget 20x, channel], laq [channel]")  # a comma inside
    assert [v.name for v in picked] == ["LAQ [channel]", "LAPQ [budget 20x, channel]"]
    for crs in ([3, 3], [3, 3.0000001]):  # one archive, two rows of the table
        with pytest.raises(IQAError, match="two rows are named alike"):
            pick_variants(extra_variants(paper_crs=crs), None)


def _test_samples(run) -> list:
    _, meta = load_model(run.checkpoint)
    ds = load_agiqa3k(meta["qlis_iqa.dataset_root"])
    return split_samples(ds, run.predictions.names)[0]


def test_sweep_rows_columns_and_outputs(runs: dict, tmp_path: Path) -> None:
    run = runs["clip"]
    variants = paper_variants() + extra_variants(per_channel=True, paper_crs=[8.0])
    rows = run_sweep(
        run.model,
        _test_samples(run),
        tmp_path,
        variants,
        FeatureCache(run.checkpoint.parent / "cache"),
        baseline_file=run.checkpoint,
        logistic=True,
        log=lambda m: None,
    )
    assert [r.variant for r in rows] == [v.name for v in variants]
    base = rows[0]
    assert (base.cr, base.hcr) == (1.0, 1.0) and base.srcc == pytest.approx(run.metrics["srcc"])
    assert base.file_bytes == run.checkpoint.stat().st_size
    for r in rows[1:]:
        assert r.test_images == 6 and r.backbone == RANDOM_LABEL and r.file_bytes > 0
        assert r.real_ratio == pytest.approx(base.real_ratio * base.file_bytes / r.file_bytes)
        assert r.cr >= 1.0 and r.hcr >= 1.0 and (tmp_path / "archives").is_dir()
    by = {r.variant: r for r in rows}
    assert by["Q 1-bit"].mean_bits == 1.0 and math.isnan(by["P level 1.0"].mean_bits)
    assert by["P level 1.5"].sparsity > by["P level 0.25"].sparsity > 0
    assert by["Q 2-bit"].cr > by["Q 8-bit"].cr
    assert by["LAPQ [budget 8x, channel]"].cr >= 8.0

    files = write_outputs(rows, tmp_path, f"CLIPIQA sweep [{RANDOM_LABEL}]", logistic=True)
    md = files["markdown"].read_text()
    assert RANDOM_LABEL in md.splitlines()[0] and "must not be compared" in md
    assert "| LAPQ [channel] |" in md and "PLCC (logistic)" in md
    with files["csv"].open() as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == CSV_FIELDS and len(table) == len(variants)
    assert {"srcc", "krcc", "plcc", "cr", "hcr", "real_ratio", "backbone"} <= set(CSV_FIELDS)
    assert {r["backbone"] for r in table} == {RANDOM_LABEL}
    assert files["plot"].stat().st_size > 1000


def test_the_low_bit_runtime_gives_the_same_srcc(runs: dict, tmp_path: Path) -> None:
    run = runs["dino"]
    variants = [v for v in paper_variants() if v.name in ("Q 8-bit", "Q 4-bit", "LAPQ")]
    kwargs = dict(cache=None, log=lambda m: None)
    floats = run_sweep(run.model, _test_samples(run), tmp_path / "f", variants, **kwargs)
    packed = run_sweep(run.model, _test_samples(run), tmp_path / "p", variants,
                       runtime="lowbit", **kwargs)
    for a, b in zip(floats, packed, strict=True):
        assert a.variant == b.variant and a.file_bytes == b.file_bytes
        assert b.srcc == pytest.approx(a.srcc, abs=1e-9)
        assert b.plcc == pytest.approx(a.plcc, abs=1e-4)


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_bfloat16_precision_scores_alike_in_both_runtimes(
    runs: dict, tmp_path: Path, sample_root: Path, family: str
) -> None:
    """bfloat16 inference rounds the same backbone matmuls whether the layers are packed or
    not, stays near float32, and never shares feature-cache entries with float32."""
    packed = pack(runs[family].model, tmp_path / "m.qlis", "quant", bits=8)
    images = list_images(sample_root / "images")[:6]
    scores = {}
    for runtime in ("float", "lowbit"):
        for precision in ("float32", "bfloat16"):
            model, _ = load_model(packed.path, runtime, precision)
            scores[runtime, precision] = score_images(model, images, batch_size=3).scores
    # the head in float32 either way: its int8 path equals its float one to float rounding
    assert scores["lowbit", "bfloat16"] == pytest.approx(scores["float", "bfloat16"], rel=1e-5)
    exact, fast = scores["float", "float32"], scores["float", "bfloat16"]
    assert fast != exact
    for i, value in exact.items():
        assert fast[i] == pytest.approx(value, rel=0.05, abs=0.05)
    float32, _ = load_model(packed.path)
    assert float32.fingerprint() != float32.set_precision("bfloat16").fingerprint()
    with pytest.raises(IQAError, match="precision"):
        load_model(packed.path, precision="float16")


def test_bfloat16_precision_runs_the_head_in_float32(runs: dict, sample_root: Path) -> None:
    """Only the backbone's matmuls round to bfloat16: the score itself kept 8 bits."""
    model = copy.deepcopy(runs["clip"].model).set_precision("bfloat16").eval()
    images = list_images(sample_root / "images")[:4]
    _, pixels, _ = next(iter(image_loader(images, model.preprocess, 4, 0)))
    with torch.no_grad():
        with model.inference_context():
            features = model.frozen_forward(pixels)
            mixed = model.trainable_forward(features)
        assert torch.equal(mixed, model.trainable_forward(features.float()))


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_archive_scoring_equals_in_memory(
    runs: dict, tmp_path: Path, sample_root: Path, family: str
) -> None:
    run = runs[family]
    packed = pack(run.model, tmp_path / "m.qlis", "lapq", granularity="channel")
    assert packed.real_ratio > 1.0
    in_memory = model_from_metadata(run.model.metadata())
    load_state(in_memory, packed.result.state_dict())
    from_archive, meta = load_model(packed.path)
    assert meta["qlis_iqa.policy"] == "lapq" and meta["qlis_iqa.backbone"] == RANDOM_LABEL
    state = qlis.load(packed.path)
    for name, tensor in packed.result.state_dict().items():
        assert torch.equal(state[name], tensor), name
    images = list_images(sample_root / "images")
    a = score_images(in_memory, images, batch_size=4)
    b = score_images(from_archive, images, batch_size=4)
    assert a.scores == b.scores and len(a.scores) == 12  # bit-identical weights, same batches
    # the sweep's cached path scores the same images the same way
    samples = _test_samples(run)
    cached = predict_samples(from_archive, samples, FeatureCache(tmp_path / "cache"))
    full = {images[i].name: s for i, s in b.scores.items()}
    for name, pred in zip(cached.names, cached.pred, strict=True):
        assert pred == pytest.approx(full[name], abs=1e-5)


def test_score_folder_lists_bad_images(runs: dict, tmp_path: Path, sample_root: Path) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(sample_root / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write_image(folder / "sub" / "deep.png", 5)
    archive = pack(runs["dino"].model, tmp_path / "m.qlis", "lapq").path
    scores, label = score_folder(folder, archive, tmp_path / "scores.csv", batch_size=4)
    assert label == RANDOM_LABEL and len(scores.scores) == 12 and len(scores.errors) == 1
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and {r["backbone"] for r in rows} == {RANDOM_LABEL}
    bad = [r for r in rows if r["error"]]
    assert [r["image"] for r in bad] == ["broken.jpg"] and bad[0]["score"] == ""
    deep, _ = score_folder(folder, archive, tmp_path / "all.csv", recursive=True)
    assert len(deep.scores) == 13
    (tmp_path / "empty").mkdir()
    with pytest.raises(IQAError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(IQAError, match="no such folder"):
        list_images(tmp_path / "absent")


def test_an_image_memory_is_short_for_is_listed_unreadable_and_the_rest_scored(
    runs: dict, tmp_path: Path, sample_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError while decoding one large image was a traceback that ended the folder."""
    from qlis_iqa import features

    folder = shutil.copytree(sample_root / "images", tmp_path / "imgs")
    huge = sorted(folder.iterdir())[0]
    real = features.read_image

    def short_of_memory(path):
        if Path(path).name == huge.name:
            raise MemoryError
        return real(path)

    monkeypatch.setattr(features, "read_image", short_of_memory)
    archive = pack(runs["dino"].model, tmp_path / "m.qlis", "lapq").path
    scores, _ = score_folder(folder, archive, tmp_path / "scores.csv", batch_size=4)
    assert len(scores.scores) == 11
    assert list(scores.errors.values()) == [
        f"{huge}: unreadable (not enough memory to decode it)"]


def test_pack_checks_its_target_before_compressing(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = runs["clip"].model
    calls: list[str] = []
    compress = qlis.compress
    monkeypatch.setattr(qlis, "compress", lambda *a, **k: calls.append("run") or compress(*a, **k))
    with pytest.raises(IQAError, match="no such folder"):
        pack(model, tmp_path / "missing" / "m.qlis", "quant", bits=8)
    assert not (tmp_path / "missing").exists() and not calls
    first = pack(model, tmp_path / "m.qlis", "quant", bits=8)
    with pytest.raises(IQAError, match="exists; pass --force"):
        pack(model, tmp_path / "m.qlis", "quant", bits=4)
    assert len(calls) == 1 and first.path.stat().st_size == first.file_bytes
    assert (
        pack(model, tmp_path / "m.qlis", "quant", bits=4, overwrite=True).file_bytes
        < first.file_bytes
    )


def _train_samples(run) -> list:
    _, meta = load_model(run.checkpoint)
    ds = load_agiqa3k(meta["qlis_iqa.dataset_root"])
    return split_samples(ds, Split.load(meta["qlis_iqa.split_file"]).train)[0]


def test_calibration_is_centred_scores_of_training_images(runs: dict) -> None:
    run = runs["dino"]
    calib = calibration(run.model, _train_samples(run), images=5, batch_size=2)
    assert calib.images == 5 and [len(b) for b in calib.batches] == [2, 2, 1]
    out = calib(run.model)
    assert out.shape == (5,) and abs(float(out.sum())) < 1e-9
    with torch.no_grad():
        raw = torch.cat([run.model(b) for b in calib.batches]).double()
    torch.testing.assert_close(out, raw - raw.mean())


class _FakeSearch(_QualitySearch):
    """The search with a validation SRCC that passes from ladder index `first_ok` on."""

    def __init__(self, first_ok: int) -> None:
        self.first_ok, self.calls = first_ok, []
        self.baseline, self.memo = 0.8, {}
        self.rd = RDData(calib=None, validation=[None] * 4)

    def _validation_srcc(self, i: int) -> float:
        self.calls.append(i)
        self.memo[i] = 0.8 if i >= self.first_ok else 0.5
        return self.memo[i]


def test_quality_search_bisects_to_the_smallest_passing_target() -> None:
    for first_ok in range(len(COSINE_LADDER) + 1):
        search = _FakeSearch(first_ok)
        chosen, note = search.min_cosine_for(0.05)
        assert chosen == COSINE_LADDER[min(first_ok, len(COSINE_LADDER) - 1)]
        assert len(search.calls) <= 5
        assert ("not met" in note) == (first_ok == len(COSINE_LADDER))


def test_rd_rows_beside_the_paper_rows(runs: dict, tmp_path: Path) -> None:
    if "rd" not in qlis.policy_names():
        pytest.skip("this qlis has no policy 'rd' yet")
    run = runs["clip"]
    rd = rd_data(run.model, _train_samples(run), calib_images=3, val_images=4, batch_size=2)
    assert len(rd.validation) == 3 and rd.calib.images == 3  # 6 training images in all
    with pytest.raises(IQAError, match="too few"):
        rd_data(run.model, _train_samples(run)[:5])
    names = {s.name for s in rd.validation}
    assert not names & set(run.predictions.names)  # never the test split
    variants = pick_variants(paper_variants(), "Baseline,Q 8-bit") + rd_variants([4, 1e4], [0.05])
    messages: list[str] = []
    rows = run_sweep(
        run.model,
        _test_samples(run),
        tmp_path / "sweep",
        variants,
        FeatureCache(run.checkpoint.parent / "cache"),
        baseline_file=run.checkpoint,
        rd=rd,
        log=messages.append,
    )
    assert any(m.startswith("rd [10000x]: skipped (") for m in messages)  # out of reach
    by = {r.variant: r for r in rows}
    assert [r.kind for r in rows] == ["baseline", "paper", "rd", "rd"]
    ratio_row, drop_row = by["rd [4x]"], by["rd [SRCC -0.05]"]
    assert ratio_row.real_ratio >= 3.0  # the target counts archive bytes; our metadata adds some
    assert "min_cosine=" in drop_row.options and "validation SRCC" in drop_row.options
    files = write_outputs(rows, tmp_path / "sweep", "CLIPIQA rd")
    md = files["markdown"].read_text()
    assert "SRCC vs real archive ratio" in md and "| rd | rd [4x] |" in md
    with pytest.raises(IQAError, match="SRCC-drop"):
        run_sweep(run.model, [], tmp_path, rd_variants(srcc_drops=[0.1]), None, archives=False)


def test_sweep_says_why_a_row_has_no_correlation_and_logs_quality_warnings(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant whose model scores every test image alike has SRCC "—" in the table: the log
    says why beside the row; qlis' quality warnings are log lines, not Python warnings."""
    import warnings

    from qlis_iqa import sweep as sweep_module
    from qlis_iqa.sweep import Variant

    run = runs["clip"]
    real = sweep_module.compress_model

    def noisy(*args, **kwargs):
        result = real(*args, **kwargs)
        warnings.warn(qlis.QualityWarning("the size target is out of reach"), stacklevel=1)
        result.warnings.append("the size target is out of reach")
        return result

    monkeypatch.setattr(sweep_module, "compress_model", noisy)
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", qlis.QualityWarning)  # none may escape
        rows = run_sweep(
            run.model,
            _test_samples(run),
            tmp_path,
            [Variant("all pruned", "prune", {"k": 1e6})],
            FeatureCache(run.checkpoint.parent / "cache"),
            archives=False,
            logistic=True,
            log=messages.append,
        )
    assert math.isnan(rows[0].srcc)
    assert "all pruned: warning: the size target is out of reach" in messages
    assert any(m.startswith("all pruned: SRCC, KRCC, PLCC") and "same score" in m
               for m in messages), messages


def test_an_archive_over_its_size_target_is_a_log_line_not_a_python_warning(
    runs: dict, tmp_path: Path
) -> None:
    """qlis.save warns of a size target the archive missed (the model's metadata, which the
    plan does not count, on a tiny model); the sweep printed it as Python's warning."""
    import warnings

    run = runs["clip"]
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", qlis.QualityWarning)  # none may escape
        run_sweep(run.model, _test_samples(run), tmp_path / "sweep", rd_variants([8]),
                  FeatureCache(run.checkpoint.parent / "cache"), log=messages.append)
    assert any(m.startswith("rd [8x]: warning: the archive is ") and "over the size target"
               in m for m in messages), messages


def test_constant_output_flags_a_compression_that_scores_every_image_alike(
    runs: dict, tmp_path: Path
) -> None:
    """`compress` warns when its calibrated result gives every calibration image the same score
    (qlis then reads cosine 0, which is no correlation): `constant_output` finds it."""
    from qlis_iqa.pack import compress_model, constant_output

    run = runs["clip"]
    calib = calibration(run.model, _train_samples(run), images=4, batch_size=2)
    flat = compress_model(run.model, "prune", calib=calib, k=1e6)  # every weight pruned
    assert constant_output(flat)
    kept = compress_model(run.model, "quant", calib=calib, bits=8)
    assert not constant_output(kept)
    assert not constant_output(compress_model(run.model, "quant", bits=8))  # data-free


def test_quality_search_with_an_undefined_baseline_says_so() -> None:
    """Validation images that all have the same MOS: the baseline SRCC is nan, so no drop can be
    measured; the search takes the ladder's top at no compression cost and says why (not
    'not met', which reads as a measured failure)."""
    search = _FakeSearch(0)
    search.baseline = math.nan
    chosen, note = search.min_cosine_for(0.05)
    assert chosen == COSINE_LADDER[-1] and search.calls == []
    assert "undefined" in note and "cannot be measured" in note and "not met" not in note


@pytest.mark.parametrize("family", ["clip", "dino"])
def test_a_refit_head_row_beside_each_rd_row(runs: dict, tmp_path: Path, family: str) -> None:
    """The refit row's archive holds the rd row's backbone to the bit and a head trained
    again from the float model's on the compressed backbone's outputs, stored as rd stored
    the head it replaces."""
    run = runs[family]
    rd = rd_data(run.model, _train_samples(run), calib_images=3, val_images=3, batch_size=2)
    refit = RefitData(_train_samples(run), TrainConfig(epochs=3, batch_size=2, lr=1e-2))
    variants = pick_variants(paper_variants(), "Q 8-bit") + rd_variants([4])
    rows = run_sweep(run.model, _test_samples(run), tmp_path, variants, None, rd=rd,
                     refit=refit, log=lambda m: None)
    assert [(r.variant, r.kind) for r in rows] == [
        ("Q 8-bit", "paper"), ("rd [4x]", "rd"), ("rd [4x] + head refit", "refit")]
    plain = qlis.load(tmp_path / "archives" / "rd-4x.qlis")
    refitted = qlis.load(tmp_path / "archives" / "rd-4x-head-refit.qlis")
    assert plain.keys() == refitted.keys()
    head = [k for k in plain if k.startswith("head.")]
    assert head and all(torch.equal(plain[k], refitted[k]) for k in plain if k not in head)
    float_head = run.model.head.state_dict()
    for name in head:
        assert not torch.equal(refitted[name], plain[name])
        assert not torch.equal(refitted[name], float_head[name.removeprefix("head.")])
    assert rows[2].file_bytes == pytest.approx(rows[1].file_bytes, rel=0.05)  # head as rd's
    stored = predict_samples(load_model(tmp_path / "archives" / "rd-4x-head-refit.qlis")[0],
                             _test_samples(run), None).metrics()
    assert rows[2].plcc == pytest.approx(stored["plcc"], abs=1e-6)  # scored as stored
    assert "head refit" in write_outputs(rows, tmp_path, "refit")["markdown"].read_text()
    with pytest.raises(IQAError, match="no training image"):
        refit_head(run.model, torch.zeros(0, *run.model.feature_shape), torch.zeros(0))


def test_the_low_bit_runtime_scores_a_refit_row_as_its_archive_says(runs: dict,
                                                                    tmp_path: Path) -> None:
    run = runs["dino"]
    rd = rd_data(run.model, _train_samples(run), calib_images=3, val_images=3, batch_size=2)
    refit = RefitData(_train_samples(run), TrainConfig(epochs=2, batch_size=2, lr=1e-2))
    kwargs = dict(cache=None, rd=rd, refit=refit, log=lambda m: None)
    floats = run_sweep(run.model, _test_samples(run), tmp_path / "f", rd_variants([4]), **kwargs)
    packed = run_sweep(run.model, _test_samples(run), tmp_path / "p", rd_variants([4]),
                       runtime="lowbit", **kwargs)
    assert [r.kind for r in packed] == ["rd", "refit"]
    for a, b in zip(floats, packed, strict=True):
        assert a.variant == b.variant and a.file_bytes == b.file_bytes
        assert b.srcc == pytest.approx(a.srcc, abs=1e-9)


def test_refit_head_lowers_the_training_loss_and_trains_the_head_alone(runs: dict) -> None:
    model = model_from_metadata(runs["dino"].model.metadata())
    load_state(model, runs["dino"].model.state_dict())
    torch.manual_seed(0)
    features = torch.randn(16, *model.feature_shape)
    targets = torch.linspace(1, 5, 16)
    block = {k: v.clone() for k, v in model.blocks[-1].state_dict().items()}
    losses = refit_head(model, features, targets, TrainConfig(epochs=20, batch_size=8, lr=1e-2))
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, model.blocks[-1].state_dict()[k]) for k, v in block.items())
