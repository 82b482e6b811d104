"""The bounded JSON reader behind every JSON option: deep nesting, binary and oversize files,
FIFOs, folders, wrong types and non-finite numbers are each one InputError naming the option,
never a RecursionError, a hang or a read without limit."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qlis.errors import InputError
from qlis.json_input import (
    MAX_DEPTH,
    JSONSyntaxError,
    parse_json_text,
    read_json_file,
)

# How the messages name each JSON type: what was expected, and what was given.
EXPECTED = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            bool: "boolean"}
GIVEN = {dict: "an object", list: "an array", str: "a string", int: "an integer",
         float: "a number", bool: "a boolean", type(None): "null"}
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8) \
    | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=10,
)
# A string full of brackets: nesting is counted outside strings only.
bracket_text = st.text(alphabet='[]{}"\\ab', max_size=40)


def nested(kinds: list[str], leaf: str = "0") -> str:
    """JSON nested len(kinds) levels deep, each level a list ("l") or an object ("d")."""
    text = leaf
    for kind in reversed(kinds):
        text = f"[{text}]" if kind == "l" else f'{{"k": {text}}}'
    return text


@pytest.fixture(scope="module")
def write(tmp_path_factory: pytest.TempPathFactory):
    """Writes a test file, one at a time (hypothesis runs many examples in one test)."""
    path = tmp_path_factory.mktemp("json") / "x.json"

    def write_file(data: bytes) -> Path:
        path.write_bytes(data)
        return path

    return write_file


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    return str(info.value)


@given(kinds=st.lists(st.sampled_from("ld"), min_size=MAX_DEPTH + 1, max_size=4000),
       padding=st.sampled_from(["", " ", "\n\t"]))
def test_nesting_beyond_the_limit_is_refused_without_recursion(kinds, padding):
    text = padding + nested(kinds) + padding
    line = refused(parse_json_text, text, "--quantizer")
    assert line == "--quantizer nests deeper than 64 levels"
    # never closed (what a truncated file holds): refused the same way, not as a syntax error
    unclosed = text[: text.index("0")]
    assert refused(parse_json_text, unclosed, "--quantizer").endswith("deeper than 64 levels")


@given(kinds=st.lists(st.sampled_from("ld"), min_size=1, max_size=MAX_DEPTH),
       inside=bracket_text)
def test_nesting_up_to_the_limit_parses_and_brackets_in_strings_do_not_count(kinds, inside):
    leaf = json.dumps(inside + "[" * 100)
    text = nested(kinds, leaf)
    assert parse_json_text(text, "--x") == json.loads(text)


@given(kinds=st.lists(st.sampled_from("ld"), min_size=MAX_DEPTH + 1, max_size=300),
       inside=bracket_text)
def test_a_deep_file_is_refused(write, kinds, inside):
    path = write(nested(kinds, json.dumps(inside)).encode())
    assert "--plan" in refused(read_json_file, path, "--plan")


@given(data=st.binary(min_size=1, max_size=200))
def test_random_bytes_are_their_json_value_or_one_input_error_naming_the_file(write, data):
    path = write(data)
    try:
        value = read_json_file(path, "--plan")
    except InputError as err:
        assert str(err).startswith(f"--plan {path}")
    else:
        assert value == json.loads(data.decode("utf-8-sig"))


@given(size=st.integers(101, 400), fill=st.sampled_from([b" ", b"[", b"\x00", b"\xff"]))
def test_files_over_the_limit_are_refused(write, size, fill):
    path = write(fill * size)
    assert "larger than 100 B" in refused(read_json_file, path, "--plan", max_bytes=100)
    assert read_json_file(write(b"[" + b" " * 97 + b"]"), "--plan", max_bytes=100) == []


@given(size=st.integers(11, 2000))
def test_text_over_the_limit_is_refused(size):
    text = json.dumps("a" * size)
    assert "longer than 10 characters" in refused(parse_json_text, text, "--x", max_chars=10)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def read() -> None:
        outcome.append(refused(read_json_file, fifo, "--plan"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock the reader, so that the test run can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert outcome and "not a regular file" in outcome[0]


def test_folders_devices_and_missing_files_are_refused(tmp_path):
    assert "is a folder" in refused(read_json_file, tmp_path, "--plan")
    assert "no such file" in refused(read_json_file, tmp_path / "none.json", "--plan")
    if os.path.exists("/dev/zero"):
        assert "not a regular file" in refused(read_json_file, "/dev/zero", "--plan")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path)
    assert "is a folder" in refused(read_json_file, link, "--plan")


@given(value=json_values, expected=st.sampled_from(list(EXPECTED)))
def test_a_value_of_another_type_is_refused_naming_both(write, value, expected):
    text = json.dumps(value)
    if type(value) is expected or (expected is float and type(value) is int):
        assert parse_json_text(text, "--pruner", expected) == value
    else:
        assert refused(parse_json_text, text, "--pruner", expected) == (
            f"--pruner must be a JSON {EXPECTED[expected]}, got {GIVEN[type(value)]}")
    if type(value) is not dict:  # the same check on a file
        assert refused(read_json_file, write(text.encode()), "--plan", expected_type=dict
                       ).endswith(f"must be a JSON object, got {GIVEN[type(value)]}")


@given(value=json_values, bad=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999",
                                               "-1e400", "1" + "0" * 400]))
def test_non_finite_numbers_are_refused_wherever_they_are(value, bad):
    text = json.dumps({"a": [value, {"b": "__BAD__"}]}).replace('"__BAD__"', bad)
    with pytest.raises(InputError) as info:
        parse_json_text(text, "--quantizer")
    assert type(info.value) is InputError  # a refusal, not "not JSON" (--set keeps that as text)
    assert str(info.value).startswith("--quantizer: ")
    assert "not a finite number" in str(info.value) or "out of range" in str(info.value)


# a first character that no JSON value starts with (drawn, not filtered: no health-check risk)
@given(text=st.builds(str.__add__, st.sampled_from("abcdeghjkmopqrsuvwxyz<>!?;:=()~'"),
                      st.text(max_size=29)))
def test_text_that_is_not_json_is_a_syntax_error(text):
    with pytest.raises(JSONSyntaxError, match="--set x must be JSON"):
        parse_json_text(text, "--set x")


def test_strict_utf8_and_no_lone_surrogates(write):
    assert read_json_file(write(b'\xef\xbb\xbf{"a": "\xc3\xbc"}'), "--plan") == {"a": "ü"}
    assert "not UTF-8" in refused(read_json_file, write(b'{"a": "\xc3"}'), "--plan")
    assert "lone surrogate" in refused(parse_json_text, '["\\udc80"]', "--x")
    assert parse_json_text('"\\ud83d\\ude00"', "--x") == "\U0001f600"


@pytest.mark.parametrize("text", ['{"a": 1, "a": 2}', '[{"x": {"b": 1, "b": 1}}]'])
def test_a_key_given_twice_is_refused_at_any_depth(tmp_path, text):
    """``json.loads`` keeps the last of two equal keys: a plan naming a layer twice, or a
    config giving ``bits`` twice, lost one unseen."""
    with pytest.raises(InputError, match="is given twice in one object") as refused:
        parse_json_text(text, "--x")
    assert not isinstance(refused.value, JSONSyntaxError)  # JSON, refused: never kept as text
    path = tmp_path / "twice.json"
    path.write_text(text)
    with pytest.raises(InputError, match="is given twice in one object"):
        read_json_file(path, "--plan")
