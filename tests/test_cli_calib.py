"""`qlis pack --calib`: a Hugging Face model folder calibrated on text or on input tensors,
reconstructed, its output quality measured; bad calibration input is one line, exit 2."""

from __future__ import annotations

import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, reconstruction_notes, run
from safetensors.torch import load_file, save_file

import qlis
import qlis.cli.progress
import qlis.models.calib_files
from qlis.cli import model_commands
from qlis.cli.main import cli
from qlis.errors import InputError
from qlis.models import hf_model
from qlis.models.hf_model import load_hf_model, max_input_length
from qlis.workers import memory

transformers = pytest.importorskip("transformers")

WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "big", "small", "photo", "of", "image",
         "painting", "sky", "sea", "tree", "house", "car", "man", "woman", "girl", "boy", "city",
         "night", "day", "sun", "moon", "star", "art", "style", "bright"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random-initialised BERT with its tokenizer, saved as Hugging Face does."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(
        folder)
    return folder


def user_error(*args: object) -> str:
    return one_line_error(cli, "qlis: error:", *args)


def test_pack_calibrated_on_text_measures_the_output(bert_folder, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(" ".join(WORDS[i:i + 6]) for i in range(20)) + "\n\n")
    out = tmp_path / "bert.qlis"
    result = run(cli, "pack", bert_folder, "-o", out, "--calib", text, "--min-cosine", "0.99",
                 "--calib-batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "output on the calibration data: cosine 0.99" in result.output
    assert "calibration: 20 examples" in result.output
    model = load_hf_model(bert_folder)
    state = qlis.load(out)
    assert set(state) == set(model.state_dict())
    assert any(note and note.startswith("error feedback") for note in reconstruction_notes(out))


def test_pack_calibrated_on_input_tensors(bert_folder, tmp_path):
    inputs = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.randint(5, 40, (12, 7)),
               "attention_mask": torch.ones(12, 7, dtype=torch.int64)}, str(inputs))
    out = tmp_path / "bert.qlis"
    result = run(cli, "pack", bert_folder, "-o", out, "--calib", inputs,
                 "--target-bits-per-weight", "12", "--calib-examples", "10",
                 "--rounding-sweeps", "1")
    assert result.exit_code == 0, result.output
    assert "calibration: 10 examples" in result.output and "cosine" in result.output
    with qlis.open(out) as archive:
        assert archive.compression["rounding_sweeps"] == 1


def test_each_pack_sets_the_allocator_for_its_own_work(bert_folder, tmp_path, monkeypatch):
    """The allocator setting that speeds a streaming pack or unpack raises a calibrated run's
    held memory (workers/memory.py): the calibrated pack instead unmaps its buffers when
    freed, and sets it before the model is built (whose weights are freed when the file's
    replace them)."""
    settings: list[object] = []
    monkeypatch.setattr(memory, "_MALLOPT", lambda option, value: settings.append((option, value)))
    built = model_commands.load_hf_model
    monkeypatch.setattr(model_commands, "load_hf_model",
                        lambda path: settings.append("built") or built(path))
    kept = [(-3, memory.KEPT_MMAP_THRESHOLD), (-1, memory.KEPT_TRIM_THRESHOLD)]
    inputs = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.randint(5, 40, (8, 7))}, str(inputs))
    calibrated = run(cli, "pack", bert_folder, "-o", tmp_path / "c.qlis", "--calib", inputs)
    assert calibrated.exit_code == 0, calibrated.output
    assert settings == [(-3, memory.RETURNED_MMAP_THRESHOLD), "built"]
    settings.clear()
    out = tmp_path / "bert.qlis"
    assert run(cli, "pack", bert_folder, "-o", out).exit_code == 0
    assert settings == kept
    assert run(cli, "unpack", out, "-o", tmp_path / "back.safetensors").exit_code == 0
    assert settings == kept * 2


