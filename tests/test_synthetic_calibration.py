"""Synthetic calibration: random token sequences from a text model's vocabulary, framed as its
tokenizer frames a text, and noise images for an image model, for `qlis.compress(calib=...)`
and `qlis pack --calib synthetic`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import reconstruction_notes, run

import qlis
from qlis.cli.main import cli
from qlis.errors import InputError
from qlis.models.hf_model import load_hf_model, load_tokenizer
from qlis.models.synthetic_inputs import DEFAULT_IMAGES

transformers = pytest.importorskip("transformers")

WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the", "sky", "sea", "tree", "house"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny random-initialised BERT with its tokenizer, saved as Hugging Face does."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=24)
    transformers.BertModel(config).save_pretrained(folder)
    vocabulary = {token: i for i, token in enumerate([*SPECIALS, *WORDS])}
    transformers.BertTokenizerFast(vocab=vocabulary).save_pretrained(folder)
    return folder


def test_tokens_are_drawn_from_the_vocabulary_and_framed_as_the_tokenizer_frames_text(
        bert_folder):
    model, tokenizer = load_hf_model(bert_folder), load_tokenizer(bert_folder)
    batches = qlis.synthetic_calibration(model, tokenizer, examples=10, batch_size=4, length=6)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (10, 8)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids[:, -1] == tokenizer.sep_token_id).all()
    inner = ids[:, 1:-1]
    assert inner.min() >= len(SPECIALS) and inner.max() < len(SPECIALS) + len(WORDS)
    assert len(inner.unique()) > len(WORDS) // 2  # drawn across the vocabulary
    for b in batches:
        assert (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()
        model(**b)  # the model runs on them


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(bert_folder):
    model = load_hf_model(bert_folder)
    first = qlis.synthetic_calibration(model, examples=8, length=5)
    again = qlis.synthetic_calibration(model, examples=8, length=5)
    other = qlis.synthetic_calibration(model, examples=8, length=5, seed=1)
    assert torch.equal(first[0]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])


def test_without_a_tokenizer_sequences_are_bare_and_leave_out_the_configs_special_ids(
        bert_folder):
    model = load_hf_model(bert_folder)
    model.config.pad_token_id = 0
    model.config.bos_token_id = 7  # a word of the vocabulary, made special by the config
    ids = qlis.synthetic_calibration(model, examples=64, length=8)[0]["input_ids"]
    assert ids.shape == (8, 8)
    drawn = set(torch.cat([b["input_ids"] for b in qlis.synthetic_calibration(
        model, examples=64, length=8)]).unique().tolist())
    assert 0 not in drawn and 7 not in drawn and 1 in drawn


def test_sequences_are_cut_to_the_models_positions(bert_folder):
    model, tokenizer = load_hf_model(bert_folder), load_tokenizer(bert_folder)
    batch = qlis.synthetic_calibration(model, tokenizer, examples=2, length=1000)[0]
    assert batch["input_ids"].shape == (2, 24)
    model(**batch)


def test_an_encoder_decoder_gets_decoder_inputs():
    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config)
    batch = qlis.synthetic_calibration(model, examples=3, length=5)[0]
    assert batch["decoder_input_ids"].shape == (3, 5)
    assert (batch["decoder_input_ids"][:, 0] == 0).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["input_ids"][:, :-1])
    model(**batch)


def tiny_vit(image_size: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        image_size=image_size, patch_size=4)).eval()


def test_a_model_that_says_nothing_of_its_inputs_is_refused():
    with pytest.raises(InputError, match="does not say it takes"):
        qlis.synthetic_calibration(torch.nn.Linear(4, 4))


def test_a_vision_model_gets_noise_images_of_its_configs_size():
    model = tiny_vit()
    batches = qlis.synthetic_calibration(model)
    assert sum(len(b["pixel_values"]) for b in batches) == DEFAULT_IMAGES
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert pixels.shape[1:] == (3, 8, 8)
    assert -1 <= float(pixels.min()) < -0.9 and 0.9 < float(pixels.max()) <= 1  # [0, 1] normed
    again = qlis.synthetic_calibration(model)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(
        batches, again, strict=True))
    result = qlis.compress(model, calib=batches)
    assert result.distortion["output"]["synthetic"] is True


def test_any_image_model_gets_noise_images_of_the_shape_asked():
    """Measured on nsfwjs's MobileNetV2 at 8x (a module of this kind): 16 noise images kept
    feature cosine 0.971 on real images, data-free rd 0.895."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3)).eval()
    batches = qlis.synthetic_calibration(model, image_shape=(3, 12, 12), examples=6,
                                         batch_size=4, pixel_mean=(0, 0.5, 1), pixel_std=1)
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 12, 12), (2, 3, 12, 12)]
    pixels = torch.cat([b[0] for b in batches])
    assert float(pixels[:, 2].max()) <= 0 <= float(pixels[:, 0].min())  # per-channel means
    result = qlis.compress(model, calib=batches)
    assert result.distortion["output"]["synthetic"] is True
    assert "synthetic inputs, not your data" in result.describe_quality()


