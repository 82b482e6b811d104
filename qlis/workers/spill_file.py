"""Large buffers that a long job writes once and only reads again, kept in a file instead of
the process's memory.

A calibrated pack holds two such things for its whole length: every finished layer's codes
until the archive is written, and the float model's outputs on the calibration batches, which
each quality measure compares with (as large as a block's activations: a transformer's last
hidden states, a language model's logits). `SpillFile` writes each buffer once to an unlinked
file and maps it back copy-on-write: the kernel can drop those pages and read them again when
they are used, as it does the input's weights. Nothing stays on disk: the file has no name,
and its space is freed with the last mapping. It only grows, so a job needs that much free
space beside its output until it ends.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from qlis.errors import InputError

SPILL_FROM_BYTES = 1 << 20
"""Buffers smaller than this stay in memory (their mapping would cost more than it saves)."""
_ALIGN = 64


class SpillFile:
    """An unlinked file in ``folder`` that holds buffers written once (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        try:
            # no context manager: the file lives as long as the spill and its mappings
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".qlis-spill-")  # noqa: SIM115
        except OSError as err:
            raise InputError(f"{folder}: cannot keep calibration data beside the archive "
                             f"while it is made ({err.strerror})") from None
        self._end = 0
        self._lock = threading.Lock()

    def keep_array(self, array: np.ndarray) -> np.ndarray:
        """``array``'s values, mapped from the file (small ones: ``array`` itself)."""
        if array.nbytes < SPILL_FROM_BYTES:
            return array
        array = np.ascontiguousarray(array)
        with self._lock:
            offset = -(-self._end // _ALIGN) * _ALIGN
            try:
                self._file.seek(offset)
                self._file.write(memoryview(array.reshape(-1)).cast("B"))
                self._file.flush()
            except OSError as err:
                raise InputError(f"cannot keep calibration data and codes beside the archive "
                                 f"while it is made ({err.strerror}): free some disk "
                                 "space") from None
            self._end = offset + array.nbytes
            return np.memmap(self._file, dtype=array.dtype, mode="c", offset=offset,
                             shape=array.shape)

    def keep_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values, mapped from the file, in its dtype and shape (its bytes go as
        they are: numpy has no bfloat16); a small one, or one outside the process's memory (on
        a GPU), is returned as it is."""
        if (tensor.device.type != "cpu"
                or tensor.numel() * tensor.element_size() < SPILL_FROM_BYTES):
            return tensor
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        return torch.from_numpy(self.keep_array(raw)).view(tensor.dtype).reshape(tensor.shape)
