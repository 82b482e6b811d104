"""Sequential reconstruction: each layer kind's inputs as the rows its weight multiplies, layers
fitted in forward order to the quantized model's inputs, bias correction, and per-layer notes
for the layers calibration cannot shape."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlis
import qlis.measure.layer_inputs
from qlis.measure.layer_inputs import layer_inputs
from qlis.quantize import gptq
from qlis.quantize import reconstruct as rec

UNIFORM = {"id": "uniform", "rel_mse": 0.03}


def all_rows(inputs, *args, **kwargs) -> list[torch.Tensor]:
    chunks = list(inputs.chunks(args, kwargs))
    return [torch.cat([chunk[g] for chunk in chunks]) for g in range(inputs.groups)]


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=2, dilation=(2, 1), groups=2,
              padding_mode="reflect"),
    nn.Conv2d(6, 6, 3, padding="same", groups=6, bias=False),  # depthwise
    nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=(0, 1, 1), padding_mode="circular"),
], ids=["conv1d", "conv2d-grouped-dilated-reflect", "depthwise", "conv3d-circular"])
def test_convolution_inputs_are_the_patches_their_weight_multiplies(conv):
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, *([9] * len(conv.kernel_size)))
    inputs = layer_inputs(nn.Sequential(conv), "0.weight")
    rows = all_rows(inputs, x)
    assert len(rows) == conv.groups and inputs.bias == ("0.bias" if conv.bias is not None
                                                       else None)
    out = conv(x) - (0 if conv.bias is None else conv.bias.reshape(1, -1, *[1] *
                                                                    len(conv.kernel_size)))
    per_group = conv.out_channels // conv.groups
    matrix = inputs.output_matrix(conv.weight)
    for g, patches in enumerate(rows):
        assert patches.shape[1] == inputs.width
        w = matrix[g * per_group:(g + 1) * per_group]
        expected = out[:, g * per_group:(g + 1) * per_group].movedim(1, -1).reshape(-1, per_group)
        torch.testing.assert_close(patches @ w.T, expected, rtol=1e-4, atol=1e-5)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 uses it: y = x @ W + b with W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_linear_hf_conv1d_and_packed_attention_inputs():
    torch.manual_seed(0)
    conv1d = Conv1D(5, 3)
    inputs = layer_inputs(nn.Sequential(conv1d), "0.weight")
    x = torch.randn(2, 7, 3)
    (rows,) = all_rows(inputs, x)
    assert inputs.transposed and inputs.width == 3
    torch.testing.assert_close(rows @ inputs.output_matrix(conv1d.weight).T + conv1d.bias,
                               conv1d(x).reshape(-1, 5))
    attention = nn.MultiheadAttention(8, 2)
    holder = nn.Sequential(attention)
    inputs = layer_inputs(holder, "0.in_proj_weight")
    q, kv = torch.randn(4, 1, 8), torch.randn(6, 1, 8)
    rows = all_rows(inputs, q, kv, value=kv)
    assert inputs.groups == 3 and inputs.bias == "0.in_proj_bias"
    assert [r.shape[0] for r in rows] == [4, 6, 6] and torch.equal(rows[0], q.reshape(4, 8))
    assert layer_inputs(holder, "0.out_proj.weight").module is attention  # never called itself
    assert layer_inputs(nn.Sequential(nn.Embedding(4, 3)), "0.weight") is None
    assert layer_inputs(nn.Sequential(nn.Linear(2, 2)), "0.bias") is None
    assert layer_inputs(nn.Sequential(nn.Linear(2, 2)), "9.weight") is None


def test_a_model_of_wide_conv1d_layers_is_left_as_it_was():
    """Conv1D weights are stored (in, out); GPTQ once wrote its updates into them when they
    were wider than one of its blocks (128 inputs)."""
    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(8, 160), nn.GELU(), Conv1D(160, 8))  # 160 inputs first
    before = {name: t.clone() for name, t in model.state_dict().items()}
    calib = [torch.randn(32, 160) for _ in range(4)]
    result = qlis.compress(model, "quant", bits=3, calib=calib)
    assert result.layers[0].reconstruction.startswith("error feedback")
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


@pytest.mark.parametrize("batch_first", [False, True])
def test_the_attention_output_projection_sees_the_heads_outputs(batch_first):
    """nn.MultiheadAttention never calls its out_proj: the rows are recomputed, and out_proj
    applied to them gives the module's output, on the slow path (masks, weights returned)
    and on the fast one (inference, no weights returned)."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    inputs = layer_inputs(nn.Sequential(attention), "0.out_proj.weight")
    assert inputs.bias == "0.out_proj.bias" and inputs.width == 8 and not inputs.transposed
    weight, bias = attention.out_proj.weight.clone(), attention.out_proj.bias.clone()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 4 + [True]] * 3) if batch_first else None
    for kwargs in ({"need_weights": True}, {"need_weights": False, "key_padding_mask": mask}):
        (rows,) = all_rows(inputs, x, x, x, **kwargs)
        with torch.no_grad():
            expected = attention(x, x, x, **kwargs)[0].reshape(-1, 8)
            torch.testing.assert_close(attention.out_proj(rows), expected)
    assert torch.equal(attention.out_proj.weight, weight)  # the identity was swapped back
    assert torch.equal(attention.out_proj.bias, bias)


