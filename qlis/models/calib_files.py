"""Calibration data from files, for ``qlis pack --calib``: input batches or text.

- ``.safetensors`` / ``.pt``: named tensors, the model's keyword inputs (``input_ids``,
  ``attention_mask``; ``pixel_values``), one example per row of the first dimension, read by
  qlis' own loader (no pickle, validated);
- ``.txt``: one example per line, tokenized by the model folder's tokenizer (as llama.cpp's
  imatrix tool takes text).

At most ``examples`` examples are used, in ``batch_size`` batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qlis.errors import InputError
from qlis.models.checkpoints import load_state_dict
from qlis.models.hf_model import load_tokenizer, tokenized_batches
from qlis.regular_files import read_small_file

MAX_TEXT_BYTES = 64 << 20
DEFAULT_EXAMPLES = 128
DEFAULT_BATCH = 16
CALIB_SUFFIXES = (".txt", ".safetensors", ".pt", ".pth")


def _text_lines(path: Path, examples: int) -> list[str]:
    data = read_small_file(path, MAX_TEXT_BYTES, expected="a calibration text file (a few "
                           "hundred lines are enough)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    # one example a line, as wc counts them: splitlines() also split at U+2028, \f and \x85
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        raise InputError(f"{path}: no example (one per line) in the calibration text")
    return lines[:examples]


_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""Inputs of one value per token (a ``decoder_`` one per decoder token)."""


def _tensor_batches(path: Path, examples: int, batch_size: int) -> list[dict[str, Any]]:
    inputs = load_state_dict(path)
    if scalars := sorted(name for name, t in inputs.items() if not t.ndim):
        raise InputError(f"{path}: calibration tensor {scalars[0]!r} is a single number; "
                         "each tensor holds one example per row")
    rows = {name: t.shape[0] for name, t in inputs.items()}
    if len(set(rows.values())) != 1:
        raise InputError(f"{path}: calibration tensors must share their first dimension "
                         f"(one example per row); got {dict(sorted(rows.items()))}")
    count = min(next(iter(rows.values())), examples)
    if count == 0:
        raise InputError(f"{path}: the calibration tensors hold no example")
    for name, tensor in inputs.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor[:count]).all()):
            raise InputError(f"{path}: calibration tensor {name!r} holds NaN or inf")
    for side in ("", "decoder_"):  # the ids and masks of one side run along its tokens
        names = {side + key for key in _PER_TOKEN}
        per_token = {name: tuple(t.shape[:2]) for name, t in inputs.items()
                     if t.ndim >= 2 and name in names}
        if len(set(per_token.values())) > 1:
            raise InputError(f"{path}: calibration ids and masks must have one length per "
                             f"example; got (examples, length) "
                             f"{dict(sorted(per_token.items()))}")
    return [{name: t[start:min(start + batch_size, count)] for name, t in inputs.items()}
            for start in range(0, count, batch_size)]


def check_calibration_path(path: str | Path) -> Path:
    """``path`` if it names a calibration file of a known kind (checked before any work)."""
    path = Path(path)
    if path.suffix.lower() not in CALIB_SUFFIXES:
        raise InputError(f"{path}: calibration data must be {', '.join(CALIB_SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    return path


def read_calibration(path: str | Path, model_folder: str | Path,
                     examples: int = DEFAULT_EXAMPLES,
                     batch_size: int = DEFAULT_BATCH, max_length: int | None = None,
                     ) -> list[dict[str, torch.Tensor]]:
    """Keyword input batches for ``qlis.compress(model, calib=...)`` from ``path``; text
    examples are cut to ``max_length`` tokens (see `max_input_length`)."""
    path = check_calibration_path(path)
    if path.suffix.lower() == ".txt":
        lines = _text_lines(path, examples)
        return tokenized_batches(load_tokenizer(model_folder), lines, batch_size, max_length)
    return _tensor_batches(path, examples, batch_size)
