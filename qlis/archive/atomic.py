"""Atomic file writes: a temporary file in the target's folder, fsync, then publish it.

An interrupted write never leaves a half file under the target name, and a file the user
already had is only replaced once the new one is complete on disk. New files follow the
umask like any other tool's; a replaced file keeps its mode. Without ``overwrite`` the file
is published with a hard link, which fails if the target appeared meanwhile, so a file that
someone else creates while we write is never clobbered. Temporaries are named
``.NAME.qlis-tmp-PID-RANDOM`` (`temporary_name`); those left by a killed qlis are removed on
the next write to their folder. A set of files published together (a model's shards and
their index) is renamed into place with Ctrl-C and SIGTERM held back (`signals_deferred`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qlis.errors import InputError

TMP_MARK = ".qlis-tmp-"
STALE_SECONDS = 300
_TMP_NAME = re.compile(r"^\..+\.qlis-tmp-(\d+)-[0-9a-f]{8}$")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_NAME_MAX = 255  # bytes in one file name on the file systems qlis writes to
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or not ours to judge): leave its file alone
    return True


def clean_stale(folder: Path) -> list[Path]:
    """Remove our own temporaries in ``folder`` whose writer is gone (dead pid) and that are
    older than STALE_SECONDS; returns what was removed."""
    removed = []
    now = time.time()
    try:
        names = [n for n in os.listdir(folder) if TMP_MARK in n]
    except OSError:
        return removed
    for name in names:
        match = _TMP_NAME.match(name)
        if not match:
            continue
        path = folder / name
        try:
            old = now - path.lstat().st_mtime > STALE_SECONDS
            if old and not _alive(int(match.group(1))):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def hidden_beside(path: Path, suffix: str) -> Path:
    """``.NAME`` + ``suffix`` in ``path``'s folder, NAME cut (at a character) so that the
    whole name fits a file system's 255 bytes: a target whose own name is near that long
    still gets its temporaries."""
    room = _NAME_MAX - 1 - len(os.fsencode(suffix))
    name = path.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return path.parent / f".{name}{suffix}"


def temporary_name(path: Path) -> Path:
    """A fresh name beside ``path`` for a file that is to become it, named as `clean_stale`
    knows them: one that a killed writer leaves (a finished shard waiting for the others) is
    removed by a later write to the folder, not kept for ever."""
    return hidden_beside(path, f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _create_temporary(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0666 so the umask applies."""
    for _ in range(100):
        tmp = temporary_name(path)
        try:
            fd = os.open(tmp, _CREATE, 0o666)
        except FileExistsError:
            continue
        except OSError as err:  # name the target the user gave, not our temporary name
            raise InputError(f"{path}: cannot write beside it ({err.strerror or err})") from None
        os.close(fd)
        return tmp
    raise InputError(f"{path.parent}: cannot create a temporary file")


def new_file_mode(folder: Path) -> int:
    """The permissions a new file gets in ``folder`` (0666 less the umask), learnt from one
    made and removed: reading the umask means setting it, for every thread at once."""
    probe = _create_temporary(folder / "mode")
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def keep_mode(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the permissions of the file ``path`` it is to replace, if there is one:
    the read and write bits, not setuid/setgid/sticky (the tensors we write run nothing)."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, os.stat(path).st_mode & 0o777)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        keep_mode(tmp, path)
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-replace race
    except FileExistsError:
        raise InputError(
            f"{path} appeared while it was being written; it was kept. Pass --force "
            "(overwrite=True) to replace it"
        ) from None
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        if path.exists() or path.is_symlink():  # no hard links here: check, then rename
            raise InputError(f"{path} exists; pass --force (overwrite=True) to replace it") from err
        os.replace(tmp, path)
        return
    tmp.unlink()


def new_temporary(path: Path, overwrite: bool = True) -> Path:
    """A new empty temporary file beside ``path`` (refused when ``path`` exists and not
    ``overwrite``), for `publish` to make it ``path``; the folder's stale ones removed."""
    if not overwrite and (path.exists() or path.is_symlink()):
        raise InputError(f"{path} exists; pass --force (overwrite=True) to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{parent}: no such folder")
    clean_stale(parent)
    return _create_temporary(path)


def publish(tmp: Path, path: Path, overwrite: bool = True) -> None:
    """Make the written temporary ``tmp`` (from `new_temporary`) ``path``, durably: its data
    and then its name reach the disk. Where that fails, ``tmp`` is removed."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some systems; the rename is done
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the block runs, then delivered as they would have
    been: renames that must all happen or none (shards that replace an earlier set of the
    same names) are not cut in two, which left a model mixed from two archives that loads
    without a word. Only the main thread can set handlers (elsewhere: nothing held back); an
    ignored signal stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in _DEFERRED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda got, _: caught.append(got))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path`` durably.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     target = os.path.join(folder, "out.txt")
    ...     with atomic_path(target) as tmp:
    ...         _ = tmp.write_text("done")
    ...     Path(target).read_text()
    'done'
    """
    path = Path(path)
    tmp = new_temporary(path, overwrite)
    created = tmp.stat().st_mode & 0o7777  # what the umask gives a new file
    try:
        yield tmp
        if tmp.stat().st_mode & 0o7777 != created:  # a writer that made the file anew
            os.chmod(tmp, created)                   # (safetensors: 0600)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path, overwrite)
