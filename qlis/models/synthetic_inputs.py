"""Synthetic calibration, for when no data is at hand: random token sequences for text models,
uniform-noise images for vision models.

Data-free rounding knows nothing of which layers and which directions of their inputs matter.
Random tokens from the model's own vocabulary, framed as its tokenizer frames a text, run
every layer on inputs from the model's own embedding table, which tells the allocation
each layer's weight on the output and GPTQ each layer's input covariance, much as data
does (data-free quantization with generated inputs, as ZeroQ and LLM-QAT do). On
all-MiniLM-L6-v2 at 3.5 bits/weight it keeps mean cosine 0.990 on real sentences where
data-free rd keeps 0.983 (docs/benchmarks.md). Noise images do the same for an image model
(uniform pixels, normalised as its processor would) where data-free rounding loses too much:
on nsfwjs's MobileNetV2 at 8x, 16 of them kept feature cosine 0.971 on real images where
data-free rd kept 0.895 and 16 real images 0.988 (InceptionV3, which data-free rd keeps at
0.998, gained nothing). The quality a compression reports on these batches is measured on
them, not on the user's data.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from qlis.errors import InputError, first_line
from qlis.models.hf_model import max_input_length, with_decoder_inputs

SYNTHETIC = "synthetic"
"""What ``qlis pack --calib`` takes, instead of a file, for synthetic calibration."""
DEFAULT_EXAMPLES = 192
DEFAULT_IMAGES = 16
"""Noise images by default: as many as the real images of the measure in the module doc."""
DEFAULT_BATCH = 8
DEFAULT_LENGTH = 32
PIXEL_MEAN = PIXEL_STD = 0.5
"""Pixels in [0, 1] normalised to [-1, 1], as ViT's image processor does (CLIP's and DINO's
span about [-2, 2]): noise needs only the model's range, not its exact statistics."""
MAX_IMAGE_ELEMENTS = 1 << 27
"""The most noise values made (512 MiB of float32), whatever a config claims its images are."""
MAX_IMAGE_SIDE = 1 << 14
MAX_VOCABULARY = 1 << 24  # far beyond any tokenizer's; bounds the pool of ids
_SPECIAL_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                 "cls_token_id", "mask_token_id", "unk_token_id", "decoder_start_token_id")
_PROBE_TEXT = "a"


class SyntheticBatch(dict):
    """One batch of keyword inputs that `synthetic_calibration` made up: a compression
    calibrated on such batches says that its measured output quality is theirs."""

    synthetic = True


class SyntheticImages(tuple):
    """One batch of positional inputs (an image tensor) that `synthetic_calibration` made up."""

    synthetic = True


