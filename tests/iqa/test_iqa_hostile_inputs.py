"""Hostile user inputs of qlis-iqa: annotation files, split files, options and outputs.

An annotation or split file is read bounded (no FIFO blocks, no device fills memory), its rows
checked (finite scores, names inside the images folder, one score per name); options are
range-checked by their types; no output may be an input, even with --force; a failed training
run leaves nothing it made behind. Each case is one clear error, never a traceback or a hang.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run, within_5_s
from iqa_helpers import make_agiqa3k

from qlis import QlisError
from qlis_iqa import data as data_module
from qlis_iqa import evaluate, score
from qlis_iqa.cli import MAX_WORKERS, cli
from qlis_iqa.data import Split, load_agiqa1k, load_agiqa3k, make_split
from qlis_iqa.errors import IQAError
from qlis_iqa.evaluate import eval_set_for, skipped_report
from qlis_iqa.sweep import paper_variants, pick_variants, rd_variants
from qlis_iqa.train import TrainConfig, train_run


def refused(*args: object) -> str:
    return one_line_error(cli, "qlis-iqa: error: ", *args)


def _annotate(root: Path, rows: list[tuple[str, str]]) -> Path:
    """An AGIQA-3K folder (two real images) whose data.csv holds `rows` (name, score) after
    its own two."""
    make_agiqa3k(root, 2)
    with (root / "data.csv").open("a", newline="") as f:
        csv.writer(f).writerows([name, "a prompt", score, "0.5"] for name, score in rows)
    return root


def test_annotation_files_that_are_not_utf8_csv(tmp_path: Path) -> None:
    root = _annotate(tmp_path / "d", [])
    with (root / "data.csv").open("ab") as f:
        f.write(b"caf\xe9.jpg,1.0\n")
    with pytest.raises(IQAError, match=r"row 4: not UTF-8 text"):
        load_agiqa3k(root)
    (root / "data.csv").write_bytes(os.urandom(4096))
    with pytest.raises(IQAError, match="not UTF-8 text"):
        load_agiqa3k(root)
    _annotate(tmp_path / "long", [("a" * 200_000, "1.0")])
    with pytest.raises(IQAError, match=r"row 4: not readable as CSV \(field larger"):
        load_agiqa3k(tmp_path / "long")


def test_an_annotation_sheet_that_unpacks_past_the_bound_is_refused(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A zip bomb: a few KiB of .xlsx whose sheet inflates to megabytes (gigabytes in the wild)
    is refused from its declared sizes, before openpyxl inflates anything."""
    root = tmp_path / "d"
    root.mkdir()
    with zipfile.ZipFile(root / "AIGC_MOS_Zscore.xlsx", "w", zipfile.ZIP_DEFLATED) as sheet:
        sheet.writestr("xl/worksheets/sheet1.xml", b"0" * (2 << 20))
    assert (root / "AIGC_MOS_Zscore.xlsx").stat().st_size < 64 << 10
    monkeypatch.setattr(data_module, "MAX_XLSX_UNPACKED_BYTES", 1 << 20)
    with pytest.raises(IQAError, match="unpacks to 2.00 MiB, more than the 1.00 MiB"):
        load_agiqa1k(root)
    (root / "AIGC_MOS_Zscore.xlsx").write_bytes(b"PK not a zip")
    with pytest.raises(IQAError, match="not a readable .xlsx"):
        load_agiqa1k(root)


def test_annotation_files_are_read_bounded(tmp_path: Path, monkeypatch) -> None:
    root = make_agiqa3k(tmp_path / "d", 2)
    monkeypatch.setattr(data_module, "MAX_ANNOTATION_BYTES", 64)
    with pytest.raises(QlisError, match="larger than 64 B"):
        load_agiqa3k(root)
    monkeypatch.undo()
    (root / "data.csv").unlink()
    (root / "data.csv").symlink_to("/dev/zero")
    with pytest.raises(QlisError, match="not a regular file"):
        load_agiqa3k(root)
    (root / "data.csv").unlink()
    os.mkfifo(root / "data.csv")

    def read() -> str:
        with pytest.raises(QlisError, match="not a regular file") as err:
            load_agiqa3k(root)
        return str(err.value)

    within_5_s(read, root / "data.csv")


