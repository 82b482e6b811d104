"""Compiled kernels find a cache folder they can write: with numba's own places read-only
(a root-owned install, a read-only HOME), a folder of the user's under the temporary one."""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np

import qlis.compiled


def _read_only_except_temp(monkeypatch, tmp_path) -> None:
    writable = qlis.compiled._writable
    monkeypatch.setattr(qlis.compiled, "_writable",
                        lambda folder: folder.is_relative_to(tmp_path) and writable(folder))
    monkeypatch.setattr(qlis.compiled.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)


def test_with_numbas_places_read_only_kernels_are_cached_in_a_temporary_folder(
        monkeypatch, tmp_path):
    _read_only_except_temp(monkeypatch, tmp_path)
    folder = qlis.compiled.choose_cache_folder()
    assert folder is not None and Path(folder).parent == tmp_path
    assert numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"] == folder

    @qlis.compiled.njit(cache=True)
    def doubled(values: np.ndarray) -> np.ndarray:
        return values * 2

    assert doubled(np.arange(3)).tolist() == [0, 2, 4]
    assert any(Path(folder).rglob("*.nbi"))  # the kernel's cache index, where it was sent


def test_a_folder_the_user_gave_or_numbas_own_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "given"))
    assert qlis.compiled.choose_cache_folder() is None
    assert str(tmp_path / "given") == numba.config.CACHE_DIR
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(qlis.compiled, "_writable", lambda folder: True)
    assert qlis.compiled.choose_cache_folder() is None and numba.config.CACHE_DIR == ""