@pytest.mark.parametrize("kwargs, message", [
    ({"image_shape": (3, 0, 8)}, "image shape"),
    ({"image_shape": (3, 8)}, "image shape"),
    ({"image_shape": (3, 1 << 13, 1 << 13)}, "exceed"),  # before any allocation
    ({"image_shape": (3, 8, 8), "pixel_std": 0}, "pixel_std"),
    ({"image_shape": (3, 8, 8), "pixel_mean": (0, 1)}, "pixel_mean"),
    ({"image_shape": (3, 8, 8), "pixel_mean": float("nan")}, "pixel_mean"),
    ({"image_shape": np.array([3, 8, 8])}, "image shape"),  # its truth value raised
    ({"image_shape": (3, 8, 8), "pixel_std": 1e-300}, "beyond float32"),  # 0 as float32
    ({"image_shape": (3, 8, 8), "pixel_mean": 1e300}, "beyond float32"),  # inf images
])
def test_bad_image_settings_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        qlis.synthetic_calibration(torch.nn.Conv2d(3, 3, 1), **kwargs)


def test_numpy_numbers_are_taken_for_image_settings():
    batches = qlis.synthetic_calibration(
        torch.nn.Conv2d(3, 3, 1), image_shape=(np.int64(3), 8, 8), examples=2,
        pixel_mean=np.float32(0.5), pixel_std=np.float32(0.25))
    pixels = batches[0][0]
    assert pixels.shape == (2, 3, 8, 8)
    assert float(pixels.min()) >= -2 and float(pixels.max()) <= 2


def test_a_tokenizer_of_the_users_own_is_read_with_care(bert_folder):
    """A plain function without a length frames the tokens; one that raises anything is
    named as the tokenizer's failure."""
    model = load_hf_model(bert_folder)

    def framing(text: str, add_special_tokens: bool = True) -> dict:
        ids = [2, 7, 8, 3] if add_special_tokens else [7, 8]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    batch = qlis.synthetic_calibration(model, framing, examples=2, length=6)[0]
    assert (batch["input_ids"][:, 0] == 2).all() and (batch["input_ids"][:, -1] == 3).all()

    def broken(text: str, add_special_tokens: bool = True) -> dict:
        raise RuntimeError("tokenizer broken")

    with pytest.raises(InputError, match="cannot encode text .*RuntimeError: tokenizer broken"):
        qlis.synthetic_calibration(model, broken)

    for odd in ("[CLS]", 2**70, -1):
        def naming(text: str, add_special_tokens: bool = True, odd: object = odd) -> dict:
            return {"input_ids": ([odd] if add_special_tokens else []) + [7, 8]}

        with pytest.raises(InputError, match="which is no token id"):
            qlis.synthetic_calibration(model, naming)


def test_another_models_tokenizer_whose_frame_is_past_the_vocabulary_is_refused(bert_folder,
                                                                                tmp_path):
    """A frame id the embedding has no row for made the first pass fail with torch's
    "index out of range in self", in the library and in ``pack --calib synthetic``."""
    model = load_hf_model(bert_folder)
    rows = model.get_input_embeddings().num_embeddings

    def larger(text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([rows + 60] if add_special_tokens else []) + [7, 8]}

    with pytest.raises(InputError, match=f"frames a text with token id {rows + 60}; the model "
                                         f"has {rows} token ids"):
        qlis.synthetic_calibration(model, larger)
    folder = tmp_path / "other-tokenizer"
    shutil.copytree(bert_folder, folder)
    (folder / "tokenizer.json").unlink()
    words = [f"w{i}" for i in range(100)]  # its [CLS] and [SEP] are 102 and 103
    (folder / "vocab.txt").write_text("\n".join([*words, "[PAD]", "[UNK]", *SPECIALS[2:]]))
    result = run(cli, "pack", folder, "-o", tmp_path / "o.qlis", "--calib", "synthetic",
                 "--calib-examples", "4")
    assert result.exit_code == 2 and "frames a text with token id 102" in result.output


