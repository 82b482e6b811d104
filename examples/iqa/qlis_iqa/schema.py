"""The model description stored in checkpoints and archives, validated before anything is built.

`qlis-iqa score --model X.qlis` rebuilds a model from the archive alone, so the archive's
metadata (family, backbone config, head size, preprocessing) is untrusted input that decides
how much memory and time the rebuild takes. It is read against this schema first:

=====================  =======================================================================
key                    accepted
=====================  =======================================================================
qlis_iqa.format        "1" (absent: "1")
qlis_iqa.family        "clip" or "dino"
qlis_iqa.head_hidden   integer 1..8192 (absent: 256)
qlis_iqa.preprocess    see `qlis_iqa.preprocess.Preprocess` (size 16..1024, known resample,
                       3 finite means, 3 stds >= 1e-3); its size must equal the backbone's
                       image size
backbone config        JSON object of at most 64 KiB with, per family, the keys of ARCH_KEYS:
                       hidden_size 8..8192 (a multiple of num_attention_heads 1..128),
                       intermediate_size 8..32768, num_hidden_layers 1..64, image_size 16..1024,
                       patch_size 1..image_size with at most 4096 patches, num_channels 3,
                       projection_dim / pooler_output_size 1..8192, encoder_stride 1..1024,
                       hidden_act / pooler_act in ACTIVATIONS, layer_norm_eps in (0, 1],
                       dropouts in [0, 1], qkv_bias a boolean, model_type the family's;
                       attention implementation "eager" or "sdpa"; return_dict true,
                       output_attentions / output_hidden_states / torchscript false, no pruned
                       heads, no chunked feed-forward. Other keys (labels, version strings) are
                       dropped: only the keys above reach transformers.
=====================  =======================================================================

A description that passes is then checked against the file's declared tensor names and shapes
(`models.check_declared_shapes`) before a single weight is allocated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qlis_iqa.errors import IQAError
from qlis_iqa.families import RANDOM_INIT_FLAG, get_family
from qlis_iqa.preprocess import Preprocess

FORMAT_VERSION = "1"
KEY = "qlis_iqa."  # prefix of the metadata keys stored in checkpoints and archives

MAX_CONFIG_CHARS = 65536
MAX_HIDDEN = 8192
MAX_INTERMEDIATE = 32768
MAX_LAYERS = 64
MAX_HEADS = 128
MIN_IMAGE, MAX_IMAGE = 16, 1024
MAX_PATCHES = 4096
MAX_HEAD_HIDDEN = 8192
MAX_PARAMETERS = 2_000_000_000  # ViT-G/14 has 1.8 G; the paper's ViT-L/14 0.3 G
ACTIVATIONS = frozenset(
    {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "tanh"}
)
ATTENTION = (None, "eager", "sdpa")

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float(lo: float, hi: float, open_low: bool = False) -> Check:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (lo < v if open_low else lo <= v) and v <= hi

    return check


def _one_of(*values: Any) -> Check:
    return lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values)


def _activation(v: Any) -> bool:
    return isinstance(v, str) and v in ACTIVATIONS


def _image_size(v: Any) -> bool:
    if isinstance(v, list) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    return _int(MIN_IMAGE, MAX_IMAGE)(v)


_COMMON: dict[str, Check] = {
    "hidden_size": _int(8, MAX_HIDDEN),
    "intermediate_size": _int(8, MAX_INTERMEDIATE),
    "num_hidden_layers": _int(1, MAX_LAYERS),
    "num_attention_heads": _int(1, MAX_HEADS),
    "image_size": _image_size,
    "patch_size": _int(1, MAX_IMAGE),
    "num_channels": _one_of(3),
    "hidden_act": _activation,
    "layer_norm_eps": _float(0.0, 1.0, open_low=True),
    "initializer_range": _float(0.0, 10.0),
    RANDOM_INIT_FLAG: _one_of(True, False),
}

ARCH_KEYS: dict[str, dict[str, Check]] = {
    "clip": {
        **_COMMON,
        "projection_dim": _int(1, MAX_HIDDEN),
        "attention_dropout": _float(0.0, 1.0),
        "initializer_factor": _float(0.0, 10.0),
    },
    "dino": {
        **_COMMON,
        "qkv_bias": _one_of(True, False),
        "hidden_dropout_prob": _float(0.0, 1.0),
        "attention_probs_dropout_prob": _float(0.0, 1.0),
        "encoder_stride": _int(1, MAX_IMAGE),
        "pooler_output_size": _int(1, MAX_HIDDEN),
        "pooler_act": _activation,
    },
}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")

# Keys that change how transformers runs the model: accepted only at their harmless values.
_RUNTIME: dict[str, Check] = {
    "attn_implementation": _one_of(*ATTENTION),
    "_attn_implementation": _one_of(*ATTENTION),
    "return_dict": _one_of(True),
    "output_attentions": _one_of(False),
    "output_hidden_states": _one_of(False),
    "torchscript": _one_of(False),
    "chunk_size_feed_forward": _one_of(0),
    "pruned_heads": lambda v: v == {},
    "is_encoder_decoder": _one_of(False),
}


@dataclass(frozen=True)
class ModelSpec:
    """A validated model description: what `models.model_from_spec` builds."""

    family: str
    config: dict[str, Any]  # backbone config: the family's ARCH_KEYS only, validated
    head_hidden: int
    preprocess: Preprocess | None  # None: the family's default at the image size

    @property
    def image_size(self) -> int:
        size = self.config["image_size"]
        return int(size[0] if isinstance(size, list) else size)


def architecture(family: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a backbone config that define the model (sorted; no labels, no versions)."""
    keys = ARCH_KEYS[get_family(family).name]
    return {k: config[k] for k in sorted(keys) if k in config}


