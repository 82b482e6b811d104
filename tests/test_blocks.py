"""A model's chain of blocks: found and verified on the float model's pass, run block by block
on cached inputs with the same result as passes of the whole model, and quantized layers made
one at a time when a pass would otherwise hold them all."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import qlis
from qlis.measure import blocks as blocks_module
from qlis.measure import calibrate
from qlis.measure.blocks import ChainCheck, find_blocks
from qlis.measure.layer_inputs import layer_inputs
from qlis.plan.execute import Dequantized
from qlis.quantize import reconstruct as rec
from qlis.quantize.quantizers import get_quantizer

UNIFORM = {"id": "uniform", "rel_mse": 0.03}


class Block(nn.Module):
    """A pre-norm residual block whose attention-like mixing reads a mask argument."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        scores = (self.q(h) @ self.k(h).transpose(1, 2)) * scale + mask
        x = x + scores.softmax(-1) @ self.v(h)
        return x + self.down(torch.relu(self.up(x))), scores


class InPlaceBlock(Block):
    """A block that changes its input in place before using it."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x.mul_(1.5), mask, scale=scale)


class Chain(nn.Module):
    """Embedding, a chain of blocks, a head: the shape of a transformer encoder."""

    def __init__(self, width: int = 16, depth: int = 4, skip: bool = False,
                 in_place: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList((InPlaceBlock if in_place else Block)(width)
                                    for _ in range(depth))
        self.head = nn.Linear(width, 3)
        self.skip = skip

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(self.embed(ids))
        bias = (1.0 - mask[:, None, :].float()) * -1e4
        first = x
        for i, layer in enumerate(self.layers):
            x = layer(first if self.skip and i == 2 else x, bias, scale=0.25)[0]
        return self.head(x[:, 0])


def batches(count: int = 5) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"ids": torch.randint(0, 50, (3, 7), generator=generator),
             "mask": torch.ones(3, 7, dtype=torch.long)} for _ in range(count)]


def chained(model: nn.Module, calib: list) -> bool:
    calibration = calibrate.Calibration(model, calib)
    check = ChainCheck(find_blocks(model))
    with check.watching():
        calibration.feed()
    return check.chained and check.runs == calibration.forward_calls


def test_the_heaviest_module_list_is_the_chain_of_blocks():
    found = find_blocks(Chain())
    assert found.names == ("layers.0", "layers.1", "layers.2", "layers.3")
    assert found.index_of("layers.2.q.weight") == 2 and found.index_of("head.weight") is None
    assert find_blocks(nn.Linear(3, 3)) is None
    sequential = find_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert sequential.names == ("0", "1", "2")


def test_groups_are_layers_reading_one_live_tensor_not_a_reused_address():
    """The embedding's output is freed before the first block's norm output takes its
    memory: the input layer and the block's q/k/v are two groups, not one."""
    model, calib = Chain().eval(), batches(2)
    reachable = {n: layer_inputs(model, n) for n, p in model.named_parameters()
                 if n.endswith("weight") and layer_inputs(model, n) is not None}
    for _ in range(3):
        groups = rec._order(calibrate.Calibration(model, calib), reachable, None)[0]
        assert groups[:2] == [["inp.weight"], ["layers.0.q.weight", "layers.0.k.weight",
                                               "layers.0.v.weight"]]


def test_a_chain_is_told_from_blocks_that_are_not_one():
    calib = batches(2)
    assert chained(Chain().eval(), calib)
    assert not chained(Chain(skip=True).eval(), calib)  # block 2 reads the embedding

    class Twice(Chain):  # the first block runs twice per forward
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.inp(self.embed(ids))
            bias = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1])
            x = self.layers[0](x, bias)[0]
            for layer in self.layers:
                x = layer(x, bias)[0]
            return self.head(x[:, 0])

    class Masks(Chain):  # every block gets another mask
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.inp(self.embed(ids))
            for i, layer in enumerate(self.layers):
                x = layer(x, torch.full((ids.shape[0], ids.shape[1], ids.shape[1]), -i))[0]
            return self.head(x[:, 0])

    assert not chained(Twice().eval(), calib)
    assert not chained(Masks().eval(), calib)


@pytest.mark.parametrize(("skip", "in_place"), [(False, False), (True, False), (False, True)],
                         ids=["chain", "not-a-chain", "blocks-change-their-input"])