def test_bad_calibration_input_is_one_line(bert_folder, tmp_path, monkeypatch):
    state_file = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(state_file))
    text = tmp_path / "ok.txt"
    text.write_text("a red cat\n")
    out = tmp_path / "x.qlis"
    assert "config.json" in user_error("pack", state_file, "-o", out, "--calib", text)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no example" in user_error("pack", bert_folder, "-o", out, "--calib", empty)
    ragged = tmp_path / "ragged.safetensors"
    save_file({"input_ids": torch.zeros(3, 4, dtype=torch.int64),
               "attention_mask": torch.ones(2, 4, dtype=torch.int64)}, str(ragged))
    assert "first dimension" in user_error("pack", bert_folder, "-o", out, "--calib", ragged)
    save_file({"input_ids": torch.tensor(3)}, str(ragged))
    assert "'input_ids' is a single number; each tensor holds one example per row" in (
        user_error("pack", bert_folder, "-o", out, "--calib", ragged))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"pixel_values": torch.zeros(2, 3)}, str(wrong))
    assert "'pixel_values' is not a tensor input of BertModel" in user_error(
        "pack", bert_folder, "-o", out, "--calib", wrong)
    for key, ids, words in [("input_ids", [[2, 40, 3]], "holds input_ids 40; the model has 40 "
                             "rows in its token embedding (ids 0-39)"),
                            ("input_ids", [[2, -1, 3]], "holds input_ids -1"),
                            ("token_type_ids", [[0, 2, 0]], "holds token_type_ids 2; the model "
                             "has 2 token types")]:
        beyond = tmp_path / "beyond.safetensors"
        batch = {"input_ids": torch.tensor([[2, 7, 3]]), key: torch.tensor(ids)}
        save_file(batch, str(beyond))
        assert words in user_error("pack", bert_folder, "-o", out, "--calib", beyond)
    binary = tmp_path / "bytes.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in user_error("pack", bert_folder, "-o", out, "--calib", binary)
    monkeypatch.setattr(qlis.models.calib_files, "MAX_TEXT_BYTES", 4)
    assert "larger than 4 B, the most accepted for a calibration text file" in user_error(
        "pack", bert_folder, "-o", out, "--calib", text)
    monkeypatch.undo()
    assert "must be" in user_error("pack", bert_folder, "-o", out, "--calib", tmp_path / "c.csv")
    assert "pass --calib" in user_error("pack", bert_folder, "-o", out, "--rounding-sweeps", "2")
    assert not out.exists()


def test_progress_bars_draw_with_and_without_a_known_total(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with qlis.cli.progress.progress_bars() as bar:
        measuring, writing = bar("measuring", None), bar("writing", 100, "tensors")
        assert bar("nothing to do", 0) is None
        for advance in (measuring, writing, measuring, writing):
            advance(60)
    with qlis.cli.progress.progress_bars(quiet=True) as bar:
        assert bar("writing", 100) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with qlis.cli.progress.progress_bars() as bar:
        assert bar("writing", 100) is None


def test_a_folder_loads_as_transformers_loads_it_without_random_weights_first(
        bert_folder, monkeypatch):
    """The module is built with no weight filled (the folder's replace them at once) and
    computes what transformers' own loading gives, buffers included."""
    filled = []
    monkeypatch.setattr(torch.nn.init, "normal_",
                        lambda tensor, *args, **kwargs: filled.append(tensor) or tensor)
    model = load_hf_model(bert_folder)
    assert filled == []
    monkeypatch.undo()
    reference = transformers.BertModel.from_pretrained(bert_folder).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 12, 3, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                           reference(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_text_longer_than_the_models_positions_is_cut_to_them(bert_folder, tmp_path):
    """The tiny BERT's tokenizer declares no length; its config allows 64 positions: a line
    of 300 words calibrates on its first 64 tokens instead of failing in the model."""
    text = tmp_path / "long.txt"
    text.write_text(" ".join(WORDS * 10) + "\na red cat\n")
    out = tmp_path / "bert.qlis"
    result = run(cli, "pack", bert_folder, "-o", out, "--calib", text,
                 "--target-bits-per-weight", "6")
    assert result.exit_code == 0, result.output
    assert "calibration: 2 examples" in result.output


def test_the_longest_input_is_read_from_the_models_position_table():
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=48))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=48, pad_token_id=1))
    assert max_input_length(bert) == 48
    assert max_input_length(roberta) == 46  # positions count from padding_idx + 1
    assert max_input_length(torch.nn.Linear(2, 2)) is None


