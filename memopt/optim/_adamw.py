"""AdamW arithmetic shared by memopt's Adam-family optimizers.

* `adam_coefficients`: the per-step scalars (bias corrections folded in) that the plain
  update and the fused kernels in `memopt.codegen` take; the one place that computes them.
* `adamw_group_step`: plain AdamW for the parameters a memory-efficient optimizer leaves at
  full precision (biases, norms, embeddings, small tensors), op for op as
  ``torch.optim.AdamW(foreach=False)``, so those parameters train exactly as under torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from memopt.codegen._chunks import pieces

__all__ = ["ADAMW_STATE_KEYS", "adam_coefficients", "init_adamw_state", "adamw_update", "adamw_group_step"]


def adam_coefficients(group: Mapping[str, Any], step: int, scale: float = 1.0) -> dict[str, float]:
    """The scalars of AdamW step ``step`` (1-based) under ``group``'s options: ``beta1``,
    ``beta2``, ``eps``, ``step_size = lr * scale / (1 - beta1**step)``,
    ``bias_correction2_sqrt = (1 - beta2**step) ** 0.5`` and ``decay = 1 - lr * weight_decay``
    (decoupled weight decay), computed as torch's AdamW computes them."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    return {
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
        "step_size": lr * scale / (1 - beta1**step),
        "bias_correction2_sqrt": (1 - beta2**step) ** 0.5,
        "decay": 1 - lr * group["weight_decay"],
    }


ADAMW_STATE_KEYS: frozenset[str] = frozenset({"step", "exp_avg", "exp_avg_sq"})
"""The state of a parameter that gets plain AdamW (`init_adamw_state`)."""


def init_adamw_state(param: torch.Tensor) -> dict[str, Any]:
    """Fresh AdamW state: step 0 and two zero moments shaped and typed like ``param``."""
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: Mapping[str, float],
) -> None:
    """One AdamW step in place with coefficients ``c`` (`adam_coefficients`), bit-identical
    to torch's single-tensor AdamW; over pieces of the elements (`memopt.codegen._chunks`),
    so its temporaries are at most one piece, not the parameter's size."""
    for p, g, m, v in pieces(param, grad, exp_avg, exp_avg_sq):
        p.mul_(c["decay"])
        m.lerp_(g, 1 - c["beta1"])
        v.mul_(c["beta2"]).addcmul_(g, g, value=1 - c["beta2"])
        denom = (v.sqrt() / c["bias_correction2_sqrt"]).add_(c["eps"])
        p.addcdiv_(m, denom, value=-c["step_size"])


def adamw_group_step(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: Mapping[str, Any]
) -> None:
    """Initialize ``state`` if empty, count the step, and apply `adamw_update` with the
    options of param group ``group``."""
    if not state:
        state.update(init_adamw_state(param))
    state["step"] += 1
    adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], adam_coefficients(group, state["step"]))