def test_a_torch_transformer_layer_is_reconstructed_whole():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    result = qlis.compress(model.eval(), calib=[torch.randn(4, 6, 16) for _ in range(4)])
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["layers.0.self_attn.out_proj.weight"].startswith("error feedback")
    assert not result.warnings


class Net(nn.Module):
    """A conv stem (depthwise too), an MLP, an embedding and a layer nothing calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, groups=16, padding=1)
        self.c3 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


@pytest.fixture(scope="module")
def net_and_batches():
    torch.manual_seed(0)
    return Net().eval(), [torch.randn(8, 3, 12, 12) for _ in range(3)]


def output_rel_mse(model, result, batches) -> float:
    copy = Net().eval()
    copy.load_state_dict(result.state_dict())
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches])
        out = torch.cat([copy(b) for b in batches])
    return float((out - ref).square().sum() / ref.square().sum())


def test_sequential_reconstruction_lowers_the_output_error_and_says_what_it_did(
        net_and_batches):
    model, batches = net_and_batches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = qlis.compress(model, "quant", quantizer=UNIFORM, calib=batches,
                          error_feedback=False)
    with pytest.warns(qlis.QualityWarning, match=r"never ran 1 planned layer\(s\): unused"):
        fed = qlis.compress(model, "quant", quantizer=UNIFORM, calib=batches,
                            bias_correction=False)
    with pytest.warns(qlis.QualityWarning, match="never ran"):
        corrected = qlis.compress(model, "quant", quantizer=UNIFORM, calib=batches)
    errors = [output_rel_mse(model, r, batches) for r in (plain, fed, corrected)]
    assert errors[1] < 0.7 * errors[0] and errors[2] < errors[0]
    assert corrected.distortion["output"]["rel_mse"] == pytest.approx(errors[2], rel=1e-3)
    notes = {layer.name: layer.reconstruction for layer in corrected.layers}
    assert notes == {"emb.weight": rec.NO_INPUTS, "unused.weight": rec.NOT_REACHED,
                     **{f"{n}.weight": rec.BIAS_CORRECTED for n in ("c1", "c2", "c3", "fc",
                                                                     "head")}}
    assert {layer.reconstruction for layer in fed.layers} >= {rec.FED_BACK}
    assert all(layer.reconstruction == "" for layer in plain.layers) and not plain.warnings
    assert corrected.config["error_feedback"] and not plain.config["error_feedback"]
    assert not torch.equal(corrected.tensors["fc.bias"], model.fc.bias)
    assert torch.equal(fed.tensors["fc.bias"], model.fc.bias)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bias_correction_restores_each_layers_mean_output():
    """One layer whose rounding shifts its mean output: corrected, the shift is gone."""
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(256, 16) + 3.0  # inputs far from zero mean: rounding shifts the mean
    config = {"id": "uniform", "rel_mse": 0.2, "rounding": 0.3}
    results = [qlis.compress(layer, "quant", quantizer=config, calib=[x], error_feedback=True,
                             bias_correction=flag) for flag in (False, True)]
    shifts = []
    for result in results:
        state = result.state_dict()
        with torch.no_grad():
            out = F.linear(x, state["0.weight"], state["0.bias"])
            shifts.append(float((out - layer(x)).mean(dim=0).abs().max()))
    assert shifts[1] < 1e-4 < shifts[0]


class Shared(nn.Module):
    """One Linear run twice per forward: its inputs come from both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_a_layer_run_twice_per_forward_sees_both_calls():
    torch.manual_seed(2)
    model = Shared().eval()
    batches = [torch.randn(32, 8) for _ in range(2)]
    calibration = qlis.measure.calibrate.Calibration(model, batches)
    reachable = {n: layer_inputs(model, n) for n in ("a.weight", "b.weight")}
    groups, moments, repeated, _ = rec._order(calibration, reachable, None)
    assert groups == [["a.weight"], ["b.weight"]] and repeated
    assert moments["a.weight"].rows == [128]  # 2 calls x 2 batches x 32 rows
    result = qlis.compress(model, "quant", quantizer=UNIFORM, calib=batches, error_feedback=True)
    assert {layer.reconstruction for layer in result.layers} == {rec.BIAS_CORRECTED}


