"""numba's ``njit``, with its on-disk cache of compiled kernels in a folder it can write.

numba keeps compiled kernels (``cache=True``) beside the source, in ``__pycache__``, or
where that is read-only, in the user's cache folder; with neither writable (a package
installed by root, run by a user whose HOME is read-only, as containers do) every
``@njit(cache=True)`` raised at import, and every command that reads an archive with it.
Modules that compile kernels import ``njit`` from here: the cache then goes to a private
folder of this user's under the system's temporary folder (the cache holds pickled data and
machine code: a folder another user could write or link is never used), and where there is
none, kernels are compiled in each process without a cache.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
from numba.misc.appdirs import AppDirs

__all__ = ["njit", "choose_cache_folder"]


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (made if absent), as numba itself tries."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _private(folder: Path) -> bool:
    """``folder`` made if absent (mode 0700), and then a real folder (not a link) of this
    user's that no one else may write."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and _writable(folder))


def choose_cache_folder() -> str | None:
    """Where kernels are cached: None where numba's own choice works (a writable
    NUMBA_CACHE_DIR, or beside the source, or the user's cache folder), else a private folder
    under the temporary one, which numba is told; "" where there is none (no cache)."""
    given = numba.config.CACHE_DIR
    if given and _writable(Path(given)):
        return None
    if not given:
        beside_source = Path(__file__).parent / "__pycache__"
        user_wide = Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)
        if _writable(beside_source) or _writable(user_wide):
            return None
    folder = ""
    if hasattr(os, "getuid"):  # a private folder needs an owner to check
        candidate = Path(tempfile.gettempdir()) / f"qlis-numba-cache-{os.getuid()}"
        folder = str(candidate) if _private(candidate) else ""
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"] = folder
    return folder


_CACHE = choose_cache_folder()


def njit(*args: Any, **kwargs: Any) -> Callable:
    """``numba.njit``; ``cache=True`` is dropped where no folder can hold the cache (numba
    would raise at import)."""
    if _CACHE == "":
        kwargs.pop("cache", None)
    return numba.njit(*args, **kwargs)