def _config_image_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) of a Hugging Face vision model's ``pixel_values`` (None for a
    model that takes none), from its config."""
    if getattr(model, "main_input_name", None) != "pixel_values":
        return None
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if type(size) is int:
        size = (size, size)
    channels = getattr(config, "num_channels", 3)
    if not (isinstance(size, list | tuple) and len(size) == 2):
        raise InputError(f"the model's config gives no image size ({size!r}) to make noise "
                         "images of; give calibration batches instead")
    return (channels, *size)


def _check_image_shape(shape: object, examples: int) -> tuple[int, int, int]:
    if not (isinstance(shape, list | tuple) and len(shape) == 3
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                    and 1 <= n <= MAX_IMAGE_SIDE for n in shape)):
        raise InputError(f"an image shape is (channels, height, width), each from 1 to "
                         f"{MAX_IMAGE_SIDE}; got {shape!r}")
    shape = tuple(int(n) for n in shape)
    if examples * shape[0] * shape[1] * shape[2] > MAX_IMAGE_ELEMENTS:
        raise InputError(f"{examples} noise images of {list(shape)} exceed "
                         f"{MAX_IMAGE_ELEMENTS:,} values; make fewer or smaller ones")
    return tuple(shape)


def _per_channel(value: float | Iterable[float], channels: int, name: str,
                 positive: bool) -> torch.Tensor:
    """``value`` (one number, or one per channel) as a (channels, 1, 1) float32 tensor."""
    values = [value] if isinstance(value, numbers.Real) else list(value)
    if len(values) == 1:
        values *= channels
    if (len(values) != channels or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 or not positive) for v in values)):
        rule = "> 0" if positive else "finite"
        raise InputError(f"{name} takes one number or one per channel ({channels}), each "
                         f"{rule}; got {value!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32).reshape(channels, 1, 1)


def _noise_images(shape: tuple[int, int, int], examples: int, batch_size: int, seed: int,
                  mean: float | Iterable[float], std: float | Iterable[float],
                  ) -> list[torch.Tensor]:
    """Uniform pixels in [0, 1], seeded, normalised as ``(x - mean) / std``, in batches."""
    centre = _per_channel(mean, shape[0], "pixel_mean", positive=False)
    scale = _per_channel(std, shape[0], "pixel_std", positive=True)
    ends = (torch.tensor([0.0, 1.0]).reshape(1, 2, 1) - centre) / scale
    if not (scale > 0).all() or not ends.isfinite().all():  # a std under float32's smallest
        raise InputError(f"pixel_mean {mean!r} and pixel_std {std!r} put normalised pixels "
                         f"beyond float32's range; give the model's own normalisation")
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(min(batch_size, examples - start), *shape, generator=generator)
             - centre) / scale for start in range(0, examples, batch_size)]


def _vocabulary_size(model: torch.nn.Module) -> int:
    """The ids the model can look up: its config's vocabulary, within its input embedding's
    rows where it exposes them."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) != "input_ids" or type(size) is not int \
            or size < 2:
        raise InputError(
            f"synthetic calibration makes token ids or images, which this "
            f"{type(model).__name__} does not say it takes (it needs a Hugging Face text "
            "model: main input 'input_ids' and a config with vocab_size, a vision model: main "
            "input 'pixel_values', or image_shape=); give calibration batches of its own inputs")
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        table = None
    if isinstance(table, torch.nn.Embedding):
        size = min(size, table.num_embeddings)
    if size > MAX_VOCABULARY:
        raise InputError(f"the model's config claims a vocabulary of {size} tokens and no "
                         "input embedding says otherwise; give calibration batches instead")
    return size


def _config_specials(model: torch.nn.Module) -> set[int]:
    config = model.config
    return {v for key in _SPECIAL_KEYS
            if type(v := getattr(config, key, None)) is int}


def _framing(tokenizer: Any) -> tuple[list[int], list[int], set[str]]:
    """The ids a tokenizer puts before and after a text's own tokens, and the keyword
    inputs it gives: found by encoding one short text with and without them."""
    try:  # the tokenizer is the user's code: whatever it raises, it cannot encode
        framed = tokenizer(_PROBE_TEXT)
        bare = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
        ids = list(framed["input_ids"])
        keys = set(framed.keys())
    except Exception as err:
        raise InputError(f"the tokenizer cannot encode text ({type(err).__name__}: "
                         f"{first_line(err, 200)})") from None
    odd = [i for i in ids if not (isinstance(i, numbers.Integral) and 0 <= i < 2**63)]
    if odd:
        raise InputError(f"the tokenizer gives {first_line(repr(odd[0]), 60)} among a text's "
                         "ids, which is no token id (a whole number in [0, 2**63))")
    ids = [int(i) for i in ids]
    for start in range(len(ids) - len(bare) + 1):
        if bare and ids[start:start + len(bare)] == bare:
            return ids[:start], ids[start + len(bare):], keys
    raise InputError("the tokenizer's encoding of a text does not hold the text's own tokens; "
                     "give calibration batches instead of synthetic ones")


