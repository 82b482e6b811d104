"""Shared fixtures: a tiny ViT-shaped model with heavy-tailed (Student-t) random weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from reference import student_t
from torch import nn

# The first call of a numba kernel compiles it (or loads it from the cache): no deadlines.
settings.register_profile("qlis", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CI runs the same examples every time (a red CI is then a real regression, not a new draw);
# local runs keep exploring new ones.
settings.register_profile("ci", parent=settings.get_profile("qlis"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "qlis")


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)
        x = x + self.proj(attn @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A ViT in miniature (patch embedding, class token, position embedding, blocks, head).

    Random-initialised with Student-t weights whose scale and tail differ per layer, so the
    layers get different QLIS scores; ``position_ids`` is an integer buffer (never a layer).
    """

    def __init__(self, dim: int = 16, depth: int = 2, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self.register_buffer("position_ids", torch.arange(tokens).reshape(1, -1))
        rng = np.random.default_rng(1234)
        with torch.no_grad():
            for i, (name, p) in enumerate(self.named_parameters()):
                if p.ndim >= 2:
                    df = (2.5, 3.0, 5.0, 10.0)[i % 4]
                    scale = (0.002, 0.02, 0.05)[i % 3]
                    p.copy_(student_t(tuple(p.shape), df, scale, rng))
                elif name.endswith("bias"):
                    p.copy_(student_t(tuple(p.shape), 4.0, 0.01, rng))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@pytest.fixture
def tiny_vit() -> TinyViT:
    """A fresh tiny ViT (same weights every time)."""
    return TinyViT()


@pytest.fixture
def tiny_state(tiny_vit: TinyViT) -> dict[str, torch.Tensor]:
    """The tiny ViT's state dict, cloned (so a test may keep it as the untouched original)."""
    return {name: t.clone() for name, t in tiny_vit.state_dict().items()}


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the errors checked must come before any work."""
    import qlis.cli.model_commands

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(qlis.cli.model_commands, "load_state_dict", refuse)
    monkeypatch.setattr(qlis.cli.model_commands, "load_hf_model", refuse)