@pytest.mark.parametrize("kwargs", [{"examples": 0}, {"length": True}, {"batch_size": 1.5},
                                    {"seed": -1}, {"seed": 2**64}])
def test_bad_sizes_are_refused(bert_folder, kwargs):
    with pytest.raises(InputError, match="must be an integer"):
        qlis.synthetic_calibration(load_hf_model(bert_folder), **kwargs)


def test_pack_calibrates_on_synthetic_tokens_and_says_so(bert_folder, tmp_path):
    out = tmp_path / "bert.qlis"
    result = run(cli, "pack", bert_folder, "-o", out, "--calib", "synthetic",
                 "--target-bits-per-weight", "6", "--calib-examples", "24",
                 "--calib-batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "calibration: 24 synthetic examples" in result.output
    assert "held-out calibration batch (synthetic inputs, not your data): cosine" \
        in result.output
    assert any(note and note.startswith("error feedback") for note in reconstruction_notes(out))


def test_pack_of_a_folder_without_a_tokenizer_calibrates_on_bare_tokens(bert_folder, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_folder / name, folder / name)
    result = run(cli, "pack", folder, "-o", tmp_path / "b.qlis", "--calib", "synthetic",
                 "--calib-examples", "32")
    assert result.exit_code == 0, result.output
    assert "calibration: 32 synthetic" in result.output
    # in synthetic batches of 8 by default (as measured): four, the fourth held out
    assert "on 1 held-out calibration batch " in result.output


def test_pack_calibrates_a_vision_model_on_noise_images(tmp_path):
    folder = tmp_path / "vit"
    tiny_vit().save_pretrained(folder)
    result = run(cli, "pack", folder, "-o", tmp_path / "v.qlis", "--calib", "synthetic")
    assert result.exit_code == 0, result.output
    assert f"calibration: {DEFAULT_IMAGES} synthetic examples" in result.output


def test_ids_stay_within_the_rows_of_the_input_embedding(bert_folder):
    model = load_hf_model(bert_folder)
    model.config.vocab_size = 1 << 40  # a config that claims more than the table holds
    ids = torch.cat([b["input_ids"] for b in qlis.synthetic_calibration(model, examples=32)])
    assert ids.max() < model.get_input_embeddings().num_embeddings


def test_a_vocabulary_nothing_bounds_is_refused_before_any_allocation():
    class Claims(torch.nn.Module):
        main_input_name = "input_ids"
        config = transformers.PretrainedConfig(vocab_size=1 << 40)

    with pytest.raises(InputError, match="claims a vocabulary"):
        qlis.synthetic_calibration(Claims())


def test_a_causal_language_model_is_calibrated_on_its_own_vocabulary():
    config = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=47, eos_token_id=47)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = qlis.synthetic_calibration(model, examples=8, batch_size=4, length=40)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (8, 16) and ids.max() < 47  # cut to its positions; no end-of-text
    result = qlis.compress(model, "quant", bits=6, calib=batches)
    assert result.distortion["output"]["cosine"] > 0.5


def test_a_result_calibrated_on_synthetic_batches_says_its_quality_is_theirs(bert_folder):
    model, tokenizer = load_hf_model(bert_folder), load_tokenizer(bert_folder)
    synthetic = qlis.synthetic_calibration(model, tokenizer, examples=16, batch_size=4)
    result = qlis.compress(model, "quant", bits=6, calib=synthetic)
    assert result.distortion["output"]["synthetic"] is True
    assert "(synthetic inputs, not your data)" in result.describe_quality()
    real = [dict(batch) for batch in synthetic]  # the same inputs, not marked as made up
    plain = qlis.compress(model, "quant", bits=6, calib=real)
    assert "synthetic" not in plain.distortion["output"]
    assert "synthetic" not in plain.describe_quality()
