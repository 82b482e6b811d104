"""Tied tensors (one tensor under several state-dict names, as a language model's output
projection tied to its input embedding) are compressed once, stored once, and loaded back
tied: the float and the low-bit loaders compute with the same values."""

from __future__ import annotations

import json

import pytest
import torch
from archive_layout import build, split
from cli_helpers import run
from format_reference import FOLDER
from safetensors.torch import load_file
from torch import nn

import qlis
from qlis.archive.file import Archive
from qlis.archive.format import ALIASES_VERSION, COMPACT_VERSION, PREFIX, VERSION
from qlis.cli.main import cli
from qlis.errors import ArchiveError


class TiedLM(nn.Module):
    """An embedding, a hidden layer and an output projection sharing the embedding's weight."""

    def __init__(self, vocab: int = 256, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["data-free", "calibrated"])
def compressed(request):
    model = TiedLM()
    options = {"calib": [_ids(i) for i in range(4)]} if request.param == "calibrated" else {}
    return model, qlis.compress(model, target_bits_per_weight=4, **options)


def test_a_tied_tensor_is_planned_and_stored_once(tmp_path, compressed):
    model, result = compressed
    assert result.aliases == {"head.weight": "embed.weight"}
    assert "head.weight" not in result.tensors
    assert [layer.name for layer in result.layers].count("embed.weight") == 1
    assert "head.weight" not in [layer.name for layer in result.layers]
    state = result.state_dict()
    assert state["head.weight"] is state["embed.weight"]
    path = qlis.save(result, tmp_path / "m.qlis")
    header, _ = split(path.read_bytes())
    assert [e["name"] for e in header["tensors"]].count("embed.weight") == 1
    assert header["aliases"] == {"head.weight": "embed.weight"}
    assert header["version"] == COMPACT_VERSION == PREFIX.unpack_from(path.read_bytes())[1]
    assert result.original_bytes == sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "head.weight")


def test_inspect_scores_a_tied_tensor_once():
    report = qlis.inspect(TiedLM())
    assert [layer.name for layer in report.layers] == ["embed.weight", "hidden.weight"]
    assert sum(layer.P for layer in report.layers) == pytest.approx(1.0)


def test_any_name_of_a_tied_tensor_selects_or_plans_it():
    report = qlis.inspect(TiedLM(), select="head.*")
    assert [layer.name for layer in report.layers] == ["embed.weight"]
    config = {"quantizer": {"id": "affine", "bits": 6}}
    result = qlis.compress(TiedLM(), plan={"head.weight": config})
    assert [layer.name for layer in result.layers] == ["embed.weight"]
    assert result.layers[0].quantizer["bits"] == 6
    with pytest.raises(qlis.ConfigError, match="names the tied tensor 'embed.weight' twice"):
        qlis.compress(TiedLM(), plan={"head.weight": config, "embed.weight": config})


def test_tied_names_load_back_tied_and_both_loaders_agree(tmp_path, compressed):
    _, result = compressed
    path = qlis.save(result, tmp_path / "m.qlis")
    state = qlis.load(path)
    assert state["head.weight"] is state["embed.weight"]
    with qlis.open(path) as archive:
        assert archive.names() == [*result.tensors, "head.weight"]
        assert archive.entry("head.weight").name == "embed.weight"
    floating, lowbit = TiedLM(seed=1), TiedLM(seed=2)
    qlis.load(path, model=floating)
    qlis.load(path, model=lowbit, runtime="lowbit")
    assert type(lowbit.head) is not nn.Linear  # the head runs on the packed codes
    with torch.no_grad():
        ids = _ids(9)
        reference = TiedLM()
        reference.load_state_dict(result.state_dict())
        assert torch.equal(floating(ids), reference(ids))
        assert torch.allclose(lowbit(ids), floating(ids), rtol=1e-4, atol=1e-5)


def test_the_tied_archive_is_smaller_than_the_untied_one(tmp_path):
    tied = TiedLM()
    untied = TiedLM()
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    sizes = {}
    for label, model in (("tied", tied), ("untied", untied)):
        result = qlis.compress(model, policy="quant", bits=8)
        sizes[label] = qlis.save(result, tmp_path / f"{label}.qlis", codec="bitpack").stat().st_size
    embedding = tied.embed.weight.numel()  # 8-bit codes: a byte per weight
    assert sizes["untied"] - sizes["tied"] > 0.9 * embedding


