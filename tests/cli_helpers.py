"""Running a click command in-process, and the one-line error every user mistake must give."""

from __future__ import annotations

import click
from click.testing import CliRunner, Result


def run(command: click.Command, *args: object, prog_name: str | None = None) -> Result:
    return CliRunner().invoke(command, [str(a) for a in args], prog_name=prog_name)


def one_line_error(command: click.Command, prefix: str, *args: object) -> str:
    """Run and assert exit code 2 with exactly one stderr line starting with ``prefix``."""
    result = run(command, *args, prog_name=prefix.split(":")[0])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]