def test_block_by_block_reconstruction_gives_the_bytes_of_whole_model_passes(
        monkeypatch, skip, in_place):
    torch.manual_seed(0)
    model, calib = Chain(skip=skip, in_place=in_place).eval(), batches(6)
    runs = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda module, args: runs.append(1))
    by_blocks = qlis.compress(model, "quant", bits=3, calib=calib)
    block_runs = len(runs)
    monkeypatch.setattr(rec, "find_blocks", lambda model: None)
    runs.clear()
    whole = qlis.compress(model, "quant", bits=3, calib=calib)
    mine, theirs = by_blocks.state_dict(), whole.state_dict()
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    assert by_blocks.distortion["output"] == whole.distortion["output"]
    if not skip:  # each block ran for its own groups and to pass its outputs on
        assert block_runs < 0.75 * len(runs)


def test_finished_quantized_layers_are_made_one_at_a_time_past_the_budget(monkeypatch):
    torch.manual_seed(1)
    model, calib = Chain().eval(), batches(4)
    names = [n for n, p in model.named_parameters() if p.ndim == 2]
    assert any("embed" in n for n in names)  # an embedding's table is made when it runs too
    planned = qlis.compress(model, "quant", bits=3, calib=calib, select=names)
    realized = {n: t for n, t in planned.state_dict().items() if n in names}
    measurement = calibrate.Calibration(model, calib)
    eager = measurement.outputs_with(realized)
    own = {n: p.data for n, p in model.named_parameters()}
    most = []

    def count(module: nn.Module, args: tuple) -> None:
        most.append(sum(not p.data.equal(own[n]) for n, p in model.named_parameters()
                        if n in names))

    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.register_forward_pre_hook(count)
    monkeypatch.setattr(calibrate, "EAGER_BYTES", 0)
    lazy = measurement.outputs_with({n: (lambda t=t: t) for n, t in realized.items()})
    assert eager.keys() == lazy.keys()
    assert all(torch.equal(eager[key], lazy[key]) for key in eager)
    # counted as each module starts, before its own replacement is made: no other is held
    assert most and max(most) == 0
    assert all(p.data_ptr() == own[n].data_ptr() for n, p in model.named_parameters())


def test_a_pass_after_the_chain_holds_no_blocks_float_copies():
    """The head's pass runs every finished block; their layers are made as each module runs,
    not all at once, however small the model is."""
    torch.manual_seed(3)
    model, calib = Chain(depth=4).eval(), batches(4)
    own = {n: p.data for n, p in model.named_parameters()}
    held: list[set[int]] = []

    def at_head(module: nn.Module, args: tuple) -> None:
        held.append({int(n.split(".")[1]) for n, p in model.named_parameters()
                     if n.startswith("layers.") and p.ndim == 2  # weights (biases are small)
                     and p.data.data_ptr() != own[n].data_ptr()})

    model.head.register_forward_pre_hook(at_head)
    qlis.compress(model, "quant", bits=4, calib=calib)
    # the head's reconstruction pass holds no block's layers (the final measure, a pass like
    # any other caller's, makes them all up front)
    assert all(blocks in (set(), {0, 1, 2, 3}) for blocks in held) and {0, 1, 2, 3} in held


def test_a_block_pass_holds_no_float_copy_but_the_running_layers(monkeypatch):
    """Inside the chain a fitted layer is made when its module runs and let go when it
    returns: as a block runs for its own fit, the float copies alive are the layer before
    the chain's (made up front), never the block's other layers nor the previous block's."""
    torch.manual_seed(4)
    model, calib = Chain(depth=3).eval(), batches(4)
    made: list[weakref.ref] = []
    real_dequantized, real_lazily = rec.dequantized, rec.lazily

    def tracked(stored: object) -> torch.Tensor:
        tensor = real_dequantized(stored)
        made.append(weakref.ref(tensor))
        return tensor

    def tracked_lazily(stored: object) -> object:
        made_lazily.append(real_lazily(stored))
        return lambda: tracked(stored)

    made_lazily: list[object] = []
    alive: list[int] = []
    monkeypatch.setattr(rec, "dequantized", tracked)
    monkeypatch.setattr(rec, "lazily", tracked_lazily)
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(
                    lambda module, args: alive.append(sum(ref() is not None for ref in made)))
    qlis.compress(model, "quant", bits=4, calib=calib)
    per_block = sum(p.ndim == 2 for p in model.layers[0].parameters())
    assert len(made_lazily) == 3 * per_block  # every layer inside the chain, made on call
    assert len(made) > 3 * per_block  # and made again by each pass that ran it
    assert max(alive) == 1  # the layer before the chain's


