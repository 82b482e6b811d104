"""CLIPIQA and DINOIQA: a ViT backbone and the paper's MLP head, as one `nn.Module`.

The module's `state_dict()` is the whole model (backbone and head), which is what qlis
compresses and archives. Each model splits its forward pass in two: `frozen_forward` (what
training never changes, so its output can be cached on disk) and `trainable_forward` (what is
trained and always recomputed). CLIPIQA freezes the whole CLIP image encoder; DINOIQA trains
its last transformer block and final norm, so its cache holds the tokens entering that block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from qlis_iqa.backbones import (
    RANDOM_LABEL,
    build_backbone,
    config_to_json,
    get_family,
    is_random_init,
)
from qlis_iqa.errors import IQAError
from qlis_iqa.preprocess import Preprocess, for_family

FORMAT_VERSION = "1"
KEY = "qlis_iqa."  # prefix of the metadata keys stored in checkpoints and archives


def mlp_head(in_features: int, hidden: int = 256) -> nn.Sequential:
    """The paper's head: Linear(d, 256) -> ReLU -> Linear(256, 1)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class IQAModel(nn.Module):
    """Backbone + MLP head predicting one quality score per image."""

    family: str = ""

    def __init__(self, backbone: PreTrainedModel, head_hidden: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_hidden = head_hidden
        self.head = mlp_head(self.feature_dim, head_hidden)
        size = backbone.config.image_size  # an int, or (height, width) in some configs
        size = size[0] if isinstance(size, list | tuple) else size
        self.preprocess: Preprocess = for_family(self.family, int(size))
        for module in self.frozen_modules():
            module.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def random_init(self) -> bool:
        return is_random_init(self.backbone.config)

    @property
    def label(self) -> str:
        """'random-initialised backbone' or 'pretrained backbone': printed beside every result."""
        return RANDOM_LABEL if self.random_init else "pretrained backbone"

    def frozen_modules(self) -> list[nn.Module]:
        """The modules whose output `frozen_forward` computes (cacheable)."""
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.trainable_modules():
            yield from module.parameters()

    def frozen_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scores, shape (batch,)."""
        return self.trainable_forward(self.frozen_forward(pixel_values))

    def fingerprint(self) -> str:
        """SHA-256 of what determines the frozen output: backbone config and frozen tensors.

        Two models with the same fingerprint produce the same cached features, whatever their
        heads (and, for DINOIQA, last blocks) are: this is the key of the feature cache.
        """
        h = hashlib.sha256()
        h.update(self.family.encode())
        h.update(config_to_json(self.backbone.config).encode())
        for i, module in enumerate(self.frozen_modules()):
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        """Everything needed to rebuild this model from a bare state dict (string values)."""
        return {
            KEY + "format": FORMAT_VERSION,
            KEY + "family": self.family,
            KEY + "backbone_config": config_to_json(self.backbone.config),
            KEY + "preprocess": self.preprocess.to_json(),
            KEY + "head_hidden": str(self.head_hidden),
            KEY + "backbone": self.label,
        }


def _call_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out


class CLIPIQA(IQAModel):
    """Frozen CLIP image encoder; its projected image embedding feeds the MLP head."""

    family = "clip"

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.config.projection_dim)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.head]

    def frozen_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).image_embeds

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(-1)


class DINOIQA(IQAModel):
    """DINO ViT with its last block and final norm trainable; the CLS token feeds the MLP head."""

    family = "dino"

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def blocks(self) -> nn.ModuleList:
        vit = self.backbone
        return vit.layers if hasattr(vit, "layers") else vit.encoder.layer

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone.embeddings, *self.blocks[:-1]]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.blocks[-1], self.backbone.layernorm, self.head]

    def frozen_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embeddings(pixel_values)
        for block in self.blocks[:-1]:
            hidden = _call_block(block, hidden)
        return hidden

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.layernorm(_call_block(self.blocks[-1], features))
        return self.head(hidden[:, 0]).squeeze(-1)


MODEL_CLASSES: dict[str, type[IQAModel]] = {"clip": CLIPIQA, "dino": DINOIQA}


def make_model(family: str, backbone: PreTrainedModel, head_hidden: int = 256) -> IQAModel:
    """Wrap a backbone of the family with a fresh MLP head."""
    get_family(family)
    return MODEL_CLASSES[family](backbone, head_hidden).eval()


def model_from_metadata(metadata: dict[str, str]) -> IQAModel:
    """An uninitialised model of the architecture described by checkpoint/archive metadata."""
    try:
        family = metadata[KEY + "family"]
        config_json = metadata[KEY + "backbone_config"]
        head_hidden = int(metadata.get(KEY + "head_hidden", "256"))
        stored_pre = metadata.get(KEY + "preprocess")
    except (KeyError, ValueError):
        raise IQAError(
            "this file is not a qlis-iqa model (its metadata has no qlis_iqa.family / "
            "qlis_iqa.backbone_config); train with `qlis-iqa train` and compress with "
            "`qlis-iqa compress`"
        ) from None
    model = make_model(family, build_backbone(family, config_json), head_hidden)
    if stored_pre is not None:
        model.preprocess = Preprocess.from_json(stored_pre)
    return model


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a checkpoint (.safetensors) or archive (.qlis)."""
    path = Path(path)
    if not path.is_file():
        raise IQAError(f"{path}: no such model file")
    if path.suffix == ".qlis":
        import qlis

        with qlis.open(path) as archive:
            return dict(archive.metadata)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise IQAError(f"{path}: not a safetensors checkpoint ({exc})") from None


def load_model(path: str | Path) -> tuple[IQAModel, dict[str, str]]:
    """Rebuild a model from a checkpoint (.safetensors) or a qlis archive (.qlis), nothing else."""
    path = Path(path)
    metadata = read_metadata(path)
    model = model_from_metadata(metadata)
    if path.suffix == ".qlis":
        import qlis

        state = qlis.load(path)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    load_state(model, state, str(path))
    return model, metadata


def load_state(model: IQAModel, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Load a whole-model state dict, with a clear error when it is not this architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise IQAError(f"{source} does not match the model it describes: {first}") from None


def save_checkpoint(model: IQAModel, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the whole model as safetensors, its metadata (+ `extra`) in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {**model.metadata(), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def state_nbytes(model: IQAModel) -> int:
    """Bytes of the model's tensors as stored uncompressed (the 'original size' of ratios)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
