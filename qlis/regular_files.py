"""Opening the files a user names, which are hostile until checked.

Only a regular file is opened: anything else is refused from ``os.stat`` before any open (opening
some devices acts on them, and a FIFO's reader waits for a writer), and the open itself cannot
block (``O_NONBLOCK``) and is checked again, in case the path was replaced in between. A small
file (a config, an index, an annotation sheet, a JSON option) is read whole but bounded: a file
can grow while it is read, or lie about its size (/proc).
"""

from __future__ import annotations

import os
import stat

from qlis.cli.console import escape, human_bytes
from qlis.errors import InputError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for a message (``mode`` from ``os.stat``)."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular_file(path: str | os.PathLike, subject: str | None = None,
                      expected: str = "a file") -> int:
    """A read-only descriptor of the regular file at ``path``. Messages name it as ``subject``
    (default: the path, escaped) and say what to give instead: ``expected``."""
    subject = escape(os.fspath(path)) if subject is None else subject
    try:
        kind = os.stat(path).st_mode
        if stat.S_ISREG(kind):
            fd = os.open(path, _OPEN_FLAGS)
            kind = os.fstat(fd).st_mode
            if stat.S_ISREG(kind):
                return fd
            os.close(fd)
    except FileNotFoundError:
        raise InputError(f"{subject}: no such file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise InputError(f"{subject}: cannot be read "
                         f"({getattr(err, 'strerror', None) or err})") from None
    if stat.S_ISDIR(kind):
        raise InputError(f"{subject} is a folder; give {expected}")
    raise InputError(f"{subject} is not a regular file but {file_kind(kind)}; give {expected}")


def read_small_file(path: str | os.PathLike, max_bytes: int, subject: str | None = None,
                    expected: str = "a file") -> bytes:
    """The whole regular file at ``path``, of at most ``max_bytes`` (see `open_regular_file`
    for ``subject`` and ``expected``)."""
    subject = escape(os.fspath(path)) if subject is None else subject
    too_large = InputError(f"{subject} is larger than {human_bytes(max_bytes)}, the most "
                           f"accepted for {expected}; is it the right file?")
    fd = open_regular_file(path, subject, expected)
    with open(fd, "rb") as file:
        if os.fstat(fd).st_size > max_bytes:
            raise too_large
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large
    return data