def test_layers_reading_one_input_form_one_group_and_the_pass_stops_after_it():
    torch.manual_seed(3)

    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.q(x) * self.k(x) + self.v(x))

    model = QKV().eval()
    calibration = qlis.measure.calibrate.Calibration(model, [torch.randn(5, 6)])
    names = ["q.weight", "k.weight", "v.weight", "out.weight"]
    reachable = {n: layer_inputs(model, n) for n in names}
    groups, floats, repeated, _ = rec._order(calibration, reachable, None)
    assert groups == [names[:3], ["out.weight"]] and not repeated
    calls = []
    model.out.register_forward_pre_hook(lambda module, args: calls.append(1))
    whole_model = calibration.feed
    rec._group_moments(calibration, names[:3], reachable, floats, True, whole_model)
    assert calls == []  # stopped once q, k and v had run
    rec._group_moments(calibration, ["out.weight"], reachable, floats, True, whole_model)
    assert calls == [1]


def test_corrected_biases_and_notes_round_trip_through_the_archive(tmp_path, net_and_batches):
    model, batches = net_and_batches
    result = qlis.compress(model, calib=batches, error_feedback=True)
    path = qlis.save(result, tmp_path / "net.qlis")
    state = qlis.load(path)
    for name, tensor in result.state_dict().items():
        assert torch.equal(state[name], tensor)
    with qlis.open(path) as archive:
        assert archive.entry("c1.weight").plan["reconstruction"] == rec.BIAS_CORRECTED
        assert "reconstruction" not in (archive.entry("c1.bias").plan or {})


def test_docstring_examples():
    result = doctest.testmod(qlis.measure.layer_inputs, optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


def test_a_quality_target_is_met_with_fewer_bytes_when_reconstruction_recovers_error():
    """min_cosine is re-measured on the reconstructed model, so the allocation can spend
    fewer bytes than rounding alone needs for the same measured cosine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    mixing = torch.randn(128, 128) * torch.logspace(0, -2, 128)  # strongly correlated inputs
    batches = [torch.randn(256, 128) @ mixing]
    plain = qlis.compress(model, calib=batches, min_cosine=0.999, error_feedback=False)
    fed = qlis.compress(model, calib=batches, min_cosine=0.999)
    for result in (plain, fed):
        assert result.distortion["output"]["cosine"] >= 0.999 and not result.warnings
    assert fed.estimated_bytes < 0.95 * plain.estimated_bytes


def test_calibration_data_that_does_not_fit_or_gives_nan_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(qlis.InputError, match=r"does not fit the model \(batch 1\)"):
        qlis.compress(model, calib=[torch.randn(2, 8), torch.randn(2, 5)])
    with pytest.raises(qlis.InputError, match="does not fit the model"):
        qlis.compress(model, calib=[{"nope": torch.randn(2, 8)}])
    with pytest.raises(qlis.InputError, match="NaN or inf"):
        qlis.compress(model, calib=[torch.full((2, 8), float("inf"))])


class TextAndImage(nn.Module):
    """A two-tower model (CLIP's shape): both inputs optional in its signature, both used."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Embedding(10, 8)
        self.image = nn.Linear(12, 8)

    def forward(self, input_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        images = self.image(pixel_values.reshape(pixel_values.shape[0], -1))
        return self.text(input_ids).mean(dim=1) @ images.T


def test_a_batch_without_an_input_the_model_needs_names_it():
    """CLIP calibrated on text alone failed with "'NoneType' object has no attribute
    'shape'", which names nothing the user gave."""
    with pytest.raises(qlis.InputError, match="the batch gives no pixel_values, which "
                                              "TextAndImage takes"):
        qlis.compress(TextAndImage(), calib=[{"input_ids": torch.randint(0, 10, (2, 3))}])
    both = {"input_ids": torch.randint(0, 10, (2, 3)), "pixel_values": torch.randn(2, 3, 4)}
    assert qlis.compress(TextAndImage(), calib=[both]).distortion["output"]["cosine"] > 0.9


class CachesItsIndex(nn.Module):
    """A model that computes a tensor on its first call and keeps it (as BEiT caches its
    relative position index): made in a measuring pass, it is used by the gradient passes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.order: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            self.order = torch.arange(7, -1, -1)
        return self.linear(x)[:, self.order]


def test_a_model_that_caches_what_a_measuring_pass_computed_still_calibrates():
    """The measuring passes ran in inference mode, whose tensors the model kept: the
    gradient passes failed ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    result = qlis.compress(CachesItsIndex(), calib=[torch.randn(16, 8)], min_cosine=0.99)
    assert result.distortion["output"]["cosine"] >= 0.99


def test_a_weight_holding_nan_is_named_not_the_calibration_data():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[3] = float("nan")  # a tensor no layer plan touches
    with pytest.raises(qlis.InputError, match=r"its tensor '1.weight' holds NaN or inf; "
                                              "repair the model's weights"):
        qlis.compress(model, calib=[torch.randn(2, 8)])


def test_a_model_of_mixed_weight_dtypes_is_named_not_the_calibration_data():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].half()
    with pytest.raises(qlis.InputError, match=r"float32 but for some \('1.weight' is "
                                              r"torch.float16.*store them in one dtype"):
        qlis.compress(model, calib=[torch.randn(2, 8)])


class Flaky(nn.Module):
    """A linear model that misbehaves from its ``fails_from``-th call on: raises ``error``,
    or (``error`` None) returns one vector fewer."""

    def __init__(self, fails_from: int, error: Exception | None) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 4)
        self.calls, self.fails_from, self.error = 0, fails_from, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.fails_from:
            if self.error is not None:
                raise self.error
            x = x[1:]
        return self.layer(x)


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"),
                                   AssertionError("a check of the model's"),
                                   RuntimeError("Can't call numpy() on Tensor that requires "
                                                "grad")])
