"""A model's chain of repeated blocks (a transformer's layers, a network's stages), so that
sequential reconstruction can run it one block at a time.

Reconstruction needs each layer's inputs with every earlier layer quantized. Run from the
model's input, that is a forward pass per group of layers. When the model's heaviest
``ModuleList`` / ``Sequential`` is a chain (each block called once per forward, in order, fed
the previous block's first output, every other argument the one the first block got), the
first block's inputs are cached once and every block then runs on cached inputs alone: a
pass costs one block, and a block's weights are read once. `ChainCheck` verifies the chain on
the float model's own pass; a model that is not one keeps the forward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlis.errors import InputError
from qlis.measure.calibrate import Calibration, Replacement, Run, first_tensor


@dataclass(frozen=True)
class Blocks:
    """The chain's blocks: their module names (state-dict prefixes) and modules, in order."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def index_of(self, tensor_name: str) -> int | None:
        """The block that holds the state-dict entry ``tensor_name`` (None: outside them)."""
        for index, name in enumerate(self.names):
            if tensor_name.startswith(f"{name}."):
                return index
        return None


def find_blocks(model: nn.Module) -> Blocks | None:
    """The ``ModuleList`` / ``Sequential`` of at least two modules holding the most
    parameters (the outermost on a tie), or None."""
    best: tuple[int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) >= 2:
            weight = sum(p.numel() for p in module.parameters())
            if weight and (best is None or weight > best[0]):
                best = (weight, name, module)
    if best is None:
        return None
    _, name, container = best
    names = tuple(f"{name}.{child}" if name else child for child, _ in container.named_children())
    return Blocks(names, tuple(container.children()))


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are the same value (tensors: same shape, dtype and bits)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return type(a) is type(b) and bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


_SHARED = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype,
           torch.device, nn.Module)


def _fresh(value: Any) -> Any:
    """``value`` for one more call of a block: a copy when a call may change it (a key/value
    cache that each attention call appends to), so that every replay starts from the state
    the first block was given, not from what earlier replays left in it. Tensors (the
    block's inputs, cloned where it matters), plain values and modules are shared."""
    if isinstance(value, _SHARED):
        return value
    if type(value) in (tuple, list):
        return type(value)(_fresh(item) for item in value)
    if type(value) is dict:
        return {key: _fresh(item) for key, item in value.items()}
    return copy.deepcopy(value)


@dataclass
class _Call:
    """One block call: its arguments and where the hidden state (the chained tensor) is."""

    args: tuple
    kwargs: dict
    hidden_at: int | str

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> _Call | None:
        if args:
            return cls(args, kwargs, 0) if isinstance(args[0], torch.Tensor) else None
        key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        return None if key is None else cls(args, kwargs, key)

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.hidden_at == 0 else self.kwargs[self.hidden_at]

    def with_hidden(self, hidden: torch.Tensor) -> _Call:
        if self.hidden_at == 0:
            return _Call((hidden, *self.args[1:]), self.kwargs, 0)
        return _Call(self.args, {**self.kwargs, self.hidden_at: hidden}, self.hidden_at)

    def fresh(self) -> _Call:
        """This call with a copy of its hidden state and of any state a block may change
        (`_fresh`): a block that changes its inputs in place must not change the cache."""
        hidden = self.hidden.clone()
        args = tuple(hidden if i == 0 and self.hidden_at == 0 else _fresh(value)
                     for i, value in enumerate(self.args))
        kwargs = {key: hidden if key == self.hidden_at else _fresh(value)
                  for key, value in self.kwargs.items()}
        return _Call(args, kwargs, self.hidden_at)

    def same_context(self, other: _Call) -> bool:
        """The arguments besides the hidden state are the same as ``other``'s."""
        if self.hidden_at != other.hidden_at or len(self.args) != len(other.args):
            return False
        if self.kwargs.keys() != other.kwargs.keys():
            return False
        rest = range(1, len(self.args)) if self.hidden_at == 0 else range(len(self.args))
        return (all(_same(self.args[i], other.args[i]) for i in rest)
                and all(_same(v, other.kwargs[k]) for k, v in self.kwargs.items()
                        if k != self.hidden_at))


