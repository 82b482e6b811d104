"""``qlis.pack``: compress a model straight into a .qlis archive, tensor by tensor.

``save(compress(...))`` holds every layer's codes and the archive's records in memory. pack
plans the same way (the policy measures each layer: rd's curves come from samples), then
quantizes, encodes and writes the tensors in a second pass, ``jobs`` at a time, in the
model's order: memory holds the tensors in flight and their records, whatever the model's
size (with a `qlis.models.checkpoints.MappedState` input, tensors are read as they are
used). The archive is the bytes ``save(compress(...))`` writes, whatever ``jobs`` is. With
calibration data the reconstruction runs the whole model, so pack then compresses and saves,
each finished layer's codes and the float model's outputs on the calibration data waiting in
an unlinked file beside the archive, not in memory (qlis/workers/spill_file.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlis.archive.file import (
    ArchiveWriter,
    EncodedTensor,
    check_codec_name,
    encode_tensor,
    plan_entry,
    save,
)
from qlis.archive.format import crc32c
from qlis.archive.resume import PassCache, input_fingerprint
from qlis.config import Param, check_callback, check_instance
from qlis.errors import ClusterError, ConfigError, QlisError
from qlis.models.checkpoints import MappedState
from qlis.models.tensors import as_state_dict, bit_patterns, model_in_use, tensor_layout
from qlis.plan.compress import (
    DEFAULT_POLICY,
    CompressionResult,
    PlannedCompression,
    plan_compression,
)
from qlis.plan.execute import LayerPlan, StoredTensor
from qlis.plan.policy import Policy
from qlis.workers.cluster import Cluster, framed, share, unframed
from qlis.workers.spill_file import SpillFile
from qlis.workers.threads import (
    IN_FLIGHT_ELEMENTS,
    SMALL_TENSOR_ELEMENTS,
    ordered_map,
    single_threaded_ops,
)

Progress = Callable[[int], None]
Encoded = tuple[EncodedTensor, LayerPlan | None]  # a tensor's records, and its plan row


class _Recomputed(Mapping[str, StoredTensor]):
    """A streamed result's tensors: the input's where unchanged, a planned layer executed
    again when asked for (execution is deterministic: the same codes as in the archive)."""

    def __init__(self, planned: PlannedCompression) -> None:
        self._planned = planned

    def __getitem__(self, name: str) -> StoredTensor:
        planned = self._planned
        tensor = planned.state[name]
        if name not in planned.plan:
            return planned.executor.rest(tensor)
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
    cluster: Cluster | None = None,
    resume: bool = False,
    **options: Any,
) -> CompressionResult:
    """Compress as ``qlis.compress`` does (same options) and write the archive as
    ``qlis.save`` does (``codec``, ``metadata``, ``source_bytes``, ``overwrite``), streaming.

    ``planning_progress`` gets the parameters of each layer the policy has measured (first
    pass; with calibration data, of each layer executed in every calibrated pass),
    ``progress`` those of each tensor written (last pass). The result's tensors are
    computed again when read (``result.tensors[name]``), not kept.

    In a torch.distributed job (``cluster``; by default the one this process belongs to,
    see `Cluster.from_environment`) every rank calls ``pack`` with the same input and
    options: each measures, quantizes and encodes the tensors it owns (with ``calib``: runs
    its share of the batches and fits the layers it owns, qlis/quantize/reconstruct.py),
    rank 0 writes the archive (the same bytes as one process), and every rank gets the
    result.

    A data-free pack of a file (a `qlis.models.checkpoints.MappedState`) in one process saves
    its first pass beside ``path`` until the archive is written; ``resume=True`` reuses what an
    interrupted pack of the same files with the same options saved (qlis/archive/resume.py).
    """
    check_codec_name(codec)
    resume = Param("bool").check(resume, "resume")
    check_callback(progress, "progress")
    check_instance(cluster, Cluster, "cluster")
    if resume and options.get("calib") is not None:
        raise ConfigError("resume reuses the first pass of a data-free pack; a calibrated "
                          "pack measures on its data every time: leave resume out")
    cluster = Cluster.from_environment() if cluster is None else cluster
    if resume and (cluster is not None or not isinstance(model_or_state_dict, MappedState)):
        why = ("under torchrun each rank measures its share" if cluster is not None else
               "this input is not read from safetensors files (a .pt, a module)")
        raise ConfigError(f"resume reuses the first pass a pack of safetensors files saves in "
                          f"one process, and {why}: leave resume out")  # was ignored
    if cluster is not None:
        cluster.agree(_fingerprint(model_or_state_dict, policy, beta, codec, options),
                      "input or options")
    if options.get("calib") is not None:
        with model_in_use(model_or_state_dict):  # its weights are swapped while it runs
            planned = plan_compression(model_or_state_dict, policy, beta, jobs=jobs,
                                       progress=planning_progress, cluster=cluster,
                                       spill=SpillFile(Path(path).parent), **options)
            result = planned.result(*planned.executor.run(planned.plan))
        if cluster is None or cluster.leader:
            save(result, path, codec=codec, metadata=metadata, overwrite=overwrite,
                 source_bytes=source_bytes, progress=progress)
        return result
    streamed = partial(_streamed, model_or_state_dict, path, policy, beta, codec, metadata,
                       source_bytes, overwrite, progress, planning_progress, jobs, cluster,
                       options=options)
    if cluster is not None or not isinstance(model_or_state_dict, MappedState):
        return streamed(None)
    settings = {"policy": repr(policy), "beta": beta,
                **{k: v for k, v in options.items() if v is not None}}
    fingerprint = input_fingerprint(model_or_state_dict.files(), settings)
    cache = PassCache(path, fingerprint, resume)
    try:
        return streamed(cache)
    except QlisError:
        cache.discard()  # a rerun that fails the same way has no use for it
        if not cache.used:
            raise
    # what failed may be the saved pass (a file beside the output, like any other hostile
    # until proven otherwise): measured again, once
    return streamed(PassCache(path, fingerprint, resume=False))


def _streamed(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike, policy: str | Policy, beta: float, codec: str,
    metadata: Mapping[str, str] | None, source_bytes: int | None, overwrite: bool,
    progress: Progress | None, planning_progress: Progress | None, jobs: int | None,
    cluster: Cluster | None, cache: PassCache | None, options: Mapping[str, Any],
) -> CompressionResult:
    """The data-free `pack`: the first pass (saved in ``cache`` where given), the plan, then
    each tensor executed, encoded and written in the model's order."""
    planned = plan_compression(model_or_state_dict, policy, beta, jobs=jobs, cluster=cluster,
                               cache=cache, planning_progress=planning_progress, **options)
    state, plan = planned.state, planned.plan

    def work(name: str) -> Encoded:
        tensor = state[name]
        if name not in plan:
            return encode_tensor(name, planned.executor.rest(tensor), codec), None
        stored, layer = planned.executor.execute(name, tensor, plan[name])
        return encode_tensor(name, stored, codec, plan_entry(layer)), layer

    names = list(state)
    sizes = {name: t.numel() for name, t in tensor_layout(state).items()}
    owner, owned = share(cluster, list(sizes.values()))
    mine = ordered_map(work, [names[i] for i in owned], jobs, cost=sizes.__getitem__,
                       budget=IN_FLIGHT_ELEMENTS, group_below=SMALL_TENSOR_ELEMENTS)
    if cluster is not None and not cluster.leader:
        return _follow(cluster, planned, mine)
    layers: dict[str, LayerPlan] = {}
    with ArchiveWriter(path, overwrite=overwrite) as writer, closing(mine):
        for encoded, layer in _in_order(cluster, owner, mine):
            writer.add(encoded)
            if layer is not None:
                layers[layer.name] = layer
            if progress is not None:
                progress(math.prod(encoded.entry["shape"]))
        result = planned.result(_Recomputed(planned), [layers[name] for name in plan])
        try:
            writer.finish(metadata=metadata, **result.header(source_bytes))
        except QlisError as err:
            if cluster is not None:
                cluster.all_gather_json({"error": str(err)})
            raise
    result.check_written_size(Path(path), codec)
    if cache is not None:
        cache.discard()
    if cluster is not None:
        cluster.all_gather_json({"layers": [asdict(layer) for layer in result.layers]})
    return result