@pytest.mark.parametrize("fails_from", [1, 3])
def test_whatever_the_model_raises_in_any_pass_is_a_clear_error(error, fails_from):
    model = Flaky(fails_from, error)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    when = "does not fit the model" if fails_from == 1 and isinstance(error, RuntimeError) \
        else "failed on the calibration data" if fails_from == 1 else "after running on it"
    with pytest.raises(qlis.InputError, match=rf"{when}.*{type(error).__name__}") as raised:
        qlis.compress(model, calib=[torch.randn(4, 8), torch.randn(4, 8)])
    assert raised.value.__cause__ is error or fails_from == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_an_output_that_changes_shape_between_passes_is_refused():
    with pytest.raises(qlis.InputError, match=r"changed shape between passes \(\[4, 4\] "
                                              r"vectors, then \[3, 4\]\)"):
        qlis.compress(Flaky(3, None), calib=[torch.randn(4, 8), torch.randn(4, 8)])


def test_a_model_built_in_inference_mode_is_refused_before_it_is_changed():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 4))
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(qlis.InputError, match=r"'0.weight' is an inference tensor"):
        qlis.compress(model, calib=[torch.randn(4, 8)])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


class Counting(nn.Module):
    """A model whose forward updates a buffer (a step counter, an observer's running range)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.layer(x) + 0 * self.seen


def test_buffers_a_forward_updates_start_every_pass_as_they_were_and_are_left_so():
    model = Counting()
    result = qlis.compress(model, calib=[torch.randn(4, 8) for _ in range(3)])
    assert model.seen.item() == 0.0 and result.tensors["seen"].item() == 0.0


class Normalising(nn.Module):
    """A running normaliser that keeps updating in eval mode (as observation normalisers
    do), and a history that grows by concatenation, re-registered at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("history", torch.zeros(0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean.mul_(0.5).add_(0.5 * x.mean(dim=0))
        self.history = torch.cat([self.history, x])
        if not hasattr(self, "first"):
            self.register_buffer("first", x[:1].clone())
        return self.layer(x - self.mean)


def test_every_call_starts_from_the_buffers_as_they_were_and_leaves_them_so():
    """A pass measuring 2 of 8 batches read them with the normaliser in another state than
    the reference pass had: cosine 0.982 with no weight changed. A buffer replaced by one of
    another shape, or registered by the forward, stayed in the user's model."""
    torch.manual_seed(0)
    model = Normalising()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    calibration = qlis.measure.calibrate.Calibration(
        model, [torch.randn(4, 8) * (i + 1) for i in range(8)])
    assert calibration.measure({})["cosine"] == pytest.approx(1.0, abs=1e-12)
    result = qlis.compress(model, calib=[torch.randn(4, 8) for _ in range(4)])
    assert model.state_dict().keys() == state.keys() == result.tensors.keys()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in state.items())


class Unreadable(list):
    """A list of batches whose third batch raises when it is read."""

    def __getitem__(self, index):
        if index == 2:
            raise OSError("the batch file is gone")
        return super().__getitem__(index)


def test_a_batch_that_cannot_be_read_is_named():
    with pytest.raises(qlis.InputError, match=r"calib= batch 2 could not be read: OSError"):
        qlis.compress(nn.Linear(8, 4), calib=Unreadable([torch.randn(2, 8)] * 3))


def test_an_output_on_the_meta_device_is_refused():
    class Meta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x).to("meta")

    with pytest.raises(qlis.InputError, match="output is on the meta device"):
        qlis.compress(Meta(), calib=[torch.randn(2, 8)])


