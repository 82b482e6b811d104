"""Files a user names are opened only when regular, and small ones are read bounded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qlis.errors import InputError
from qlis.regular_files import read_small_file


def refused(path: Path | str, **options) -> str:
    with pytest.raises(InputError) as info:
        read_small_file(path, 16, expected="a JSON file", **options)
    return str(info.value)


def test_a_small_regular_file_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"0123456789abcdef")
    assert read_small_file(tmp_path / "a.json", 16) == b"0123456789abcdef"


def test_each_kind_of_path_is_named_with_what_to_give(tmp_path: Path) -> None:
    assert refused(tmp_path / "missing") == f"{tmp_path / 'missing'}: no such file"
    assert refused(tmp_path) == f"{tmp_path} is a folder; give a JSON file"
    (tmp_path / "big").write_bytes(b"x" * 17)
    assert "is larger than 16 B, the most accepted for a JSON file" in refused(tmp_path / "big")
    assert refused(tmp_path / "big", subject="--plan big").startswith("--plan big is larger")


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_fifos_and_devices_are_refused_without_blocking_or_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would wait for a writer
    assert "is not a regular file but a FIFO (named pipe)" in refused(tmp_path / "pipe")
    assert "is not a regular file but a device" in refused("/dev/zero")  # never ends


def test_a_name_that_could_drive_the_terminal_is_escaped(tmp_path: Path) -> None:
    message = refused(tmp_path / "a\x1b[2Jb")
    assert "\x1b" not in message and "\\x1b[2Jb" in message


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_file_whose_size_lies_is_still_bounded() -> None:
    assert os.stat("/proc/self/status").st_size == 0  # yet it holds far more than 16 bytes
    assert "is larger than 16 B" in refused("/proc/self/status")
