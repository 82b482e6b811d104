"""A sentence-transformers folder is calibrated on its sentence embeddings (its Pooling
module's modes over the per-token states), not on the per-token states."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run

import qlis
from qlis.cli.main import cli
from qlis.errors import InputError
from qlis.models.sentence_pooling import MODES, PooledBatch, pool, pooling_modes

transformers = pytest.importorskip("transformers")

WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the", "sky", "sea", "tree", "house"]


def st_folder(root: Path, **modes: bool) -> Path:
    """A tiny random BERT saved as sentence-transformers saves a model: the Hugging Face files
    at the root, ``modules.json``, and the Pooling module's config in ``1_Pooling``."""
    folder = root / "st-model"
    torch.manual_seed(0)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(
        folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    settings = {f"pooling_mode_{m}": False for m in MODES} | {
        f"pooling_mode_{m}": on for m, on in modes.items()}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 16, **settings}))
    return folder


def test_each_mode_pools_as_sentence_transformers_does():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]],
                           [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the first sentence has one padding token
    assert pool(hidden, mask, "cls_token").tolist() == [[1.0, 2.0], [0.0, 1.0]]
    assert pool(hidden, mask, "max_tokens").tolist() == [[3.0, 2.0], [4.0, 5.0]]
    assert pool(hidden, mask, "mean_tokens").tolist() == [[2.0, -1.0], [2.0, 3.0]]
    sums, lengths = torch.tensor([[4.0, -2.0], [6.0, 9.0]]), torch.tensor([[2.0], [3.0]])
    assert torch.allclose(pool(hidden, mask, "mean_sqrt_len_tokens"), sums / lengths.sqrt())
    # positions weigh 1, 2, 3: (1 + 6) / 3, (2 - 8) / 3; (0 + 4 + 12) / 6, (1 + 6 + 15) / 6
    assert torch.allclose(pool(hidden, mask, "weightedmean_tokens"),
                          torch.tensor([[7 / 3, -2.0], [16 / 6, 22 / 6]]))
    assert pool(hidden, mask, "lasttoken").tolist() == [[3.0, -4.0], [4.0, 5.0]]
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: the last token is still last
    assert pool(hidden, left, "lasttoken").tolist() == [[9.0, 9.0], [4.0, 5.0]]


def test_modes_are_read_from_the_pooling_module_and_concatenated_in_its_order(tmp_path):
    folder = st_folder(tmp_path, mean_tokens=True, cls_token=True)
    assert pooling_modes(folder) == ("cls_token", "mean_tokens")
    model = transformers.BertModel.from_pretrained(folder)
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4)}
    out = PooledBatch(batch, pooling_modes(folder))(model)
    hidden = model(**batch).last_hidden_state
    assert torch.allclose(out, torch.cat([hidden[:, 0], hidden.mean(1)], -1))


def test_a_plain_model_folder_has_no_pooling(tmp_path):
    folder = st_folder(tmp_path, mean_tokens=True)
    (folder / "modules.json").unlink()
    assert pooling_modes(folder) is None


@pytest.mark.parametrize("path", ["../elsewhere", "/etc", "a\x00b", "loop"])
def test_a_pooling_module_outside_the_folder_is_refused(tmp_path, path):
    """A NUL byte and a loop of links raised ValueError / RuntimeError: a traceback."""
    folder = st_folder(tmp_path, mean_tokens=True)
    (folder / "loop").symlink_to(folder / "loop")
    listing = json.loads((folder / "modules.json").read_text())
    listing[1]["path"] = path
    (folder / "modules.json").write_text(json.dumps(listing))
    with pytest.raises(InputError, match="inside the model folder"):
        pooling_modes(folder)


def test_a_pooling_config_without_a_mode_is_refused(tmp_path):
    folder = st_folder(tmp_path)
    with pytest.raises(InputError, match="no pooling mode"):
        pooling_modes(folder)


def test_pack_of_a_sentence_transformers_folder_compares_its_sentence_embeddings(tmp_path):
    folder = st_folder(tmp_path, mean_tokens=True)
    text = tmp_path / "prompts.txt"
    text.write_text("a red cat\nthe blue sky\na photo of the sea\na dog\n")
    out = tmp_path / "st.qlis"
    result = run(cli, "pack", folder, "-o", out, "--calib", text, "--calib-batch-size", "2",
                 "--policy", "quant", "--bits", "3")
    assert result.exit_code == 0, result.output
    assert "calibration: 4 examples, compared as sentence embeddings (mean pooling" in \
        result.output
    reported = float(result.output.split("cosine ")[1].split()[0])
    # the reported cosine is that of the mean-pooled vectors on the calibration text
    model = transformers.BertModel.from_pretrained(folder)
    packed = transformers.BertModel.from_pretrained(folder)
    packed.load_state_dict(qlis.load(out), strict=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(text.read_text().split("\n")[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = pool(model(**encoded).last_hidden_state, encoded["attention_mask"], "mean_tokens")
        b = pool(packed(**encoded).last_hidden_state, encoded["attention_mask"], "mean_tokens")
    measured = float(torch.nn.functional.cosine_similarity(a, b).mean())
    assert measured == pytest.approx(reported, abs=2e-5)


def test_a_broken_modules_listing_is_one_line(tmp_path):
    folder = st_folder(tmp_path, mean_tokens=True)
    (folder / "modules.json").write_text("{not json")
    text = tmp_path / "prompts.txt"
    text.write_text("a red cat\n")
    message = one_line_error(cli, "qlis: error:", "pack", folder, "-o", tmp_path / "x.qlis",
                             "--calib", text)
    assert "modules.json" in message
    shutil.rmtree(folder / "1_Pooling")
    (folder / "modules.json").write_text(json.dumps([
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    message = one_line_error(cli, "qlis: error:", "pack", folder, "-o", tmp_path / "x.qlis",
                             "--calib", text)
    assert "config.json" in message


def test_pooled_batches_keep_the_mark_of_synthetic_ones(tmp_path):
    folder = st_folder(tmp_path, mean_tokens=True)
    model = transformers.BertModel.from_pretrained(folder)
    made_up = qlis.synthetic_calibration(model, examples=2, length=4)[0]
    assert PooledBatch(made_up, ("mean_tokens",)).synthetic is True
    assert PooledBatch(dict(made_up), ("mean_tokens",)).synthetic is False


@pytest.mark.parametrize("linked", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                    "modules.json", "1_Pooling/config.json"])
def test_a_file_linked_from_outside_the_folder_is_not_read(tmp_path, linked):
    """What the folder's files say (the model, its tokenizer, its pooling) comes from the
    folder: a link out of it is refused, as for the weights, whatever library reads it."""
    folder = st_folder(tmp_path, mean_tokens=True)
    outside = tmp_path / "elsewhere"
    (folder / linked).rename(outside)
    (folder / linked).symlink_to(outside)
    text = tmp_path / "prompts.txt"
    text.write_text("a red cat\n")
    message = one_line_error(cli, "qlis: error:", "pack", folder, "-o", tmp_path / "x.qlis",
                             "--calib", text)
    assert f"{linked} resolves to {outside}, outside the model folder" in message
    assert not (tmp_path / "x.qlis").exists()
