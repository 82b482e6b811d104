"""Finished layers' codes kept in a file instead of memory until the archive is written.

A calibrated pack reconstructs the whole model before its archive is written, and every
layer's codes (a byte per weight) wait in memory meanwhile: on a model larger than memory,
more than it can hold. `CodeSpill` writes each finished layer's codes once to an unlinked
file beside the archive and maps them back copy-on-write: the kernel can drop those pages and
read them again when the codes are dequantized or encoded, as it does the input's weights.
Nothing stays on disk: the file has no name, and its space is freed with the last mapping.
It grows by each execution's codes (rd's calibrated allocation executes its plan a few times),
so a pack needs that much free space beside the archive until it ends.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from pathlib import Path

import numpy as np

from qlis.errors import InputError
from qlis.plan.execute import StoredTensor
from qlis.quantize.quantizers import QuantizedTensor

SPILL_FROM_BYTES = 1 << 20
"""Codes smaller than this stay in memory (their mapping would cost more than it saves)."""
_ALIGN = 64


class CodeSpill:
    """An unlinked file in ``folder`` that holds finished layers' codes (thread-safe)."""

    def __init__(self, folder: str | Path) -> None:
        try:
            # no context manager: the file lives as long as the spill and its mappings
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".qlis-codes-")  # noqa: SIM115
        except OSError as err:
            raise InputError(f"{folder}: cannot keep codes beside the archive while it is "
                             f"made ({err.strerror})") from None
        self._end = 0
        self._lock = threading.Lock()

    def keep(self, stored: StoredTensor) -> StoredTensor:
        """``stored`` with its codes moved to the file (small or unquantized: as it is)."""
        if not isinstance(stored, QuantizedTensor) or stored.codes.nbytes < SPILL_FROM_BYTES:
            return stored
        codes = np.ascontiguousarray(stored.codes)
        with self._lock:
            offset = -(-self._end // _ALIGN) * _ALIGN
            try:
                self._file.seek(offset)
                self._file.write(memoryview(codes.reshape(-1)).cast("B"))
                self._file.flush()
            except OSError as err:
                raise InputError(f"cannot keep codes beside the archive while it is made "
                                 f"({err.strerror}): free some disk space") from None
            self._end = offset + codes.nbytes
            mapped = np.memmap(self._file, dtype=codes.dtype, mode="c", offset=offset,
                               shape=codes.shape)
        return dataclasses.replace(stored, codes=mapped)
