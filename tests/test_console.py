"""qlis.cli.console: the output conventions both CLIs share (escaping, sizes, tables, the one rule
for output files)."""

from __future__ import annotations

import doctest
import io
import json
import os
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

import qlis.cli.console
from qlis.cli import console
from qlis.cli.console import (
    check_output,
    check_output_dir,
    echo_json_with_list,
    escape,
    human_bytes,
    strict_json,
    table,
)
from qlis.errors import InputError


def test_docstring_examples():
    assert doctest.testmod(qlis.cli.console, verbose=False).failed == 0


@given(st.text())
def test_escape_leaves_nothing_a_terminal_would_act_on(text):
    shown = escape(text)
    assert shown.isprintable()
    shown.encode("utf-8")  # lone surrogates are escaped, so the line can always be written
    if text.isprintable():
        assert shown == text


def test_escape_shows_control_sequences_as_escapes():
    name = "w\x1b]52;c;ZXZpbA==\x07\nx\udc80"
    assert escape(name) == "w\\x1b]52;c;ZXZpbA==\\x07\\nx\\udc80"


@given(st.integers(min_value=0, max_value=2**60))
def test_human_bytes_is_binary_and_close(n):
    text = human_bytes(n)
    number, unit = text.split()
    power = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"].index(unit)
    assert float(number) * 1024**power == pytest.approx(n, rel=0.005, abs=0.5)
    assert power == 0 or 1 <= float(number) < 1024


LONG = "encoder.layer.11.attention.output.dense." + "very_long_segment." * 6 + "weight"


def test_table_piped_never_cuts_names():
    out = table(["tensor", "bytes"], [(LONG, "1,024"), ("b", "8")], right={1}, terminal=False)
    lines = out.splitlines()
    assert any(line.startswith(LONG + " ") for line in lines)
    assert "…" not in out


def test_table_on_a_terminal_folds_names_to_the_width():
    out = table(["tensor", "bytes"], [(LONG, "1,024")], right={1}, terminal=True, width=40)
    lines = out.splitlines()
    assert all(len(line) <= 40 for line in lines)
    first_column = "".join(line.split()[0] for line in lines[2:])
    assert first_column == LONG  # wrapped in order, nothing lost


def test_table_cells_are_escaped_and_not_markup():
    out = table(["tensor"], [("[bold]x\x1b[2J",)], terminal=False)
    assert "[bold]x\\x1b[2J" in out and "\x1b" not in out


def test_strict_json_has_no_nan_or_infinity():
    text = strict_json({"k": float("inf"), "v": [float("-inf"), float("nan"), 1.0]})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(text, parse_constant=refuse) == {"k": None, "v": [None, None, 1.0]}


def test_check_output_suffix_parent_and_force(tmp_path):
    with pytest.raises(InputError, match="must end in .qlis"):
        check_output(tmp_path / "z.txt", False, (".qlis",))
    with pytest.raises(InputError, match="no such folder"):
        check_output(tmp_path / "absent" / "x.qlis", True, (".qlis",))
    assert not (tmp_path / "absent").exists()
    (tmp_path / "model.pt").write_bytes(b"model")  # was reported as "no such folder"
    with pytest.raises(InputError, match="model.pt: is not a folder"):
        check_output(tmp_path / "model.pt" / "x.qlis", True, (".qlis",))
    with pytest.raises(InputError, match="model.pt: is not a folder"):
        check_output_dir(tmp_path / "model.pt" / "shards", True)
    existing = tmp_path / "x.qlis"
    existing.write_bytes(b"keep")
    with pytest.raises(InputError, match="--force"):
        check_output(existing, False, (".qlis",))
    assert check_output(existing, True, (".qlis",)) == existing
    assert existing.read_bytes() == b"keep"


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_check_output_refuses_an_input_even_with_force(tmp_path, link):
    source = tmp_path / "model.pt"
    source.write_bytes(b"model")
    target = tmp_path / "alias.pt"
    if link == "same":
        target = source
    elif link == "symlink":
        target.symlink_to(source)
    else:
        os.link(source, target)
    with pytest.raises(InputError, match="one of the inputs"):
        check_output(target, True, (".pt",), inputs=[source])


def test_check_output_dir(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        check_output_dir(tmp_path / "a" / "b", True)
    assert check_output_dir(tmp_path / "new", False) == tmp_path / "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match=re.escape("not empty; pass --force")):
        check_output_dir(tmp_path / "full", False)
    check_output_dir(tmp_path / "full", True)


def _rich_table(headers, rows, right):
    """The oracle: rich's own rendering of the piped table (every cell in full)."""
    cells = [[escape(str(c)) for c in row] for row in rows]
    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, safe_box=True)
    for i, header in enumerate(headers):
        grid.add_column(header, justify="right" if i in right else "left", overflow="fold",
                        no_wrap=True)
    for row in cells:
        grid.add_row(*(Text(c) for c in row))
    widths = [cell_len(h) for h in headers]
    for row in cells:
        widths = [max(w, cell_len(c)) for w, c in zip(widths, row, strict=True)]
    buffer = io.StringIO()
    Console(file=buffer, width=sum(widths) + 3 * len(widths) + 1, color_system=None,
            force_terminal=False, highlight=False, emoji=False).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


@given(
    rows=st.lists(st.tuples(st.text(min_size=1, max_size=12), st.integers(0, 10**9),
                            st.floats(allow_nan=False, width=32)), max_size=12),
    right=st.sets(st.integers(0, 2)),
)
def test_piped_tables_are_rich_s_layout_written_directly(rows, right):
    headers = ["layer", "params", "x"]
    assert table(headers, rows, right=right, terminal=False) == _rich_table(headers, rows, right)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_rows = st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.dictionaries(st.text(max_size=5), json_scalars, min_size=1, max_size=3),
       rows=st.lists(json_rows, max_size=12), batch=st.integers(1, 5),
       after=st.dictionaries(st.text(max_size=5), json_scalars, min_size=1, max_size=3))
def test_a_streamed_listing_is_the_json_of_the_whole(monkeypatch, capsys, before, rows, batch,
                                                      after):
    """`echo_json_with_list` writes, batch by batch, exactly what one `strict_json` call
    would write for the whole document (NaN and infinities as null included)."""
    key = "tensors"
    before = {k: v for k, v in before.items() if k != key}
    after = {k: v for k, v in after.items() if k not in before and k != key}
    assume(before and after)
    monkeypatch.setattr(console, "_BATCH", batch)
    capsys.readouterr()
    echo_json_with_list(before, key, iter(rows), after)
    assert capsys.readouterr().out == strict_json({**before, key: rows, **after}) + "\n"