def test_a_callable_that_refills_one_input_tensor_is_refused():
    """Its calls are recorded to be replayed: all of them replayed the last batch's values,
    and the layers were fitted to one batch."""
    batches = [torch.randn(4, 8) for _ in range(3)]
    reused = torch.empty(4, 8)

    def calib(model: nn.Module) -> torch.Tensor:
        return torch.cat([model(reused.copy_(batch)) for batch in batches])

    with pytest.raises(qlis.InputError, match=r"input of the calib callable's model call 0 "
                                              r"changed after the call"):
        qlis.compress(nn.Sequential(nn.Linear(8, 4)), calib=calib)


def test_a_callables_model_calls_are_replayed_one_by_one():
    """A callable that runs several batches still lets each pass stop early per call."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    batches = [torch.randn(5, 6) for _ in range(3)]
    calibration = qlis.measure.calibrate.Calibration(
        model, lambda m: torch.cat([m(b) for b in batches]))
    assert calibration.forward_calls == 3
    reachable = {n: layer_inputs(model, n) for n in ("0.weight", "2.weight")}
    groups, moments, repeated, _ = rec._order(calibration, reachable, None)
    assert not repeated and moments["0.weight"].rows == [15]
    early = rec._group_moments(calibration, ["0.weight"], reachable, moments, True,
                               calibration.feed)
    assert early["0.weight"].rows == [15]  # every call contributed, each stopped early
    by_callable = qlis.compress(model, "quant", quantizer=UNIFORM,
                                calib=lambda m: torch.cat([m(b) for b in batches]))
    by_batches = qlis.compress(model, "quant", quantizer=UNIFORM, calib=batches)
    for name, tensor in by_batches.state_dict().items():
        assert torch.equal(by_callable.state_dict()[name], tensor)


def test_gradient_sensitivities_agree_with_probe_passes():
    """A few backward passes estimate each layer's output gain as a probe per layer does."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 16)).eval()
    calibration = qlis.measure.calibrate.Calibration(model, [torch.randn(64, 32) for _ in range(2)])
    names = ["0.weight", "2.weight", "4.weight"]
    flags = [p.requires_grad for p in model.parameters()]
    marker = torch.ones(64, 64)
    model[2].weight.grad = marker  # the user's own gradient, left as it was
    gains = calibration.sensitivities(names, samples=16)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[2].weight.grad is marker and model[0].weight.grad is None
    for name in names:
        weight = model.state_dict()[name]
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        noise *= 0.03 * weight.square().mean().sqrt()
        probe = calibration.measure({name: weight + noise})["one_minus_cosine"]
        rel = float(noise.square().sum() / weight.square().sum())
        assert gains[name] == pytest.approx(probe / rel, rel=0.35)
    x = torch.randn(8, 32)
    quiet = qlis.measure.calibrate.Calibration(model, lambda m: m(x).detach())
    assert quiet.sensitivities(names) is None  # no gradient: rd measures probes instead
    assert [p.requires_grad for p in model.parameters()] == flags


