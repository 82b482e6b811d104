"""CLIPIQA and DINOIQA: a ViT backbone and the paper's MLP head, as one `nn.Module`.

The module's `state_dict()` is the whole model (backbone and head), which is what qlis
compresses and archives. Each model splits its forward pass in two: `frozen_forward` (what
training never changes, so its output can be cached on disk) and `trainable_forward` (what is
trained and always recomputed). CLIPIQA freezes the whole CLIP image encoder; DINOIQA trains
its last transformer block and final norm, so its cache holds the tokens entering that block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlis.archive.atomic import atomic_path
from qlis.archive.format import FLOAT_DTYPES
from qlis_iqa.backbones import (
    RANDOM_LABEL,
    attention,
    build_backbone,
    check_finite,
    get_family,
    is_random_init,
)
from qlis_iqa.errors import IQAError
from qlis_iqa.preprocess import Preprocess, for_family
from qlis_iqa.schema import (
    FORMAT_VERSION,
    KEY,
    MAX_PARAMETERS,
    ModelSpec,
    architecture,
    parse_metadata,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def mlp_head(in_features: int, hidden: int = 256) -> nn.Sequential:
    """The paper's head: Linear(d, 256) -> ReLU -> Linear(256, 1)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise IQAError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


class IQAModel(nn.Module):
    """Backbone + MLP head predicting one quality score per image."""

    family: str = ""
    precision: str = "float32"  # what inference computes in (`inference_context`)

    def __init__(self, backbone: PreTrainedModel, head_hidden: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_hidden = head_hidden
        self.head = mlp_head(self.feature_dim, head_hidden)
        self.preprocess: Preprocess = for_family(self.family, _side(backbone.config.image_size))
        for module in self.frozen_modules():
            module.requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's `frozen_forward` output (what the feature cache stores)."""
        raise NotImplementedError

    def architecture_json(self) -> str:
        """The backbone config keys that define the model, as compact JSON (see schema.py)."""
        arch = architecture(self.family, self.backbone.config.to_dict())
        return json.dumps(arch, sort_keys=True, separators=(",", ":"))

    @property
    def random_init(self) -> bool:
        return is_random_init(self.backbone.config)

    @property
    def label(self) -> str:
        """'random-initialised backbone' or 'pretrained backbone': printed beside every result."""
        return RANDOM_LABEL if self.random_init else "pretrained backbone"

    def set_precision(self, precision: str) -> IQAModel:
        """Run inference in `precision`: "bfloat16" is several times faster on CPUs with
        AVX512-BF16 or AMX, and rounds every matmul's inputs to 8 significant bits."""
        check_precision(precision)
        self.precision = precision
        return self

    def inference_context(self) -> contextlib.AbstractContextManager:
        """Where inference runs: torch.autocast to bfloat16 when `precision` asks for it
        (matmuls and convolutions in bfloat16, norms and softmax in float32), else nothing."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        device = next(self.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules whose output `frozen_forward` computes (cacheable)."""
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def frozen_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the MLP head reads, from the frozen outputs (`frozen_forward`)."""
        raise NotImplementedError

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        """The head's scores, computed in float32 whatever the precision: under bfloat16 a
        score kept 8 bits (16 images scored 8 distinct values, and the ties moved SRCC)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.head(self.head_inputs(features).float()).squeeze(-1)

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
        if self.precision != "float32":  # other outputs; float32 keys stay as they were
            h.update(f"precision:{self.precision}".encode())
        h.update(self.architecture_json().encode())
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
            KEY + "backbone_config": self.architecture_json(),
            KEY + "preprocess": self.preprocess.to_json(),
            KEY + "head_hidden": str(self.head_hidden),
            KEY + "backbone": self.label,
        }


def _side(size: int | list[int] | tuple[int, ...]) -> int:
    """An image or patch size of a config: an int, or (height, width) in some configs."""
    return int(size[0] if isinstance(size, list | tuple) else size)


def _call_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out


class CLIPIQA(IQAModel):
    """Frozen CLIP image encoder; its projected image embedding feeds the MLP head."""

    family = "clip"

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.config.projection_dim)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.feature_dim,)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.head]

    def frozen_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).image_embeds

    def head_inputs(self, features: torch.Tensor) -> torch.Tensor:
        return features


