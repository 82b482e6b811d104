"""`qlis-iqa` end to end on the sample, and one-line errors with exit code 2 for user mistakes."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qlis
from qlis_iqa.backbones import RANDOM_LABEL
from qlis_iqa.cli import cli


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="qlis-iqa")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_train_evaluate_compress_score_sweep(tmp_path: Path, sample_root: Path) -> None:
    code, out, _ = invoke(
        "make-backbone", "--family", "dino", "--size", "tiny", "-o", tmp_path / "bb"
    )
    assert code == 0 and RANDOM_LABEL in out
    run = tmp_path / "run"
    code, out, _ = invoke(
        "train",
        "--family",
        "dino",
        "--root",
        sample_root,
        "--weights",
        tmp_path / "bb",
        "-o",
        run,
        "--epochs",
        "1",
        "--test-fraction",
        "0.5",
    )
    assert code == 0 and "SRCC" in out and RANDOM_LABEL in out
    code, out, _ = invoke("evaluate", run, "--logistic", "-o", tmp_path / "pred.csv")
    assert code == 0 and "PLCC LOGISTIC" in out and (tmp_path / "pred.csv").is_file()
    code, out, _ = invoke(
        "compress", run, "--policy", "quant", "--bits", "4", "-o", tmp_path / "m.qlis"
    )
    assert code == 0 and "real ratio" in out and RANDOM_LABEL in out
    code, out, _ = invoke(  # the default: rd, calibrated on training images
        "compress", run, "--calib-images", "4", "--target-ratio", "3", "-o", tmp_path / "rd.qlis"
    )
    assert code == 0 and "policy rd, calibrated on 4 training images" in out, out
    assert "output on the calibration data: cosine" in out
    code, out, _ = invoke(  # the same with the head trained again on the compressed backbone
        "compress", run, "--calib-images", "4", "--target-ratio", "3", "--refit-head", "-o",
        tmp_path / "refit.qlis"
    )
    assert code == 0 and "quality before the head refit: weight error" in out, out
    assert "head refit on 6 training images: the mean squared error of their scores" in out
    plain, refit = qlis.load(tmp_path / "rd.qlis"), qlis.load(tmp_path / "refit.qlis")
    assert all(torch.equal(plain[k], refit[k]) for k in plain if not k.startswith("head."))
    assert not torch.equal(plain["head.0.weight"], refit["head.0.weight"])
    code, out, _ = invoke("evaluate", tmp_path / "refit.qlis")
    assert code == 0 and "test (6 images)" in out
    code, out, _ = invoke("evaluate", tmp_path / "m.qlis")  # dataset and split from the archive
    assert code == 0 and "test (6 images)" in out
    code, out, _ = invoke(
        "score",
        sample_root / "images",
        "--model",
        tmp_path / "m.qlis",
        "-o",
        tmp_path / "scores.csv",
    )
    assert code == 0 and "scored 12 image(s), skipped 0" in out
    with (tmp_path / "scores.csv").open() as f:
        floats = list(csv.DictReader(f))
    assert len(floats) == 12
    code, out, _ = invoke(  # the same archive, its layers kept packed: the same scores
        "score", sample_root / "images", "--model", tmp_path / "m.qlis", "--runtime", "lowbit",
        "-o", tmp_path / "lowbit.csv",
    )
    assert code == 0, out
    with (tmp_path / "lowbit.csv").open() as f:
        packed = list(csv.DictReader(f))
    assert [r["image"] for r in packed] == [r["image"] for r in floats]
    for a, b in zip(floats, packed, strict=True):
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4 * (1 + abs(float(a["score"])))
    code, out, _ = invoke(  # packed and in bfloat16: near the float32 scores
        "score", sample_root / "images", "--model", tmp_path / "m.qlis", "--runtime", "lowbit",
        "--precision", "bfloat16", "-o", tmp_path / "bf16.csv",
    )
    assert code == 0, out
    with (tmp_path / "bf16.csv").open() as f:
        fast = list(csv.DictReader(f))
    for a, b in zip(floats, fast, strict=True):
        assert abs(float(a["score"]) - float(b["score"])) <= 0.05 * (1 + abs(float(a["score"])))
    code, out, _ = invoke(
        "sweep",
        run,
        "-o",
        tmp_path / "sweep",
        "--only",
        "Baseline,Q 8-bit,LAPQ,rd [3x]",
        "--per-channel",
        "--paper-cr",
        "6",
        "--rd-ratio",
        "3",
        "--calib-images",
        "3",
        "--val-images",
        "3",
        "--refit-head",
    )
    assert code == 0 and out.count(RANDOM_LABEL) >= 3
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| rd [3x] |" in md and "| rd [3x] + head refit |" in md
    assert (tmp_path / "sweep" / "archives" / "rd-3x-head-refit.qlis").is_file()
    assert {p.name for p in (tmp_path / "sweep").iterdir()} >= {
        "sweep.md",
        "sweep.csv",
        "sweep.png",
        "archives",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--family", "clip", "--root", "/no/such/dir", "-o", "x"],
            "/no/such/dir: no such dataset folder",
        ),
        (
            [
                "train",
                "--family",
                "dino",
                "--root",
                "{sample}",
                "-o",
                "{tmp}/r",
                "--weights",
                "{tmp}",
            ],
            "weights not found offline; looked in",
        ),
        (["evaluate", "{tmp}/none.qlis"], "no such model file"),
        (["score", "{tmp}", "--model", "{tmp}/none.qlis", "-o", "{tmp}/s.csv"], "no such model"),
        (["score", "{tmp}", "--model", "{sample}/data.csv", "-o", "{tmp}/s.csv"], "no image files"),
        (["sweep", "{sample}/data.csv", "-o", "{tmp}/s"], "not a safetensors checkpoint"),
    ],
)
def test_user_mistakes_are_one_line(
    tmp_path: Path, sample_root: Path, args: list[str], message: str
) -> None:
    filled = [a.format(sample=sample_root, tmp=tmp_path) for a in args]
    code, out, err = invoke(*filled)
    assert code == 2, err
    assert err.startswith("qlis-iqa: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_exit_2() -> None:
    code, _, err = invoke("train", "--family", "resnet")
    assert code == 2 and "resnet" in err


@pytest.mark.parametrize("policy", ["plan", "levels"])
def test_compress_offers_no_policy_its_flags_cannot_configure(policy: str, tmp_path) -> None:
    """--policy plan wrote the model uncompressed, exit 0."""
    code, _, err = invoke("compress", tmp_path / "m.safetensors", "-o", tmp_path / "m.qlis",
                          "--policy", policy)
    assert code == 2 and f"'{policy}' is not one of" in err


def test_a_failed_sweep_leaves_no_folder_to_block_its_rerun(
    runs: dict, tmp_path: Path, sample_root: Path
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(sample_root, damaged)
    for image in (damaged / "images").iterdir():
        image.write_bytes(b"junk")
    out = tmp_path / "sweep"
    code, _, err = invoke("sweep", runs["dino"].checkpoint, "-o", out, "--only", "Baseline",
                          "--root", damaged)
    assert code == 2 and "no readable image" in err and not out.exists()
    code, _, _ = invoke("sweep", runs["dino"].checkpoint, "-o", out, "--only", "Baseline",
                        "--root", sample_root)
    assert code == 0 and (out / "sweep.md").is_file()


def test_a_sweep_whose_every_row_is_skipped_writes_no_empty_table(
    runs: dict, tmp_path: Path, sample_root: Path
) -> None:
    out = tmp_path / "sweep"
    code, stdout, err = invoke("sweep", runs["dino"].checkpoint, "-o", out, "--only",
                               "LAPQ [budget 1000x]", "--paper-cr", "1000", "--root",
                               sample_root)
    assert code == 2 and "LAPQ [budget 1000x]: skipped (" in stdout
    assert err.strip() == ("qlis-iqa: error: every row of the sweep was skipped (the lines "
                           "above say why): no table is written")
    assert not out.exists()
