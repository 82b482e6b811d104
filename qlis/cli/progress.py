"""Progress bars for the commands that work on models (qlis.cli.model_commands,
qlis.cli.unpack), and the ``--quiet`` option that turns them off."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")

Bar = Callable[[int], None]


@contextmanager
def progress_bars(quiet: bool = False) -> Iterator[Callable[..., Bar | None]]:
    """Progress bars on a terminal (stderr), one per pass of a command, in one display; silent
    when piped or ``quiet``. ``add(label, total, unit)`` starts a bar and returns what advances
    it; a bar with ``total=None`` (a pass whose length is found as it goes) counts what was
    done, with its rate and the time spent."""
    if quiet or not sys.stderr.isatty():
        yield lambda label, total, unit="parameters": None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Remaining(TimeRemainingColumn):
        def render(self, task):  # noqa: ANN001, ANN202 - rich's interface
            return super().render(task) if task.total is not None else ""

    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.completed:,} {task.fields[unit]}"), TimeElapsedColumn(),
               _Remaining()]
    with Progress(*columns, transient=True) as display:

        def add(label: str, total: int | None, unit: str = "parameters") -> Bar | None:
            if total is not None and total <= 0:
                return None
            task = display.add_task(label, total=total, unit=unit)
            return lambda n: display.advance(task, n)

        yield add
