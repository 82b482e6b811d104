"""Compress a trained model with qlis and write a self-describing .qlis archive.

The archive's metadata holds the model family, backbone config, preprocessing and head size
(strings), so `qlis-iqa score --model X.qlis` rebuilds the model from the archive alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qlis
from qlis_iqa.models import KEY, IQAModel, state_nbytes


@dataclass
class Packed:
    """A written archive: the compression result, its path, size and ratios."""

    result: Any
    path: Path
    file_bytes: int
    original_bytes: int

    @property
    def real_ratio(self) -> float:
        """Original tensor bytes / archive bytes on disk (everything included)."""
        return self.original_bytes / self.file_bytes


def write_archive(
    model: IQAModel,
    result: Any,
    path: str | Path,
    codec: str = "huffman",
    metadata: dict[str, str] | None = None,
) -> Packed:
    """Save `result` (a compression of `model`) with the metadata that rebuilds the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qlis.save(result, path, codec=codec, metadata={**model.metadata(), **(metadata or {})})
    return Packed(result, path, path.stat().st_size, state_nbytes(model))


def pack(
    model: IQAModel,
    path: str | Path,
    policy: str = "lapq",
    beta: float = 0.5,
    codec: str = "huffman",
    metadata: dict[str, str] | None = None,
    **options: Any,
) -> Packed:
    """Compress the whole model (backbone and head) and write its archive."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    result = qlis.compress(state, policy=policy, beta=beta, **options)
    extra = {KEY + "policy": policy, KEY + "beta": str(beta), **(metadata or {})}
    extra.update({KEY + f"option.{k}": str(v) for k, v in options.items()})
    return write_archive(model, result, path, codec, extra)
