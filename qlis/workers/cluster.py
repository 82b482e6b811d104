"""Several processes, or machines, as one compression: the ranks of a torch.distributed job.

Under ``torchrun`` (or inside a process group the caller initialised) the data-free pipeline
splits its per-layer work over the ranks: each rank measures, quantizes and encodes the
layers it owns (owners balanced by parameter count), the ranks exchange what they found, and
rank 0 writes the archive. A calibrated compression splits the calibration batches instead
(`share_of`), adds the ranks' sums onto each layer's owner (qlis/measure/batch_sums.py) and
broadcasts the layer it fits (qlis/quantize/reconstruct.py). Everything exchanged is plain
JSON or raw bytes in uint8 tensors (never pickle), and every rank computes exactly what one
process would, so the archive is the same bytes whatever the number of ranks. A rank that
cannot be reached, stops, or sees another input ends the job with a `ClusterError` on every
rank that is still there.
"""

from __future__ import annotations

import atexit
import datetime
import heapq
import json
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from qlis.archive.resume import PassCache
from qlis.errors import ClusterError, QlisError
from qlis.workers.threads import IN_FLIGHT_ELEMENTS, SMALL_TENSOR_ELEMENTS, ordered_map

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT_S = 600
"""How long a rank waits for the others (rendezvous, or a rank's share of a pass)."""
MAX_RANKS = 1 << 20
"""The most ranks a job may have (torch's store counts them in 32 bits)."""
_MAX_MESSAGE = 1 << 31  # one exchanged JSON document or record: refused beyond 2 GiB
_HEAD_LENGTH = struct.Struct("<Q")


def framed(head: Any, payload: Iterable[bytes | memoryview] = ()) -> bytes:
    """A message of the ranks' own: the length of a JSON ``head``, the head, then raw
    ``payload`` bytes whose layout the head gives."""
    text = json.dumps(head).encode()
    return b"".join([_HEAD_LENGTH.pack(len(text)), text, *payload])


def unframed(message: bytes) -> tuple[Any, int]:
    """The head of a `framed` message and where its payload starts. A message too short for
    its head raises ValueError or struct.error: the caller names the rank that sent it."""
    (length,) = _HEAD_LENGTH.unpack_from(message)
    start = _HEAD_LENGTH.size + length
    if start > len(message):
        raise ValueError("the head runs past the message")
    return json.loads(message[_HEAD_LENGTH.size:start]), start