def _in_order(cluster: Cluster | None, owner: list[int], mine: Iterator[Encoded],
              ) -> Iterator[Encoded]:
    """Every tensor encoded, in the model's order: this rank's own (``mine``, in order) and,
    in a cluster, the others' as they send them (each rank sends its own in order)."""
    for rank in owner:
        yield next(mine) if rank == 0 else _unpacked(cluster.receive_bytes(rank), rank)


def _follow(cluster: Cluster, planned: PlannedCompression,
            mine: Generator[Encoded, None, None]) -> CompressionResult:
    """A rank other than 0: send the tensors this rank encodes (``mine``) to rank 0, then
    receive the layers of the whole model (or rank 0's error) and build the same result."""
    try:
        with closing(mine):
            for encoded, layer in mine:
                cluster.send_bytes(_packed(encoded, layer), 0)
    except QlisError as err:
        if not isinstance(err, ClusterError):
            cluster.send_bytes(_packed_error(f"rank {cluster.rank}: {err}"), 0)
        raise
    shared = cluster.all_gather_json({})[0]
    if "error" in shared:
        raise ClusterError(f"rank 0 could not write the archive: {shared['error']}")
    return planned.result(_Recomputed(planned), [LayerPlan(**row) for row in shared["layers"]])


def _packed(encoded: EncodedTensor, layer: LayerPlan | None) -> bytes:
    """One encoded tensor as a message: a JSON head (entry, record lengths and CRCs, plan
    row), then the records' bytes."""
    return framed({
        "entry": encoded.entry,
        "records": [[key, crc, len(data)] for key, data, crc in encoded.records],
        "layer": asdict(layer) if layer is not None else None,
    }, (bytes(d) for _, d, _ in encoded.records))