def _edited_copy(folder: Path, tmp_path: Path, **config: object) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    entries = json.loads((copy / "config.json").read_text())
    entries.update(config)
    (copy / "config.json").write_text(json.dumps(entries))
    return copy


@pytest.mark.parametrize(("key", "value"), [
    ("num_hidden_layers", 10**6), ("hidden_size", 10**9),
    ("hidden_size", "32"), ("hidden_size", 32.5), ("intermediate_size", -1),
    ("num_attention_heads", [2, 10**9]), ("num_attention_heads", []),
    ("num_attention_heads", [2] * 40),
    ("num_labels", 10**9),  # transformers made an id2label of 10**9 entries: 100 GB
])
def test_config_sizes_the_weights_cannot_justify_are_refused_before_building(
        bert_folder, tmp_path, key, value):
    """num_hidden_layers=10**6 built modules for minutes past 9 GB and hidden_size=10**9
    asked torch for 160 GB (a traceback); a size of the wrong type was transformers'
    traceback. Each is one line now, the key named, before anything is built."""
    folder = _edited_copy(bert_folder, tmp_path, **{key: value})
    text = tmp_path / "ok.txt"
    text.write_text("a red cat\n")
    message = user_error("pack", folder, "-o", tmp_path / "x.qlis", "--calib", text)
    assert f"'{key}' is" in message and "the weights hold 39 tensors" in message
    assert not (tmp_path / "x.qlis").exists()


def test_a_config_count_no_listed_key_bounds_stops_the_build_early(tmp_path):
    """ALBERT's inner_group_num is no key of a layer count qlis bounds: 300,000 built layers
    for minutes and 7.5 GB on the meta device before the skeleton was compared."""
    folder = tmp_path / "albert"
    transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    ).save_pretrained(folder)
    folder = _edited_copy(folder, tmp_path, inner_group_num=100_000)
    message = user_error("pack", folder, "-o", tmp_path / "x.qlis", "--calib", "synthetic")
    assert "describes a model of more than" in message and "modules" in message


def test_a_config_transformers_cannot_build_or_weights_of_the_wrong_kind_are_one_line(
        bert_folder, tmp_path):
    """Zero attention heads was a ZeroDivisionError inside transformers, 10**9 positions a
    128 GB allocation and an int32 weight torch's RuntimeError from load_state_dict, all
    tracebacks; the positions are now compared on the meta device, nothing allocated."""
    text = tmp_path / "ok.txt"
    text.write_text("a red cat\n")
    zero_heads = _edited_copy(bert_folder, tmp_path / "a", num_attention_heads=0)
    assert "cannot build this model" in user_error("pack", zero_heads, "-o", tmp_path / "x.qlis",
                                                   "--calib", text)
    positions = _edited_copy(bert_folder, tmp_path / "p", max_position_embeddings=10**9)
    assert "[1000000000, 32]" in user_error("pack", positions, "-o", tmp_path / "x.qlis",
                                            "--calib", text)
    ints = _edited_copy(bert_folder, tmp_path / "b")
    state = load_file(ints / "model.safetensors")
    state["pooler.dense.weight"] = state["pooler.dense.weight"].to(torch.int32)
    save_file(state, ints / "model.safetensors")
    message = user_error("pack", ints, "-o", tmp_path / "x.qlis", "--calib", text)
    assert "'pooler.dense.weight' is torch.int32, where BertModel holds torch.float32" in message