def _bad(what: str) -> IQAError:
    return IQAError(f"the stored model description is not usable: {what}")


def parse_config(family: str, config_json: str) -> dict[str, Any]:
    """The validated architecture keys of a stored backbone config (its attention choice is
    checked, not kept: every backbone runs with `backbones.attention`)."""
    fam = get_family(family)
    if len(config_json) > MAX_CONFIG_CHARS:
        raise _bad(
            f"backbone config of {len(config_json):,} characters (at most {MAX_CONFIG_CHARS})"
        )
    try:
        raw = json.loads(config_json)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"backbone config is not JSON ({str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise _bad("backbone config is not a JSON object")
    if raw.get("model_type", fam.model_type) != fam.model_type:
        raise _bad(f"model_type {raw['model_type']!r} is not {fam.model_type!r} ({fam.name})")
    for key, check in {**ARCH_KEYS[fam.name], **_RUNTIME}.items():
        if key in raw and not check(raw[key]):
            raise _bad(
                f"backbone {key} = {_short(raw[key])} is out of bounds (see qlis_iqa.schema)"
            )
    absent = [k for k in REQUIRED if k not in raw]
    if absent:
        raise _bad(f"backbone config lacks {', '.join(absent)}")
    config = architecture(fam.name, raw)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise _bad(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    size = config["image_size"]
    size = size[0] if isinstance(size, list) else size
    patches = (size // config["patch_size"]) ** 2
    if config["patch_size"] > size or patches > MAX_PATCHES:
        raise _bad(
            f"image_size {size} / patch_size {config['patch_size']} gives {patches} patches "
            f"(1..{MAX_PATCHES})"
        )
    return config


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_metadata(metadata: Mapping[str, str]) -> ModelSpec:
    """Validate a checkpoint's or archive's qlis_iqa.* metadata; nothing is built here."""
    family = metadata.get(KEY + "family")
    config_json = metadata.get(KEY + "backbone_config")
    if not isinstance(family, str) or not isinstance(config_json, str):
        raise IQAError(
            "this file is not a qlis-iqa model (its metadata has no qlis_iqa.family / "
            "qlis_iqa.backbone_config); train with `qlis-iqa train` and compress with "
            "`qlis-iqa compress`"
        )
    version = metadata.get(KEY + "format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise _bad(
            f"format {_short(version)}; this qlis-iqa reads format {FORMAT_VERSION} "
            "(upgrade qlis-iqa, or compress the model again with this version)"
        )
    if family not in ARCH_KEYS:
        raise _bad(f"unknown model family {_short(family)}; use one of {sorted(ARCH_KEYS)}")
    config = parse_config(family, config_json)
    head = metadata.get(KEY + "head_hidden", "256")
    if not (len(head) <= 6 and head.isdigit() and 1 <= int(head) <= MAX_HEAD_HIDDEN):
        raise _bad(f"head_hidden {_short(head)} is not an integer in 1..{MAX_HEAD_HIDDEN}")
    stored_pre = metadata.get(KEY + "preprocess")
    preprocess = None
    if stored_pre is not None:
        if len(stored_pre) > 4096:
            raise _bad("preprocessing config longer than 4096 characters")
        preprocess = Preprocess.from_json(stored_pre)
    spec = ModelSpec(family, config, int(head), preprocess)
    if preprocess is not None and preprocess.size != spec.image_size:
        raise _bad(
            f"preprocessing size {preprocess.size} differs from the backbone's image size "
            f"{spec.image_size}"
        )
    return spec
