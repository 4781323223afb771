"""Small models built from code (random weights, nothing downloaded) that exercise
what a memory backend must get right: BatchNorm buffers mutated in training, dropout
RNG, attention, tied weights, a graph break, dynamic batch sizes, in-place input
mutation. Used by memopt's tests, examples and benchmarks, and by users' own tests.

Each `ZooCase` builds a model and example inputs for a batch size; ``model(*inputs)``
returns a scalar loss (training) so a step is ``model(*inputs).backward()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ZooCase",
    "ZOO",
    "zoo_case",
    "MLP",
    "ConvNet",
    "TransformerBlock",
    "GPTConfig",
    "GPT",
    "GraphBreakMLP",
    "InplaceInputModel",
]


class MLP(nn.Module):
    """Linear/GELU stack with a mean-squared-error loss."""

    def __init__(self, d_in: int = 64, hidden: int = 256, depth: int = 3, d_out: int = 8) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return F.mse_loss(self.head(x), target)


class ConvNet(nn.Module):
    """Conv-BatchNorm-ReLU blocks, pooling and a classifier (BatchNorm buffers are
    mutated in training mode)."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1, stride=2),
            nn.BatchNorm2d(channels * 2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(channels * 2, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(self.features(x).flatten(1)), labels)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        attn = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP block with dropout."""

    def __init__(self, dim: int = 64, heads: int = 4, dropout: float = 0.1, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class BlockRegression(nn.Module):
    """One `TransformerBlock` with a regression loss (the zoo's 'transformer block')."""

    def __init__(self, dim: int = 64, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.block = TransformerBlock(dim, heads, dropout)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.block(x), target)


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    context: int = 64
    dim: int = 64
    heads: int = 4
    layers: int = 2
    dropout: float = 0.0


class GPT(nn.Module):
    """A small GPT-style causal LM with tied input/output embeddings."""

    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.dim)
        self.wpe = nn.Embedding(config.context, config.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases (keeps tied logits small)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class GraphBreakMLP(MLP):
    """An MLP whose forward contains a graph break (two compiled regions)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.layers[0](x))
        torch._dynamo.graph_break()
        for layer in self.layers[1:]:
            x = F.gelu(layer(x))
        return F.mse_loss(self.head(x), target)


class InplaceInputModel(nn.Module):
    """Mutates one of its inputs in place (a running sum the caller keeps)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        total.add_(y.detach().sum(0))
        return (y * y).mean()


@dataclass(frozen=True)
class ZooCase:
    """A model and its inputs: ``build()`` makes the model, ``inputs(batch)`` the
    arguments of one training step (``model(*inputs)`` is a scalar loss)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    default_batch: int = 8
    uses_rng: bool = False


def _gpt_inputs(batch: int, config: GPTConfig = GPTConfig(), seq: int = 32) -> tuple[torch.Tensor, ...]:
    idx = torch.randint(0, config.vocab, (batch, seq + 1))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


ZOO: dict[str, ZooCase] = {
    c.name: c
    for c in [
        ZooCase("mlp", MLP, lambda b: (torch.randn(b, 64), torch.randn(b, 8))),
        ZooCase(
            "cnn_bn",
            ConvNet,
            lambda b: (torch.randn(b, 3, 16, 16), torch.randint(0, 10, (b,))),
        ),
        ZooCase(
            "transformer_block",
            BlockRegression,
            lambda b: (torch.randn(b, 16, 64), torch.randn(b, 16, 64)),
            uses_rng=True,
        ),
        ZooCase("gpt", GPT, _gpt_inputs, default_batch=4),
        ZooCase("graph_break", GraphBreakMLP, lambda b: (torch.randn(b, 64), torch.randn(b, 8))),
        ZooCase(
            "inplace_input",
            InplaceInputModel,
            lambda b: (torch.randn(b, 32), torch.zeros(32)),
        ),
    ]
}


def zoo_case(name: str) -> ZooCase:
    """The zoo entry ``name``; raises ``KeyError`` listing the valid names."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; choose one of {sorted(ZOO)}") from None
