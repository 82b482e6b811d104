"""The rules both CLIs share, on `qlis`: checks before any work, the one output rule, -h, the
codec choice from the registry, escaped names, strict JSON, and what `info` and `demo` say."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error as cli_error
from cli_helpers import run, within_5_s
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import qlis
import qlis.cli.main
from qlis.cli.choices import codec_names
from qlis.cli.main import cli
from qlis.json_input import MAX_DEPTH, MAX_FILE_BYTES


@pytest.fixture
def model_pt(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({"a.weight": torch.randn(32, 16, generator=gen),
                "a.bias": torch.randn(32, generator=gen)}, path)
    return path


def invoke(*args: object):
    return run(cli, *args)


def one_line_error(*args: object) -> str:
    return cli_error(cli, "qlis: error:", *args)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("args", [["info"], ["info", "--verify"], ["unpack", "-o", "m.pt"]])
def test_an_archive_that_is_not_a_regular_file_is_refused_by_name(tmp_path, args):
    """A FIFO must not block the reader (nothing writes to it), a folder must be named."""
    fifo = tmp_path / "fifo.qlis"
    os.mkfifo(fifo)
    command, *options = args
    line = within_5_s(lambda: one_line_error(command, fifo, *options), fifo)
    assert str(fifo) in line and "not a regular file" in line
    folder = tmp_path / "folder.qlis"
    folder.mkdir()
    assert str(folder) in one_line_error(command, folder, *options)


def test_start_up_pauses_the_collector_and_the_command_runs_with_it(tmp_path, monkeypatch):
    """main pauses Python's cyclic collector while the command's imports load; the command
    runs with it back, start-up's objects frozen once; a caller of `cli` (this runner) keeps
    its collector as it is."""
    path = qlis.save(qlis.compress({"w": torch.randn(8, 8)}, "quant", bits=4),
                     tmp_path / "m.qlis")
    seen, frozen = [], []
    monkeypatch.setattr(qlis.cli.main, "cli", lambda **_: seen.append(gc.isenabled()))
    monkeypatch.setattr(qlis.cli.main, "set_the_commands_allocator", lambda: None)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    try:
        qlis.cli.main.main()
        assert seen == [False] and not gc.isenabled()
        monkeypatch.undo()
        monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
        assert invoke("info", path).exit_code == 0
        assert gc.isenabled() and frozen == [True]
        assert invoke("info", path).exit_code == 0 and frozen == [True]
    finally:
        gc.enable()


def test_dash_h_is_help():
    for args in ([], ["pack"], ["info"]):
        result = invoke(*args, "-h")
        assert result.exit_code == 0 and "Usage:" in result.stdout


def test_codec_choice_is_the_registry_in_help_and_error(model_pt, tmp_path, no_loading):
    names = codec_names()
    assert set(names) >= {"huffman", "ans", "bitpack", "raw", "sparse", "auto"}
    help_text = " ".join(invoke("pack", "-h").stdout.split())
    assert "[" + "|".join(names) + "]" in help_text
    result = invoke("pack", model_pt, "-o", tmp_path / "m.qlis", "--codec", "zstd")
    assert result.exit_code == 2
    listed = re.search(r"is not one of (.*)\.", result.stderr).group(1)
    assert re.findall(r"'([^']+)'", listed) == names


def test_pack_checks_the_output_before_loading(model_pt, tmp_path, no_loading):
    line = one_line_error("pack", model_pt, "-o", tmp_path / "absent" / "m.qlis")
    assert "absent: no such folder" in line
    assert not (tmp_path / "absent").exists()
    assert "must end in .qlis" in one_line_error("pack", model_pt, "-o", tmp_path / "z.txt")
    assert "no such file" in one_line_error("pack", tmp_path / "none.pt", "-o", tmp_path / "m.qlis")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a folder no file "
                                                             "can be made in")
def test_an_output_whose_folder_takes_no_file_is_refused_before_loading(model_pt, no_loading):
    line = one_line_error("pack", model_pt, "-o", "/proc/m.qlis")
    assert line.startswith("qlis: error: /proc/m.qlis: cannot write beside it (")
    line = one_line_error("demo", "-o", "/proc")  # a folder written into
    assert line.startswith("qlis: error: /proc: cannot write beside it (")


def test_an_error_line_never_carries_a_paths_terminal_codes(model_pt, tmp_path, no_loading):
    line = one_line_error("pack", model_pt, "-o", tmp_path / "no\x1b]0;T\x07dir" / "m.qlis")
    assert "\x1b" not in line and "\x07" not in line
    assert "no\\x1b]0;T\\x07dir: no such folder" in line


def test_a_plan_file_named_as_the_pass_cache_is_refused_not_replaced(model_pt, tmp_path,
                                                                    no_loading):
    plan = tmp_path / ".out.qlis-pass1.json"
    plan.write_text('{"a.weight": {"quantizer": {"id": "affine", "bits": 4}}}')
    line = one_line_error("pack", model_pt, "-o", tmp_path / "out.qlis", "--plan", plan)
    assert "is an input, and the name of the pass cache" in line
    assert plan.read_text().startswith('{"a.weight"')


def test_outputs_that_are_inputs_are_refused_even_with_force(model_pt, tmp_path, no_loading):
    before = model_pt.read_bytes()
    assert "must end in .png" in one_line_error("inspect", model_pt, "--plot", tmp_path / "x.jpg")
    alias = tmp_path / "alias.png"
    alias.symlink_to(model_pt)
    line = one_line_error("inspect", model_pt, "--plot", alias, "--force")
    assert "one of the inputs" in line
    assert model_pt.read_bytes() == before


def test_a_plan_or_calibration_file_is_never_the_packs_output(model_pt, tmp_path, no_loading):
    """`pack --plan plan.qlis -o plan.qlis --force` replaced the plan with the archive."""
    plan = tmp_path / "plan.qlis"
    plan.write_text('{"w": {"quantizer": {"id": "group", "bits": 4}}}')
    before = plan.read_bytes()
    line = one_line_error("pack", model_pt, "--plan", plan, "-o", plan, "--force")
    assert "one of the inputs" in line and plan.read_bytes() == before
    calib = tmp_path / "calib.qlis"
    calib.write_text("a red cat\n")
    line = one_line_error("pack", model_pt, "--calib", calib, "-o", calib, "--force")
    assert "one of the inputs" in line and calib.read_text() == "a red cat\n"


def test_a_folders_weight_file_is_never_the_packs_output(tmp_path, no_loading):
    """A folder's model.safetensors linked to weights.qlis: the output was checked against
    the folder alone, and the pack replaced the only copy of the weights it read."""
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "weights.qlis"
    save_file({"w": torch.randn(16, 16)}, weights)
    (folder / "model.safetensors").symlink_to("weights.qlis")
    before = weights.read_bytes()
    line = one_line_error("pack", folder, "-o", weights, "--force")
    assert "one of the inputs" in line and weights.read_bytes() == before


def test_inspect_plot_is_not_replaced_without_force(model_pt, tmp_path):
    plot = tmp_path / "q.png"
    plot.write_bytes(b"keep")
    assert "exists" in one_line_error("inspect", model_pt, "--plot", plot)
    assert plot.read_bytes() == b"keep"


def test_unpack_refuses_to_overwrite_its_archive(model_pt, tmp_path):
    archive = tmp_path / "m.qlis"
    qlis.save(qlis.compress(torch.load(model_pt, weights_only=True), "quant", bits=4), archive)
    alias = tmp_path / "m.safetensors"
    alias.hardlink_to(archive)
    assert "one of the inputs" in one_line_error("unpack", archive, "-o", alias, "--force")
    qlis.open(archive).close()  # still a valid archive


HOSTILE = "evil\x1b]52;c;cHduZWQ=\x07\nname"


def test_names_are_escaped_in_inspect_and_info(tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({HOSTILE: torch.randn(16, 8)}, path)
    shown = "evil\\x1b]52;c;cHduZWQ=\\x07\\nname"
    out = invoke("inspect", path).stdout
    assert "\x1b" not in out and "\x07" not in out and shown in out
    archive = tmp_path / "h.qlis"
    qlis.save(qlis.compress(torch.load(path, weights_only=True), "quant", bits=4), archive,
              metadata={"note": "a\x1b[2Jb"})
    out = invoke("info", archive).stdout
    assert "\x1b" not in out and shown in out and "a\\x1b[2Jb" in out


def test_inspect_csv_and_json_keep_hostile_names_on_one_row(tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({HOSTILE: torch.randn(16, 8), 'a\rb,c"d': torch.randn(8, 8)}, path)
    out = invoke("inspect", path, "--format", "csv").stdout
    assert not any(c in out for c in "\x1b\x07\r")
    lines = out.splitlines()
    assert len(lines) == 3  # the header and one line per tensor
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["name"] for r in rows} == {"evil\\x1b]52;c;cHduZWQ=\\x07\\nname", 'a\\rb,c"d'}
    records = json.loads(invoke("inspect", path, "--format", "json").stdout)  # escaped by JSON
    assert {r["name"] for r in records} == {HOSTILE, 'a\rb,c"d'}


def test_info_reads_like_gguf_dump_and_labels_the_paper_ratios(model_pt, tmp_path):
    archive = tmp_path / "m.qlis"
    result = invoke("pack", model_pt, "-o", archive, "--policy", "quant", "--bits", "4")
    assert result.exit_code == 0, result.output
    out = invoke("info", archive).stdout
    order = [out.index(marker) for marker in
             ("metadata:", "source = model.pt", "writer:", "compression", "tensor ",
              "real ratio", "paper ratios")]
    assert order == sorted(order)
    header = next(line for line in out.splitlines() if line.startswith("tensor "))
    assert header.split() == ["tensor", "shape", "dtype", "quantizer", "bits", "k", "codec",
                              "size"]
    assert "idealised" in out and "pruned zeros count as free" in out
    assert re.search(r"\d KiB|\d B", out)  # binary units, as in qlis-iqa


def test_info_json_is_strict_and_exact(model_pt, tmp_path):
    archive = tmp_path / "m.qlis"
    assert invoke("pack", model_pt, "-o", archive).exit_code == 0

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads(invoke("info", archive, "--format", "json").stdout, parse_constant=refuse)
    assert data["totals"]["archive_bytes"] == archive.stat().st_size
    assert all(isinstance(row["bytes"], int) for row in data["tensors"])


def test_demo_without_output_dir_says_the_files_are_temporary():
    result = invoke("demo", "--model", "vit-tiny")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "temporary file" in out and "saved to" not in out and "-o DIR" in out
    quality = next(line for line in out.splitlines() if line.startswith("quality:"))
    assert "relative MSE" in quality and "SNR" in quality and " dB" in quality
    assert all("at that quality" in line or "quality above" in line
               for line in out.splitlines() if "ratio" in line)


def test_demo_refuses_a_missing_parent(tmp_path):
    assert "no such folder" in one_line_error("demo", "--model", "vit-tiny",
                                              "-o", tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


# JSON options (issue 15): a deep, non-finite, oversize or wrongly typed value, or a plan that is
# no regular file, is one error line and exit code 2, before any model is loaded.
deep_kinds = st.lists(st.sampled_from("ld"), min_size=MAX_DEPTH + 1, max_size=3000)
not_objects = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
).filter(lambda value: not isinstance(value, dict))
JSON_NAMES = {list: "an array", str: "a string", int: "an integer", bool: "a boolean",
              type(None): "null"}
NO_FIXTURE_RESET = settings(max_examples=40,
                            suppress_health_check=[HealthCheck.function_scoped_fixture])


def nested(kinds: list[str]) -> str:
    """JSON nested one level per kind: a list ("l") or an object ("d")."""
    return "".join("[" if k == "l" else '{"k": ' for k in kinds) + "0" + "".join(
        "]" if k == "l" else "}" for k in reversed(kinds))


def pack_refused(model: Path, output: Path, *args: object) -> str:
    line = one_line_error("pack", model, "-o", output, *args)
    assert not output.exists()
    return line


@NO_FIXTURE_RESET
@given(kinds=deep_kinds,
       option=st.sampled_from(["--quantizer", "--pruner", "--set granularities"]))
def test_deep_json_options_are_one_error(model_pt, tmp_path, no_loading, kinds, option):
    value = nested(kinds)
    args = ["--set", f"granularities={value}"] if option.startswith("--set") else [option, value]
    line = pack_refused(model_pt, tmp_path / "m.qlis", "--policy", "lapq", *args)
    assert line.endswith(f"{option} nests deeper than {MAX_DEPTH} levels")


@NO_FIXTURE_RESET
@given(value=not_objects, option=st.sampled_from(["--quantizer", "--pruner"]))
def test_a_config_option_must_be_an_object(model_pt, tmp_path, no_loading, value, option):
    line = pack_refused(model_pt, tmp_path / "m.qlis", "--policy", "lapq", option,
                        json.dumps(value))
    assert line.endswith(f"{option} must be a JSON object, got {JSON_NAMES[type(value)]}")


@NO_FIXTURE_RESET
@given(constant=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-2e308"]),
       where=st.sampled_from(["--quantizer", "--set"]))
def test_non_finite_numbers_are_refused(model_pt, tmp_path, no_loading, constant, where):
    if where == "--set":
        args = ["--set", f"max_distortion={constant}"]
    else:
        args = ["--policy", "lapq", "--quantizer", f'{{"id": "affine", "bits": {constant}}}']
    line = pack_refused(model_pt, tmp_path / "m.qlis", *args)
    assert ("not a finite number" in line or "out of range" in line) and constant in line


@pytest.mark.parametrize("key, flag", [("policy", "--policy"), ("plan", "--plan"),
                                       ("beta", "--beta"), ("select", "--select")])
def test_set_refuses_what_pack_passes_itself(model_pt, tmp_path, no_loading, key, flag):
    for value in ("", "quant", "[1]"):
        line = pack_refused(model_pt, tmp_path / "m.qlis", "--set", f"{key}={value}")
        assert line.endswith(f"--set {key}= is not a policy option; give {flag} instead")


@pytest.mark.parametrize("args, said", [
    (["--quantizer", '{"id": "affine", "bits": 2, "bits": 8}', "--policy", "quant"],
     "--quantizer: the key 'bits' is given twice"),
    (["--set", 'granularities={"a": 1, "a": 2}'], "--set granularities: the key 'a' is given "
                                                   "twice"),
])
def test_a_json_option_that_gives_a_key_twice_is_refused(model_pt, tmp_path, no_loading, args,
                                                        said):
    """Python's json keeps the last of two equal keys: the first was dropped unseen."""
    assert said in pack_refused(model_pt, tmp_path / "m.qlis", *args)