def test_sparse_embedding_gradients_give_the_dense_gains():
    """An ``nn.Embedding(sparse=True)`` makes sparse gradients, which the gains' squared sums
    could not reshape (RuntimeError); they count as the dense gradient does, a row looked
    up twice summed first."""
    gains = []
    for sparse in (False, True):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Embedding(20, 8, sparse=sparse), nn.Linear(8, 4)).eval()
        ids = [torch.tensor([[1, 1, 3], [4, 1, 7]]), torch.tensor([[2, 3, 3]])]
        calibration = qlis.measure.calibrate.Calibration(model, ids)
        gains.append(calibration.sensitivities(["0.weight", "1.weight"]))
    assert gains[1] == pytest.approx(gains[0], rel=1e-9)


def test_progress_counts_every_layer_executed_in_every_pass(net_and_batches):
    model, batches = net_and_batches
    planned = [0]
    data_free = qlis.compress(model, progress=lambda n: planned.__setitem__(0, planned[0] + n))
    assert planned[0] == sum(layer.numel for layer in data_free.layers)
    counted = [0]
    calibrated = qlis.compress(model, calib=batches, min_cosine=0.99,
                               progress=lambda n: counted.__setitem__(0, counted[0] + n))
    total = sum(layer.numel for layer in calibrated.layers)
    assert counted[0] >= total and counted[0] % total == 0  # whole passes only


def test_layers_of_no_inputs_or_no_outputs_are_left_to_data_free_rounding():
    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)
            self.no_inputs, self.no_outputs = nn.Linear(0, 8), nn.Linear(8, 0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x) + self.no_inputs(x[:, :0])
            return self.b(torch.cat([h, self.no_outputs(x)], dim=-1))

    torch.manual_seed(0)
    result = qlis.compress(Empty(), "quant", bits=4,
                           calib=[torch.randn(16, 8) for _ in range(3)])
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["no_inputs.weight"] == notes["no_outputs.weight"] == rec.NO_INPUTS
    assert notes["a.weight"] == notes["b.weight"] == rec.BIAS_CORRECTED
    assert result.distortion["output"]["cosine"] > 0.9


def test_a_layer_the_outputs_do_not_depend_on_is_fitted_and_not_called_data_free():
    """A layer that runs but whose result the output drops is fitted to its inputs like
    the others: the warning said it was rounded data-free, its plan said it was fitted."""

    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kept, self.dropped = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.dropped(x)
            return self.kept(x)

    torch.manual_seed(0)
    with pytest.warns(qlis.QualityWarning, match="do not depend on") as caught:
        result = qlis.compress(Dropped(), calib=[torch.randn(8, 16) for _ in range(4)])
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["dropped.weight"] == rec.BIAS_CORRECTED
    assert not any("data-free" in str(w.message) for w in caught)


def test_layers_a_plan_keeps_as_they_are_claim_no_rounding():
    """A layer the plan neither prunes nor quantizes is not "error feedback" or "data-free
    rounding": a Linear after a quantized one only has its bias corrected, a kept table and
    a kept layer never reached say nothing (and no warning: nothing of them was lost)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.a, self.b = nn.Embedding(32, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.unused = nn.Linear(8, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(self.table(ids))))

    torch.manual_seed(0)
    uniform = {"id": "uniform", "rel_mse": 0.05}
    plan = {"a.weight": {"quantizer": uniform}, "b.weight": {},
            "table.weight": {}, "unused.weight": {}}
    net = Net().eval()
    result = qlis.compress(net, plan=plan, calib=[torch.randint(0, 32, (4, 5)) for _ in range(3)])
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes == {"a.weight": rec.BIAS_CORRECTED, "b.weight": rec.BIAS_ONLY,
                     "table.weight": "", "unused.weight": ""}
    assert torch.equal(result.tensors["b.weight"], net.b.weight)
    assert not torch.equal(result.tensors["b.bias"], net.b.bias)
    assert not result.warnings  # a kept layer never reached lost nothing to warn of


def test_a_model_given_too_few_inputs_is_told_so_not_a_traceback():
    # CLIP needs pixel_values beside the text; missing, it reads None.shape (AttributeError)
    transformers = pytest.importorskip("transformers")
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 16, "patch_size": 8}
    text = {**vision, "vocab_size": 40, "max_position_embeddings": 16, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    with pytest.raises(qlis.InputError, match=r"does not fit the model \(batch 0\): Attrib"):
        qlis.compress(model, calib=[{"input_ids": torch.randint(0, 40, (2, 5))}])


class Lookup(nn.Module):
    """A table whose first three columns alone reach the output, and a layer that reads them;
    ``tied``: the output layer multiplies by the table too (``"linear"``) or another kind of
    module does (``"other"``). ``table``: an embedding class; ``outside``: the rows are
    multiplied by it after the lookup."""

    def __init__(self, tied: str | None = None, table: type = nn.Embedding,
                 outside: float = 1.0) -> None:
        super().__init__()
        self.table = table(64, 8)
        self.spare = nn.Embedding(512, 8)  # never looked up
        self.head = nn.Linear(3, 8)
        self.out = nn.Linear(8, 64, bias=False) if tied != "other" else Projection(8, 64)
        self.outside = outside
        if tied:
            self.out.weight = self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table(ids) * self.outside
        return self.out(torch.tanh(self.head(rows[..., :3])))


class Scaled(nn.Embedding):
    """An embedding that scales its rows in its own forward (BART's, Gemma's)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 4.0


