"""The ``qlis`` command: inspect, pack, unpack, info, demo.

Every user mistake (a QlisError, a file that cannot be read or written, a bad option) is one
line on stderr and exit code 2 (`qlis.cli.console.CommandGroup`, shared with ``qlis-iqa``). The
commands are imported when they run (`qlis.cli.console.LazyCommandGroup`): ``qlis info`` reads a
header without torch, the commands that work on models (qlis.cli.model_commands,
qlis.cli.unpack) load it.
"""

from __future__ import annotations

import gc

import click

from qlis.cli.console import LazyCommandGroup
from qlis.version import __version__
from qlis.workers.memory import set_the_commands_allocator

CONTEXT = {"help_option_names": ["-h", "--help"]}
COMMANDS = {
    "inspect": "qlis.cli.model_commands:inspect",
    "pack": "qlis.cli.model_commands:pack",
    "unpack": "qlis.cli.unpack:unpack",
    "info": "qlis.cli.info:info",
    "demo": "qlis.cli.model_commands:demo",
}


@click.group(cls=LazyCommandGroup, name="qlis", context_settings=CONTEXT, lazy=COMMANDS)
@click.version_option(__version__, prog_name="qlis")
def cli() -> None:
    """qlis: layer-importance-guided pruning, quantization and compact archives."""
    _resume_collections()  # the command's module is imported by now; it runs next


_start_up = {"collections_paused": False}


def _pause_collections() -> None:
    """Pause Python's cyclic garbage collector while the process starts: each collection that
    importing torch, numba and the command triggers walks every object loaded so far (0.4 s
    of the 2.4 s an unpack spends before its first tensor). `_resume_collections` gives it
    back before the command runs."""
    gc.disable()
    _start_up["collections_paused"] = True


def _resume_collections() -> None:
    """The collector back, what start-up loaded frozen out of its walks (`gc.freeze`: modules
    and their objects live as long as the process); nothing where main did not pause it (a
    test's runner, a program that calls `cli`)."""
    if _start_up["collections_paused"]:
        _start_up["collections_paused"] = False
        gc.freeze()
        gc.enable()


def main() -> None:
    _pause_collections()
    set_the_commands_allocator()
    cli(prog_name="qlis")


if __name__ == "__main__":
    main()
