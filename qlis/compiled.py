"""numba's ``njit``, with its on-disk cache of compiled kernels in a folder it can write.

numba keeps compiled kernels (``cache=True``) beside the source, in ``__pycache__``, or
where that is read-only, in the user's cache folder; with neither writable (a package
installed by root, run by a user whose HOME is read-only, as containers do) every
``@njit(cache=True)`` raised at import, and every command that reads an archive with it.
Modules that compile kernels import ``njit`` from here: the cache then goes to a folder of
this user's under the system's temporary folder, and the kernels are compiled once per
machine, not per process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba
from numba import njit
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


def choose_cache_folder() -> str | None:
    """Point numba's cache at a temporary folder of this user's when neither of its own
    places is writable (nor one given in NUMBA_CACHE_DIR); returns that folder, or None where
    numba's own choice stands."""
    if numba.config.CACHE_DIR:
        return None
    beside_source = Path(__file__).parent / "__pycache__"
    user_wide = Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    if _writable(beside_source) or _writable(user_wide):
        return None
    user = getattr(os, "getuid", lambda: "user")()  # one folder per user: theirs to write
    folder = Path(tempfile.gettempdir()) / f"qlis-numba-cache-{user}"
    if not _writable(folder):
        return None  # nowhere: numba's own error names the kernel
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"] = str(folder)
    return str(folder)


choose_cache_folder()
