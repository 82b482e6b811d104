"""The qlis command line: outputs, files it writes, and one-line errors with exit code 2."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file

import qlis
from qlis.archive.file import write_tensors
from qlis.cli.main import cli
from qlis.cli.model_commands import INSPECT_KEYS, PLOT_LABELS
from qlis.models.tensors import same_bits


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.attention.attention.query.weight": torch.randn(48, 48, generator=gen),
        "encoder.layer.0.attention.attention.query.bias": torch.randn(48, generator=gen),
        "encoder.layer.0.intermediate.dense.weight": torch.randn(96, 48, generator=gen) * 0.05,
        "classifier.weight": torch.randn(3, 48, generator=gen),
        "position_ids": torch.arange(10),
    }


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_pt(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(make_state(), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ok(runner: CliRunner, *args: str):
    result = runner.invoke(cli, [str(a) for a in args], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


def run_user_error(runner: CliRunner, *args: str):
    result = runner.invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


def test_inspect_json_matches_the_library(runner, model_pt):
    records = json.loads(run_ok(runner, "inspect", model_pt, "--format", "json").stdout)
    expected = qlis.inspect(make_state()).records()
    assert [tuple(r) for r in records] == [INSPECT_KEYS] * len(expected)
    assert records == json.loads(json.dumps(expected))
    assert "position_ids" not in {r["name"] for r in records}


def test_inspect_table_piped_shows_full_names(runner, model_pt):
    out = run_ok(runner, "inspect", model_pt).stdout  # COLUMNS=80, but piped: never cut
    lines = out.splitlines()
    assert "QLIS" in lines[0] and "3 layers" in lines[-1]
    for name in ("encoder.layer.0.attention.attention.query.weight",
                 "encoder.layer.0.intermediate.dense.weight", "classifier.weight"):
        assert sum(line.startswith(name + " ") for line in lines) == 1, (name, lines)


def test_inspect_and_pack_name_a_mask_of_infinities_and_keep_it(runner, tmp_path):
    state = {**make_state(), "attn.mask": torch.triu(torch.full((4, 4), -torch.inf), 1)}
    save_file(state, tmp_path / "masked.safetensors")
    shown = run_ok(runner, "inspect", tmp_path / "masked.safetensors")
    assert "3 layers" in shown.stdout and "attn.mask" not in shown.stdout
    assert "1 tensor(s) of infinities left out of the layers" in shown.stderr
    packed = run_ok(runner, "pack", tmp_path / "masked.safetensors", "-o", tmp_path / "m.qlis")
    assert "hold infinities and no NaN" in packed.stderr
    run_ok(runner, "unpack", tmp_path / "m.qlis", "-o", tmp_path / "back.safetensors")
    assert torch.equal(load_file(tmp_path / "back.safetensors")["attn.mask"], state["attn.mask"])


def test_inspect_csv_and_options(runner, model_pt):
    out = run_ok(runner, "inspect", model_pt, "--format", "csv", "--beta", "1").stdout
    header, *rows = out.strip().splitlines()
    assert header.split(",") == list(INSPECT_KEYS)
    qlis_column = [float(r.split(",")[-1]) for r in rows]
    p_column = [float(r.split(",")[INSPECT_KEYS.index("P")]) for r in rows]
    assert qlis_column == pytest.approx(p_column)  # beta=1: QLIS is the parameter share


def test_inspect_plot_writes_png(runner, model_pt, tmp_path):
    plot = tmp_path / "qlis.png"
    run_ok(runner, "inspect", model_pt, "--plot", plot, "--policy", "laq")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


class OutOfMemoryError(RuntimeError):
    """torch.OutOfMemoryError's name and base, as a GPU's allocator raises it."""


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 70368744177664 bytes."),
    OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_memory_that_runs_out_is_one_line_saying_what_to_lower(runner, model_pt, monkeypatch,
                                                               error):
    """An allocation that failed (a batch size too large for the machine) was a traceback."""
    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(qlis, "inspect", allocate)
    line = run_user_error(runner, "inspect", model_pt)
    assert line.startswith("qlis: error: out of memory (") and "lower the batch size" in line


def test_a_runtime_error_that_is_no_allocation_keeps_its_traceback(runner, model_pt,
                                                                   monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch in qlis' own code")

    monkeypatch.setattr(qlis, "inspect", bug)
    result = runner.invoke(cli, ["inspect", str(model_pt)])
    assert isinstance(result.exception, RuntimeError) and result.exit_code == 1


def test_a_plot_on_a_full_disk_is_named_and_leaves_nothing(runner, model_pt, tmp_path,
                                                           monkeypatch):
    """The plot's write failing (a full disk) printed "qlis: error: No space left on device",
    naming no file: matplotlib's OSError carries none."""
    def full(self, fname, **kwargs):
        with open(fname, "wb") as file:
            file.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    plot = tmp_path / "q.png"
    result = runner.invoke(cli, ["inspect", str(model_pt), "--plot", str(plot)])
    assert result.exit_code == 2 and result.stderr == (
        f"qlis: error: {plot}: could not be written (No space left on device); free space or "
        "write elsewhere\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_inspect_plot_names_layers_as_text_and_bounds_its_width(runner, model_pt, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "many.pt"
    state = {f"layers.{i}.weight": torch.randn(2, 2) for i in range(400)}
    state["a$\\foo{$"] = torch.randn(3, 3)  # not a formula matplotlib could parse
    torch.save(state, checkpoint)
    plot = tmp_path / "q\x1b[31m.png"
    result = run_ok(runner, "inspect", checkpoint, "--plot", plot)
    assert result.stderr == "plot written to " + str(plot).replace("\x1b", "\\x1b") + "\n"
    assert 0 < _png_width(plot) <= PLOT_LABELS * 0.25 * 120  # 0.25 inch a label, 120 dpi
    few = tmp_path / "few.png"
    run_ok(runner, "inspect", model_pt, "--plot", few)
    assert _png_width(few) < _png_width(plot)


@pytest.mark.parametrize("option", [["--policy", "lap"], ["--force"]])
def test_inspect_plot_options_without_a_plot_are_refused(runner, model_pt, option):
    line = run_user_error(runner, "inspect", model_pt, *option)
    assert line == f"qlis: error: {option[0]} is for the plot: give --plot PATH too"


def test_inspect_reads_safetensors_and_hf_folders(runner, tmp_path):
    state = make_state()
    save_file(state, tmp_path / "m.safetensors")
    expected = json.loads(run_ok(runner, "inspect", tmp_path / "m.safetensors",
                                 "--format", "json").stdout)
    folder = tmp_path / "hf"
    folder.mkdir()
    names = list(state)
    save_file({n: state[n] for n in names[:2]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in names[2:]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = json.loads(run_ok(runner, "inspect", folder, "--format", "json").stdout)
    assert sorted(sharded, key=lambda r: r["name"]) == sorted(expected, key=lambda r: r["name"])


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp_path / "absent.pt"
    files["text"] = tmp_path / "notes.pt"
    files["text"].write_text("not a model")
    files["empty"] = tmp_path / "empty.pt"
    torch.save({}, files["empty"])
    files["integers"] = tmp_path / "ints.pt"
    torch.save({"ids": torch.arange(12).reshape(3, 4)}, files["integers"])
    files["nan"] = tmp_path / "nan.pt"
    torch.save({"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, files["nan"])
    files["inf"] = tmp_path / "inf.safetensors"
    save_file({"w": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, files["inf"])
    files["module"] = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), files["module"])
    files["evil"] = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, files["evil"])
    files["empty folder"] = tmp_path / "folder"
    files["empty folder"].mkdir()
    files["bad safetensors"] = tmp_path / "bad.safetensors"
    files["bad safetensors"].write_bytes(b"\x10" + bytes(20))
    return files


@pytest.mark.parametrize("command", ["inspect", "pack"])
def test_bad_inputs_get_one_line_and_exit_2(runner, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kind, path in bad_inputs(tmp_path).items():
        before = digest(path) if path.is_file() else None
        args = [command, path] + (["-o", tmp_path / "out.qlis"] if command == "pack" else [])
        line = run_user_error(runner, *args)
        assert line.startswith("qlis: error:"), (kind, line)
        assert (digest(path) if path.is_file() else None) == before, kind
        assert not (tmp_path / "out.qlis").exists()
    assert not (tmp_path / "pwned").exists()


def test_a_module_is_told_apart_from_bytes_that_are_no_checkpoint(runner, tmp_path):
    """Random bytes were reported as "pickled Python objects that would run code"."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert run_user_error(runner, "inspect", garbage).endswith(
        "garbage.pt: not a PyTorch checkpoint (its pickle data is not a state dict's)")
    assert "would run code when loaded (for example a whole nn.Module)" in run_user_error(
        runner, "inspect", bad_inputs(tmp_path)["module"])


def test_nan_error_names_the_layer(runner, tmp_path):
    line = run_user_error(runner, "inspect", bad_inputs(tmp_path)["nan"])
    assert "'w'" in line and "NaN" in line


def test_pack_info_unpack(runner, model_pt, tmp_path):
    archive = tmp_path / "model.qlis"
    out = run_ok(runner, "pack", model_pt, "-o", archive, "--policy", "quant", "--bits", "4",
                 "--codec", "ans").stdout
    assert "real ratio" in out and "HCR" in out
    expected = qlis.compress(make_state(), policy="quant", bits=4).state_dict()

    info = json.loads(run_ok(runner, "info", archive, "--format", "json", "--verify").stdout)
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["classifier.weight"]["bits"] == 4 and rows["position_ids"]["bits"] is None
    assert info["totals"]["archive_bytes"] == archive.stat().st_size
    assert info["totals"]["source_file_bytes"] == model_pt.stat().st_size
    assert info["totals"]["real_ratio"] == pytest.approx(
        info["totals"]["original_bytes"] / archive.stat().st_size
    )
    table = run_ok(runner, "info", archive).stdout
    assert "paper ratios" in table and "real ratio" in table

    for suffix in (".safetensors", ".pt"):
        target = tmp_path / f"unpacked{suffix}"
        run_ok(runner, "unpack", archive, "-o", target)
        state = load_file(target) if suffix == ".safetensors" else torch.load(
            target, weights_only=True
        )
        assert sorted(state) == sorted(expected)  # safetensors stores names sorted
        assert all(same_bits(state[n], expected[n]) for n in expected)


def test_info_cuts_a_long_metadata_value_in_its_table_not_in_json(runner, tmp_path):
    archive = tmp_path / "m.qlis"
    note = "x" * 100_000
    qlis.save(qlis.compress({"w": torch.randn(8, 8)}, "quant", bits=4), archive,
              metadata={"note": note})
    table = run_ok(runner, "info", archive).stdout
    line = next(line for line in table.splitlines() if line.startswith("  note = "))
    assert len(line) < 300 and "(100,000 characters; --format json: all)" in line
    info = json.loads(run_ok(runner, "info", archive, "--format", "json").stdout)
    assert info["metadata"]["note"] == note


def test_outputs_are_not_overwritten_without_force(runner, model_pt, tmp_path):
    archive = tmp_path / "model.qlis"
    archive.write_bytes(b"keep me")
    assert "exists" in run_user_error(runner, "pack", model_pt, "-o", archive)
    assert archive.read_bytes() == b"keep me"
    run_ok(runner, "pack", model_pt, "-o", archive, "--force")
    unpacked = tmp_path / "out.safetensors"
    unpacked.write_bytes(b"keep me too")
    assert "exists" in run_user_error(runner, "unpack", archive, "-o", unpacked)
    assert unpacked.read_bytes() == b"keep me too"
    assert "must end in" in run_user_error(runner, "unpack", archive, "-o", tmp_path / "x.txt")


def test_corrupt_archives_get_one_line(runner, model_pt, tmp_path):
    archive = tmp_path / "model.qlis"
    run_ok(runner, "pack", model_pt, "-o", archive)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    for command in (["info", archive], ["unpack", archive, "-o", tmp_path / "o.pt"]):
        assert "truncated" in run_user_error(runner, *command)
    assert "no such file" in run_user_error(runner, "info", tmp_path / "none.qlis")


def test_an_input_that_cannot_be_reached_says_why(runner, tmp_path):
    """A loop of links was reported as "no such file" (pathlib's exists() is False for it)."""
    loop = tmp_path / "loop.qlis"
    loop.symlink_to(loop)
    for command in (["info", loop], ["unpack", loop, "-o", tmp_path / "o.pt"],
                    ["pack", loop, "-o", tmp_path / "m.qlis"], ["inspect", loop]):
        line = run_user_error(runner, *command)
        assert line.endswith("loop.qlis: cannot be read (Too many levels of symbolic links)"), line
    inside_a_file = tmp_path / "none.qlis" / "m.qlis"
    (tmp_path / "none.qlis").write_bytes(b"")
    assert run_user_error(runner, "info", inside_a_file).endswith("m.qlis: no such file")


def test_bad_options_exit_2(runner, model_pt, tmp_path):
    result = runner.invoke(cli, ["pack", str(model_pt), "-o", str(tmp_path / "m.qlis"),
                                 "--codec", "zip"])
    assert result.exit_code == 2 and "'zip' is not one of" in result.stderr
    result = runner.invoke(cli, ["pack", str(model_pt), "-o", str(tmp_path / "m.qlis"),
                                 "--policy", "lapq", "--paper-cr", "1000"])
    assert result.exit_code == 2 and "out of reach" in result.stderr
    assert not (tmp_path / "m.qlis").exists()


def test_demo_runs_and_verifies(runner, tmp_path):
    out = run_ok(runner, "demo", "--model", "vit-tiny", "-o", tmp_path).stdout
    assert "RANDOM-INITIALISED" in out and "bit-exact: yes" in out
    assert (tmp_path / "vit-tiny.qlis").is_file()
    assert str(tmp_path / "vit-tiny.safetensors") in out
    assert "exists" in run_user_error(runner, "demo", "--model", "vit-tiny", "-o", tmp_path)


def test_a_suffix_in_capitals_is_the_same_format(runner, model_pt, tmp_path):
    """The output rule took .SAFETENSORS, and the writer, comparing case, wrote a torch
    pickle under that name; inspect read such a file as a torch checkpoint."""
    archive = tmp_path / "m.qlis"
    run_ok(runner, "pack", model_pt, "-o", archive)
    target = tmp_path / "UNPACKED.SAFETENSORS"
    run_ok(runner, "unpack", archive, "-o", target)
    assert sorted(load_file(target)) == sorted(qlis.load(archive))
    assert "layer" in run_ok(runner, "inspect", target).stdout


def test_info_states_the_output_quality_the_archive_records_beside_its_ratios(runner, tmp_path):
    """A calibrated archive's weight error says little of its outputs: `info` shows the
    output quality its writer measured, labelled held out or not, after the ratios."""
    archive = tmp_path / "m.qlis"
    output = {"cosine": 0.99594, "one_minus_cosine": 0.00406, "cosine_stderr": 0.00017,
              "rel_mse": 8.1e-3, "finite": True, "batches": 1, "held_out": True}
    write_tensors(archive, {"w": torch.ones(4, 4)}, distortion={
        "weight_rel_mse": 0.92, "weight_rel_mse_max": 1.77, "output": output})
    table = run_ok(runner, "info", archive).stdout
    after_ratios = table[table.index("real ratio"):]
    assert "output quality on 1 held-out calibration batch: cosine 0.99594 ± 0.00017" in (
        after_ratios)
    assert "the mean per layer; worst layer 1.77" in after_ratios
    write_tensors(archive, {"w": torch.ones(4, 4)}, distortion={
        "weight_rel_mse": 0.92, "output": {**output, "held_out": False, "batches": 3}})
    assert "output quality on the calibration data (not held out)" in run_ok(
        runner, "info", archive).stdout
    write_tensors(archive, {"w": torch.ones(4, 4)})
    assert "distortion: none recorded" in run_ok(runner, "info", archive).stdout
