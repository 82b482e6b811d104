"""``qlis.pack``: compress a model straight into a .qlis archive, tensor by tensor.

``save(compress(...))`` holds every layer's codes and the archive's records in memory. pack
plans the same way (the policy measures each layer: rd's curves come from samples), then
quantizes, encodes and writes the tensors in a second pass, ``jobs`` at a time, in the
model's order: memory holds the tensors in flight and their records, whatever the model's
size (with a `qlis.io.MappedState` input, tensors are read as they are used). The archive is
the bytes ``save(compress(...))`` writes, whatever ``jobs`` is. With calibration data the
reconstruction runs the whole model, so pack then compresses and saves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from qlis.archive import (
    ArchiveWriter,
    EncodedTensor,
    check_codec_name,
    encode_tensor,
    plan_entry,
    result_header,
    save,
)
from qlis.compress import (
    DEFAULT_POLICY,
    CompressionResult,
    PlannedCompression,
    compress,
    plan_compression,
)
from qlis.execute import LayerPlan, StoredTensor
from qlis.parallel import ordered_map, single_threaded_ops
from qlis.policy import Policy

Progress = Callable[[int], None]


class _Recomputed(Mapping[str, StoredTensor]):
    """A streamed result's tensors: the input's where unchanged, a planned layer executed
    again when asked for (execution is deterministic: the same codes as in the archive)."""

    def __init__(self, planned: PlannedCompression) -> None:
        self._planned = planned

    def __getitem__(self, name: str) -> StoredTensor:
        planned = self._planned
        tensor = planned.state[name]
        if name not in planned.plan:
            return tensor
        with single_threaded_ops():  # as pack executed it, whatever the caller's threads
            return planned.executor.execute(name, tensor, planned.plan[name])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._planned.state)

    def __len__(self) -> int:
        return len(self._planned.state)


def pack(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    policy: str | Policy = DEFAULT_POLICY,
    beta: float = 0.5,
    *,
    codec: str = "ans",
    metadata: Mapping[str, str] | None = None,
    source_bytes: int | None = None,
    overwrite: bool = True,
    progress: Progress | None = None,
    planning_progress: Progress | None = None,
    jobs: int | None = None,
    **options: Any,
) -> CompressionResult:
    """Compress as ``qlis.compress`` does (same options) and write the archive as
    ``qlis.save`` does (``codec``, ``metadata``, ``source_bytes``, ``overwrite``), streaming.

    ``planning_progress`` gets the parameters of each layer the policy has measured (first
    pass; with calibration data, of each layer executed in every calibrated pass),
    ``progress`` those of each tensor written (last pass). The result's tensors are
    computed again when read (``result.tensors[name]``), not kept.
    """
    check_codec_name(codec)
    if options.get("calib") is not None:
        result = compress(model_or_state_dict, policy, beta, jobs=jobs,
                          progress=planning_progress, **options)
        save(result, path, codec=codec, metadata=metadata, overwrite=overwrite,
             source_bytes=source_bytes, progress=progress)
        return result
    planned = plan_compression(model_or_state_dict, policy, beta, jobs=jobs,
                               planning_progress=planning_progress, **options)
    state, plan = planned.state, planned.plan

    def work(name: str) -> tuple[EncodedTensor, LayerPlan | None]:
        tensor = state[name]
        if name not in plan:
            return encode_tensor(name, tensor, codec), None
        stored, layer = planned.executor.execute(name, tensor, plan[name])
        return encode_tensor(name, stored, codec, plan_entry(layer)), layer

    layers: dict[str, LayerPlan] = {}
    with ArchiveWriter(path, overwrite=overwrite) as writer:
        for encoded, layer in ordered_map(work, state, jobs):
            writer.add(encoded)
            if layer is not None:
                layers[layer.name] = layer
            if progress is not None:
                progress(math.prod(encoded.entry["shape"]))
        result = planned.result(_Recomputed(planned), [layers[name] for name in plan])
        writer.finish(metadata=metadata, **result_header(result, source_bytes))
    return result

