"""What the output cosine compares: vectors along the last dimension (a token's, an
embedding's), a feature map (examples, channels, space) one example at a time, never a loss."""

from __future__ import annotations

import weakref

import pytest
import torch

import qlis
from qlis.errors import InputError
from qlis.measure.calibrate import Calibration
from qlis.plan.compress import QualityWarning


class MaskedConv(torch.nn.Module):
    """A conv feature map whose odd pixel rows are always zero (a padded or masked map)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mask", (torch.arange(6) % 2 == 0).float()[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mask


def mean_cosine(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(reference.double(), output.double(),
                                                       dim=1).mean())


def test_a_feature_map_is_compared_one_example_at_a_time():
    model = MaskedConv().eval()
    batches = [torch.randn(5, 3, 6, 7) for _ in range(2)]
    noisy = model.conv.weight + 0.5 * torch.randn_like(model.conv.weight)
    measured = Calibration(model, batches).measure({"conv.weight": noisy})
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches])
        model.conv.weight.data, own = noisy, model.conv.weight.data
        output = torch.cat([model(b) for b in batches])
        model.conv.weight.data = own
    per_example = mean_cosine(reference.flatten(1), output.flatten(1))
    rows = reference.reshape(-1, 7).double(), output.reshape(-1, 7).double()
    zero = rows[0].norm(dim=1) == 0
    per_pixel_row = float(torch.where(zero, 1.0, torch.nn.functional.cosine_similarity(
        *rows, dim=1)).mean())  # zero rows in both counted as perfect, half of them here
    assert abs(measured["cosine"] - per_example) < 1e-9
    assert per_pixel_row > per_example + 0.1


def test_token_vectors_are_compared_along_the_last_dimension():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    batches = [torch.randn(2, 5, 8) for _ in range(2)]
    noisy = model[0].weight + 0.3 * torch.randn_like(model[0].weight)
    measured = Calibration(model, batches).measure({"0.weight": noisy})
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches]).reshape(-1, 8)
        output = torch.cat([b @ noisy.T + model[0].bias for b in batches]).reshape(-1, 8)
    assert abs(measured["cosine"] - mean_cosine(reference, output)) < 1e-9


class Tokens(torch.nn.Module):
    """A text model's shape: token ids and their attention mask in, a vector per position
    out (the padded positions computed as any other, as a transformer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embed(input_ids))


def test_padded_positions_are_not_compared():
    """Nine tenths of a batch of unequal lines can be padding: counted, a min_cosine of 0.99
    was met where the real tokens kept 0.9889."""
    torch.manual_seed(0)
    model = Tokens().eval()
    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[:, :2] = 1  # two real tokens a line, eight of padding
    ids = torch.randint(1, 32, (3, 10)) * mask  # padding is token 0
    batch = {"input_ids": ids, "attention_mask": mask}
    noisy = model.linear.weight + 0.3 * torch.randn_like(model.linear.weight)
    measured = Calibration(model, [batch]).measure({"linear.weight": noisy})
    with torch.no_grad():
        real = mask.reshape(-1).bool()
        reference = model(**batch).reshape(-1, 8)[real]
        output = (model.embed(ids) @ noisy.T + model.linear.bias).reshape(-1, 8)[real]
    assert abs(measured["cosine"] - mean_cosine(reference, output)) < 1e-9


class SequenceFirst(Tokens):
    """The same, its output (length, batch, width), as nn.Transformer's default, with the
    padded positions zeroed."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.linear(self.embed(input_ids)) * attention_mask[..., None]).transpose(0, 1)


def test_a_sequence_first_output_is_masked_in_its_own_order():
    """The flat (batch, length) mask over (length, batch) rows dropped real tokens and kept
    padding: cosine 0.9937 reported where the real tokens kept 0.9915."""
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    mask = (torch.arange(10) < torch.tensor([[3], [7], [10]])).long()  # lines of 3, 7, 10
    batch = {"input_ids": torch.randint(1, 32, (3, 10)) * mask, "attention_mask": mask}
    noisy = model.linear.weight + 0.3 * torch.randn_like(model.linear.weight)
    measured = Calibration(model, [batch]).measure({"linear.weight": noisy})
    with torch.no_grad():
        real = mask.bool()
        reference = model.linear(model.embed(batch["input_ids"]))[real]
        output = (model.embed(batch["input_ids"]) @ noisy.T + model.linear.bias)[real]
    assert abs(measured["cosine"] - mean_cosine(reference, output)) < 1e-9


class Caching(torch.nn.Module):
    """Returns its output with a large cache beside it (a language model's logits and
    past keys and values), and counts how many of the caches it returned are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.returned: list[weakref.ref] = []
        self.most_alive = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.most_alive = max(self.most_alive, sum(r() is not None for r in self.returned))
        cache = torch.zeros(4096)
        self.returned.append(weakref.ref(cache))
        return self.linear(x), cache


def test_each_output_is_reduced_to_its_vectors_as_it_comes():
    """Every batch's whole output was held until the pass ended: 1.2 GB for 32 batches of a
    small GPT-2's logits and cache, where one batch's logits are 16 MB."""
    model = Caching().eval()
    calibration = Calibration(model, [torch.randn(4, 8) for _ in range(8)])
    calibration.measure({"linear.weight": torch.zeros(8, 8)})
    assert len(model.returned) > 8 and model.most_alive == 0