@pytest.mark.parametrize("score", ["1e39", "-1e300", "1000000001"])
def test_scores_past_any_rating_scale_are_refused(tmp_path: Path, score: str) -> None:
    root = _annotate(tmp_path, [("sd1.5_normal_000.jpg", score)])
    with pytest.raises(IQAError, match=rf"row 4: score '{score}' is past any rating scale"):
        load_agiqa3k(root)


@pytest.mark.parametrize("score", ["nan", "inf", "-Infinity"])
def test_scores_must_be_finite(tmp_path: Path, score: str) -> None:
    root = _annotate(tmp_path, [("sd1.5_normal_000.jpg", score)])
    with pytest.raises(IQAError, match=rf"row 4: score '{score}' is not a finite number"):
        load_agiqa3k(root)


@pytest.mark.parametrize("score", ["4_5", "\u0661\u0662", "0x10", "4.5.1"])
def test_scores_are_ascii_decimal_numbers(tmp_path: Path, score: str) -> None:
    """float() read "4_5" as 45 and Arabic-Indic digits as a number."""
    root = _annotate(tmp_path, [("sd1.5_normal_000.jpg", score)])
    with pytest.raises(IQAError, match=r"row 4: score .* is not a number"):
        load_agiqa3k(root)


@pytest.mark.parametrize("spelling", ["./sd1.5_normal_001.jpg", ".//sd1.5_normal_001.jpg"])
def test_one_image_spelled_twice_is_one_sample(tmp_path: Path, spelling: str) -> None:
    """"./NAME" and "NAME" were two samples of one file: one could train, the other test."""
    root = _annotate(tmp_path, [(spelling, "2.5")])
    ds = load_agiqa3k(root)
    assert sorted(s.name for s in ds.samples) == ["sd1.5_normal_000.jpg", "sd1.5_normal_001.jpg"]
    root = _annotate(tmp_path / "other", [(spelling, "4.5")])
    ds = load_agiqa3k(root)
    assert [s.name for s in ds.samples] == ["sd1.5_normal_000.jpg"]
    assert "annotated twice with different scores" in ds.missing_report()


@pytest.mark.parametrize("name", ["../data.csv", "/etc/hostname", "sub/../../x.jpg"])
def test_image_names_must_stay_in_the_images_folder(tmp_path: Path, name: str) -> None:
    root = _annotate(tmp_path, [(name, "1.0")])
    with pytest.raises(IQAError, match="row 4: image name .* leaves the images folder"):
        load_agiqa3k(root)


def test_a_file_whose_every_name_is_scored_twice_says_so(tmp_path: Path) -> None:
    """It said that none of the annotated images was in the images folder, where all were."""
    root = make_agiqa3k(tmp_path, 2)
    names = sorted(p.name for p in (root / "images").iterdir())
    with (root / "data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["name", "mos_quality"], *([n, s] for n in names
                                                             for s in ("1.0", "2.0"))])
    with pytest.raises(IQAError, match="every image of .* is annotated twice with different "
                                       "scores .*rows 2 and 3"):
        load_agiqa3k(root)


@pytest.mark.parametrize("name", ["y" * 300 + ".jpg", "d/" * 3000 + "a.jpg"])
def test_names_no_file_can_have_are_missing_images(tmp_path: Path, name: str) -> None:
    """A name part over 255 bytes (or a path past PATH_MAX) was an OSError ending the load."""
    root = _annotate(tmp_path, [(name, "2.5")])
    ds = load_agiqa3k(root)
    assert len(ds.samples) == 2 and ds.missing == [name]


def test_reports_of_very_long_names_stay_short(tmp_path: Path) -> None:
    """A CSV field may be 131,072 characters: five missing or twice-scored such names made
    one report line of hundreds of kilobytes."""
    long = ["x" * 100_000 + f"{i}.jpg" for i in range(5)]
    root = _annotate(tmp_path, [(n, "2.5") for n in long] + [(long[0], "3.5")])
    report = load_agiqa3k(root).missing_report()
    assert "4 annotated image(s) missing" in report and "annotated twice" in report
    assert max(map(len, report.splitlines())) < 1000
    assert len(skipped_report("test", [(n, "unreadable") for n in long])) < 1000