class Squashed(nn.Embedding):
    """An embedding whose forward gives no multiple of its rows."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(ids))


class Projection(nn.Module):
    """A matrix product that is not an ``nn.Linear``."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_an_embedding_is_fitted_along_the_gradients_its_rows_receive():
    """rd's backward passes measure E[g g^T] of the gradients at a table's output rows: none
    along the columns the output never reads; reconstruction rounds the table along it and
    says so. A table never looked up is rounded data-free."""
    torch.manual_seed(3)
    ids = [torch.randint(0, 64, (16, 6)) for _ in range(4)]
    model = Lookup().eval()
    calibration = qlis.measure.calibrate.Calibration(model, ids)
    calibration.sensitivities(["table.weight", "spare.weight", "head.weight", "out.weight"])
    covariance = calibration.output_covariances["table.weight"]
    assert covariance.shape == (8, 8) and torch.equal(covariance, covariance.T)
    assert not covariance[3:].any() and not covariance[:, 3:].any()
    assert bool((torch.linalg.eigvalsh(covariance[:3, :3].double()) > 0).all())
    assert list(calibration.output_covariances) == ["table.weight"]
    with pytest.warns(qlis.QualityWarning, match="do not depend on .*spare.weight"):
        result = qlis.compress(model, calib=ids, min_cosine=0.99)
    table = next(layer for layer in result.layers if layer.name == "table.weight")
    assert table.reconstruction == rec.OUTPUT_FED_BACK and table.feedback < 1.0
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["spare.weight"] == rec.NO_INPUTS


def _output_covariance(model: nn.Module, ids: list[torch.Tensor]) -> torch.Tensor | None:
    calibration = qlis.measure.calibrate.Calibration(model, ids)
    calibration.sensitivities(["table.weight", "head.weight"])
    return calibration.output_covariances.get("table.weight")


def test_a_table_tied_to_the_output_layer_is_fitted_along_both_of_its_uses():
    """A table that the output layer multiplies by too costs its lookups' S plus, per row,
    sum_p |g_p|^2 h_p h_p^T of the output layer's inputs h_p: the same lookups' S with the
    output layer kept apart, plus a positive-definite term along every column (the output
    layer reads all eight). Held by another kind of module, the table stays data-free."""
    torch.manual_seed(3)
    ids = [torch.randint(0, 64, (16, 6)) for _ in range(4)]
    tied = Lookup(tied="linear").eval()
    apart = Lookup().eval()
    apart.load_state_dict(tied.state_dict())
    both = qlis.measure.calibrate.Calibration(tied, ids)
    both.sensitivities(["table.weight", "head.weight"])
    lookups = qlis.measure.calibrate.Calibration(apart, ids)
    lookups.sensitivities(["table.weight", "head.weight", "out.weight"])
    assert torch.equal(apart.out.weight, tied.table.weight)
    covariance = both.output_covariances["table.weight"]
    assert torch.equal(covariance, covariance.T)
    head_part = (covariance - lookups.output_covariances["table.weight"]).double()
    assert bool((torch.linalg.eigvalsh(head_part) > 0).all())
    with pytest.warns(qlis.QualityWarning, match="do not depend on .*spare.weight"):
        result = qlis.compress(tied, calib=ids, min_cosine=0.99)
    table = next(layer for layer in result.layers if layer.name == "table.weight")
    assert table.reconstruction == rec.OUTPUT_FED_BACK and table.feedback < 1.0
    other = Lookup(tied="other").eval()
    assert _output_covariance(other, ids) is None
    with pytest.warns(qlis.QualityWarning, match="do not depend on .*spare.weight"):
        result = qlis.compress(other, calib=ids, min_cosine=0.99)
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["table.weight"] == rec.NO_INPUTS