@contextmanager
def _signals_end_the_process() -> Iterator[None]:
    """SIGTERM and SIGINT end the process at once while it joins the other ranks (joining
    writes nothing): the rendezvous blocks in torch's own code, which never gives Python's
    handlers (qlis turns SIGTERM into Ctrl-C) a turn, so a rank waiting for a job that would
    not start ignored them until SIGKILL (torchrun ending a failed job waited 30 s for it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.signal(signum, signal.SIG_DFL)
             for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Cluster:
    """This process's place in a torch.distributed job: its ``rank`` among ``world`` ranks."""

    rank: int
    world: int

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S,
                         waiting: Callable[[str], None] | None = None) -> Cluster | None:
        """The job this process belongs to: an initialised process group, or the one that
        ``torchrun``'s environment (WORLD_SIZE > 1) describes, joined over gloo; None for a
        single process. ``waiting`` is told, before the rendezvous, whom the job waits for
        and how long (a rank started alone waits silently otherwise)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        world = _job_size()
        if world <= 1:
            return None
        if not dist.is_available():
            raise ClusterError("WORLD_SIZE asks for several ranks, but this torch has no "
                               "torch.distributed")
        if waiting is not None:
            where = ":".join(os.environ.get(k, "?") for k in ("MASTER_ADDR", "MASTER_PORT"))
            waiting(f"joining a job of {world} ranks at {where} (waiting up to "
                    f"{timeout_s:g} s for every rank to start)")
        try:
            with _signals_end_the_process():
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise ClusterError(f"could not join the other ranks ({_first_line(err)}); check "
                               "MASTER_ADDR, MASTER_PORT and that every rank was started"
                               ) from None
        atexit.register(_leave)  # a group left standing can abort the process at exit
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that owns each item: the costliest first, each to the least-loaded rank
        (ties to the lowest rank), the same on every rank."""
        loads = [(0.0, r) for r in range(self.world)]
        owner = [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, rank = heapq.heappop(loads)
            owner[index] = rank
            heapq.heappush(loads, (load + costs[index], rank))
        return owner

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (plain JSON), in rank order."""
        return [json.loads(data) for data in self.all_gather_bytes(
            json.dumps(value, allow_nan=True).encode())]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        with _reporting("exchanging results"):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
            longest = max(int(s) for s in sizes)
            if longest > _MAX_MESSAGE:
                raise ClusterError(f"a rank sent {longest:,} bytes at once; refusing")
            padded = torch.zeros(longest, dtype=torch.uint8)
            if data:
                padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(gathered, padded)
        return [g[:int(n)].numpy().tobytes() for g, n in zip(gathered, sizes, strict=True)]

    def send_bytes(self, data: bytes, to: int) -> None:
        """``data`` to rank ``to`` (which calls `receive_bytes`)."""
        with _reporting(f"sending to rank {to}"):
            dist.send(torch.tensor([len(data)], dtype=torch.int64), to)
            if data:
                dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), to)

    def receive_bytes(self, source: int) -> bytes:
        """What rank ``source`` sent with `send_bytes`."""
        with _reporting(f"waiting for rank {source}"):
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, source)
            if not 0 <= int(size) <= _MAX_MESSAGE:
                raise ClusterError(f"rank {source} announced {int(size):,} bytes; refusing")
            data = torch.empty(int(size), dtype=torch.uint8)
            if int(size):
                dist.recv(data, source)
        return data.numpy().tobytes()

    def broadcast_bytes(self, data: bytes | None, source: int) -> bytes:
        """Rank ``source``'s ``data`` on every rank (the others pass None)."""
        with _reporting(f"waiting for rank {source}"):
            size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
            dist.broadcast(size, source)
            if not 0 <= int(size) <= _MAX_MESSAGE:
                raise ClusterError(f"rank {source} announced {int(size):,} bytes; refusing")
            buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8)
                      if data else torch.empty(int(size), dtype=torch.uint8))
            if int(size):
                dist.broadcast(buffer, source)
        return data if data is not None else buffer.numpy().tobytes()

    def sum_onto(self, tensor: torch.Tensor, owner: int) -> None:
        """Add every rank's ``tensor`` (int64: exact in any order) into rank ``owner``'s."""
        with _reporting(f"adding sums onto rank {owner}"):
            dist.reduce(tensor, owner, op=dist.ReduceOp.SUM)

    def agree(self, fingerprint: Any, what: str) -> None:
        """Refuse to go on unless every rank has the same ``fingerprint`` (plain JSON) of
        ``what`` (e.g. its input and options)."""
        seen = self.all_gather_json(fingerprint)
        differ = [r for r, f in enumerate(seen) if f != seen[0]]
        if differ:
            raise ClusterError(f"rank {differ[0]} sees another {what} than rank 0; give every "
                               "rank the same files and options")


def share(cluster: Cluster | None, costs: Sequence[float]) -> tuple[list[int], list[int]]:
    """The rank that owns each item (rank 0 for all without a cluster), and the indices of
    the items this rank owns, in order."""
    owner = cluster.owners(costs) if cluster is not None else [0] * len(costs)
    here = cluster.rank if cluster is not None else 0
    return owner, [i for i, rank in enumerate(owner) if rank == here]