@dataclass
class ChainCheck:
    """Hooks that watch one pass of the model and say whether ``blocks`` form a chain."""

    blocks: Blocks
    chained: bool = True
    runs: int = 0
    """How many times the first block ran (a chain runs once per model call)."""
    _next: int = 0
    _first: _Call | None = None
    _output: torch.Tensor | None = None
    _handles: list = field(default_factory=list)

    @contextmanager
    def watching(self) -> Iterator[ChainCheck]:
        for index, module in enumerate(self.blocks.modules):
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, i=index: self._entered(i, args, kwargs),
                with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                lambda m, args, output: self._left(output)))
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
        if self._next not in (0, len(self.blocks.modules)):
            self.chained = False

    def _entered(self, index: int, args: tuple, kwargs: dict) -> None:
        call = _Call.of(args, kwargs)
        if index == 0:
            self.runs += 1
            if self._next in (0, len(self.blocks.modules)):
                self._next, self._first = 0, call
        fits = call is not None and index == self._next and self._first is not None
        if fits and index > 0:
            fits = (self._output is not None and _same(call.hidden, self._output)
                    and call.same_context(self._first))
        self.chained = self.chained and fits
        self._next = index + 1

    def _left(self, output: Any) -> None:
        try:
            self._output = first_tensor(output)
        except InputError:
            self._output, self.chained = None, False


class _Captured(Exception):
    """Raised by the first block's pre-hook once its inputs are kept: the pass stops."""


class CachedInputs:
    """The inputs of one block on every fitting batch, run through blocks one at a time."""

    def __init__(self, calibration: Calibration, blocks: Blocks,
                 replacements: Mapping[str, Replacement]) -> None:
        """The first block's inputs, from a pass of the model with ``replacements``."""
        self.calibration = calibration
        self.calls: list[tuple[int, _Call]] = []
        """Each fitting batch's key and the first block's call on it."""

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = _Call.of(args, kwargs)
            if call is not None:
                self.calls.append((calibration.batch, call))
            raise _Captured

        handle = blocks.modules[0].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            calibration.feed(_Captured, replacements)
        finally:
            handle.remove()

    def run(self, block: nn.Module, replacements: Mapping[str, Replacement],
            stop: type[Exception] | None = None) -> None:
        """One pass of ``block`` alone on the cached inputs (for the caller's hooks); a call
        that raises ``stop`` is cut short. A replacement that is a callable is made when
        its module runs (`Calibration.swapped`)."""
        self.calibration.run_calls(self._calls_of(block), replacements, stop, eager_bytes=0)

    def advance(self, block: nn.Module, replacements: Mapping[str, Replacement]) -> None:
        """Replace the cached inputs by ``block``'s outputs: the next block's inputs, each
        batch's as soon as its output is made, so that the cache holds one block's
        activations and a batch, not two blocks' (a long calibration's activations are the
        largest thing it holds)."""

        def replaced(index: int) -> Callable[[], None]:
            def run() -> None:
                key, call = self.calls[index]
                fresh = call.fresh()
                output = block(*fresh.args, **fresh.kwargs)
                self.calls[index] = (key, call.with_hidden(first_tensor(output)))

            return run

        runs = [(key, replaced(index)) for index, (key, _) in enumerate(self.calls)]
        self.calibration.run_calls(runs, replacements, eager_bytes=0)

    def _calls_of(self, block: nn.Module) -> list[Run]:
        """Calls of ``block`` on the cached inputs, each on fresh copies of them
        (`_Call.fresh`)."""
        return [(key, lambda call=call: block(*(fresh := call.fresh()).args, **fresh.kwargs))
                for key, call in self.calls]
