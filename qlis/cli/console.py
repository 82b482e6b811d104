"""Output conventions shared by the `qlis` and `qlis-iqa` commands: one vocabulary for both.

Every user mistake (a QlisError, an OSError, a bad or missing option) is one line
``PROG: error: ...`` and exit code 2 (`CommandGroup`); names from files are escaped before
printing (a tensor name is data, not terminal control); sizes are shown in binary units and
written as exact integers in JSON/CSV; tables show full names when piped and fold long names on
a terminal; every output file passes one rule; a device is checked against this machine before
any work.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import click

from qlis.errors import ConfigError, InputError, QlisError, first_line

INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C: 128 + SIGINT, as shells report it."""

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def escape(text: str) -> str:
    """``text`` with every unprintable character (control codes such as ESC, newlines, lone
    surrogates, zero-width marks) written as a Python escape, so a name cannot drive the terminal.

    >>> escape("layer\\x1b]52;c;aGk=\\x07.weight\\n")
    'layer\\\\x1b]52;c;aGk=\\\\x07.weight\\\\n'
    >>> escape("bloc\\udc80k"), escape("encoder.layer.0 ü")
    ('bloc\\\\udc80k', 'encoder.layer.0 ü')
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def human_bytes(n: float) -> str:
    """A size for people, in binary units (1 KiB = 1024 B); machine outputs keep exact bytes.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 2**30)
    ('512 B', '1.50 KiB', '3.00 GiB')
    """
    if type(n) is int and -1024 < n < 1024:  # most tensors of a long listing: one test
        return f"{n} B"
    value, unit = float(n), 0
    while round(abs(value), 2) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(n)} B" if unit == 0 else f"{value:.2f} {_UNITS[unit]}"


def describe_rel_mse(rel_mse: float) -> str:
    """A weight relative MSE (error energy / weight energy) with what it means: the SNR in dB
    and a coarse verdict (>= 20 dB small, 10-20 dB moderate, < 10 dB large).

    >>> describe_rel_mse(0.01)
    "weight relative MSE 0.01 (SNR 20.0 dB: small; the error holds 1% of the weights' energy)"
    >>> describe_rel_mse(4.0).split("; ")[1]
    "the error's energy is 4 times the weights')"
    """
    if not math.isfinite(rel_mse) or rel_mse < 0:
        return f"weight relative MSE {rel_mse} (not a valid error)"
    if rel_mse == 0:
        return "weight relative MSE 0 (exact)"
    snr = -10 * math.log10(rel_mse)
    verdict = "small" if snr >= 20 else "moderate" if snr >= 10 else "large"
    share = (f"the error holds {100 * rel_mse:.3g}% of the weights' energy" if rel_mse <= 1
             else f"the error's energy is {rel_mse:.3g} times the weights'")
    return f"weight relative MSE {rel_mse:.4g} (SNR {snr:.1f} dB: {verdict}; {share})"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], **layout: Any) -> str:
    """`table_lines` as one string."""
    return "\n".join(table_lines(headers, rows, **layout))


_BATCH = 4096  # lines or list items written per call by the echo_* functions


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[object]], **layout: Any) -> None:
    """`table_lines` written to stdout a few thousand lines at a time: a listing of 100,000
    tensors never exists as one string."""
    lines = iter(table_lines(headers, rows, **layout))
    while batch := list(itertools.islice(lines, _BATCH)):
        click.echo("\n".join(batch))


def echo_json_with_list(before: Mapping[str, Any], key: str, items: Iterable[Any],
                        after: Mapping[str, Any]) -> None:
    """``{**before, key: [*items], **after}`` as `strict_json` writes it, to stdout, the list
    encoded a few thousand items at a time: a long listing never exists as one string or
    one list. ``before`` and ``after`` are not empty."""
    items = iter(items)
    click.echo(f"{strict_json(before)[:-1]}, {json.dumps(key)}: [", nl=False)
    separator = ""
    while batch := list(itertools.islice(items, _BATCH)):
        click.echo(separator + strict_json(batch)[1:-1], nl=False)
        separator = ", "
    click.echo(f"], {strict_json(after)[1:]}")


def table_lines(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right: Collection[int] = (),
    fold: int = 0,
    terminal: bool | None = None,
    width: int | None = None,
) -> Iterable[str]:
    """Rows as the lines of a text table (rich's layout), cells escaped.

    Piped (``terminal`` False; default: whether stdout is a terminal) every cell is shown in
    full, however wide. On a terminal the table fits ``width`` (default: the terminal's) and
    column ``fold`` (the names) wraps onto further lines instead of being cut. Columns whose
    index is in ``right`` are right-aligned (numbers).
    """
    if terminal is None:
        terminal = sys.stdout.isatty()
    columns = _columns(headers, rows)
    if not terminal:  # rich's layout, written directly: linear in the rows (rich takes ~2 ms/row)
        return _plain_table(columns, right)
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, safe_box=True)
    for i, header in enumerate(headers):
        grid.add_column(
            header,
            justify="right" if i in right else "left",
            overflow="fold",
            no_wrap=not terminal or i != fold,
        )
    for row in itertools.islice(zip(*columns, strict=True), 1, None):
        grid.add_row(*(Text(cell) for cell in row))
    width = width or shutil.get_terminal_size((80, 24)).columns
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False,
            highlight=False, emoji=False, legacy_windows=False).print(grid)
    return [line.rstrip() for line in buffer.getvalue().splitlines()]


def _columns(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[list[str]]:
    """The table's columns, each its header then its cells, as escaped text; a column with
    nothing to escape (nearly always) is kept as it is, after one test of all its text."""
    columns = [[header] for header in headers]
    for column, cells in zip(columns, zip(*rows, strict=True), strict=False):  # no rows: headers
        column.extend(map(str, cells))
    return [c if " ".join(c).isprintable() else list(map(escape, c)) for c in columns]


def _plain_table(columns: list[list[str]], right: Collection[int]) -> Iterator[str]:
    """Every cell in full: columns as wide as their widest cell, three spaces apart, a rule
    under the headers (rich's SIMPLE_HEAD box without edges), trailing spaces measured but
    not drawn (as rich does). ASCII cells without trailing spaces (nearly always) take one
    format string per line (fast on 100,000-row listings)."""
    if all("".join(c).isascii() and " \n" not in "\n".join([*c, ""]) for c in columns):
        widths = [max(map(len, column)) for column in columns]  # the common case: one format
        line = "   ".join(f"%{'' if i in right else '-'}{w}s" for i, w in enumerate(widths))
        lines = map(str.rstrip, map(line.__mod__, zip(*columns, strict=True)))
    else:
        lines, widths = _padded_lines(columns, right)
    yield next(lines)
    yield "\u2500" * (sum(widths) + 3 * (len(widths) - 1))
    yield from lines


def _padded_lines(columns: list[list[str]],
                  right: Collection[int]) -> tuple[Iterator[str], list[int]]:
    """`_plain_table`'s lines and column widths for any text: wide and combining characters
    measured in terminal cells, trailing spaces measured but not drawn."""
    padded, widths = [], []
    for i, column in enumerate(columns):
        ascii_only = "".join(column).isascii()
        width = max(map(len if ascii_only else _cells, column))
        values = [value.rstrip(" ") for value in column] if " \n" in "\n".join(
            [*column, ""]) else column  # trailing spaces are rare: one test for the column
        if ascii_only:
            pad = str.rjust if i in right else str.ljust
            padded.append(list(map(pad, values, itertools.repeat(width))))
        else:
            spaces = [" " * (width - _cells(value)) for value in values]
            padded.append([s + v if i in right else v + s
                           for v, s in zip(values, spaces, strict=True)])
        widths.append(width)
    return map(str.rstrip, map("   ".join, zip(*padded, strict=True))), widths


def _cells(text: str) -> int:
    """Terminal cells ``text`` takes (wide and combining characters: rich's measure)."""
    from rich.cells import cell_len

    return cell_len(text)


def strict_json(value: Any, **dumps: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null (Python's default writes
    the non-standard ``NaN``/``Infinity``).

    >>> strict_json({"k": float("inf"), "rows": [1.5, float("nan")]})
    '{"k": null, "rows": [1.5, null]}'
    """

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    try:  # nearly always nothing to replace: one pass, no copy
        return json.dumps(value, allow_nan=False, **dumps)
    except ValueError:
        return json.dumps(clean(value), allow_nan=False, **dumps)


UNIFORM_FLAGS = {"k": ("prune",), "bits": ("quant",)}
"""The uniform flags of the paper's policies, and the policies they set: the others choose
those values per layer (a uniform --bits would silently override lapq's levels, and --k would
add pruning to quant)."""
LEVELS_POLICIES = ("prune", "quant", "lap", "laq", "lapq", "levels")
"""The policies of k and bits levels (qlis.plan.policy.LevelsPolicy): ``k_levels`` and
``bits_levels`` are theirs; rd, or a plugin's policy, has neither."""
QUANTIZING_POLICIES = ("quant", "laq", "lapq", "levels")
"""The policies that quantize by bits, which --granularity, --method and --quantizer shape."""


def check_policy_flags(policy: str, given: Collection[str], levels_hint: bool = True) -> None:
    """Refuse a flag given with a policy it does not apply to, which the library would
    accept with another meaning or ignore; ``levels_hint``: name `qlis pack`'s ``--set`` way
    to change the levels."""
    for key, policies in UNIFORM_FLAGS.items():
        if key in given and policy not in policies:
            if policy not in LEVELS_POLICIES:  # no levels to change: no --set hint
                raise InputError(f"--{key} applies to --policy {' or '.join(policies)}; policy "
                                 f"{policy!r} does not take it")
            raise InputError(
                f"--{key} applies to --policy {' or '.join(policies)}; policy {policy!r} sets "
                "it per layer" + (f" (use --set {key}_levels=[...] to change its levels)"
                                  if levels_hint else ""))
    for key in ("granularity", "method", "quantizer"):
        if key in given and policy not in QUANTIZING_POLICIES:
            raise InputError(f"--{key} applies to policies that quantize by bits "
                             f"({', '.join(QUANTIZING_POLICIES)}), not {policy!r}")


@contextlib.contextmanager
def errors_as_flags(names: Iterable[str], given: Collection[str] = (),
                    help_hint: str = "") -> Iterator[None]:
    """The library's option errors raised inside, in a command's words: its flags, not the
    Python keywords (`as_flags`)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(as_flags(str(err), names, given, help_hint)) from None


def as_flags(message: str, names: Iterable[str], given: Collection[str] = (),
             help_hint: str = "") -> str:
    """A library message as a command-line user reads it: each Python keyword in ``names``
    written as its flag (``target_ratio=`` as ``--target-ratio``). A name of several words
    is replaced wherever it stands; a one-word name (``k``, ``bits``: also plain words) only
    where its flag is in ``given``. The library's list of known keywords, which the command
    does not all take, gives way to ``help_hint``, and a hint for `qlis pack` is dropped.

    >>> as_flags("give one target, not target_bits_per_weight, target_ratio",
    ...          ["target_ratio", "target_bits_per_weight", "bits"])
    'give one target, not --target-bits-per-weight, --target-ratio'
    >>> as_flags("unknown option(s) bits for policy 'rd'; known: max_distortion", ["bits"],
    ...          given=["bits"], help_hint="see 'qlis-iqa compress -h'")
    "unknown option(s) --bits for policy 'rd'; see 'qlis-iqa compress -h'"
    >>> as_flags("pass paper_cr= (qlis pack --paper-cr)", ["paper_cr"])
    'pass --paper-cr'
    >>> as_flags('pass it as quantizer={"id": "kmeans"} instead of method=', ["quantizer"])
    'pass it as --quantizer {"id": "kmeans"} instead of method='
    >>> as_flags("give either k= (sigma pruning) or pruner=, not both", ["k", "pruner"], ["k"])
    'give either --k (sigma pruning) or pruner=, not both'
    """
    head, listed, _ = message.partition("; known: ")
    message = head + (f"; {help_hint}" if listed and help_hint else "")
    message = re.sub(r" \(qlis pack [^)]*\)", "", message)
    names = list(names)
    if names:  # any name written as a keyword (quantizer=...) is its flag and a value
        message = re.sub(_any_of(names) + r"=(?=[\w{\[\"'+-])",
                         lambda m: _flag(m.group(1)) + " ", message)
    words = [n for n in names if "_" in n or n in given]
    if not words:
        return message
    return re.sub(_any_of(words) + r"\b=?", lambda m: _flag(m.group(1)), message)


def _any_of(names: list[str]) -> str:
    """A pattern of any of ``names`` as a whole word (longest first), captured."""
    return r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + ")"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _UserError(click.ClickException):
    exit_code = 2


def _one_line(err: click.ClickException) -> str:
    """click's message on one line (it lists choices on lines of their own), its control
    codes escaped (a path the user gave may hold ESC sequences that drive the terminal)."""
    return escape(" ".join(err.format_message().split()))


class _PathParameter(click.Path):
    """click's Path, refusing an empty string: pathlib reads '' as the current folder, so
    ``qlis inspect ''`` would inspect whatever folder the shell is in."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> object:
        if isinstance(value, str) and not value:
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


PATH = _PathParameter(path_type=Path)
"""The type of every path argument and option of `qlis` and `qlis-iqa`."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Raise KeyboardInterrupt, except inside an import, which it would leave half done (a
    numpy or scipy module missing its names: a traceback instead of "interrupted"): there
    the signal is sent again a moment later."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            threading.Timer(_RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


_RETRY_S = 0.05


@contextlib.contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, torchrun ending a failed job's other ranks) unwinds
    the command as Ctrl-C does, so that the files it was writing are removed; by default it
    ended the process where it stood and left them. Ctrl-C itself waits for an import in
    progress (`_interrupt`): Python's own handler raised inside torch's start-up, which
    swallowed it (the command ran on and exited 0) or left numpy half imported (a
    traceback); a SIGINT handler the caller set (ignored, in a background job) is kept. Only
    the main thread sets handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|out of memory",
                            re.IGNORECASE)
"""What torch's allocators say when an allocation fails: a plain RuntimeError on the CPU
("DefaultCPUAllocator: can't allocate memory"), torch.OutOfMemoryError on a GPU."""


def _is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed (Python's, or torch's on any device)."""
    return isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError) and (type(err).__name__ == "OutOfMemoryError"
                                           or bool(_OUT_OF_MEMORY.search(first_line(err)))))


class CommandGroup(click.Group):
    """The error policy of both commands: a user's mistake is one line ``PROG: error: ...``
    on stderr and exit code 2, whether it comes from the library (a QlisError), the system (an
    OSError, naming the file; memory that runs out, with what to lower) or the command line
    itself (click's usage errors, which would otherwise print four lines); a closed stdout
    ends the output quietly (exit code 1). Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QlisError as err:
            raise _UserError(str(err)) from None
        except (MemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err):
                raise
            said = first_line(err, 200) or type(err).__name__
            raise _UserError(f"out of memory ({said}); lower the batch size or the number of "
                             "jobs, or run on a machine with more memory") from None
        except BrokenPipeError:
            silence_broken_pipe()
            ctx.exit(1)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise _UserError(f"{where}{err.strerror or err}") from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        prog = kwargs.get("prog_name") or self.name
        try:
            with _terminated_as_interrupted():
                result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else prog
            click.echo(f"{prog}: error: {_one_line(err)} (see '{where} -h')", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"{prog}: error: {_one_line(err)}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:  # Ctrl-C (or end of input at a prompt)
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)


class LazyCommandGroup(CommandGroup):
    """A `CommandGroup` whose commands are imported when first used: ``lazy`` maps each
    command name to "module:attribute", so that a command that needs little (``qlis info``)
    does not wait for the others' imports (torch). `load` is the same lookup, for the parts
    of a light command that need a heavy module only on request."""

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The table's commands in its order, then any added directly (sorted), whether
        loaded yet or not."""
        return [*self._lazy, *(n for n in super().list_commands(ctx) if n not in self._lazy)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy and name not in self.commands:
            self.add_command(self.load(self._lazy[name]), name)
        return super().get_command(ctx, name)

    @staticmethod
    def load(target: str) -> Any:
        """The object ``target`` ("module:attribute") names, its module imported if need be.
        An import that the environment makes fail (torch refuses TORCH_DISTRIBUTED_DEBUG=x
        with a ValueError) is the user's error, one line, not a traceback."""
        module, _, attribute = target.partition(":")
        try:
            imported = importlib.import_module(module)
        except ValueError as err:
            raise _UserError(f"cannot start: {first_line(err)}") from None
        return getattr(imported, attribute)


def silence_broken_pipe() -> None:
    """After the reader of stdout went away (``| head``): drop the rest of the output quietly,
    as other command-line tools do, instead of reporting an error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def check_input(path: str | os.PathLike, what: str = "file or folder") -> Path:
    """``path`` if it exists; an InputError naming it otherwise (checked before any work),
    with the reason where it is not that nothing is there (a loop of links, a folder that
    cannot be searched): ``Path.exists`` says False for those too."""
    path = Path(path)
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{escape(str(path))}: no such {what}") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise InputError(f"{escape(str(path))}: cannot be read "
                         f"({getattr(err, 'strerror', None) or err})") from None
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one existing file (through a symlink or hard link too): how
    an output is compared with the inputs."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _no_folder(parent: Path) -> InputError:
    """Why an output's parent cannot hold it: absent, or a file in the folder's place (``-o
    model.pt/out.qlis`` is not "no such folder")."""
    if parent.exists() or parent.is_symlink():
        return InputError(f"{parent}: is not a folder")
    return InputError(f"{parent}: no such folder (create it first)")


def check_output(
    path: str | os.PathLike,
    force: bool,
    suffixes: Collection[str] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Apply the one rule for every file either tool writes, before any work is done.

    The name must end in one of ``suffixes`` (when given); its folder must already exist
    (never created silently); an existing file is replaced only with ``force``; and a path
    that is one of ``inputs`` (the same file, through a symlink or hard link too) is refused
    even with ``force``.
    """
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(f"{path}: the output must end in {' or '.join(sorted(suffixes))}")
    for source in inputs:
        if same_file(path, source):
            raise InputError(f"{path} is one of the inputs; write the output somewhere else")
    parent = path.parent
    if not parent.is_dir():
        raise _no_folder(parent)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise InputError(f"{path} exists; pass --force to replace it")
    _check_writable(parent, path)
    return path


def _check_writable(folder: Path, path: Path) -> None:
    """Refuse an output whose folder cannot take a file, before the work (a calibrated
    compress ran 20 s before it found out): the output is written beside itself first."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise InputError(f"{path}: cannot write beside it ({err.strerror or err})") from None


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, what: str = "the size") -> int:
    """Bytes from a size as Hugging Face writes it: ``5GB`` (10^9), ``500MiB`` (2^20), or a
    plain number of bytes.

    >>> parse_size("5GB"), parse_size("1.5 KiB"), parse_size("4096")
    (5000000000, 1536, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or len(match.group(1)) > 20:
        raise InputError(f"{what} {text!r} is not a size (e.g. 5GB, 500MiB or a number of "
                         "bytes)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise InputError(f"{what} {text!r} must be at least one byte")
    return size


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """The rule for an output folder: its parent must exist, and a folder that already holds
    files is written into only with ``force``."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():  # a link to nowhere too
        raise InputError(f"{path} exists and is not a folder")
    if not path.parent.is_dir():
        raise _no_folder(path.parent)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{path} exists and is not empty; pass --force to write into it")
    _check_writable(path if path.is_dir() else path.parent, path)
    return path
