"""Files qlis writes: umask modes, kept modes, no clobbering, stale temporaries, full disks."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from qlis.archive.atomic import STALE_SECONDS, atomic_path
from qlis.errors import InputError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out.bin") == 0o666 & ~umask


def test_a_file_its_writer_makes_anew_still_follows_the_umask(tmp_path):
    """safetensors' save_file replaces the temporary with a file of mode 0600."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.ones(2)}, str(tmp))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "m.safetensors") == 0o644


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o640


def test_a_file_that_appears_while_writing_is_not_clobbered(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(InputError, match="appeared"), atomic_path(target, overwrite=False) as tmp:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_without_hard_links_the_write_still_publishes(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    with atomic_path(tmp_path / "out.bin", overwrite=False) as tmp:
        tmp.write_bytes(b"ours")
    assert (tmp_path / "out.bin").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("name", ["o" * 251 + ".bin", "é" * 123 + ".bin"])
def test_a_name_near_the_file_systems_limit_is_still_written(tmp_path, name):
    # the temporary's longer name is cut (at a character), never the target's
    assert len(os.fsencode(name)) in (250, 255)
    with atomic_path(tmp_path / name) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"x"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_our_naming_are_cleaned(tmp_path):
    old = time.time() - STALE_SECONDS - 60
    dead = _dead_pid()
    stale = tmp_path / f".a.qlis.qlis-tmp-{dead}-0123abcd"
    fresh = tmp_path / f".b.qlis.qlis-tmp-{dead}-0123abcd"
    alive = tmp_path / f".c.qlis.qlis-tmp-{os.getpid()}-0123abcd"
    foreign = tmp_path / f".d.qlis.tmp-{dead}"  # not our naming: never touched
    for path in (stale, fresh, alive, foreign):
        path.write_bytes(b"partial")
    for path in (stale, alive, foreign):
        os.utime(path, (old, old))
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert not stale.exists()
    assert fresh.exists() and alive.exists() and foreign.exists()


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, torch, qlis
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    result = qlis.compress({"w": torch.randn(64, 64)}, "quant", bits=8)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # writes past 1000 bytes fail
    try:
        qlis.save(result, sys.argv[1], codec="raw")
    except qlis.InputError as err:
        print(err)
    """
)


def test_a_full_disk_leaves_nothing_behind(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "m.qlis")],
        capture_output=True, text=True, timeout=120,
    )
    message = f"{tmp_path / 'm.qlis'}: could not be written ({os.strerror(errno.EFBIG)})"
    assert out.stdout.startswith(message), out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_named_by_the_target_not_the_temporary(
    tmp_path, monkeypatch
) -> None:
    """A folder where no file may be created (read-only, immutable): the error names the path
    the caller gave, not the hidden temporary file beside it."""
    import errno
    import os as _os

    import pytest

    from qlis import InputError
    from qlis.archive import atomic

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(atomic.os, "open", refuse)
    target = tmp_path / "out.csv"
    with pytest.raises(InputError) as err, atomic.atomic_path(target):
        pass
    assert str(err.value) == f"{target}: cannot write beside it (Operation not permitted)"
    assert ".qlis-tmp" not in str(err.value) and _os.listdir(tmp_path) == []