def spread(fn: Callable[[T], R], items: Sequence[T], costs: Sequence[float],
           jobs: int | None, cluster: Cluster | None,
           to_json: Callable[[R], Any] = lambda r: r,
           from_json: Callable[[Any], R] = lambda j: j,
           done: Callable[[int], None] | None = None,
           cache: PassCache | None = None, key: str = "") -> list[R]:
    """``fn`` over ``items`` on ``jobs`` threads and, in a cluster, over the ranks (each
    computes the items it owns, then all receive all results through JSON): the results in
    input order, the same on every rank; the items worked on at once cost (``costs``) at
    most IN_FLIGHT_ELEMENTS besides one large item (`ordered_map`). ``done`` gets the index
    of each item computed here, as it is. In one process, results saved in ``cache`` under
    ``key`` are used instead of computed, and the computed ones are saved there."""
    if cache is not None and cluster is None:
        saved = cache.lookup(key, len(items), from_json)
        if saved is not None:
            return saved
        results = spread(fn, items, costs, jobs, None, done=done)
        cache.store(key, results, to_json)
        return results
    owner, mine = share(cluster, costs)
    found = []
    failed: QlisError | None = None
    computed = ordered_map(lambda i: fn(items[i]), mine, jobs, cost=costs.__getitem__,
                           budget=IN_FLIGHT_ELEMENTS, group_below=SMALL_TENSOR_ELEMENTS)
    try:
        with closing(computed):  # the items still running are stopped, not left behind
            for index, result in zip(mine, computed, strict=True):
                found.append(result)
                if done is not None:
                    done(index)
    except QlisError as err:  # told to the other ranks, which waited for the results
        if cluster is None or isinstance(err, ClusterError):  # (gloo's "connection reset")
            raise
        failed = err
    if cluster is None:
        return found
    gathered = cluster.all_gather_json(
        {"error": str(failed)} if failed is not None else [to_json(r) for r in found])
    if failed is not None:
        raise failed
    results: list[Any] = [None] * len(items)
    for rank, shared in enumerate(gathered):
        if isinstance(shared, dict) and "error" in shared:
            raise ClusterError(f"rank {rank}: {shared['error']}")
        owned = [i for i in range(len(items)) if owner[i] == rank]
        if not isinstance(shared, list) or len(shared) != len(owned):
            raise ClusterError(f"rank {rank} returned another number of results than the "
                               f"{len(owned)} items it owns")
        for index, value in zip(owned, shared, strict=True):
            results[index] = value
    return [from_json(r) for r in results]


@contextmanager
def together(cluster: Cluster | None) -> Iterator[None]:
    """Work that fails on every rank if it fails on one: a QlisError inside is raised here,
    and every other rank raises a ClusterError that quotes it. Nothing inside may exchange
    (each rank makes one exchange at the end)."""
    try:
        yield
    except QlisError as err:
        if cluster is not None and not isinstance(err, ClusterError):
            cluster.all_gather_json({"error": str(err)})
        raise
    if cluster is not None:
        for rank, seen in enumerate(cluster.all_gather_json({})):
            if isinstance(seen, dict) and "error" in seen:
                raise ClusterError(f"rank {rank}: {seen['error']}")


def share_of(items: Sequence[T], cluster: Cluster | None) -> list[T]:
    """This rank's contiguous part of ``items`` (all of them in one process): the ranks'
    parts differ in length by one at most."""
    if cluster is None:
        return list(items)
    start, stop = (len(items) * r // cluster.world for r in (cluster.rank, cluster.rank + 1))
    return list(items[start:stop])


@contextmanager
def _reporting(doing: str) -> Iterator[None]:
    """A failed collective (a rank that stopped, a timeout) becomes one ClusterError."""
    try:
        yield
    except (RuntimeError, ValueError) as err:  # ValueError: no process group at all
        raise ClusterError(f"the distributed job failed while {doing}: {_first_line(err)} "
                           "(did a rank stop?)") from None


def _environment_integer(name: str) -> int | None:
    """An integer variable of torchrun's environment (None when unset or empty)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ClusterError(f"{name}={text!r} in the environment is not an integer") from None


def _job_size() -> int:
    """The ranks torchrun's environment asks for (1: none), its RANK, MASTER_PORT and
    MASTER_ADDR checked first: a rank outside the job, a port no socket has or an address no
    resolver knows would wait out the rendezvous timeout for ranks that never come."""
    world = _environment_integer("WORLD_SIZE")
    if world is None or world <= 1:
        return 1
    if world > MAX_RANKS:  # torch's store takes a 32-bit count: a traceback past it
        raise ClusterError(f"WORLD_SIZE={world}: qlis runs jobs of at most {MAX_RANKS:,} ranks")
    rank = _environment_integer("RANK")
    if rank is not None and not 0 <= rank < world:
        raise ClusterError(f"RANK={rank} in a job of WORLD_SIZE={world}: each rank's RANK is "
                           f"one of 0..{world - 1}")
    port = _environment_integer("MASTER_PORT")
    if port is not None and not 0 < port < 1 << 16:
        raise ClusterError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    address = os.environ.get("MASTER_ADDR")
    if address:  # a name no resolver knows: the rendezvous retried it for twice its timeout
        try:
            socket.getaddrinfo(address, port)
        except (OSError, UnicodeError) as err:
            raise ClusterError(f"MASTER_ADDR={address[:200]!r} is no address this machine "
                               f"can reach ({_first_line(err)})") from None
    return world


def _leave() -> None:
    """Destroy the process group this process joined (gloo's threads end cleanly)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