def test_a_module_larger_than_its_weights_is_refused_before_it_is_built(
        bert_folder, tmp_path, monkeypatch):
    """Sizes within the weights' element count can still describe a module many times the
    weights (a vocabulary whose table the folder lacks): measured on the meta device, refused
    before memory is taken."""
    monkeypatch.setattr(hf_model, "_BUFFER_SLACK_ELEMENTS", 0)
    folder = _edited_copy(bert_folder, tmp_path, vocab_size=20_000)
    state = load_file(folder / "model.safetensors")
    del state["embeddings.word_embeddings.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match="a BertModel of 660,448 elements, its weights hold 20,"):
        load_hf_model(folder)


def test_tensors_the_class_makes_itself_are_made_not_missing(tmp_path):
    """Marian's files leave out its sinusoidal position tables, which transformers makes as
    it loads: calibration refused the folder for lacking them."""
    folder = tmp_path / "tiny-marian"
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0,
        decoder_start_token_id=0)
    transformers.MarianMTModel(config).save_pretrained(folder)
    assert not [k for k in load_file(folder / "model.safetensors") if "embed_positions" in k]
    expected = transformers.MarianMTModel.from_pretrained(folder).state_dict()
    loaded = load_hf_model(folder).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_an_encoder_decoder_calibrated_on_text_feeds_its_decoder_the_text(tmp_path):
    # T5 cannot run on input_ids alone: text calibration ended in "does not fit the model"
    folder = tmp_path / "tiny-t5"
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(
        folder)
    text = tmp_path / "calib.txt"
    text.write_text("a photo of a cat\nthe red car at night\na big tree\n")
    ids = torch.tensor([[2, 7, 9, 3]])
    fed = hf_model.with_decoder_inputs(model, [{"input_ids": ids}])[0]["decoder_input_ids"]
    assert fed.tolist() == [[0, 2, 7, 9]]  # the text shifted right after the start token
    result = run(cli, "pack", folder, "-o", tmp_path / "t5.qlis", "--calib", text,
                 "--policy", "quant", "--bits", "4", "-q")
    assert result.exit_code == 0, result.output
    assert "output on the calibration data: cosine" in result.output
    with qlis.open(tmp_path / "t5.qlis") as archive:  # the decoder was fitted on the text
        entry = archive.entry("decoder.block.0.layer.1.EncDecAttention.q.weight")
    assert entry.plan["reconstruction"] == "error feedback"
    with pytest.raises(InputError, match="holds decoder_input_ids 502; the model has 40 rows "
                                         "in its decoder's token embedding"):
        hf_model.check_token_ids(model, [{"input_ids": ids, "decoder_input_ids": ids + 493}],
                                 "calib.safetensors")


IDS = torch.randint(5, 40, (8, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("tensors", "message"), [
    ({"input_ids": IDS, "atention_mask": torch.ones(8, 12)},
     "calibration tensor 'atention_mask' is not a tensor input of BertModel (its inputs: "
     "attention_mask, "),
    ({"input_ids": IDS, "return_dict": torch.ones(8)},
     "calibration tensor 'return_dict' is not a tensor input of BertModel"),
    ({"input_ids": IDS, "attention_mask": torch.ones(8, 5, dtype=torch.int64)},
     "ids and masks must have one length per example; got (examples, length) "
     "{'attention_mask': (8, 5), 'input_ids': (8, 12)}"),
    ({"input_ids": IDS, "attention_mask": torch.full((8, 12), float("nan"))},
     "calibration tensor 'attention_mask' holds NaN or inf"),
    ({"input_ids": IDS.repeat(1, 7)},
     "calibration batch 0 holds sequences of 84 tokens; the model's position table holds 64"),
    ({"input_ids": IDS, "position_ids": IDS + 60},
     "holds position_ids 99; the model has 64 positions (its position table)"),
], ids=["misspelt", "a flag", "lengths", "nan", "too long", "positions"])
def test_calibration_tensors_the_model_would_ignore_or_misread_are_refused(
        bert_folder, tmp_path, tensors, message):
    """transformers 5's forward takes unknown keywords into **kwargs and ignores them, and
    only the examples' count was compared: each of these calibrated (exit 0) without the
    input the user meant, or on a mask of NaN."""
    inputs = tmp_path / "calib.safetensors"
    save_file(tensors, str(inputs))
    line = user_error("pack", bert_folder, "-o", tmp_path / "x.qlis", "--calib", inputs)
    assert message in line, line
    assert not (tmp_path / "x.qlis").exists()


def test_an_encoder_decoder_without_a_decoder_start_token_is_refused_in_one_line(tmp_path):
    """transformers 5 saves a T5 config without decoder_start_token_id unless given one: the
    shift of its decoder's inputs failed with an AttributeError (a traceback)."""
    folder = tmp_path / "tiny-t5"
    config = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    assert getattr(model.config, "decoder_start_token_id", None) is None
    line = user_error("pack", folder, "-o", tmp_path / "t5.qlis", "--calib", "synthetic",
                      "--calib-examples", "4")
    assert "config gives no decoder_start_token_id" in line and "config.json" in line
    assert not (tmp_path / "t5.qlis").exists()
    given = [{"input_ids": torch.tensor([[2, 7]]), "decoder_input_ids": torch.tensor([[0, 2]])}]
    assert hf_model.with_decoder_inputs(model, given) == given  # nothing to make: no error


def vit_folder(tmp_path: Path) -> tuple[Path, set[str]]:
    """A tiny ViT folder (no tokenizer) and its module's tensor names."""
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, image_size=8, patch_size=4)
    folder = tmp_path / "vit"
    model = transformers.ViTModel(config)
    model.save_pretrained(folder)
    return folder, set(model.state_dict())


