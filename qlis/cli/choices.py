"""The choices of command-line options that depend on this installation and machine: the
codecs registered (plugins included) and the torch devices present. Shared by ``qlis`` and
``qlis-iqa``; kept apart from `qlis.cli.console` so that commands that need neither (``qlis
info``) start without torch."""

from __future__ import annotations

import re

import torch

from qlis.archive.codecs import codec_registry
from qlis.cli.console import escape
from qlis.errors import InputError

_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d{1,4}))?")


def codec_names() -> list[str]:
    """The ``--codec`` choices of both tools: every registered codec, and "auto"."""
    return sorted({*codec_registry.names(), "auto"})


def _device_counts() -> dict[str, int]:
    """How many devices of each type this machine can run on (cpu always; cuda, mps if there)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cpu": 1, "cuda": cuda, "mps": int(torch.backends.mps.is_available())}


def available_devices() -> list[str]:
    """The device names that `parse_device` accepts here, for messages and help."""
    counts = _device_counts()
    names = ["cpu"]
    if counts["cuda"]:
        names += ["cuda", *(f"cuda:{i}" for i in range(counts["cuda"]))]
    if counts["mps"]:
        names.append("mps")
    return names


def parse_device(text: str, what: str = "--device") -> torch.device:
    """A torch device this machine has, from the option ``what``: ``cpu``, ``cuda``, ``cuda:N``
    or ``mps``. Checked before any work, because torch's own failure comes once a model is
    loaded, as a traceback; ``meta`` (tensors without data) and other names are refused too.

    >>> parse_device("cpu")
    device(type='cpu')
    """
    name = text.strip().lower()
    match = _DEVICE.fullmatch(name)
    if match is None:
        reason = "meta tensors hold no data" if name == "meta" else "not a device name"
    else:
        kind, index = match.group(1), match.group(2)
        count = _device_counts()[kind]
        if count and (index is None or int(index) < count):
            return torch.device(kind if index is None else f"{kind}:{int(index)}")
        reason = (f"there is no {kind}:{int(index)} (this machine has {count})" if count
                  else f"{kind} is not available on this machine")
    raise InputError(f"{what} '{escape(text)}': {reason}; use one of "
                     f"{', '.join(available_devices())}")