def synthetic_calibration(
    model: torch.nn.Module,
    tokenizer: Any = None,
    examples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    length: int = DEFAULT_LENGTH,
    seed: int = 0,
    *,
    image_shape: tuple[int, int, int] | None = None,
    pixel_mean: float | Iterable[float] = PIXEL_MEAN,
    pixel_std: float | Iterable[float] = PIXEL_STD,
) -> list[SyntheticBatch] | list[SyntheticImages]:
    """Calibration batches for ``qlis.compress(model, calib=...)`` without data (seeded: the
    same batches every time).

    A text model (a Hugging Face one: main input ``input_ids``) gets ``examples`` (default
    DEFAULT_EXAMPLES) sequences of ``length`` tokens drawn uniformly from its vocabulary, its
    special tokens left out, framed as ``tokenizer`` frames a text (without one: bare,
    special ids from the model's config left out); an encoder-decoder gets the same tokens as
    its decoder's inputs, shifted right. An image model gets ``examples`` (default
    DEFAULT_IMAGES) uniform-noise images, pixels in [0, 1] normalised as
    ``(x - pixel_mean) / pixel_std`` (one number or one per channel): a Hugging Face vision
    model (main input ``pixel_values``) of its config's size, any other module taking one
    image tensor of ``image_shape`` = (channels, height, width)."""
    for name, value in (("examples", 1 if examples is None else examples),
                        ("batch_size", batch_size), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 16:
            raise InputError(f"{name} must be an integer from 1 to 65536, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2**64) (torch's seeds), got {seed!r}")
    configured = _config_image_shape(model) if image_shape is None else None
    if image_shape is not None or configured is not None:
        examples = examples or DEFAULT_IMAGES
        shape = _check_image_shape(configured if image_shape is None else image_shape,
                                   examples)
        images = _noise_images(shape, examples, batch_size, seed, pixel_mean, pixel_std)
        if configured is None:
            return [SyntheticImages((batch,)) for batch in images]
        return [SyntheticBatch(pixel_values=batch) for batch in images]
    examples = examples or DEFAULT_EXAMPLES
    size = _vocabulary_size(model)
    prefix: list[int] = []
    suffix: list[int] = []
    keys = {"input_ids", "attention_mask"}
    specials = _config_specials(model)
    if tokenizer is not None:
        prefix, suffix, keys = _framing(tokenizer)
        if beyond := [i for i in (*prefix, *suffix) if i >= size]:
            # another model's tokenizer: the model failed on the first pass, as torch's
            # "index out of range in self"
            raise InputError(f"the tokenizer frames a text with token id {beyond[0]}; the "
                             f"model has {size} token ids (0-{size - 1}): give this model's "
                             "own tokenizer")
        with contextlib.suppress(TypeError):  # a tokenizer that does not say its size
            size = min(size, len(tokenizer))
        given = getattr(tokenizer, "all_special_ids", None)
        specials |= {i for i in given if type(i) is int} if isinstance(given, Iterable) else set()
    limit = max_input_length(model)
    if limit is not None:
        length = min(length, limit - len(prefix) - len(suffix))
    usable = torch.ones(size, dtype=torch.bool)
    usable[[i for i in specials if 0 <= i < size]] = False
    pool = usable.nonzero()[:, 0]
    if length < 1 or pool.numel() == 0:
        raise InputError("the model's vocabulary and input length leave no room for "
                         "synthetic tokens; give calibration batches instead")
    head, tail = (torch.tensor(ids, dtype=torch.long) for ids in (prefix, suffix))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, examples, batch_size):
        rows = min(batch_size, examples - start)
        drawn = pool[torch.randint(pool.numel(), (rows, length), generator=generator)]
        ids = torch.cat([head.expand(rows, -1), drawn, tail.expand(rows, -1)], 1)
        batch = {"input_ids": ids}
        if "attention_mask" in keys:
            batch["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in keys:
            batch["token_type_ids"] = torch.zeros_like(ids)
        batches.append(batch)
    return [SyntheticBatch(batch) for batch in with_decoder_inputs(model, batches)]
