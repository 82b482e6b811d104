"""The float16 quantizer, and rd storing the tensors outside its layers with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_archive_hostile import build, split
from torch import nn

import qlis
from qlis import ArchiveError, ConfigError
from qlis.quantize.float16 import Float16Quantizer
from qlis.quantize.quantizers import QuantizedTensor, get_quantizer
from qlis.quantize.reconstruct import BIAS_ONLY, NO_GRID


def test_values_round_to_float16_and_come_back_in_their_dtype(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(300) * 3
    q = get_quantizer("float16").quantize(weight)
    assert q.dtype == torch.float32 and q.codes.dtype == np.uint16
    assert torch.equal(q.dequantize(), weight.half().float())
    state = {"w": weight, "plain": torch.ones(4)}
    result = qlis.compress(state, "quant", quantizer={"id": "float16"}, select="w")
    path = qlis.save(result, tmp_path / "f16.qlis")
    back = qlis.load(path)
    assert back["w"].dtype == torch.float32
    assert torch.equal(back["w"], weight.half().float())
    # the codes' bit patterns rarely repeat: stored at their width, not entropy-coded larger
    assert path.stat().st_size < 2 * 300 + 2048


def test_float16_refuses_what_it_cannot_hold():
    with pytest.raises(ConfigError, match="float16's range"):
        Float16Quantizer().quantize(torch.tensor([1.0, 1e6]))
    with pytest.raises(ConfigError, match="floating-point"):
        Float16Quantizer().quantize(torch.arange(4))

    def holds(tensor: torch.Tensor) -> bool:
        return Float16Quantizer().narrowed(tensor) is not None

    torch.manual_seed(0)
    assert holds(torch.randn(1000) * 0.01)  # a bias: a few values below the normal range
    assert not holds(torch.randn(1000) * 1e-6)  # every value below it: percent errors
    assert not holds(torch.tensor([1.0, 7e4]))
    assert not holds(torch.tensor([1.0, float("nan")]))
    assert not holds(torch.randn(10).half())  # nothing to narrow
    assert not holds(torch.randn(10).double())


def test_a_reader_refuses_float16_codes_with_another_alphabet():
    quantizer = Float16Quantizer()
    quantizer.check_params((4,), 1 << 16, {})
    with pytest.raises(ArchiveError, match="n_levels"):
        quantizer.check_params((4,), 256, {})
    with pytest.raises(ArchiveError, match="parameter"):
        quantizer.check_params((4,), 1 << 16, {"step": np.ones(1, np.float32)})


def _normed_convolutions() -> nn.Module:
    """Thin convolutions under BatchNorm: the norms' four float32 vectors per channel are a
    large share of a small network's bytes, as in a MobileNet."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 128, 1)]
    for _ in range(4):
        layers += [nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 128, 1)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.normal_()
                module.running_var.uniform_(0.2, 3)
    return model


def test_rd_stores_the_norms_as_float16_and_gives_the_bytes_to_the_layers(tmp_path):
    """Kept float32, a MobileNetV2's BatchNorm parameters took a third of its 12x budget and
    its features kept cosine 0.04; as float16 (error 2^-11 each), 0.46."""
    model = _normed_convolutions()
    exact = qlis.compress(model, target_ratio=8, float16_rest=False)
    narrowed = qlis.compress(model, target_ratio=8)
    norms = [f"{i}.{key}" for i, module in enumerate(model)
             if isinstance(module, nn.BatchNorm2d)
             for key in ("weight", "bias", "running_mean", "running_var")]
    assert all(isinstance(narrowed.tensors[n], QuantizedTensor) for n in norms)
    assert not any(isinstance(exact.tensors[n], QuantizedTensor) for n in norms)
    state, original = narrowed.state_dict(), model.state_dict()
    for name in ("1.weight", "1.running_var", "4.running_mean"):
        assert torch.equal(state[name], original[name].half().float())
    assert torch.equal(state["1.num_batches_tracked"], original["1.num_batches_tracked"])

    def mean_error(result: qlis.CompressionResult) -> float:
        return float(np.mean([layer.rel_mse for layer in result.layers]))

    assert mean_error(narrowed) < 0.7 * mean_error(exact)
    path = qlis.save(narrowed, tmp_path / "narrowed.qlis")
    assert path.stat().st_size <= narrowed.original_bytes / 8 * 1.01  # counted as stored
    assert torch.equal(qlis.load(path)["1.running_var"], state["1.running_var"])


def test_a_tensor_float16_cannot_hold_stays_exact():
    model = _normed_convolutions()
    with torch.no_grad():
        model[1].running_var[0] = 1e5  # beyond float16's range
    result = qlis.compress(model, target_ratio=8)
    assert torch.equal(result.tensors["1.running_var"], model[1].running_var)
    assert isinstance(result.tensors["4.running_var"], QuantizedTensor)


def test_streamed_pack_writes_the_same_narrowed_archive(tmp_path):
    model = _normed_convolutions()
    saved = qlis.save(qlis.compress(model, target_ratio=8), tmp_path / "saved.qlis")
    packed = tmp_path / "packed.qlis"
    qlis.pack(model, packed, target_ratio=8)
    assert packed.read_bytes() == saved.read_bytes()


def test_calibrated_rd_narrows_the_corrected_biases():
    model = _normed_convolutions()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    result = qlis.compress(model, calib=calib, target_ratio=8)
    bias = result.tensors["3.bias"]
    assert isinstance(bias, QuantizedTensor)
    assert not torch.equal(bias.dequantize(), model[3].bias.half().float())  # corrected first
    assert result.distortion["output"]["cosine"] > 0.9


def test_calibration_rounds_a_layer_without_a_grid_data_free_and_says_so():
    """Error feedback needs a grid; a layer whose quantizer has none (float16 here, a user's
    quantizer elsewhere) made a calibrated compression fail: it is rounded as it would be
    without data, its bias still corrected."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    calib = [torch.randn(4, 32) for _ in range(3)]
    result = qlis.compress(model, "quant", quantizer={"id": "float16"}, calib=calib)
    assert all(layer.reconstruction == f"{NO_GRID}; {BIAS_ONLY}" for layer in result.layers)
    assert torch.equal(result.state_dict()["0.weight"], model[0].weight.half().float())
    assert result.distortion["output"]["cosine"] > 0.9999


@pytest.mark.parametrize("change", [
    lambda entry: entry.update(n_levels=256),  # another alphabet: 8-bit codes
    lambda entry: entry.update(params={"step": {"offset": 0, "length": 4, "crc32c": 0,
                                                "shape": [1], "dtype": "float32"}}),
    lambda entry: entry["quantizer"].update(bits=8),  # an option float16 does not take
])
def test_a_crafted_float16_entry_is_refused_in_one_line(tmp_path, change):
    path = qlis.save(qlis.compress(_normed_convolutions(), target_ratio=8), tmp_path / "m.qlis")
    header, data = split(path.read_bytes())
    entry = next(e for e in header["tensors"] if e["name"] == "1.running_var")
    assert entry["quantizer"] == {"id": "float16"}
    change(entry)
    path.write_bytes(build(header, data))
    with pytest.raises(ArchiveError) as refused:
        qlis.load(path)
    assert "\n" not in str(refused.value)
