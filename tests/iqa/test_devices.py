"""`--device` is checked against this machine before any work: a device it lacks (cuda without
CUDA, cuda:7 with two GPUs, meta, gpu, xla, "") is one error line listing what it has, never a
torch traceback once the model is loaded. A `--split` file gets the same bounded JSON check as
qlis's JSON options (issue 15)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run, within_5_s
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlis_iqa.score
from qlis.cli.choices import available_devices, parse_device
from qlis.errors import InputError
from qlis_iqa.cli import cli

REFUSED_EVERYWHERE = ["gpu", "meta", "xla", "", "cuda:x", "cuda:-1", "cpu:1", "npu:0", "\x1b[2J"]
device_names = st.sampled_from(["cpu", "cuda", "mps", "meta", "gpu"]) | st.text(
    alphabet=string.ascii_letters + string.digits + ":-_", max_size=8)
indices = st.none() | st.integers(0, 12)


def machine(monkeypatch: pytest.MonkeyPatch, cuda: int = 0, mps: bool = False) -> None:
    """Make torch report ``cuda`` GPUs and whether MPS is there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuda=st.integers(0, 4), mps=st.booleans(), name=device_names, index=indices)
def test_a_device_is_accepted_exactly_when_this_machine_has_it(monkeypatch, cuda, mps, name,
                                                               index):
    machine(monkeypatch, cuda, mps)
    text = name if index is None else f"{name}:{index}"
    counts = {"cpu": 1, "cuda": cuda, "mps": int(mps)}
    kind = name.lower()
    if counts.get(kind, 0) > 0 and (index is None or index < counts[kind]):
        assert parse_device(text) == torch.device(text.lower())
    else:
        with pytest.raises(InputError) as info:
            parse_device(text)
        assert str(info.value).startswith("--device '")
        assert str(info.value).endswith("use one of " + ", ".join(available_devices()))


def test_what_the_messages_say(monkeypatch):
    machine(monkeypatch, cuda=2)
    assert available_devices() == ["cpu", "cuda", "cuda:0", "cuda:1"]
    assert parse_device(" CUDA:1 ") == torch.device("cuda:1")

    def message(text: str) -> str:
        with pytest.raises(InputError) as info:
            parse_device(text)
        return str(info.value)

    assert message("cuda:2") == ("--device 'cuda:2': there is no cuda:2 (this machine has 2); "
                                 "use one of cpu, cuda, cuda:0, cuda:1")
    assert "meta tensors hold no data" in message("meta")
    assert "mps is not available" in message("mps")
    assert "not a device name" in message("gpu")
    assert "\x1b" not in message("\x1b[2J")  # escaped, as every name shown
    machine(monkeypatch, cuda=0)
    assert "cuda is not available on this machine; use one of cpu" in message("cuda")


def commands(tmp_path: Path, model_file: Path, sample_root: Path) -> dict[str, tuple[list, Path]]:
    """Every command with --device, and the output it must not create."""
    out = tmp_path / "out"
    return {
        "train": (["train", "--family", "dino", "--root", sample_root, "-o", out], out),
        "evaluate": (["evaluate", model_file, "-o", out.with_suffix(".csv")],
                     out.with_suffix(".csv")),
        "sweep": (["sweep", model_file, "-o", out], out),
        "score": (["score", sample_root, "--model", model_file, "-o", out.with_suffix(".csv")],
                  out.with_suffix(".csv")),
    }


@pytest.mark.parametrize("command", ["train", "evaluate", "sweep", "score"])
@pytest.mark.parametrize("device", ["cuda", "cuda:7", *REFUSED_EVERYWHERE])
def test_every_command_refuses_a_device_it_cannot_use(tmp_path, model_file, sample_root,
                                                      monkeypatch, command, device):
    machine(monkeypatch, cuda=0)
    args, output = commands(tmp_path, model_file, sample_root)[command]
    line = one_line_error(cli, "qlis-iqa: error: ", *args, "--device", device)
    assert "--device '" in line and line.endswith("use one of cpu")
    assert not output.exists()


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=10).filter(lambda t: t.strip().lower() not in ("cpu", "cpu:0")))
def test_random_device_names_are_one_error(tmp_path, model_file, sample_root, monkeypatch,
                                           name):
    machine(monkeypatch, cuda=0)
    args, output = commands(tmp_path, model_file, sample_root)["score"]
    assert "--device" in one_line_error(cli, "qlis-iqa: error: ", *args, "--device", name)
    assert not output.exists()


def test_the_device_given_reaches_the_work(tmp_path, model_file, sample_root, monkeypatch):
    seen = []

    def score_folder(*args):
        seen.append(args[6])
        raise InputError("stop here")

    monkeypatch.setattr(qlis_iqa.score, "score_folder", score_folder)
    args, _ = commands(tmp_path, model_file, sample_root)["score"]
    for device in ("cpu", " CPU", "cpu:0"):
        assert run(cli, *args, "--device", device, prog_name="qlis-iqa").exit_code == 2
    assert seen == ["cpu", "cpu", "cpu:0"]


@pytest.mark.parametrize("kind, match", [
    ("deep", "nests deeper than 64 levels"),
    ("array", "must be a JSON object, got an array"),
    ("binary", "is not UTF-8 text"),
    ("folder", "is a folder"),
    pytest.param("fifo", "is not a regular file", marks=pytest.mark.skipif(
        not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")),
])
def test_a_split_file_that_is_not_a_bounded_json_object_is_one_error(
        tmp_path, model_file, sample_root, kind, match):
    split = tmp_path / "split.json"
    if kind == "deep":
        split.write_text("[" * 5000 + "]" * 5000)
    elif kind == "array":
        split.write_text("[]")
    elif kind == "binary":
        split.write_bytes(bytes(range(255, -1, -1)))
    elif kind == "folder":
        split.mkdir()
    else:
        os.mkfifo(split)
    out = tmp_path / "out"
    for args in (["evaluate", model_file, "--split", split, "-o", out.with_suffix(".csv")],
                 ["sweep", model_file, "--split", split, "-o", out],
                 ["train", "--family", "dino", "--root", sample_root, "--split", split,
                  "-o", out]):
        line = within_5_s(lambda a=args: one_line_error(cli, "qlis-iqa: error: ", *a), split)
        assert f"--split {split}" in line and match in line
        assert not out.exists() and not out.with_suffix(".csv").exists()
