"""Dropout masks replayed from the random-number state, instead of saved.

Two custom ops (``torch.ops.memopt``), used by `memopt.graph.dropout` on CPU:

* ``dropout_with_rng_state(x, p) -> (out, mask, state)``: ``native_dropout(x, p,
  train=True)`` plus the CPU generator's state just before it drew the mask (a small
  uint8 tensor, `STATE_NUMEL` bytes). Random: it advances the generator exactly as
  ``native_dropout`` does, so every later random op draws what it would in eager.
* ``dropout_mask_replay(state, size, stride, p) -> mask``: the same mask again, drawn
  as ``native_dropout`` draws it (``bernoulli_(1 - p)`` on a float tensor of the same
  layout, then bool) with the generator set to ``state``, then restored. Its workspace
  is that float tensor (`memopt.analysis.workspace`). Deterministic: the planner may recompute it in backward,
  so a plan keeps a few kilobytes of state instead of a bool tensor per dropout.

The replay depends on ``native_dropout`` drawing its mask from the default CPU
generator as ``empty_like(input).bernoulli_(1 - p)``, the same way for any input of the
same size and layout; the tests pin this (`tests/test_remat.py`).
"""

from __future__ import annotations

import torch

__all__ = ["STATE_NUMEL", "dropout_with_rng_state", "dropout_mask_replay"]

STATE_NUMEL = int(torch.get_rng_state().numel())
"""Bytes of the CPU generator's state (``torch.get_rng_state()``)."""


@torch.library.custom_op("memopt::dropout_with_rng_state", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_with_rng_state(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = torch.get_rng_state()
    out, mask = torch.ops.aten.native_dropout(x, p, True)
    return out, mask, state


@dropout_with_rng_state.register_fake
def _(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool), x.new_empty((STATE_NUMEL,), dtype=torch.uint8)


@torch.library.custom_op("memopt::dropout_mask_replay", mutates_args=())
def dropout_mask_replay(state: torch.Tensor, size: list[int], stride: list[int], p: float) -> torch.Tensor:
    current = torch.get_rng_state()
    try:
        torch.set_rng_state(state)
        # what native_dropout does on CPU, without its input and output: a noise tensor
        # of the layout (default dtype), ``bernoulli_(1 - p)``, then bool
        noise = torch.empty_strided(size, stride)
        noise.bernoulli_(1 - p)
        return noise.to(torch.bool)
    finally:
        torch.set_rng_state(current)


@dropout_mask_replay.register_fake
def _(state: torch.Tensor, size: list[int], stride: list[int], p: float) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=torch.bool, device=state.device)