class Imaginary(torch.nn.Module):
    """All of its output in the imaginary part of a complex tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.complex(torch.zeros_like(y), y)


def test_a_complex_output_is_compared_by_its_real_and_imaginary_parts():
    torch.manual_seed(0)
    model = Imaginary().eval()
    batches = [torch.randn(6, 8) for _ in range(2)]
    noisy = model.linear.weight + 0.3 * torch.randn_like(model.linear.weight)
    measured = Calibration(model, batches).measure({"linear.weight": noisy})
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches])
        output = torch.cat([b @ noisy.T + model.linear.bias for b in batches])
    pairs = torch.view_as_real(reference).reshape(-1, 16)  # (re, im) of each of the 8
    assert abs(measured["cosine"] - mean_cosine(pairs, torch.stack(
        [torch.zeros_like(output), output], dim=-1).reshape(-1, 16))) < 1e-9
    assert measured["cosine"] < 0.99  # the real part alone is zeros: it saw no error


def test_a_single_output_vector_claims_no_standard_error():
    """A score per input over one batch is one vector: its cosine has no measurable spread,
    so none is reported (it was 0: a precision the measure does not have)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 1)).eval()
    batch = torch.randn(5, 6)
    noisy = model[0].weight + 0.3 * torch.randn_like(model[0].weight)
    one = Calibration(model, [batch]).measure({"0.weight": noisy})
    assert one["cosine_stderr"] is None and one["cosine"] < 1.0
    two = Calibration(model, [batch, batch + 1]).measure({"0.weight": noisy})
    assert two["cosine_stderr"] is not None and two["cosine_stderr"] >= 0.0


class WithLoss(torch.nn.Module):
    """A Hugging Face-style model given labels: the loss (one number) first, then the logits
    (or, ``loss_only``, nothing else)."""

    def __init__(self, loss_only: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.loss_only = loss_only

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.linear(x)
        loss = torch.nn.functional.mse_loss(logits, labels)
        return {"loss": loss} if self.loss_only else {"loss": loss, "logits": logits}


def test_a_loss_before_the_outputs_is_not_what_is_compared():
    torch.manual_seed(0)
    model = WithLoss().eval()
    batches = [{"x": torch.randn(4, 8), "labels": torch.randn(4, 8)}]
    noisy = model.linear.weight + 0.3 * torch.randn_like(model.linear.weight)
    measured = Calibration(model, batches).measure({"linear.weight": noisy})
    with torch.no_grad():
        reference = model.linear(batches[0]["x"])
        output = batches[0]["x"] @ noisy.T + model.linear.bias
    assert abs(measured["cosine"] - mean_cosine(reference, output)) < 1e-9


def test_a_model_that_returns_only_a_number_is_refused():
    batches = [{"x": torch.randn(4, 8), "labels": torch.randn(4, 8)}]
    with pytest.raises(InputError, match="a single number"):
        Calibration(WithLoss(loss_only=True).eval(), batches)


def _scorer(offset: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        model[2].bias.fill_(offset)
    return model.eval()


def _score_warnings(model: torch.nn.Module, calib: list[torch.Tensor]) -> list[str]:
    with pytest.warns(QualityWarning):
        result = qlis.compress(model, "quant", bits=4, calib=calib)
    return [w for w in result.warnings if "score" in w or "one output value" in w]


def test_scores_compared_uncentred_or_one_a_batch_are_said_to_say_little():
    batches = [torch.randn(8, 16) for _ in range(4)]
    (uncentred,) = _score_warnings(_scorer(3.5), batches)
    assert "one score per example, compared un-centred" in uncentred
    assert "minus their mean" in uncentred
    (single,) = _score_warnings(_scorer(3.5), [b[:1] for b in batches])
    assert single.startswith("each calibration batch gives one output value")


def test_centred_scores_and_vector_outputs_need_no_such_warning():
    batches = [torch.randn(8, 16) for _ in range(4)]

    def centred(model: torch.nn.Module) -> torch.Tensor:
        scores = torch.cat([model(b) for b in batches]).reshape(-1)
        return scores - scores.mean()

    result = qlis.compress(_scorer(3.5), "quant", bits=4, calib=centred)
    assert not [w for w in result.warnings if "score" in w]
    # scores about zero, each batch's mean off by its sampling noise; the last batch of one
    uneven = [*batches, torch.randn(1, 16)]
    result = qlis.compress(_scorer(0.0), "quant", bits=4, calib=uneven)
    assert not [w for w in result.warnings if "score" in w or "one output value" in w]
    torch.manual_seed(0)
    unbatched = torch.nn.Linear(16, 8).eval()  # one example's features: a vector
    result = qlis.compress(unbatched, "quant", bits=4, calib=[b[0] for b in batches])
    assert not [w for w in result.warnings if "score" in w or "one output value" in w]
    torch.manual_seed(0)
    vectors = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    result = qlis.compress(vectors, "quant", bits=4, calib=batches)
    assert not [w for w in result.warnings if "score" in w]
