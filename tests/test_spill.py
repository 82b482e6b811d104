"""A calibrated pack keeps finished layers' codes in an unlinked file beside the archive, not
in memory, and writes the bytes ``save(compress(...))`` writes."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from torch import nn

import qlis
from qlis.plan import spill
from qlis.quantize.quantizers import QuantizedTensor


def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return model, [torch.randn(16, 32) for _ in range(4)]


def test_codes_wait_in_a_nameless_file_and_the_archive_is_unchanged(tmp_path, monkeypatch):
    model, batches = model_and_batches()
    monkeypatch.setattr(spill, "SPILL_FROM_BYTES", 0)
    kept = []
    keep = spill.CodeSpill.keep
    monkeypatch.setattr(spill.CodeSpill, "keep",
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
    monkeypatch.setattr(spill, "SPILL_FROM_BYTES", 0)

    def full(self: object, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill.tempfile, "TemporaryFile",
                        lambda **kwargs: type("Full", (), {"seek": lambda self, n: n,
                                                           "write": full})())
    with pytest.raises(qlis.QlisError, match=r"\(No space left on device\): free some disk"):
        qlis.pack(model, tmp_path / "packed.qlis", "quant", bits=4, calib=batches)
    assert list(tmp_path.iterdir()) == []
