"""A calibrated pack keeps finished layers' codes and the float model's outputs on the
calibration data in an unlinked file beside the archive, not in memory, and writes the bytes
``save(compress(...))`` writes."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qlis
from qlis.measure.calibrate import Calibration
from qlis.plan.plan_executor import PlanExecutor
from qlis.quantize.quantizers import QuantizedTensor
from qlis.workers import spill_file
from qlis.workers.spill_file import SpillFile


def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, [torch.randn(16, 32) for _ in range(4)]


def test_codes_wait_in_a_nameless_file_and_the_archive_is_unchanged(tmp_path, monkeypatch):
    model, batches = model_and_batches()
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", 0)
    kept = []
    keep = PlanExecutor._keep
    monkeypatch.setattr(PlanExecutor, "_keep",
                        lambda self, stored: kept.append(keep(self, stored)) or kept[-1])
    packed = qlis.pack(model, tmp_path / "packed.qlis", "quant", bits=4, calib=batches)
    quantized = [k for k in kept if isinstance(k, QuantizedTensor)]
    assert len(quantized) == 2 and all(isinstance(k.codes, np.memmap) for k in quantized)
    assert [p.name for p in tmp_path.iterdir()] == ["packed.qlis"]  # the file has no name
    saved = qlis.save(qlis.compress(model, "quant", bits=4, calib=batches),
                      tmp_path / "saved.qlis")
    assert (tmp_path / "packed.qlis").read_bytes() == saved.read_bytes()
    for name, tensor in packed.state_dict().items():
        assert torch.equal(tensor, qlis.load(saved)[name])


def test_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    model, batches = model_and_batches()
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", 0)

    def full(self: object, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_file.tempfile, "TemporaryFile",
                        lambda **kwargs: type("Full", (), {"seek": lambda self, n: n,
                                                           "write": full})())
    with pytest.raises(qlis.QlisError, match=r"\(No space left on device\): free some disk"):
        qlis.pack(model, tmp_path / "packed.qlis", "quant", bits=4, calib=batches)
    assert list(tmp_path.iterdir()) == []


def _mapping_of(address: int) -> str:
    """The path of the file mapped at ``address`` in this process ("" where none is)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *path = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in span.split("-"))
        if start <= address < end:
            return path[0] if path else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc maps")
def test_the_reference_outputs_wait_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", 0)
    model, batches = model_and_batches()
    in_memory = Calibration(model, batches)
    spilled = Calibration(model, batches, spill=SpillFile(tmp_path))
    assert spilled.reference.keys() == in_memory.reference.keys()
    for key, reference in in_memory.reference.items():
        mapped = spilled.reference[key]
        assert mapped.dtype == reference.dtype and torch.equal(mapped, reference)
        path = _mapping_of(mapped.data_ptr())
        assert path.startswith(f"{tmp_path}/") and path.endswith("(deleted)")  # no name
        assert not _mapping_of(reference.data_ptr()).startswith("/")
    assert spilled.measure({}) == in_memory.measure({})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_a_kept_tensor_has_its_values_dtype_and_shape(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", 0)
    file = SpillFile(tmp_path)
    tensors = [(torch.randn(5, 7, 3) * 100).to(dtype), (torch.randn(11) * 100).to(dtype)[::2]]
    kept = [file.keep_tensor(tensor) for tensor in tensors]  # the second is not contiguous
    for tensor, mapped in zip(tensors, kept, strict=True):
        assert mapped.dtype == dtype and mapped.shape == tensor.shape
        assert torch.equal(mapped, tensor) and mapped.data_ptr() != tensor.data_ptr()
    assert SpillFile(tmp_path).keep_tensor(tensors[0]) is not tensors[0]
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", tensors[0].numel() * 8 + 1)
    assert SpillFile(tmp_path).keep_tensor(tensors[0]) is tensors[0]  # small: in memory


def test_a_tensor_outside_the_process_memory_stays_where_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(spill_file, "SPILL_FROM_BYTES", 0)
    elsewhere = torch.empty(64, 64, device="meta")  # stands for a GPU's: no numpy view
    assert SpillFile(tmp_path).keep_tensor(elsewhere) is elsewhere