def test_a_family_whose_files_use_older_names_is_calibrated_under_the_modules(tmp_path):
    """transformers 5 loads ViT's checkpoint key attention.attention.query as the module's
    attention.q_proj (and writes the old key back when it saves)."""
    folder, module_names = vit_folder(tmp_path)
    if set(load_file(str(folder / "model.safetensors"))) == module_names:
        pytest.skip("this transformers saves ViT under its module's names")
    inputs = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": torch.randn(4, 3, 8, 8)}, str(inputs))
    out = tmp_path / "vit.qlis"
    result = run(cli, "pack", folder, "-o", out, "--calib", inputs)
    assert result.exit_code == 0, result.output
    with qlis.open(out) as archive:
        assert set(archive.names()) == module_names


def test_a_tensor_transformers_splits_as_it_loads_is_refused_for_calibration(tmp_path):
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       image_size=8, patch_size=4, use_swiglu_ffn=True)
    folder = tmp_path / "dinov2"
    transformers.Dinov2Model(config).save_pretrained(folder)
    if not any("weights_in" in key for key in load_file(str(folder / "model.safetensors"))):
        pytest.skip("this transformers saves DINOv2's SwiGLU under its module's names")
    inputs = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": torch.randn(4, 3, 8, 8)}, str(inputs))
    message = user_error("pack", folder, "-o", tmp_path / "d.qlis", "--calib", inputs)
    assert "transformers merges or splits tensor" in message and "without --calib" in message
    assert run(cli, "pack", folder, "-o", tmp_path / "d.qlis").exit_code == 0  # data-free


def test_text_calibration_of_a_model_without_a_tokenizer_points_to_tensors(tmp_path):
    folder, _ = vit_folder(tmp_path)
    text = tmp_path / "prompts.txt"
    text.write_text("a photo of a cat\n")
    message = user_error("pack", folder, "-o", tmp_path / "v.qlis", "--calib", text)
    assert "no usable tokenizer" in message and "as tensors instead (a .safetensors" in message


def test_text_calibration_of_a_text_model_without_tokenizer_files_is_refused(bert_folder,
                                                                             tmp_path):
    # transformers builds a BERT tokenizer from config.json alone: every word its [UNK]
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_folder / name, folder / name)
    text = tmp_path / "prompts.txt"
    text.write_text("a photo of a cat\n")
    message = user_error("pack", folder, "-o", tmp_path / "b.qlis", "--calib", text)
    assert "no tokenizer files" in message and "as tensors instead" in message
    assert not (tmp_path / "b.qlis").exists()


