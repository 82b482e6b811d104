"""`qlis pack`: policies and targets, option conflicts refused before any work, quality shown."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import one_line_error, run
from safetensors import safe_open
from safetensors.torch import save_file

import qlis
from qlis.archive.file import ArchiveWriter
from qlis.cli import console
from qlis.cli.main import cli
from qlis.plan.rd import DEFAULT_MAX_DISTORTION


@pytest.fixture
def model_file(tmp_path) -> Path:
    gen = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(256, 128, generator=gen),
        "a.bias": torch.randn(256, generator=gen),
        "b.weight": torch.randn(64, 256, generator=gen) * 0.1,
    }
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "origin": "test"})
    return path


def invoke(*args: object):
    return run(cli, *args)


def user_error(*args: object) -> str:
    return one_line_error(cli, "qlis: error:", *args)


def test_default_pack_is_rd_and_states_its_quality(model_file, tmp_path):
    out = tmp_path / "m.qlis"
    result = invoke("pack", model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert "policy rd" in result.stdout and "real ratio" in result.stdout
    assert "quality: weight error: relative MSE" in result.stdout
    with qlis.open(out) as archive:
        assert archive.compression["policy"]["id"] == "rd"
        assert archive.distortion["weight_rel_mse"] <= DEFAULT_MAX_DISTORTION
        layers = [r for r in archive.tensor_info() if r["bits"] is not None]
        assert {r["codec"] for r in layers if r["quantizer"]} == {"ans"}


def test_size_target_holds_on_disk(model_file, tmp_path):
    out = tmp_path / "m.qlis"
    result = invoke("pack", model_file, "-o", out, "--target-bits-per-weight", 3)
    assert result.exit_code == 0, result.output
    numel = 256 * 128 + 256 + 64 * 256
    assert 8 * out.stat().st_size / numel <= 3 * 1.02


def test_quantizer_and_pruner_configs_by_name(model_file, tmp_path):
    out = tmp_path / "g.qlis"
    result = invoke("pack", model_file, "-o", out, "--policy", "quant",
                    "--quantizer", '{"id": "group", "bits": 4, "group_size": 32}')
    assert result.exit_code == 0, result.output
    with qlis.open(out) as archive:
        assert {r["quantizer"] for r in archive.tensor_info() if r["quantizer"]} == {"group"}
    out = tmp_path / "p.qlis"
    result = invoke("pack", model_file, "-o", out, "--policy", "prune",
                    "--pruner", '{"id": "fraction", "fraction": 0.5}', "--codec", "ans")
    assert result.exit_code == 0, result.output
    state = qlis.load(out)
    assert float((state["a.weight"] == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_a_hand_written_plan(model_file, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"b.weight": {"quantizer": {"id": "affine", "bits": 8}}}))
    out = tmp_path / "m.qlis"
    result = invoke("pack", model_file, "-o", out, "--plan", plan)
    assert result.exit_code == 0, result.output
    with qlis.open(out) as archive:
        quantized = [r["name"] for r in archive.tensor_info() if r["quantizer"]]
        assert quantized == ["b.weight"]
        assert archive.compression["plan"]["b.weight"]["quantizer"]["bits"] == 8


def test_set_passes_any_policy_option(model_file, tmp_path):
    out = tmp_path / "m.qlis"
    result = invoke("pack", model_file, "-o", out, "--set", 'granularities=["channel"]',
                    "--set", "max_distortion=1e-3")
    assert result.exit_code == 0, result.output
    with qlis.open(out) as archive:
        assert archive.compression["policy"]["granularities"] == ["channel"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--policy", "lapq", "--bits", "4"], "--bits applies to --policy quant"),
        (["--policy", "prune", "--bits", "3"], "--bits applies to --policy quant"),
        (["--policy", "rd", "--k", "1"], "--k applies to --policy prune"),
        (["--policy", "prune", "--method", "kmeans"], "--method applies to policies that"),
        (["--policy", "lap", "--granularity", "channel"], "--granularity applies"),
        (["--target-bits-per-weight", "4", "--max-distortion", "1e-3"], "one target"),
        (["--policy", "lapq", "--max-distortion", "1e-3"], "unknown option"),
        (["--quantizer", "{not json"], "--quantizer must be JSON"),
        (["--set", "bogus=1"], "unknown option"),
        (["--set", "no-equals"], "KEY=VALUE"),
        (["--set", 'granularities={"a": 1}'], "takes a list"),
        (["--set", "min_cosine=0.99"], "measured on calibration data: pass --calib"),
        (["--target-bytes", "5000", "--set", "target_bytes=9000"],
         "--set target_bytes= and --target-bytes both give target_bytes"),
        (["--policy", "quant", "--bits", "2", "--set", "bits=8"], "both give bits"),
        (["--set", "max_distortion=0.1", "--set", "max_distortion=1e-6"], "given twice"),
        (["--calib", "calib.txt", "--resume"], "leave --resume out"),
        (["--policy", "plan"], "'plan' is not one of"),  # a plan is --plan FILE
        (["--min-cosine", "0.99"], "measured on calibration data: pass --calib"),
        (["--min-cosine", "0"], "0<x<1"),  # as the library's own range: a cosine above 0
        (["--calib-examples", "8"], "size the calibration: pass --calib"),
        (["--calib-batch-size", "4"], "size the calibration: pass --calib"),
        (["--calib", "calib.txt", "--max-distortion", "1e-3"], "weight-error target"),
        (["--policy", "quant", "--method", "nope", "--bits", "4"], "unknown quantizer"),
        (["--policy", "lapq", "--plan", "plan.json"], "--plan gives every layer"),
    ],
)
def test_conflicting_options_are_refused_before_loading(model_file, tmp_path, no_loading,
                                                        args, match):
    line = user_error("pack", model_file, "-o", tmp_path / "x.qlis", *args)
    assert match in line
    assert not (tmp_path / "x.qlis").exists()


def test_a_missed_quality_target_is_a_warning(model_file, tmp_path, monkeypatch):
    def review(policy, result):
        return [f"the weight error {result.distortion['weight_rel_mse']:.3g} misses the target"]

    monkeypatch.setattr(qlis.RDPolicy, "review", review)
    result = invoke("pack", model_file, "-o", tmp_path / "m.qlis")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("qlis: warning: the weight error")
    assert result.stderr.count("\n") == 1  # once, not again as a Python warning


def test_unpack_carries_the_source_metadata(model_file, tmp_path):
    archive = tmp_path / "m.qlis"
    assert invoke("pack", model_file, "-o", archive).exit_code == 0
    out = tmp_path / "back.safetensors"
    result = invoke("unpack", archive, "-o", out)
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}


def test_unpack_to_pt_on_a_failing_disk_is_one_line(model_file, tmp_path, monkeypatch):
    archive = tmp_path / "m.qlis"
    assert invoke("pack", model_file, "-o", archive).exit_code == 0

    def full_disk(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    line = user_error("unpack", archive, "-o", tmp_path / "out.pt")
    assert "could not be written" in line
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not (tmp_path / "out.pt").exists()


def test_a_folders_source_size_counts_only_the_weights_read(model_file, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(model_file.read_bytes())
    (folder / "tokenizer.json").write_bytes(b"t" * 2_000_000)  # never compressed
    (folder / "README.md").write_text("a model card\n" * 1000)
    torch.save({"a.weight": torch.zeros(512, 512)}, folder / "pytorch_model.bin")  # not read
    out = tmp_path / "m.qlis"
    result = invoke("pack", folder, "-o", out)
    assert result.exit_code == 0, result.output
    with qlis.open(out) as archive:
        assert archive.summary.source_bytes == model_file.stat().st_size
        tensors = archive.summary.original_bytes / out.stat().st_size  # what targets count
    shown = model_file.stat().st_size / out.stat().st_size
    assert f"real ratio {shown:.2f}x ({tensors:.2f}x of its tensors' bytes" in result.stdout

    sharded = tmp_path / "sharded"  # the shards the index names, not the index
    sharded.mkdir()
    with safe_open(str(model_file), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open
    names = sorted(state)
    save_file({names[0]: state[names[0]]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in names[1:]}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i == 0 else 2}-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "tokenizer.json").write_bytes(b"t" * 2_000_000)
    assert invoke("pack", sharded, "-o", out, "--force").exit_code == 0
    shards = sum(p.stat().st_size for p in sharded.glob("model-*.safetensors"))
    with qlis.open(out) as archive:
        assert archive.summary.source_bytes == shards


@pytest.mark.parametrize(("args", "expected"), [
    (["--target-bits-per-weight", "4", "--target-ratio", "8"],
     "give one target, not --target-bits-per-weight, --target-ratio"),
    (["--policy", "lapq", "--target-ratio", "8"], "pass --paper-cr"),
])
def test_option_errors_name_the_commands_flags(model_file, tmp_path, args, expected):
    # the library's messages name its keywords (target_ratio=); a command user typed flags
    message = user_error("pack", model_file, "-o", tmp_path / "m.qlis", *args)
    assert expected in message and "target_ratio" not in message


def test_a_terminated_pack_unwinds_as_an_interrupted_one_and_leaves_no_file(
        model_file, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's time limit, torchrun ending a job) ended the process where it
    stood, leaving the archive being written under a hidden name."""
    add = ArchiveWriter.add

    def terminated(self, encoded):
        add(self, encoded)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # the handler raises here

    monkeypatch.setattr(ArchiveWriter, "add", terminated)
    out = tmp_path / "out"
    out.mkdir()
    def ignored(signum, frame):  # without the command's own handler: the test goes on
        pass

    before = signal.signal(signal.SIGTERM, ignored)
    try:
        result = invoke("pack", model_file, "-o", out / "m.qlis", "--jobs", "1")
        assert signal.getsignal(signal.SIGTERM) is ignored  # given back after the command
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 130 and result.output.strip().endswith("qlis: interrupted")
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []
    assert not (out / "m.qlis").exists()