class DINOIQA(IQAModel):
    """DINO ViT with its last block and final norm trainable; the CLS token feeds the MLP head."""

    family = "dino"

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        tokens = (self.preprocess.size // _side(self.backbone.config.patch_size)) ** 2 + 1
        return (tokens, self.feature_dim)

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

    def head_inputs(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.layernorm(_call_block(self.blocks[-1], features))[:, 0]


MODEL_CLASSES: dict[str, type[IQAModel]] = {"clip": CLIPIQA, "dino": DINOIQA}


def make_model(family: str, backbone: PreTrainedModel, head_hidden: int = 256) -> IQAModel:
    """Wrap a backbone of the family with a fresh MLP head."""
    get_family(family)
    return MODEL_CLASSES[family](backbone, head_hidden).eval()


def model_from_spec(spec: ModelSpec, meta: bool = False) -> IQAModel:
    """An uninitialised model of a validated description; `meta`: shapes only, no memory."""
    if meta:
        with torch.device("meta"):
            return model_from_spec(spec)
    backbone = build_backbone(spec.family, spec.config, attention(spec.family))
    model = make_model(spec.family, backbone, spec.head_hidden)
    if spec.preprocess is not None:
        model.preprocess = spec.preprocess
    return model


def model_from_metadata(metadata: Mapping[str, str]) -> IQAModel:
    """An uninitialised model of the architecture described by checkpoint/archive metadata."""
    return model_from_spec(parse_metadata(metadata))


def check_declared_shapes(
    spec: ModelSpec, declared: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Refuse a file whose tensor names and shapes are not exactly those `spec` builds.

    Runs on a meta-device model (no weight is allocated) before the real model is built, so a
    description that would take gigabytes, or weights that do not fit it, cost nothing.
    """
    skeleton = model_from_spec(spec, meta=True)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    n_params = sum(math.prod(s) for s in expected.values())
    if n_params > MAX_PARAMETERS:
        raise IQAError(
            f"{source}: its description builds {n_params:,} parameters "
            f"(at most {MAX_PARAMETERS:,}); refused"
        )
    missing = sorted(expected.keys() - declared.keys())
    extra = sorted(declared.keys() - expected.keys())
    wrong = [k for k in expected if k in declared and tuple(declared[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (first: {missing[0]!r})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) (first: {extra[0][:80]!r})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} of another shape (first: {k!r} is {list(declared[k])[:8]}, "
            f"the description needs {list(expected[k])})"
        )
    if problems:
        raise IQAError(f"{source} does not match the model it describes: {'; '.join(problems)}")


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]],
                                            set[str]]:
    """Metadata, declared tensor shapes and the names of the tensors stored in a floating
    dtype, of a checkpoint (.safetensors) or archive (.qlis).

    Nothing but the header is read: no tensor is decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise IQAError(f"{path}: no such model file")
    if path.suffix.lower() == ".qlis":
        import qlis

        with qlis.open(path) as archive:
            entries = {n: archive.entry(n) for n in archive.names()}
            return (dict(archive.metadata), {n: e.shape for n, e in entries.items()},
                    {n for n, e in entries.items() if e.dtype in FLOAT_DTYPES})
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            return (dict(f.metadata() or {}),
                    {k: tuple(v.get_shape()) for k, v in slices.items()},
                    {k for k, v in slices.items() if v.get_dtype() in _SAFETENSORS_FLOATS})
    except (SafetensorError, OSError) as exc:
        raise IQAError(f"{path}: not a safetensors checkpoint ({exc})") from None


_SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")


def check_floating(model: nn.Module, floating: set[str], source: str) -> None:
    """Refuse a file that stores one of the model's floating tensors as integers or booleans:
    qlis-iqa writes none, and read as numbers its values (weights cast to int64 are zeros)
    gave every image one score."""
    stored_as_integers = [name for name, tensor in model.state_dict().items()
                          if tensor.is_floating_point() and name not in floating]
    if stored_as_integers:
        raise IQAError(f"{source}: tensor {stored_as_integers[0][:80]!r} is stored as integers "
                       "where the model holds floating-point values; not a qlis-iqa model")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a checkpoint (.safetensors) or archive (.qlis)."""
    return read_header(path)[0]


def load_model(
    path: str | Path, runtime: str = "float", precision: str = "float32"
) -> tuple[IQAModel, dict[str, str]]:
    """Rebuild a model from a checkpoint (.safetensors) or a qlis archive (.qlis), nothing else.

    The stored description is validated (schema.py) and checked against the file's declared
    tensor shapes before the model is built or any tensor is read. ``runtime="lowbit"`` (an
    archive only) keeps the compressed layers packed in memory and computes from them
    (qlis/runtime/lowbit.py, docs/runtime.md). ``precision`` is what inference computes in
    (`IQAModel.set_precision`).
    """
    if runtime not in ("float", "lowbit"):
        raise IQAError(f"runtime must be 'float' or 'lowbit', got {runtime!r}")
    check_precision(precision)  # before anything is built or read
    path = Path(path)
    metadata, declared, floating = read_header(path)
    spec = parse_metadata(metadata)
    check_declared_shapes(spec, declared, str(path))
    model = model_from_spec(spec)
    check_floating(model, floating, str(path))
    if runtime == "lowbit" and path.suffix.lower() != ".qlis":
        raise IQAError(f"{path}: the low-bit runtime runs .qlis archives, not checkpoints")
    if path.suffix.lower() == ".qlis":
        import qlis

        if runtime == "lowbit":
            qlis.load(path, model=model, runtime="lowbit")
        else:
            load_state(model, qlis.load(path), str(path))
    else:
        from qlis.errors import QlisError
        from qlis.models.checkpoints import read_safetensors_into

        try:  # straight into the model's memory: the weights are never held twice
            read_safetensors_into(path, model.state_dict())
        except QlisError as exc:
            raise IQAError(f"{path} does not load: {exc}") from None
    check_finite(model, str(path))
    return model.set_precision(precision), metadata


def load_state(model: IQAModel, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Load a whole-model state dict, with a clear error when it is not this architecture."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise IQAError(f"{source} does not match the model it describes: {first}") from None


def with_result(model: IQAModel, result: Any, source: str) -> IQAModel:
    """A copy of `model`'s architecture holding a compression result's tensors (dequantized),
    on its device; `source` names the result in an error."""
    candidate = model_from_metadata(model.metadata()).to(next(model.parameters()).device)
    load_state(candidate, result.state_dict(), f"{source} state")
    return candidate


def save_checkpoint(
    model: IQAModel,
    path: str | Path,
    extra: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the whole model as safetensors, its metadata (+ `extra`) in the header.

    Atomic; the folder must exist; an existing file is replaced only with `overwrite`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {**model.metadata(), **(extra or {})}
    with atomic_path(path, overwrite=overwrite) as tmp:
        mode = tmp.stat().st_mode & 0o7777  # what the umask gives a new file
        save_file(state, str(tmp), metadata=meta)
        os.chmod(tmp, mode)  # safetensors writes its file afresh, as 0600
    return path


def state_nbytes(model: IQAModel) -> int:
    """Bytes of the model's tensors as stored uncompressed (the 'original size' of ratios)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
