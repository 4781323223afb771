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
from memopt.codegen._triton import use_triton

__all__ = ["ADAMW_STATE_KEYS", "adam_coefficients", "torch_update_device", "init_adamw_state", "adamw_update", "adamw_group_step"]


def adam_coefficients(
    group: Mapping[str, Any], step: int, scale: float = 1.0, *, device: torch.device | None = None
) -> dict[str, Any]:
    """The scalars of AdamW step ``step`` (1-based) under ``group``'s options: ``beta1``,
    ``beta2``, ``eps``, ``step_size = lr * scale / (1 - beta1**step)``,
    ``bias_correction2_sqrt = (1 - beta2**step) ** 0.5`` and ``decay = 1 - lr * weight_decay``
    (decoupled weight decay), computed as torch's AdamW computes them: Python floats.

    Under ``torch.compile`` with ``device`` given (the caller's update is PyTorch ops, not
    a Triton kernel, which takes floats), ``step`` enters the formulas as a 0-dim float64
    tensor on ``device``, so ``step_size`` and ``bias_correction2_sqrt`` are 0-dim tensors
    that the compiled graph computes at run time (torch's own optimizers keep their step
    count in a tensor). As Python numbers, the symbolic ``step`` Dynamo makes of the
    count and the dynamic ``lr`` meet in ``lr / (1 - beta1**step)``, and torch 2.13's
    Inductor then either bakes the trace-time ``lr`` into the graph with no guard on it
    (an LR schedule keeps stepping with that value) or specializes the graph on ``lr``
    (a recompile per value); docs/optimizers.md, `torch.compile`. ``lr`` stays a Python
    float: Dynamo keeps a float dynamic where it meets tensors only, whereas turning it
    into a tensor (``torch.full``, ``torch.tensor``) specializes on it. Eager steps (not
    compiling) always get floats: their arithmetic is torch's AdamW's, bit for bit."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    count: int | torch.Tensor = step
    if device is not None and torch.compiler.is_compiling():
        # torch.full, not torch.as_tensor: Dynamo specializes as_tensor's argument (a
        # recompile per step), not full's fill value.
        count = torch.full((), step, dtype=torch.float64, device=device)
    return {
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
        "step_size": lr * scale / (1 - beta1**count),
        "bias_correction2_sqrt": (1 - beta2**count) ** 0.5,
        "decay": 1 - lr * group["weight_decay"],
    }


def torch_update_device(kernel: str, param: torch.Tensor) -> torch.device | None:
    """``param``'s device where its update runs as PyTorch ops under ``kernel`` (the
    ``device`` to give `adam_coefficients`), None where a Triton kernel runs it: those
    take Python floats."""
    return None if use_triton(kernel, param) else param.device


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
    c: Mapping[str, Any],
) -> None:
    """One AdamW step in place with coefficients ``c`` (`adam_coefficients`: floats, or
    0-dim tensors in a compiled step), bit-identical
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
    coefficients = adam_coefficients(group, state["step"], device=param.device)
    adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], coefficients)