def _packed_error(message: str) -> bytes:
    return framed({"error": message})


def _unpacked(message: bytes, rank: int) -> tuple[EncodedTensor, LayerPlan | None]:
    """What `_packed` made, checked to add up (or the sender's error, raised)."""
    try:
        head, offset = unframed(message)
        if "error" in head:
            raise ClusterError(head["error"])
        records = []
        for key, crc, size in head["records"]:
            records.append((key, message[offset:offset + size], crc))
            offset += size
        layer = LayerPlan(**head["layer"]) if head["layer"] is not None else None
        if offset != len(message) or not isinstance(head["entry"], dict):
            raise ValueError("the records do not add up to the message")
        return EncodedTensor(head["entry"], records), layer
    except (ValueError, TypeError, KeyError, struct.error) as err:
        raise ClusterError(f"rank {rank} sent a message that does not parse ({err})") from None


def _fingerprint(model: torch.nn.Module | Mapping[str, torch.Tensor], policy: object,
                 beta: float, codec: str, options: Mapping[str, Any]) -> str:
    """A digest of the input (names, dtypes, shapes, and every tensor's CRC-32C over all its
    bytes) and the options, for the ranks to compare before they share work: each rank reads
    only the layers it owns afterwards, so ranks given two copies that differ (the first
    and last 64 KiB of each tensor were compared) wrote an archive of both, silently."""
    state = as_state_dict(model)
    digest = hashlib.sha256()
    for name in state:
        tensor = state[name]
        raw = bit_patterns(tensor).reshape(-1).view(np.uint8)
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape),
                                  crc32c(memoryview(raw))]).encode())
    calib = options.get("calib")
    if calib is not None and not callable(calib):
        for batch in calib:
            _digest_batch(digest, batch)
    settings = sorted((k, v) for k, v in options.items() if k != "calib")
    digest.update(json.dumps([repr(policy), beta, codec, settings], default=repr).encode())
    return digest.hexdigest()


def _digest_batch(digest: Any, batch: Any) -> None:
    """Add a calibration batch (tensors in tuples, lists and dicts) to ``digest``, all of
    its bytes: ranks that calibrate on other data would each fit the layers to their own."""
    if isinstance(batch, torch.Tensor):
        digest.update(json.dumps([str(batch.dtype), list(batch.shape)]).encode())
        digest.update(bit_patterns(batch.cpu()).reshape(-1).view(np.uint8).tobytes())
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            digest.update(repr(key).encode())
            _digest_batch(digest, value)
    elif isinstance(batch, tuple | list):
        for value in batch:
            _digest_batch(digest, value)
    else:
        digest.update(repr(batch).encode())
