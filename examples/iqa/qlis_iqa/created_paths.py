"""What a command creates, removed again if it fails, so that the corrected rerun finds the
place as it was."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_FILES = ("model.safetensors", "split.json", "predictions_test.csv", "metrics.json",
             "train_log.csv")
"""What `qlis-iqa train` writes into its run folder."""
SWEEP_FILES = {"markdown": "sweep.md", "csv": "sweep.csv", "plot": "sweep.png"}
"""The tables `qlis-iqa sweep` writes into its folder, beside ``archives/``."""


def top_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (or `path` itself) that does not exist yet: what making
    it creates. None when it exists."""
    made = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            return made
        made = folder
    return made


@contextmanager
def removed_on_failure(created: list[Path]) -> Iterator[None]:
    """Remove the paths a run creates (listed before it creates them) if it fails: a
    half-made output folder (a run's split.json and cache/, a sweep's archives/) would block
    the corrected rerun. Nothing that existed before the run is touched."""
    try:
        yield
    except BaseException:
        for path in reversed(created):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()
        raise
