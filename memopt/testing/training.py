"""A small synthetic training task, to compare numerics-changing options against fp32.

Loss after N steps is the acceptance measure for precision lowering and compressed
activations (docs/precision.md): train copies of one model with each option on the
same batches and compare their final losses.

The task is next-token prediction on sequences from a fixed random "successor" rule
(``next = perm[current]``, replaced by a uniformly random token with probability
``noise``): learnable, so the loss falls well below ``log(vocab)`` within a few hundred
steps, and its floor is known (the entropy of the noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["successor_tokens", "train_losses", "final_loss"]


def successor_tokens(vocab: int, batch: int, length: int, *, steps: int, seed: int = 0, noise: float = 0.1) -> list[torch.Tensor]:
    """``steps`` int64 batches of shape ``(batch, length)``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=generator)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
        for t in range(1, length):
            follow = successor[tokens[:, t - 1]]
            random = torch.randint(0, vocab, (batch,), generator=generator)
            keep = torch.rand(batch, generator=generator) >= noise
            tokens[:, t] = torch.where(keep, follow, random)
        batches.append(tokens)
    return batches


def train_losses(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    batches: Sequence[torch.Tensor],
    *,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train with AdamW on ``batches`` (one step each): ``loss_fn(batch)`` returns the
    loss; the RNG is reseeded with ``seed + step`` before each step, so dropout draws
    the same way in every run. Returns the loss of every step."""
    optimizer = torch.optim.AdamW(list(parameters), lr=lr)
    losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(seed + step)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def final_loss(losses: Sequence[float], window: int = 20) -> float:
    """Mean of the last ``window`` losses (single steps are noisy)."""
    tail = list(losses)[-window:]
    return sum(tail) / len(tail)