def test_names_scored_twice_differently_are_skipped_and_reported(tmp_path: Path) -> None:
    root = _annotate(tmp_path, [("sd1.5_normal_000.jpg", "4.5"), ("sd1.5_normal_001.jpg", "2.5")])
    ds = load_agiqa3k(root)
    assert [s.name for s in ds.samples] == ["sd1.5_normal_001.jpg"]  # same score twice: kept
    report = ds.missing_report()
    assert "1 image(s) annotated twice with different scores" in report
    assert "'sd1.5_normal_000.jpg' in rows 2 and 4" in report


def test_split_files_are_read_bounded(tmp_path: Path, runs: dict) -> None:
    with pytest.raises(QlisError, match="not a regular file"):
        Split.load("/dev/zero")
    fifo = tmp_path / "split.json"
    os.mkfifo(fifo)
    meta = {"qlis_iqa.dataset": "agiqa-3k", "qlis_iqa.dataset_root": str(tmp_path),
            "qlis_iqa.split_file": str(fifo)}

    def read() -> str:
        with pytest.raises(QlisError, match="not a regular file") as err:
            eval_set_for(meta)
        return str(err.value)

    within_5_s(read, fifo)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--lr", "nan"), ("--lr", "-1"), ("--lr", "1e300"), ("--lr", "inf"),
     ("--weight-decay", "nan"), ("--weight-decay", "-5"), ("--seed", str(10**23)),
     ("--workers", "100000"), ("--test-fraction", "nan"), ("--epochs", str(10**9)),
     ("--split-seed", "-1")],
)
def test_train_options_are_range_checked(tmp_path: Path, option: str, value: str) -> None:
    line = refused("train", "--family", "clip", "--root", tmp_path, "-o", tmp_path / "r",
                   option, value)
    assert f"Invalid value for '{option}'" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args",
    [["evaluate", "m.safetensors", "--workers", "100000"],
     ["score", ".", "--model", "m", "-o", "s.csv", "--workers", str(MAX_WORKERS + 1)],
     ["sweep", "m", "-o", "s", "--rd-ratio", "inf"],
     ["sweep", "m", "-o", "s", "--workers", "100000"],
     ["compress", "m", "-o", "m.qlis", "--target-ratio", "nan"],
     ["compress", "m", "-o", "m.qlis", "--beta", "nan"]],
)
def test_other_options_are_range_checked(args: list[str]) -> None:
    assert "Invalid value for" in refused(*args)


def test_a_head_refit_without_rd_rows_is_refused(model_file: Path, tmp_path: Path) -> None:
    line = refused("sweep", model_file, "-o", tmp_path / "s", "--refit-head", "--only",
                   "Baseline,LAPQ")
    assert "--refit-head refits the head of the rd rows, and none is selected" in line
    assert not (tmp_path / "s").exists()


def test_sweep_selection_and_ratios() -> None:
    with pytest.raises(IQAError, match="names no row"):
        pick_variants(paper_variants(), ",")
    with pytest.raises(IQAError, match="finite number >= 1"):
        rd_variants([float("inf")])


def test_no_input_is_an_output(tmp_path: Path, runs: dict, sample_root: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    annotations = (root / "data.csv").read_bytes()
    model = runs["clip"].checkpoint
    line = refused("evaluate", model, "--root", root, "-o", root / "data.csv", "--force")
    assert "data.csv is one of the inputs" in line
    line = refused("sweep", model, "--root", root, "-o", root / "images" / "sw", "--only",
                   "Baseline")
    assert "is inside" in line and not (root / "images" / "sw").exists()
    assert (root / "data.csv").read_bytes() == annotations
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"keep")
    for output in (weights, root / "images"):
        line = refused("train", "--family", "clip", "--root", root, "--weights", weights,
                       "-o", output, "--force")
        assert f"{output} is an input folder" in line
    assert (weights / "model.safetensors").read_bytes() == b"keep"
    assert sorted(p.name for p in weights.iterdir()) == ["model.safetensors"]