def test_the_output_layers_term_is_summed_a_few_rows_of_logits_at_a_time(monkeypatch):
    """sum_p |g_p|^2 h_p h_p^T, with the gradients widened to float64 a few rows at a time
    (a large vocabulary's logits are not copied whole)."""
    torch.manual_seed(6)
    inputs, gradient = torch.randn(2, 5, 8), torch.randn(2, 5, 300)
    monkeypatch.setattr(qlis.measure.calibrate, "_SQUARES_AT_ONCE", 600)  # 2 rows at once
    total = torch.zeros(8, 8, dtype=torch.float64)
    qlis.measure.calibrate._add_head_gram(total, inputs, gradient)
    h, g = inputs.reshape(10, 8).double(), gradient.reshape(10, 300).double()
    expected = sum(g[p].square().sum() * torch.outer(h[p], h[p]) for p in range(10))
    torch.testing.assert_close(total, expected)


def test_a_tied_scaled_embedding_costs_what_the_same_scale_outside_it_costs():
    """A tied embedding whose own forward multiplies its rows by c (BART's, Gemma's) is
    measured at its rows, in the units of the output layer's term: its S is that of a plain
    table scaled after the lookup, not the gradient at its scaled output. A tied one whose
    forward is no multiple of its rows is rounded to nearest."""
    torch.manual_seed(5)
    ids = [torch.randint(0, 64, (16, 6)) for _ in range(4)]
    scaled = Lookup(tied="linear", table=Scaled).eval()
    plain = Lookup(tied="linear", outside=4.0).eval()
    plain.load_state_dict(scaled.state_dict())
    inside, outside = _output_covariance(scaled, ids), _output_covariance(plain, ids)
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=0.0)
    assert _output_covariance(Lookup(tied="linear", table=Squashed).eval(), ids) is None
    assert _output_covariance(Lookup(table=Squashed).eval(), ids) is not None  # untied


class Loud(nn.Module):
    """A table whose rows reach the output through sin(1e20 x): gradients at its output
    square beyond float32."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4096, 8)
        self.head = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sin(self.table(ids) * 1e20))


def test_a_table_whose_output_covariance_overflows_is_rounded_to_nearest():
    torch.manual_seed(4)
    ids = [torch.randint(0, 4096, (16, 6)) for _ in range(4)]
    result = qlis.compress(Loud().eval(), calib=ids, target_bits_per_weight=4)
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes["table.weight"] == rec.NO_INPUTS


def test_a_layer_whose_covariance_has_no_factor_is_rounded_data_free(monkeypatch):
    """A layer whose inputs a coarse layer before it nearly silenced (rd's size search on a
    ConvNeXt) has sums too coarse on the grid for a Cholesky factor: that layer is rounded
    as data-free quantization does, and says so; the call goes on."""
    factor = gptq._upper_inverse_factor

    def failing_for_the_second(hessian, damp):
        if hessian.shape[-1] == 16:
            raise gptq.CovarianceNotPositive("not positive")
        return factor(hessian, damp)

    monkeypatch.setattr(gptq, "_upper_inverse_factor", failing_for_the_second)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    result = qlis.compress(model, policy="quant", bits=4,
                           calib=[torch.randn(32, 8) for _ in range(4)])
    notes = {layer.name: layer.reconstruction for layer in result.layers}
    assert notes == {"0.weight": rec.BIAS_CORRECTED, "2.weight": rec.NOT_POSITIVE}
    plain = qlis.AffineQuantizer(bits=4).quantize(model[2].weight.detach())
    assert torch.equal(result.state_dict()["2.weight"], plain.dequantize())


def test_inputs_whose_covariance_overflows_name_the_layer_and_the_way_out():
    """A weight of 1e30 (finite outputs) made the next layer's input covariance inf: every
    calibrated policy refused "a finite weight and covariance", which the weights were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    with torch.no_grad():
        model[2].weight[0, 0] = 1e30
    calib = [torch.randn(4, 32) for _ in range(4)]
    with pytest.raises(qlis.InputError, match=r"^4\.weight: the covariance of its calibration "
                                         r"inputs is not finite.*error_feedback=False"):
        qlis.compress(model, "quant", calib=calib)
    qlis.compress(model, "quant", calib=calib, error_feedback=False)  # the way out works
