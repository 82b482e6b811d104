"""What a pack's first pass measured, kept beside the output so an interrupted pack resumes.

The first pass (every layer's statistics and rd's rate-distortion curves) is about half of a
data-free pack. After it, `PassCache` writes its results next to the output
(``.NAME.qlis-pass1.json``, atomically); ``qlis pack --resume`` reads them back instead of
measuring again, when they were made from the same input files, unchanged (inode, size,
times), with the same options and qlis version, and the file is as it was written (its
digest), and removes the file once the archive is written. A cache that does not match, or
does not parse, is ignored and measured again: it is never trusted further than the checks
below, and a pack that fails after using it measures again, once (`qlis.archive.pack.pack`);
a pack that fails with a user's error removes it. The digest finds damage, not forgery:
whoever can write beside the output can replace the output itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qlis.archive.atomic import atomic_path, hidden_beside
from qlis.errors import InputError
from qlis.json_input import parse_json_text
from qlis.regular_files import read_small_file
from qlis.version import __version__

MAX_CACHE_BYTES = 1 << 28
"""256 MiB: the first pass of a model of some 50,000 layers (rd's candidates of one take
about 5 KB of JSON); a larger one is not saved."""
CACHE_FORMAT = 2
"""The saved document's layout (2: a digest line first), part of the fingerprint."""
_DIGEST_LINE = 65


def _plain(result: Any) -> Any:
    """A result that is plain JSON already (read back, or made so by its caller)."""
    return result


class PassCache:
    """First-pass results under keys (``"inspect"``, ``"rd"``), tied to a ``fingerprint`` of
    the input files and options; ``resume=False`` starts afresh (and overwrites)."""

    @staticmethod
    def path_for(output: str | os.PathLike) -> Path:
        """Where the pass cache of an archive written to ``output`` lies."""
        return hidden_beside(Path(output), "-pass1.json")

    def __init__(self, output: str | os.PathLike, fingerprint: str, resume: bool) -> None:
        self.path = self.path_for(output)
        self.fingerprint = fingerprint
        self.used = False
        """Whether a `lookup` gave saved results (the pass they save was not measured)."""
        self.results: dict[str, tuple[Sequence, Callable[[Any], Any]]] = {}
        """Results by key, each with what makes one of them plain JSON."""
        if resume and self.path.is_file():
            self.results = self._read()

    def _opening(self) -> str:
        """How the saved document starts: its fingerprint, then the results."""
        return f'{{"fingerprint": {json.dumps(self.fingerprint)}, "results": {{'

    def _read(self) -> dict[str, tuple[Sequence, Callable[[Any], Any]]]:
        """The saved results, where the file is this pass's as it was written: its first line
        the SHA-256 of the rest, which opens with this fingerprint. Checked before the JSON is
        parsed (a junk file of 256 MiB cost 8 GB and two minutes to parse, then to ignore);
        a file damaged since (a flipped digit changed the plan) is measured again."""
        try:
            data = read_small_file(self.path, MAX_CACHE_BYTES, "the saved first pass",
                                   "a JSON file")
        except InputError:
            return {}
        document = data[_DIGEST_LINE:]
        if (not document.startswith(self._opening().encode())
                or data[:_DIGEST_LINE] != _digest_line(hashlib.sha256(document))):
            return {}
        try:
            saved = parse_json_text(document.decode(), "the saved first pass", dict)
        except (InputError, UnicodeDecodeError):
            return {}
        results = saved.get("results")
        if not isinstance(results, dict):
            return {}
        return {k: (v, _plain) for k, v in results.items() if isinstance(v, list)}

    def lookup(self, key: str, count: int, from_json: Callable[[Any], Any]) -> list | None:
        """The ``count`` results saved under ``key``, decoded; None if absent or unusable."""
        saved, _ = self.results.get(key, (None, None))
        if saved is None or len(saved) != count:
            return None
        try:
            found = [from_json(value) for value in saved]
        except (TypeError, ValueError, KeyError):
            return None
        self.used = True
        return found

    def store(self, key: str, results: Sequence,
              to_json: Callable[[Any], Any] = _plain) -> None:
        """Save ``results`` under ``key``, each as ``to_json`` makes it plain JSON, with
        everything saved before: written one result at a time (a model of 100,000 small
        layers has 4 M rd candidates, whose JSON all at once ran out of memory), and not
        saved where the file would pass MAX_CACHE_BYTES, which reading it back refuses."""
        self.results[key] = (results, to_json)
        try:
            with atomic_path(self.path) as tmp, tmp.open("w", encoding="ascii") as file:
                self._write(file)
        except (OSError, ValueError):  # the cache only saves time: never fail for it
            self.results.pop(key, None)

    def _write(self, file: TextIO) -> None:
        """The document {"fingerprint", "results"} (ASCII) after a line of its SHA-256, a
        ValueError past MAX_CACHE_BYTES."""
        written = _DIGEST_LINE
        digest = hashlib.sha256()
        file.write(" " * _DIGEST_LINE)  # its place, filled once the document is written

        def put(text: str) -> None:
            nonlocal written
            written += len(text)
            if written > MAX_CACHE_BYTES:
                raise ValueError("the first pass is too large to save")
            file.write(text)
            digest.update(text.encode())

        put(self._opening())
        for n, (key, (results, to_json)) in enumerate(self.results.items()):
            put(f'{", " if n else ""}{json.dumps(key)}: [')
            for i, result in enumerate(results):
                put(("," if i else "") + json.dumps(to_json(result), allow_nan=False))
            put("]")
        put("}}")
        file.seek(0)
        file.write(_digest_line(digest).decode())

    def discard(self) -> None:
        """Remove the saved pass (the archive is written: nothing is left to resume). Only a
        file this cache could have written is removed (a folder or link of the user's under
        its name stays), and failing to remove it fails nothing: the archive is published."""
        with contextlib.suppress(OSError):
            if self.path.is_file() and not self.path.is_symlink():
                self.path.unlink()


def input_fingerprint(files: list[Path], options: Mapping[str, Any]) -> str:
    """A digest of the input files (path, device, inode, size, modification and change
    times: a model copied over with its time kept, ``cp -p``, has another inode or change
    time), the options and the qlis version that measures (another's candidates differ)."""
    digest = hashlib.sha256(f"qlis {__version__}, first pass {CACHE_FORMAT}".encode())
    for file in files:
        info = file.stat()
        digest.update(json.dumps([str(file.resolve()), info.st_dev, info.st_ino, info.st_size,
                                  info.st_mtime_ns, info.st_ctime_ns]).encode())
    digest.update(json.dumps(sorted(options.items()), default=repr).encode())
    return digest.hexdigest()


def _digest_line(digest: Any) -> bytes:
    """The first line of a saved pass: the SHA-256 of the rest, in hex."""
    return digest.hexdigest().encode() + b"\n"
