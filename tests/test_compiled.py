"""Compiled kernels find a cache folder they can write: with numba's own places read-only
(a root-owned install, a read-only HOME), a private folder of the user's under the temporary
one; never a folder another user could write or link (the cache is pickled data and machine
code); without any, no cache."""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
import pytest

import qlis.compiled


@pytest.fixture
def read_only_except_temp(monkeypatch, tmp_path):
    writable = qlis.compiled._writable
    monkeypatch.setattr(qlis.compiled, "_writable",
                        lambda folder: folder.is_relative_to(tmp_path) and writable(folder))
    monkeypatch.setattr(qlis.compiled.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")
    return tmp_path / f"qlis-numba-cache-{os.getuid()}"


def test_with_numbas_places_read_only_kernels_are_cached_in_a_private_folder(
        read_only_except_temp):
    folder = qlis.compiled.choose_cache_folder()
    assert folder == str(read_only_except_temp)
    assert numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"] == folder
    assert read_only_except_temp.stat().st_mode & 0o777 == 0o700

    @numba.njit(cache=True)
    def doubled(values: np.ndarray) -> np.ndarray:
        return values * 2

    assert doubled(np.arange(3)).tolist() == [0, 2, 4]
    assert any(Path(folder).rglob("*.nbi"))  # the kernel's cache index, where it was sent


@pytest.mark.parametrize("squatted", ["link", "open to others", "a file"])
def test_a_folder_another_user_could_write_or_link_is_never_used(read_only_except_temp,
                                                                  squatted):
    folder = read_only_except_temp
    if squatted == "link":
        (folder.parent / "elsewhere").mkdir()
        folder.symlink_to(folder.parent / "elsewhere")
    elif squatted == "open to others":
        folder.mkdir()
        folder.chmod(0o777)
    else:
        folder.write_text("")
    assert qlis.compiled.choose_cache_folder() == "" == numba.config.CACHE_DIR


def test_a_given_folder_is_kept_where_it_can_be_written_and_passed_over_where_not(
        read_only_except_temp, monkeypatch, tmp_path):
    given = tmp_path / "given"
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(given))
    assert qlis.compiled.choose_cache_folder() is None and str(given) == numba.config.CACHE_DIR
    monkeypatch.setattr(numba.config, "CACHE_DIR", "/proc/nowhere")
    assert qlis.compiled.choose_cache_folder() == str(read_only_except_temp)


def test_without_a_cache_folder_kernels_compile_without_one(monkeypatch):
    monkeypatch.setattr(qlis.compiled, "_CACHE", "")

    @qlis.compiled.njit(cache=True, nogil=True)
    def tripled(values: np.ndarray) -> np.ndarray:
        return values * 3

    assert tripled(np.arange(3)).tolist() == [0, 3, 6]
    assert type(tripled._cache).__name__ == "NullCache"