def test_pack_streams_the_same_bytes_as_save(tmp_path):
    model = TiedLM()
    saved = qlis.save(qlis.compress(model), tmp_path / "saved.qlis")
    packed = tmp_path / "packed.qlis"
    qlis.pack(model, packed, jobs=2)
    assert packed.read_bytes() == saved.read_bytes()


def test_info_lists_the_tied_names(tmp_path):
    path = qlis.save(qlis.compress(TiedLM()), tmp_path / "m.qlis")
    table = run(cli, "info", path)
    assert table.exit_code == 0 and "tied tensors, stored once: head.weight = embed.weight" \
        in table.output
    shown = json.loads(run(cli, "info", path, "--format", "json").output)
    assert shown["aliases"] == {"head.weight": "embed.weight"}


def test_unpack_writes_every_name(tmp_path):
    path = qlis.save(qlis.compress(TiedLM()), tmp_path / "m.qlis")
    result = run(cli, "unpack", path, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    state = load_file(tmp_path / "out.safetensors")
    assert torch.equal(state["head.weight"], state["embed.weight"])


@pytest.mark.parametrize("aliases, message", [
    ({"head.weight": "nope"}, "names no stored tensor"),
    ({"head.weight": 3}, "names no stored tensor"),
    ({"hidden.bias": "embed.weight"}, "is also the name of a stored tensor"),
    ({"a": "head.weight", "head.weight": "embed.weight"}, "names no stored tensor"),
    (["head.weight"], "not a JSON object"),
])
def test_crafted_aliases_are_refused(tmp_path, aliases, message):
    path = qlis.save(qlis.compress(TiedLM()), tmp_path / "m.qlis")
    header, data = split(path.read_bytes())
    header["aliases"] = aliases
    path.write_bytes(build(header, data))
    with pytest.raises(ArchiveError, match=message):
        Archive(path)


def test_the_decoded_bytes_limit_counts_each_alias_as_a_copy(tmp_path):
    """An unpacked .safetensors copies every alias: many aliases of one stored tensor named
    gigabytes of output in a few hundred bytes of header."""
    path = qlis.save(qlis.compress(TiedLM()), tmp_path / "m.qlis")
    with Archive(path) as archive:
        stored = sum(archive.entry(n).decoded_bytes for n in archive.names()
                     if n not in archive.aliases)
        copy = archive.entry("embed.weight").numel * 4  # float32 values
    header, data = split(path.read_bytes())
    header["aliases"] = {f"copy{i}": "embed.weight" for i in range(40)}
    path.write_bytes(build(header, data))
    with pytest.raises(ArchiveError, match="once decoded, over the limit"):
        Archive(path, max_decoded_bytes=stored + 39 * copy)
    with Archive(path, max_decoded_bytes=stored + 40 * copy) as archive:
        assert torch.equal(archive.read("copy39"), archive.read("embed.weight"))


def test_a_version_2_file_has_no_aliases(tmp_path):
    header, data = split((FOLDER.parent / "format-v2-v4" / "aliases.qlis").read_bytes())
    assert header["version"] == ALIASES_VERSION  # what version 3 wrote: 64-byte records
    header["version"] = VERSION
    path = tmp_path / "m.qlis"
    path.write_bytes(build(header, data, VERSION))
    with pytest.raises(ArchiveError, match="a version 2 header has none"):
        Archive(path)


def test_an_archive_of_untied_tensors_does_not_load_into_a_model_that_ties_them(tmp_path):
    """Loading both names into the one tensor would keep the last and lose the first."""
    torch.manual_seed(0)
    untied = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    path = qlis.save(qlis.compress(untied), tmp_path / "untied.qlis")
    shared = nn.Linear(16, 16)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    for runtime in ("float", "lowbit"):
        with pytest.raises(qlis.InputError, match=r"ties '2.weight' to '0.weight'.*stores them "
                                                  r"apart\); model unchanged"):
            qlis.load(path, model=tied, runtime=runtime)
        assert all(torch.equal(v, before[k]) for k, v in tied.state_dict().items())
    again = nn.Linear(16, 16)
    retied = nn.Sequential(again, nn.ReLU(), again)
    qlis.load(qlis.save(qlis.compress(tied), tmp_path / "tied.qlis"), model=retied)
    assert retied[0].weight is retied[2].weight


def _transposed_tie() -> nn.Sequential:
    """Two layers sharing one weight's memory, the second a transposed view: not one tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False))
    model[2].weight = nn.Parameter(model[0].weight.t())
    return model


def test_a_tie_on_the_gpu_stays_one_tensor(monkeypatch):
    """Each name of a GPU model was moved to the CPU apart, as a copy of its own: the tie was
    lost, stored twice, and the archive refused to load into the model it came from."""
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: self.clone())  # a copy, as from a GPU
    result = qlis.compress(TiedLM(), target_bits_per_weight=4)
    assert result.aliases == {"head.weight": "embed.weight"}


def test_tensors_sharing_memory_without_being_one_are_refused(tmp_path):
    """Compressed apart, the two views were rounded apart: the calibrated quality described a
    model that cannot exist, and loading wrote one over the other (silently unequal)."""
    model = _transposed_tie()
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    match = r"'0.weight' and '2.weight' of the model share memory.*model is unchanged"
    calib = [torch.randn(4, 32) for _ in range(4)]
    for options in ({}, {"calib": calib}, {"inplace": True}):
        with pytest.raises(qlis.InputError, match=match):
            qlis.compress(model, policy="quant", bits=2, granularity="channel", **options)
    apart = {k: v.clone() for k, v in model.state_dict().items()}
    path = qlis.save(qlis.compress(apart, policy="quant", bits=2, granularity="channel"),
                     tmp_path / "m.qlis")
    for runtime in ("float", "lowbit"):
        with pytest.raises(qlis.InputError, match=match):
            qlis.load(path, model=model, runtime=runtime)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].stride() == s for k, (v, s) in before.items())
    assert model[2].weight.data_ptr() == model[0].weight.data_ptr()


def test_views_side_by_side_in_one_buffer_compress_and_load(tmp_path):
    """A flat buffer holding every parameter (FSDP's), or a fused weight's column slices,
    shares a storage but no element: compressed and loaded as separate tensors."""
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    flat = torch.randn(sum(p.numel() for p in model.parameters()))
    start = 0
    for module in (model[0], model[2]):
        for name, param in list(module.named_parameters()):
            setattr(module, name, nn.Parameter(flat[start:start + param.numel()].view_as(param)))
            start += param.numel()
    fused = torch.randn(32, 96)  # two column slices of one weight
    model[0].weight = nn.Parameter(fused[:, :48].t())
    model[2].weight = nn.Parameter(fused[:16, 48:])
    result = qlis.compress(model, policy="quant", bits=4, granularity="channel")
    path = qlis.save(result, tmp_path / "m.qlis")
    state = qlis.load(path, model=model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(v, result.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("how", ["expanded", "inference"])
def test_a_model_that_cannot_be_written_into_is_refused_before_anything_changes(tmp_path, how):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    path = qlis.save(qlis.compress(model), tmp_path / "m.qlis")
    if how == "expanded":
        model[2].weight = nn.Parameter(torch.randn(1, 64).expand(8, 64))
        match = r"'2.weight' of the model repeats its elements"
    else:
        with torch.inference_mode():
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
        match = r"'0.weight' of the model is an inference tensor"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qlis.InputError, match=match):
        qlis.load(path, model=model)
    with pytest.raises(qlis.InputError, match=match):
        qlis.compress(model, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_packed_folder_without_its_tied_copies_loads_into_its_model(tmp_path):
    """Hugging Face checkpoints leave a tied tensor's copies out (GPT-2's lm_head.weight):
    the data-free pack of the folder had no module to learn the tie from, and its archive
    did not load back into the model it came from."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    archive = tmp_path / "m.qlis"
    assert run(cli, "pack", tmp_path / "hf", "-o", archive).exit_code == 0
    assert "lm_head.weight" not in qlis.load(archive)
    model, packed = (transformers.GPT2LMHeadModel(config).eval() for _ in range(2))
    qlis.load(archive, model=model)
    qlis.load(archive, model=packed, runtime="lowbit")  # the head packed, the table not
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, qlis.load(archive)["transformer.wte.weight"])
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, atol=1e-3, rtol=0)