def test_an_evaluation_that_fails_keeps_the_file_it_would_replace(tmp_path: Path, runs: dict,
                                                                     sample_root: Path) -> None:
    """The predictions replaced the user's file, then the metrics refused one image."""
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    model = runs["clip"].checkpoint
    split = json.loads((model.parent / "split.json").read_text())
    for name in split["test"][1:]:
        (root / "images" / name).write_bytes(b"")  # unreadable: skipped and reported
    kept = tmp_path / "mine.csv"
    kept.write_text("my predictions")
    result = run(cli, "evaluate", model, "--root", root, "-o", kept, "--force",
                 prog_name="qlis-iqa")
    assert result.exit_code == 2 and "need at least 2 images" in result.stderr
    assert kept.read_text() == "my predictions"


def test_a_failed_run_leaves_nothing_it_made(tmp_path: Path, backbones: dict) -> None:
    root = make_agiqa3k(tmp_path / "d", 6)
    scores = [[n, "1e9"] for n in sorted(p.name for p in (root / "images").iterdir())]
    with (root / "data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["name", "mos_quality"], *scores])
    config = TrainConfig(epochs=1, batch_size=2, lr=1e30)  # scores of 1e9: a NaN model
    with pytest.raises(IQAError, match="training diverged"):
        train_run("clip", "agiqa-3k", root, tmp_path / "run", backbones["clip"], config=config,
                  test_fraction=0.5, log=lambda m: None)
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    make_split("agiqa-3k", [s[0] for s in scores], test_fraction=0.5).save(kept / "old.json")
    with pytest.raises(IQAError, match="training diverged"):
        train_run("clip", "agiqa-3k", root, kept, backbones["clip"], config=config,
                  test_fraction=0.5, log=lambda m: None)
    with pytest.raises(IQAError, match="training diverged"):
        train_run("clip", "agiqa-3k", root, kept, backbones["clip"], config=config,
                  split_file=kept / "old.json", log=lambda m: None)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "old.json"]


def test_skipped_names_cannot_drive_the_terminal() -> None:
    """Names come from the user's files (a split file, data.csv): printed escaped."""
    line = skipped_report("test", [("a\x1b]52;c;aGk=\x07.png", "missing")])
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line


def test_calibration_without_its_training_images_names_them(tmp_path: Path, runs: dict,
                                                            sample_root: Path) -> None:
    """compress calibrates on the training images: their absence is what it reports, also
    when every test image is there."""
    run = runs["dino"]
    split = Split.load(run.split_file)
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    for name in split.train:
        (root / "images" / name).unlink()
    line = refused("compress", run.checkpoint, "--root", root, "--calib-images", "2",
                   "-o", tmp_path / "m.qlis")
    assert f"none of the {len(split.train)} training images" in line
    assert "--calib-images 0" in line and not (tmp_path / "m.qlis").exists()


@pytest.mark.parametrize("name", ["metrics.json", "model.safetensors"])
def test_a_new_split_file_is_not_one_the_run_writes(tmp_path: Path, backbones: dict,
                                                    sample_root: Path, name: str) -> None:
    """A new --split named as a run file: metrics.json replaced it (the run 'succeeded' and
    could not be evaluated), model.safetensors was refused once the run was done."""
    out = tmp_path / "run"
    out.mkdir()
    line = refused("train", "--family", "clip", "--root", sample_root, "--weights",
                   backbones["clip"], "-o", out, "--split", out / name, "--epochs", "1",
                   "--test-fraction", "0.5", "--no-progress")
    assert "is one of the files this run writes" in line
    assert list(out.iterdir()) == []


def test_an_output_that_appears_during_the_run_is_kept_without_force(
    tmp_path: Path, runs: dict, sample_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score and evaluate checked for an existing output before the work, then replaced
    whatever file had appeared there by the end of it, --force or not."""
    out = tmp_path / "out.csv"
    for module, name in ((score, "score_images"), (evaluate, "predict_samples")):
        real = getattr(module, name)

        def meanwhile(*args, real=real, **kwargs):
            out.write_text("someone else's")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, meanwhile)
    model = runs["clip"].checkpoint
    for args in (["score", sample_root / "images", "--model", model],
                 ["evaluate", model, "--root", sample_root]):
        out.unlink(missing_ok=True)
        line = refused(*args, "-o", out, "--no-progress")
        assert f"{out} exists; pass --force" in line
        assert out.read_text() == "someone else's"
        assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
