"""Running a click command in-process, and the one-line error every user mistake must give."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import qlis


def run(command: click.Command, *args: object, prog_name: str | None = None) -> Result:
    return CliRunner().invoke(command, [str(a) for a in args], prog_name=prog_name)


def one_line_error(command: click.Command, prefix: str, *args: object) -> str:
    """Run and assert exit code 2 with exactly one stderr line starting with ``prefix``."""
    result = run(command, *args, prog_name=prefix.split(":")[0])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def within_5_s(call: Callable[[], str], fifo: Path) -> str:
    """``call()`` in a thread: it must return within 5 s (a FIFO must not block the reader);
    if it does not, the FIFO is opened for writing so that the thread ends, and the test fails."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as err:  # re-raised in the test's thread
            outcome.append(err)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {fifo} did not return within 5 s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def reconstruction_notes(path: Path) -> set[str | None]:
    """What each planned layer of an archive says of its reconstruction (None: nothing)."""
    with qlis.open(path) as archive:
        return {archive.entry(n).plan.get("reconstruction") for n in archive.names()
                if archive.entry(n).plan is not None}
