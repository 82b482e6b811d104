"""Which tensors of a model are "layers" that qlis scores and compresses.

A selector is a filter on fully qualified names, like torchao's ``filter_fn``: it receives the
state-dict name and the tensor and says whether the tensor is a layer. Everything not selected
is kept losslessly (and still counted in every size and ratio).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch

from qlis.config import shown
from qlis.errors import ConfigError, first_line

Selector = Callable[[str, torch.Tensor], bool]
SelectSpec = Selector | str | Sequence[str] | None


def default_select(name: str, tensor: torch.Tensor) -> bool:
    """Floating-point tensors with 2 or more dimensions: Linear, Conv, Embedding, embeddings."""
    return tensor.is_floating_point() and tensor.ndim >= 2


def make_selector(select: SelectSpec = None) -> Selector:
    """Turn a user's ``select`` into a filter.

    ``None`` gives the default; a string or list of strings are glob patterns on names (a
    tensor must also be floating point to be a layer); a callable is used as it is.

    >>> make_selector("blocks.*.mlp.*")("blocks.0.mlp.fc1.weight", torch.zeros(2, 2))
    True
    """
    if select is None:
        return default_select
    if callable(select):
        return _users(select)
    if isinstance(select, str):
        patterns = [select]
    elif isinstance(select, list | tuple) and all(isinstance(p, str) for p in select):
        patterns = list(select)
    else:
        raise ConfigError("select takes a glob pattern, a list of them or a callable(name, "
                          f"tensor) -> bool, got {shown(select)}")

    def by_pattern(name: str, tensor: torch.Tensor) -> bool:
        return tensor.is_floating_point() and any(fnmatch.fnmatchcase(name, p) for p in patterns)

    return by_pattern


def _users(select: Selector) -> Selector:
    """A user's ``select`` callable, whatever it raises (or returns that is no truth value) a
    ConfigError naming the tensor it was asked about."""

    def chosen(name: str, tensor: torch.Tensor) -> bool:
        try:
            return bool(select(name, tensor))
        except Exception as err:
            raise ConfigError(f"select= raised {type(err).__name__} on tensor {name!r}: "
                              f"{first_line(err, 200)}") from err

    return chosen
