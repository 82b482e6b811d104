"""Calibration data from files, for ``qlis pack --calib``: input batches or text.

- ``.safetensors`` / ``.pt``: named tensors, the model's keyword inputs (``input_ids``,
  ``attention_mask``; ``pixel_values``), one example per row of the first dimension, read by
  qlis' own loader (no pickle, validated);
- ``.txt``: one example per line, tokenized by the model folder's tokenizer (as llama.cpp's
  imatrix tool takes text).

At most ``examples`` examples are used, in ``batch_size`` batches.
"""

from __future__ import annotations

import codecs
import re
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
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_NON_BLANK = re.compile(r"\S")


def _first_lines(text: str, count: int) -> list[str]:
    """The first ``count`` non-blank lines of ``text``, stripped, split at "\\n" alone (as
    wc counts them: splitlines() also splits at U+2028, \\f and \\x85). Only those are
    split out, and blank runs are skipped by one search, so that a file of millions of
    short or blank lines costs no more than one of a few (all 15 million lines of a 60 MB
    file held as strings took 1.8 GB)."""
    lines: list[str] = []
    position = 0
    while len(lines) < count and (found := _NON_BLANK.search(text, position)):
        start = text.rfind("\n", 0, found.start()) + 1
        end = text.find("\n", found.start())
        end = len(text) if end < 0 else end
        if line := text[start:end].strip():
            lines.append(line)
        position = end + 1
    return lines


def _text_lines(path: Path, examples: int) -> list[str]:
    data = read_small_file(path, MAX_TEXT_BYTES, expected="a calibration text file (a few "
                           "hundred lines are enough)")
    if data.startswith(_UTF16_BOMS):
        raise InputError(f"{path}: not UTF-8 text but UTF-16 (it starts with a UTF-16 byte "
                         "order mark); save it as UTF-8")
    try:  # a UTF-8 byte order mark (Windows' editors write one) is no part of the first line
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    lines = _first_lines(text, examples)
    if not lines:
        raise InputError(f"{path}: no example (one per line) in the calibration text")
    return lines


_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""Inputs of one value per token (a ``decoder_`` one per decoder token)."""


_IDS = ("input_ids", "token_type_ids", "position_ids")
"""Inputs of one table row per token: indices, as torch's embedding takes them."""
_ID_DTYPES = (torch.int64, torch.int32)
MAX_INPUTS = 64
"""Calibration tensors a file may hold: a forward takes a dozen keyword inputs at most, and
each tensor is read and sliced per batch (100,000 took 27 s only to be refused by name)."""


def _check_per_token(path: Path, inputs: dict[str, torch.Tensor]) -> None:
    """Refuse ids and masks that are not one row of tokens per example (``input_ids`` of
    one number per example, a mask of one per example that the model broadcast silently,
    no token at all) and ids that are no indices (float, bool, uint8), which the model
    failed on with torch's words ("not enough values to unpack", "Expected tensor for
    argument #1 'indices'")."""
    for side in ("", "decoder_"):
        for key in _PER_TOKEN:
            tensor = inputs.get(side + key)
            if tensor is None:
                continue
            name = side + key
            is_ids = key in _IDS
            if tensor.ndim < 2 or (is_ids and tensor.ndim != 2) or tensor.shape[1] == 0:
                raise InputError(f"{path}: calibration tensor {name!r} has shape "
                                 f"{list(tensor.shape)}; it holds (examples, tokens), at "
                                 "least one token an example")
            if is_ids and tensor.dtype not in _ID_DTYPES:
                raise InputError(f"{path}: calibration tensor {name!r} is {tensor.dtype}; "
                                 "token ids are integers, int64 or int32")


def _tensor_batches(path: Path, examples: int, batch_size: int) -> list[dict[str, Any]]:
    state = load_state_dict(path)
    if len(state) > MAX_INPUTS:
        raise InputError(f"{path}: holds {len(state):,} tensors; calibration tensors are a "
                         f"model's keyword inputs (input_ids, attention_mask, ...), at most "
                         f"{MAX_INPUTS}")
    inputs = {name: state[name] for name in state}  # each read once (a mapped file's: opened)
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
    _check_per_token(path, inputs)
    for name, tensor in inputs.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor[:count]).all()):
            raise InputError(f"{path}: calibration tensor {name!r} holds NaN or inf")
    for name in ("attention_mask", "decoder_attention_mask"):
        # every output position is then left out of the comparison: "the calibration
        # outputs are empty"
        mask = inputs.get(name)
        if mask is not None and mask.ndim == 2 and not bool(mask[:count].any()):
            raise InputError(f"{path}: calibration tensor {name!r} keeps no token of any "
                             "example (all 0): 1 marks a token, 0 padding")
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
