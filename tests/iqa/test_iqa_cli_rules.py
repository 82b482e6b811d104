"""`qlis-iqa` follows qlis's rules: paths and outputs checked before any work (and before
transformers is imported), no output replaced without --force, no missing folder created."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from cli_helpers import one_line_error, run
from safetensors import SafetensorError

import qlis_iqa.backbones as backbones
from qlis.cli.choices import codec_names
from qlis_iqa.backbones import random_backbone
from qlis_iqa.cli import cli
from qlis_iqa.data import load_dataset, make_split
from qlis_iqa.models import make_model, save_checkpoint


def invoke(*args: object):
    return run(cli, *args, prog_name="qlis-iqa")


def refused(*args: object) -> str:
    return one_line_error(cli, "qlis-iqa: error: ", *args)


def test_bad_paths_are_reported_before_transformers_is_imported(tmp_path: Path) -> None:
    commands = [
        ["evaluate", tmp_path / "none.qlis"],
        ["compress", tmp_path / "none", "-o", tmp_path / "x.qlis"],
        ["score", tmp_path / "no-images", "--model", tmp_path / "m.qlis", "-o", tmp_path / "s.csv"],
        ["train", "--family", "dino", "--root", tmp_path / "none", "-o", tmp_path / "r"],
        ["sweep", tmp_path / "none", "-o", tmp_path / "s"],
        ["make-backbone", "--family", "dino", "-o", tmp_path / "a" / "b"],
    ]
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from qlis_iqa.cli import cli\n"
        "codes = [CliRunner().invoke(cli, a).exit_code for a in json.loads(sys.argv[1])]\n"
        "print(json.dumps([codes, 'transformers' in sys.modules]))\n"
    )
    args = json.dumps([[str(a) for a in c] for c in commands])
    done = subprocess.run(
        [sys.executable, "-c", script, args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    codes, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(commands) and imported is False


def test_help_and_codec_choice_match_qlis() -> None:
    for args in (["-h"], ["compress", "-h"], ["sweep", "-h"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Usage:" in result.stdout
    help_text = " ".join(invoke("compress", "-h").stdout.split())
    assert "[" + "|".join(codec_names()) + "]" in help_text
    assert "-o, --output" in help_text


def test_compress_never_creates_a_folder_nor_replaces_a_file(tmp_path, model_file) -> None:
    line = refused("compress", model_file.parent, "-o", tmp_path / "nonexist" / "x.qlis")
    assert "nonexist: no such folder" in line
    assert not (tmp_path / "nonexist").exists()
    assert "must end in .qlis" in refused("compress", model_file.parent, "-o", model_file)
    existing = tmp_path / "old.qlis"
    existing.write_bytes(b"keep")
    assert "--force" in refused("compress", model_file, "-o", existing)
    assert "one of the inputs" in refused("compress", existing, "-o", existing, "--force")
    assert model_file.read_bytes() == b"checkpoint" and existing.read_bytes() == b"keep"


def test_score_and_evaluate_outputs(tmp_path, model_file, sample_root) -> None:
    images = tmp_path / "images"
    images.mkdir()
    photo = images / "photo.jpg"
    photo.write_bytes(b"jpeg")
    assert "must end in .csv" in refused("score", images, "--model", model_file, "-o", photo)
    csv = tmp_path / "scores.csv"
    csv.write_text("old")
    assert "exists" in refused("score", images, "--model", model_file, "-o", csv)
    assert "exists" in refused("evaluate", model_file.parent, "-o", csv)
    assert photo.read_bytes() == b"jpeg" and csv.read_text() == "old"


def test_folder_outputs_are_not_reused_without_force(tmp_path, model_file, sample_root) -> None:
    run = model_file.parent
    assert "--force" in refused("train", "--family", "dino", "--root", sample_root, "-o", run)
    assert "--force" in refused("make-backbone", "--family", "dino", "-o", run)
    assert "--force" in refused("sweep", model_file, "-o", run)
    assert model_file.read_bytes() == b"checkpoint"


def test_the_cache_is_not_the_output_folder_nor_a_file_written_there(tmp_path, model_file,
                                                                       sample_root) -> None:
    """A whole run was done before writing its model.safetensors onto the cache failed."""
    out = tmp_path / "out"
    for cache in (out, out / "model.safetensors", out / "metrics.json"):
        line = refused("train", "--family", "dino", "--root", sample_root, "-o", out,
                       "--cache-dir", cache)
        assert "give the cache a folder of its own" in line
    for cache in (out / "sweep.csv", out / "archives"):
        line = refused("sweep", model_file, "-o", out, "--cache-dir", cache)
        assert "give the cache a folder of its own" in line
    assert not out.exists()


def test_train_warns_when_the_stored_split_ignores_limit(tmp_path, model_file, sample_root):
    run = model_file.parent
    dataset = load_dataset("agiqa-3k", sample_root)
    make_split(dataset.name, [s.name for s in dataset.samples]).save(run / "split.json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    args = ["train", "--family", "dino", "--root", sample_root, "-o", run, "--weights", no_weights]
    result = invoke(*args, "--force", "--limit", "4")
    assert result.exit_code == 2  # then stops: there are no weights in that folder
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: ") and "limit 4 (stored: None)" in warning
    assert "weights not found" in error
    result = invoke(*args, "--force")
    assert "warning" not in result.stderr  # nothing asked that the stored split ignores
    assert model_file.read_bytes() == b"checkpoint"


def test_command_line_mistakes_are_one_line():
    """click's own errors follow the rule of library errors in qlis-iqa too."""
    for args in (["nope"], ["evaluate", "--bogus"], ["compress"], ["score", "--batch-size", "x"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qlis-iqa: error:"), result.stderr
        assert lines[0].endswith("-h')")


def test_a_missing_choice_option_is_one_line_too():
    result = invoke("train")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "Choose from: clip, dino" in lines[0]


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qlis_iqa.cli", "score", str(tmp_path / "absent"),
         "--model", str(tmp_path / "m.qlis"), "-o", str(tmp_path / "s.csv")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"qlis-iqa: error: {tmp_path / 'absent'}: no such folder of images"]


def test_compress_option_errors_name_the_flags(tmp_path, model_file) -> None:
    out = tmp_path / "x.qlis"
    cases = {  # checked before the model (a stand-in here) is read
        ("--target-ratio", "4", "--target-bits-per-weight", "3"):
            "give one target, not --target-bits-per-weight, --target-ratio",
        ("--policy", "quant", "--target-ratio", "2"): "pass --paper-cr",
        ("--policy", "rd", "--paper-cr", "5"): "unknown option(s) --paper-cr for policy 'rd'; "
                                               "see 'qlis-iqa compress -h'",
        ("--policy", "rd", "--bits", "4"): "--bits applies to --policy quant; policy 'rd'",
        # flags the library would take with another meaning: pruning added to quant, lapq's
        # levels replaced by one, prune rounding at a granularity it never uses
        ("--policy", "quant", "--k", "1"): "--k applies to --policy prune; policy 'quant'",
        ("--policy", "lapq", "--bits", "3"): "--bits applies to --policy quant; policy 'lapq'",
        ("--policy", "prune", "--granularity", "channel"):
            "--granularity applies to policies that quantize by bits",
    }
    for args, message in cases.items():
        line = refused("compress", model_file, "-o", out, *args)
        assert message in line, line
        assert "_" not in line.split(": error: ", 1)[1] and "qlis pack" not in line, line


def test_compress_errors_raised_while_packing_name_the_flags(tmp_path) -> None:
    model = save_checkpoint(make_model("dino", random_backbone("dino", "tiny")),
                            tmp_path / "m.safetensors")
    line = refused("compress", model, "-o", tmp_path / "x.qlis", "--policy", "quant",
                   "--bits", "2", "--paper-cr", "1000")
    assert "--paper-cr 1000.0 is out of reach for policy 'quant'" in line, line


def test_a_backbone_folders_files_follow_the_umask(tmp_path):
    """safetensors writes its weights file 0600: the folder was half private."""
    old = os.umask(0o022)
    try:
        assert invoke("make-backbone", "--family", "clip", "-o", tmp_path / "bb").exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "bb").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}


def test_a_backbone_that_cannot_be_written_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """save_pretrained writes config.json before the weights: where the weights fail (a
    read-only folder, a full disk), the folder keeps its old files and no hidden one."""
    folder = tmp_path / "bb"
    assert invoke("make-backbone", "--family", "dino", "-o", folder).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = random_backbone("dino", "tiny", seed=5)

    def failing(out, **_):
        model.config.save_pretrained(out)
        raise SafetensorError("Error while serializing: I/O error: Permission denied")

    monkeypatch.setattr(model, "save_pretrained", failing)
    monkeypatch.setattr(backbones, "random_backbone", lambda *args: model)
    line = refused("make-backbone", "--family", "dino", "--seed", "5", "-o", folder, "--force")
    assert "bb: the backbone could not be written (Error while serializing" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