def test_a_buffer_the_module_recomputes_is_left_out_as_transformers_leaves_it(
        bert_folder, tmp_path):
    # checkpoints written before transformers 4.31 (all-MiniLM-L6-v2) hold BERT's
    # position_ids, a buffer the module now makes and does not save: calibration refused them
    folder = _edited_copy(bert_folder, tmp_path / "old")
    state = load_file(folder / "model.safetensors")
    state["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(state, folder / "model.safetensors")
    text = tmp_path / "prompts.txt"
    text.write_text("a red cat\nthe blue sky\n")
    assert "embeddings.position_ids" not in load_hf_model(folder).state_dict()
    result = run(cli, "pack", folder, "-o", tmp_path / "b.qlis", "--calib", text)
    assert result.exit_code == 0, result.output
    state["unknown.weight"] = torch.ones(2)  # any other tensor is still refused
    save_file(state, folder / "model.safetensors")
    assert "'unknown.weight'" in user_error("pack", folder, "-o", tmp_path / "c.qlis",
                                            "--calib", text)


def test_a_config_of_sizes_per_stage_is_calibrated(tmp_path):
    """Swin's num_heads is a list (one per stage): each entry is checked, and the folder
    calibrates (it was refused as "'num_heads' is list")."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1],
                                     num_heads=[1, 2], window_size=2)
    folder = tmp_path / "swin"
    transformers.SwinModel(config).save_pretrained(folder)
    inputs = tmp_path / "pixels.safetensors"
    save_file({"pixel_values": torch.randn(4, 3, 16, 16)}, str(inputs))
    result = run(cli, "pack", folder, "-o", tmp_path / "swin.qlis", "--calib", inputs)
    assert result.exit_code == 0, result.output
    assert "cosine" in result.output


@pytest.mark.parametrize(("file", "text"), [
    ("tokenizer.json", "[" * 100_000 + "]" * 100_000),
    ("tokenizer_config.json", '{"a":' * 100_000 + "1" + "}" * 100_000),
])
def test_a_tokenizer_file_nested_past_the_parsers_depth_is_one_line(bert_folder, tmp_path, file,
                                                                    text):
    """Python's JSON parser raised RecursionError inside transformers: a traceback."""
    folder = _edited_copy(bert_folder, tmp_path)
    (folder / file).write_text(text)
    prompts = tmp_path / "ok.txt"
    prompts.write_text("a red cat\n")
    message = user_error("pack", folder, "-o", tmp_path / "x.qlis", "--calib", prompts)
    assert "no usable tokenizer" in message and "recursion" in message
    assert not (tmp_path / "x.qlis").exists()


class SilentTokenizer:
    """A tokenizer whose class reads other files than the folder holds (transformers 5's
    Qwen2Tokenizer beside a WordLevel tokenizer.json): every line comes back as no token."""

    pad_token = "<pad>"
    model_max_length = 512

    def __call__(self, lines, **kwargs):
        n = len(lines)
        return {"input_ids": torch.zeros(n, 0, dtype=torch.long),
                "attention_mask": torch.zeros(n, 0, dtype=torch.long)}


def test_text_the_tokenizer_turns_into_no_tokens_is_refused_naming_the_tokenizer():
    with pytest.raises(InputError, match=r"SilentTokenizer\) turns calibration lines 1-4 "
                                         r"into no tokens"):
        hf_model.tokenized_batches(SilentTokenizer(), [f"line {i}" for i in range(8)], 4)


@pytest.mark.parametrize(("file", "edit"), [
    ("tokenizer.json", lambda o: o["model"].update(type="NoSuchModel")),
    ("tokenizer.json", lambda o: o.update(normalizer={"type": "NoSuchNormalizer"})),
])
def test_a_tokenizer_file_the_tokenizers_library_cannot_read_is_one_line(bert_folder, tmp_path,
                                                                         file, edit):
    """The tokenizers library raises a bare Exception for it: a traceback."""
    folder = _edited_copy(bert_folder, tmp_path)
    content = json.loads((folder / file).read_text())
    edit(content)
    (folder / file).write_text(json.dumps(content))
    prompts = tmp_path / "ok.txt"
    prompts.write_text("a red cat\n")
    message = user_error("pack", folder, "-o", tmp_path / "x.qlis", "--calib", prompts)
    assert "no usable tokenizer" in message
    assert not (tmp_path / "x.qlis").exists()


class OddLengthTokenizer(SilentTokenizer):
    """A tokenizer_config.json's model_max_length as the file says it: unchecked."""

    def __call__(self, lines, max_length, **kwargs):
        assert max_length == 512
        n = len(lines)
        return {"input_ids": torch.ones(n, 3, dtype=torch.long),
                "attention_mask": torch.ones(n, 3, dtype=torch.long)}


@pytest.mark.parametrize("stated", ["abc", -5, float("inf"), float("nan"), True, None])
def test_a_model_max_length_that_is_no_length_is_passed_over(stated):
    """A string, a negative or an infinite length gave ValueError / OverflowError."""
    tokenizer = OddLengthTokenizer()
    tokenizer.model_max_length = stated
    assert len(hf_model.tokenized_batches(tokenizer, ["a", "b"], 2)) == 1


def test_a_tokenizer_that_fails_on_the_text_is_one_error():
    class Failing(SilentTokenizer):
        def __call__(self, lines, **kwargs):
            raise OverflowError("can't convert negative int to unsigned")

    with pytest.raises(InputError, match=r"Failing\) failed on calibration lines 1-2: "
                                         r"OverflowError"):
        hf_model.tokenized_batches(Failing(), ["a", "b"], 2)


def _resnet(folder: Path) -> dict[str, torch.Tensor]:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    transformers.ResNetModel(config).save_pretrained(folder)
    return {"pixel_values": torch.randn(4, 3, 32, 32)}


def _pegasus(folder: Path) -> dict[str, torch.Tensor]:
    config = transformers.PegasusConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    transformers.PegasusModel(config).save_pretrained(folder)
    return {"input_ids": torch.randint(2, 40, (4, 6))}


def _whisper(folder: Path) -> dict[str, torch.Tensor]:
    config = transformers.WhisperConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    transformers.WhisperModel(config).save_pretrained(folder)
    return {"input_features": torch.randn(4, 8, 16)}


@pytest.mark.parametrize("build", [_resnet, _pegasus, _whisper],
                         ids=["resnet", "pegasus-base", "whisper-base"])
def test_models_without_a_token_table_or_a_decoder_shift_calibrate(tmp_path, build):
    """ResNet has no token table (asking for it raised NotImplementedError: a traceback); a
    base encoder-decoder (PegasusModel, WhisperModel) has no shift of its own, and its
    decoder got no inputs ("cannot specify both decoder_input_ids and
    decoder_inputs_embeds", which the user gave neither of)."""
    torch.manual_seed(0)
    folder = tmp_path / "model"
    inputs = tmp_path / "inputs.safetensors"
    save_file(build(folder), str(inputs))
    result = run(cli, "pack", folder, "-o", tmp_path / "m.qlis", "--calib", inputs)
    assert result.exit_code == 0, result.output
    assert "output on the calibration data: cosine" in result.output


class NoPadTokenizer:
    """A tokenizer with neither a padding nor an end-of-text token: padding refuses."""

    pad_token = eos_token = None
    model_max_length = 512

    def __call__(self, lines, padding=False, **kwargs):
        if padding:
            raise ValueError("Asking to pad but the tokenizer does not have a padding token")
        return {"input_ids": torch.ones(len(lines), 3, dtype=torch.long)}


def test_one_example_a_batch_needs_no_padding_token():
    """The refusal's advice, --calib-batch-size 1, failed as well: the one line was padded."""
    with pytest.raises(InputError, match="--calib-batch-size 1"):
        hf_model.tokenized_batches(NoPadTokenizer(), ["a b", "c d"], 2)
    batches = hf_model.tokenized_batches(NoPadTokenizer(), ["a b", "c d"], 1)
    assert [b["input_ids"].shape for b in batches] == [(1, 3), (1, 3)]


def test_text_calibration_is_one_example_a_line_whatever_the_suffix_case(bert_folder, tmp_path):
    """splitlines() also split at U+2028, form feeds and NEL (2 lines by wc, 5 examples);
    "PROMPTS.TXT" was read as text but its tokenizer's names checked as the user's."""
    text = tmp_path / "PROMPTS.TXT"
    line = " ".join(WORDS[:6])
    text.write_text(f"{line}\u2028{line}\f{line}\n{line}\x85{line}\n")
    result = run(cli, "pack", bert_folder, "-o", tmp_path / "m.qlis", "--calib", text)
    assert result.exit_code == 0, result.output
    assert "calibration: 2 examples" in result.output


def test_a_path_given_as_calib_to_the_library_says_what_calib_takes():
    with pytest.raises(qlis.ConfigError, match="not a str .*tokenize its lines"):
        qlis.compress(torch.nn.Linear(4, 4), calib="prompts.txt")


def test_only_the_lines_used_are_split_out_of_a_calibration_text(tmp_path, monkeypatch):
    """Every line of the file was split out and stripped before the first ``examples`` were
    kept: 60 MB of short lines held 1.8 GB of strings to calibrate on 128 of them."""
    text = tmp_path / "many.txt"
    text.write_text("\n \t\n" + "ab\n" * 1_000_000)
    # read as it is, not into a buffer of the most a text may hold, which the peak would count
    monkeypatch.setattr(qlis.models.calib_files, "read_small_file",
                        lambda path, *args, **kwargs: Path(path).read_bytes())
    tracemalloc.start()
    try:
        lines = qlis.models.calib_files._text_lines(text, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == ["ab"] * 8
    assert peak < 3 * text.stat().st_size  # the file's bytes and its text, not its lines


@pytest.mark.parametrize(("data", "lines", "message"), [
    (b"\xef\xbb\xbfa red cat\r\n\r\nthe dog \n", ["a red cat", "the dog"], None),
    ("a red cat\n".encode("utf-16"), None, "not UTF-8 text but UTF-16 .*save it as UTF-8"),
    (b"a red\x00cat\n\xe9t\xe9\n", None, r"not UTF-8 text \(byte 10\)"),
])
def test_a_calibration_texts_encoding_marks_are_read_or_named(tmp_path, data, lines, message):
    """A UTF-8 byte order mark was kept as the first example's first character; UTF-16 was
    "not UTF-8 text (byte 0)"."""
    text = tmp_path / "text.txt"
    text.write_bytes(data)
    if message is None:
        assert qlis.models.calib_files._text_lines(text, 8) == lines
    else:
        with pytest.raises(InputError, match=message):
            qlis.models.calib_files._text_lines(text, 8)


@pytest.mark.parametrize(("tensors", "message"), [
    ({"input_ids": torch.ones(4, 6)}, "'input_ids' is torch.float32; token ids are integers"),
    ({"input_ids": torch.ones(4, 6, dtype=torch.bool)}, "'input_ids' is torch.bool"),
    ({"input_ids": torch.ones(4, 6, dtype=torch.uint8)}, "'input_ids' is torch.uint8"),
    ({"input_ids": torch.ones(4, 6, dtype=torch.long), "token_type_ids": torch.zeros(4, 6)},
     "'token_type_ids' is torch.float32"),
    ({"input_ids": torch.ones(4, dtype=torch.long)}, r"'input_ids' has shape \[4\]; it holds "
     r"\(examples, tokens\)"),
    ({"input_ids": torch.ones(4, 6, 1, dtype=torch.long)}, r"has shape \[4, 6, 1\]"),
    ({"input_ids": torch.ones(4, 0, dtype=torch.long)}, "at least one token an example"),
    ({"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.ones(4)},
     r"'attention_mask' has shape \[4\]"),
    ({"input_ids": torch.ones(4, 6, dtype=torch.long),
      "decoder_input_ids": torch.ones(4, 3)}, "'decoder_input_ids' is torch.float32"),
    ({f"x{i}": torch.zeros(1, 1) for i in range(65)}, "holds 65 tensors; calibration tensors "
     "are a model's keyword inputs .*at most 64"),
])
def test_ids_and_masks_that_are_no_row_of_tokens_are_refused_by_name(tmp_path, tensors,
                                                                     message):
    """The model failed on them with torch's words ("not enough values to unpack", "Expected
    tensor for argument #1 'indices'"), a mask of one number per example ran broadcast, and
    a file of 100,000 tensors was read for 27 s before its names were refused."""
    path = tmp_path / "inputs.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=message):
        qlis.models.calib_files.read_calibration(path, tmp_path)


def test_int32_ids_and_a_mask_per_pair_of_tokens_are_taken(tmp_path):
    path = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.ones(3, 5, dtype=torch.int32),
               "attention_mask": torch.ones(3, 5, 5, dtype=torch.long)}, str(path))
    batches = qlis.models.calib_files.read_calibration(path, tmp_path, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (1, 5)]


def test_a_mask_that_keeps_no_token_is_refused_by_name(tmp_path):
    """Every position was left out of the comparison: "the calibration outputs are empty"."""
    path = tmp_path / "inputs.safetensors"
    mask = torch.zeros(4, 3, dtype=torch.long)
    mask[3] = 1  # past the examples used
    save_file({"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": mask},
              str(path))
    with pytest.raises(InputError, match="'attention_mask' keeps no token of any example"):
        qlis.models.calib_files.read_calibration(path, tmp_path, examples=3)
    assert len(qlis.models.calib_files.read_calibration(path, tmp_path)) == 1