def test_an_embeddings_quantized_table_gives_a_pass_only_the_rows_it_looks_up(monkeypatch):
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(3000, 8, padding_idx=2999)
            self.out = nn.Linear(8, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(ids)).sum(1)

    class Counted(Dequantized):
        def __call__(self) -> torch.Tensor:
            wholes.append(1)
            return super().__call__()

    torch.manual_seed(5)
    model = Lookup().eval()
    generator = torch.Generator().manual_seed(6)
    calib = [torch.randint(2990, 3000, (2, 5), generator=generator) for _ in range(2)]
    stored = get_quantizer({"id": "affine", "bits": 4}).quantize(model.embed.weight.detach())
    own = model.embed.weight.data_ptr()
    measurement = calibrate.Calibration(model, calib)
    eager = measurement.outputs_with({"embed.weight": stored.dequantize()})
    wholes: list[int] = []
    tables: list[int] = []
    model.embed.register_forward_hook(lambda module, args, out: tables.append(
        module.weight.shape[0]))
    monkeypatch.setattr(calibrate, "EAGER_BYTES", 0)
    lazy = measurement.outputs_with({"embed.weight": Counted(stored)})
    assert all(torch.equal(eager[key], lazy[key]) for key in eager)
    assert not wholes and tables and max(tables) <= 10  # the ids lie in 2990..2999
    assert model.embed.weight.data_ptr() == own and model.embed.padding_idx == 2999
    handles = calibrate._rows_on_call(model.embed, model.embed.weight, Counted(stored))
    with torch.no_grad(), pytest.raises(IndexError, match="index out of range"):
        model.embed(torch.tensor([[3000]]))
    for handle in handles:
        handle.remove()
    assert wholes == [1]  # not a valid lookup: the whole table, and torch's own refusal
    assert model.embed.weight.data_ptr() == own and model.embed.padding_idx == 2999


def test_a_hugging_face_encoder_runs_block_by_block(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64)
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, 60, (2, 9), generator=generator),
              "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])} for _ in range(4)]
    assert find_blocks(model).names[0] == "encoder.layer.0"
    assert chained(model, calib)
    cached = []
    monkeypatch.setattr(rec, "CachedInputs",
                        lambda *args: cached.append(blocks_module.CachedInputs(*args))
                        or cached[-1])
    result = qlis.compress(model, "quant", bits=4, calib=calib)
    assert len(cached) == 1 and len(cached[0].calls) == 3  # the fitting batches
    assert result.distortion["output"]["cosine"] > 0.9


def test_a_tied_weight_is_replaced_for_every_module_that_holds_it(monkeypatch):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    torch.manual_seed(2)
    model = Tied().eval()
    measurement = calibrate.Calibration(model, [torch.randint(0, 20, (2, 5))])
    replaced = torch.randn(20, 8)
    eager = measurement.outputs_with({"head.weight": replaced})
    monkeypatch.setattr(calibrate, "EAGER_BYTES", 0)
    lazy = measurement.outputs_with({"head.weight": lambda: replaced})
    assert torch.equal(eager[0], lazy[0])


def test_a_decoders_key_value_cache_starts_empty_in_every_block_replay(monkeypatch):
    # a causal LM hands each layer the model call's KV cache, which every attention call
    # appends to: replays shared it, and a padded batch's keys outgrew its mask (a crash)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=32)
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    calib = [{"input_ids": torch.randint(0, 64, (2, 6), generator=generator),
              "attention_mask": mask} for _ in range(2)]
    assert chained(model, calib)
    by_blocks = qlis.compress(model, "quant", bits=4, calib=calib)
    monkeypatch.setattr(rec, "find_blocks", lambda model: None)
    whole = qlis.compress(model, "quant", bits=4, calib=calib)
    mine, theirs = by_blocks.state_dict(), whole.state_dict()
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    assert by_blocks.distortion["output"]["cosine"] > 0.9


def test_advancing_the_cache_lets_each_batchs_inputs_go_once_its_outputs_are_made():
    torch.manual_seed(0)
    model = Chain().eval()
    calibration = calibrate.Calibration(model, batches(6))
    blocks = find_blocks(model)
    cached = blocks_module.CachedInputs(calibration, blocks, {})
    with torch.no_grad():
        expected = [calibrate.first_tensor(blocks.modules[0](*fresh.args, **fresh.kwargs))
                    for fresh in (call.fresh() for _, call in cached.calls)]
    inputs = [weakref.ref(call.hidden) for _, call in cached.calls]
    alive_at_each_call = []
    handle = blocks.modules[0].register_forward_pre_hook(
        lambda module, args: alive_at_each_call.append(
            sum(ref() is not None for ref in inputs)))
    try:
        cached.advance(blocks.modules[0], {})
    finally:
        handle.remove()
    count = len(inputs)
    assert alive_at_each_call == list(range(count, 0, -1))  # the earlier batches' are gone
    assert all(ref() is None for ref in inputs)
    for (_, call), output in zip(cached.calls, expected, strict=True):
        assert torch.equal(call.hidden, output)
