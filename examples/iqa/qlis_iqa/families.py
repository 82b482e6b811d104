"""The backbone families of the paper (CLIP, DINO): their transformers classes, checkpoints and
shapes, and the random-initialisation flag.

Apart from `backbones` (which loads and builds them) because `schema` needs them to validate a
stored description, and `backbones` needs `schema` to validate a `--weights` folder's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlis_iqa.errors import IQAError

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds, paths are checked first
    from transformers import PretrainedConfig, PreTrainedModel

RANDOM_INIT_FLAG = "qlis_random_init"
RANDOM_LABEL = "random-initialised backbone"



@dataclass(frozen=True)
class Family:
    """A backbone family of the paper: its transformers classes (by name), checkpoint, shapes."""

    name: str
    title: str
    hub_id: str
    model_type: str  # the config's `model_type`
    model_class: str  # a class of `transformers`, imported when first needed
    config_class: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    full_config: dict[str, Any] = field(default_factory=dict)
    tiny_config: dict[str, Any] = field(default_factory=dict)

    @property
    def repo_name(self) -> str:
        return self.hub_id.split("/")[-1]

    @property
    def model_cls(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, self.model_class)

    @property
    def config_cls(self) -> type[PretrainedConfig]:
        import transformers

        return getattr(transformers, self.config_class)


FAMILIES: dict[str, Family] = {
    "clip": Family(
        name="clip",
        title="CLIPIQA (CLIP ViT-L/14)",
        hub_id="openai/clip-vit-large-patch14",
        model_type="clip_vision_model",
        model_class="CLIPVisionModelWithProjection",
        config_class="CLIPVisionConfig",
        full_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        tiny_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
    ),
    "dino": Family(
        name="dino",
        title="DINOIQA (DINO ViT-B/16)",
        hub_id="facebook/dino-vitb16",
        model_type="vit",
        model_class="ViTModel",
        config_class="ViTConfig",
        model_kwargs={"add_pooling_layer": False},
        full_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            qkv_bias=True,
        ),
        tiny_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
    ),
}

def get_family(name: str) -> Family:
    """Look a family up by name ('clip' or 'dino')."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise IQAError(f"unknown model family {name!r}; use one of {sorted(FAMILIES)}") from None
