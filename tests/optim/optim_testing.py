"""Shared helpers of the memopt.optim tests (a plain module: tests/optim has no package)."""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F


def tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    """Linear 16->24 (weight 24x16: tall; right projection under "std"), GELU, Linear 24->8
    (weight 8x24: wide; left projection under "std"). Rank 4 is below min(m, n) for both
    weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))


def batch(seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 16, generator=generator), torch.randint(0, 8, (size,), generator=generator)


def loss_of(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(data[0]), data[1])


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    """Backprop training on batch ``i`` at step ``i``; returns the losses."""
    losses = []
    for i in steps:
        loss = loss_of(model, batch(i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_mezo(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    return [opt.step(lambda i=i: loss_of(model, batch(i))) for i in steps]


def saved(obj: object) -> object:
    """``obj`` through torch.save / torch.load, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