@pytest.mark.parametrize("caller_handler", ["python's", "ignored"])
def test_ctrl_c_waits_for_an_import_as_sigterm_does(model_file, tmp_path, monkeypatch,
                                                     caller_handler):
    """Python's own SIGINT handler raised inside torch's start-up, which swallowed it (the
    command ran on, exit 0) or left numpy half imported; one the caller set is kept."""
    given = signal.default_int_handler if caller_handler == "python's" else signal.SIG_IGN
    during = []
    monkeypatch.setattr(qlis, "pack", lambda *a, **k: during.append(signal.getsignal(
        signal.SIGINT)))
    before = signal.signal(signal.SIGINT, given)
    try:
        invoke("pack", model_file, "-o", tmp_path / "m.qlis")
        assert signal.getsignal(signal.SIGINT) is given  # given back after the command
    finally:
        signal.signal(signal.SIGINT, before)
    assert during == [console._interrupt if given is signal.default_int_handler else given]


def test_sigterm_inside_an_import_is_sent_again_not_raised_there(monkeypatch):
    """KeyboardInterrupt raised inside an import left numpy half imported (a traceback about
    a missing numpy name instead of "interrupted"): there the signal comes again later."""
    sent = []
    monkeypatch.setattr(console.threading, "Timer",
                        lambda delay, fn, args: SimpleNamespace(start=lambda: sent.append(args)))

    def frame(filename, back=None):
        return SimpleNamespace(f_code=SimpleNamespace(co_filename=filename), f_back=back)

    importing = frame("/numpy/__init__.py", frame("<frozen importlib._bootstrap>",
                                                  frame("/qlis/cli/main.py")))
    console._interrupt(signal.SIGTERM, importing)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(KeyboardInterrupt):
        console._interrupt(signal.SIGTERM, frame("/qlis/archive/file.py", frame("/main.py")))


def test_an_interrupted_pack_says_so_and_exits_as_shells_expect(model_file, tmp_path,
                                                                 monkeypatch):
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(qlis, "pack", interrupt)
    result = invoke("pack", model_file, "-o", tmp_path / "m.qlis")
    assert result.exit_code == 130  # 128 + SIGINT
    assert result.output.strip().endswith("qlis: interrupted")
    assert "Traceback" not in result.output and not (tmp_path / "m.qlis").exists()