@pytest.mark.parametrize("args, said", [
    (["--policy", "quant", "--bits", "4", "--set", "bits_levels=[2, 4]"],
     "give either --bits (one level) or bits_levels, not both"),
    (["--policy", "prune", "--k", "1", "--set", "k_levels=[2, 1]"],
     "give either --k (one level) or k_levels, not both"),
    (["--set", "group_bits=[4]"], "give group_sizes too"),
])
def test_an_option_that_another_would_override_or_void_is_refused(model_pt, tmp_path,
                                                                  no_loading, args, said):
    """--bits replaced the levels of --set bits_levels (and --k those of k_levels); rd's
    group_bits without group_sizes offers no candidate: each was silently ignored."""
    assert said in pack_refused(model_pt, tmp_path / "m.qlis", *args)


@pytest.mark.parametrize("flag", [["--bits", "4"], ["--k", "1"]])
def test_a_uniform_flag_with_rd_points_to_no_levels_it_has_not(model_pt, tmp_path, no_loading,
                                                             flag):
    """rd has no k_levels or bits_levels: a hint to --set them led to another error."""
    line = pack_refused(model_pt, tmp_path / "m.qlis", "--policy", "rd", *flag)
    assert "policy 'rd' does not take it" in line and "_levels" not in line


def plan_file(tmp_path: Path, kind: str) -> Path:
    """A --plan that must be refused, and what the error says about it."""
    path = tmp_path / f"{kind}.json"
    if kind == "deep":
        path.write_text(nested(["l", "d"] * 200))
    elif kind == "array":
        path.write_text('[{"a.weight": {"quantizer": {"id": "affine", "bits": 8}}}]')
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nan":
        path.write_text('{"a.weight": {"quantizer": {"id": "affine", "bits": NaN}}}')
    elif kind == "twice":  # the second settings of a layer replaced the first, unseen
        path.write_text('{"a.weight": {"quantizer": {"id": "affine", "bits": 2}},\n'
                        ' "a.weight": {"quantizer": {"id": "affine", "bits": 8}}}')
    elif kind == "oversize":  # sparse: no disk space used
        with path.open("wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("kind, match", [
    ("deep", "nests deeper than 64 levels"),
    ("array", "must be a JSON object, got an array"),
    ("binary", "is not UTF-8 text"),
    ("nan", "NaN is not a finite number"),
    ("twice", "the key 'a.weight' is given twice in one object"),
    ("oversize", "is larger than 16.00 MiB"),
    ("folder", "is a folder; give a JSON file"),
    pytest.param("fifo", "is not a regular file", marks=pytest.mark.skipif(
        not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")),
    pytest.param("device", "is not a regular file", marks=pytest.mark.skipif(
        not os.path.exists("/dev/zero"), reason="no /dev/zero on this platform")),
])
def test_a_plan_that_is_not_a_bounded_json_object_is_one_error(model_pt, tmp_path, no_loading,
                                                              kind, match):
    path = plan_file(tmp_path, kind)
    line = within_5_s(lambda: pack_refused(model_pt, tmp_path / "m.qlis", "--plan", path), path)
    assert line.startswith(f"qlis: error: --plan {path}") and match in line


OPTION_TOKENS = st.sampled_from(["--jobs", "-j", "--codec", "--max-shard-size", "--format",
                                 "--policy", "--target-ratio", "--bits", "--bogus", "-x", "--"])
VALUE_TOKENS = st.sampled_from(["0", "-1", "1e999", "nan", "abc", "", "zstd", "9" * 30, "-h2"])


@NO_FIXTURE_RESET
@given(command=st.sampled_from(["pack", "unpack", "info", "inspect", "nope"]),
       tokens=st.lists(OPTION_TOKENS | VALUE_TOKENS, max_size=4))
def test_command_line_mistakes_are_one_line(tmp_path, no_loading, command, tokens):
    """click's own errors (a bad value, an unknown option or command, a missing argument)
    follow the same rule as the library's: one line, exit code 2, a pointer to -h."""
    result = invoke(command, *tokens)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qlis: error:"), result.stderr


@pytest.mark.parametrize("args", [["inspect", ""], ["pack", "", "-o", "m.qlis"], ["info", ""],
                                  ["unpack", "m.qlis", "-o", ""],
                                  ["pack", "m.pt", "-o", "m.qlis", "--plan", ""]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(no_loading, args):
    assert "an empty path" in one_line_error(*args)


def test_the_help_lists_the_commands_alike_before_and_after_they_are_loaded():
    """The command table imports each command when first used; `qlis -h` must not change
    (order included) once some have been."""
    first = run(cli, "--help")
    run(cli, "info", "--help")
    second = run(cli, "--help")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    listed = [line.split()[0] for line in first.stdout.split("Commands:")[1].splitlines()
              if line.strip()]
    assert listed == ["inspect", "pack", "unpack", "info", "demo"]


def test_demo_offers_no_policy_it_cannot_run_without_options():
    line = one_line_error("demo", "--model", "vit-tiny", "--policy", "levels")
    assert "Invalid value for '--policy': 'levels' is not one of" in line


def test_an_environment_torch_refuses_at_import_is_one_line(tmp_path):
    """TORCH_DISTRIBUTED_DEBUG=bogus made torch's import raise a ValueError: a traceback
    from every model command."""
    model = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, model)
    done = subprocess.run([sys.executable, "-m", "qlis", "inspect", str(model)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_DISTRIBUTED_DEBUG": "bogus"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "qlis: error: cannot start: The value of TORCH_DISTRIBUTED_DEBUG must be OFF, INFO, "
        "or DETAIL."]
