"""Argument validation shared by memopt's optimizers.

Every check raises ``ValueError`` naming the optimizer, the argument, the bad value and the
allowed range, so a typo in a param group is caught when the group is added, not as a NaN
a thousand steps later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from memopt.codegen._triton import KERNEL_CHOICES

__all__ = [
    "UNSUPPORTED_ADAMW_FLAGS", "check_number", "check_int", "check_choice", "check_bool", "check_adamw_group",
    "is_sharded_optimizer",
]  # fmt: skip


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in [low, high] (``low_open``/``high_open``: exclude the
    bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{owner}: {name}={value!r} is not a number; expected {_interval(low, high, low_open, high_open)}")
    if math.isinf(value):
        raise ValueError(f"{owner}: {name}={value!r} is not finite; expected {_interval(low, high, low_open, high_open)}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected {_interval(low, high, low_open, high_open)}")
    return float(value)


def check_int(owner: str, name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (no upper bound when ``high`` is None)."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name}={value!r} is not an int; expected {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{owner}: {name}={value!r} is out of range; expected {allowed}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not valid; expected one of {choices}")
    return str(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name}={value!r} is not valid; expected True or False")
    return value


def check_adamw_group(owner: str, group: Mapping[str, Any]) -> None:
    """Check the AdamW keys every Adam-family group has (lr, betas, eps, weight_decay,
    kernel) and refuse the AdamW flags it would ignore (`UNSUPPORTED_ADAMW_FLAGS`)."""
    check_number(owner, "lr", group["lr"], low=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas={betas!r} is not valid; expected a pair (beta1, beta2)")
    check_number(owner, "betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_number(owner, "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    check_number(owner, "eps", group["eps"], low=0.0, low_open=True)
    check_number(owner, "weight_decay", group["weight_decay"], low=0.0)
    check_choice(owner, "kernel", group["kernel"], KERNEL_CHOICES)
    for flag in UNSUPPORTED_ADAMW_FLAGS:
        if group.get(flag, False):
            raise ValueError(
                f"{owner}: {flag}={group[flag]!r} is not supported (a param group sets it, as "
                f"torch.optim.AdamW accepts); expected False or absent. Drop it, or train those "
                "parameters with torch.optim.AdamW"
            )


UNSUPPORTED_ADAMW_FLAGS: tuple[str, ...] = ("amsgrad", "maximize")
"""``torch.optim.AdamW`` options that change the update and that memopt's Adam family does
not implement: a param group ported from an AdamW config that sets one is refused rather
than trained without it."""


def is_sharded_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a `memopt.distributed.ShardedOptimizer`, told without
    importing `memopt.distributed` (and torch.distributed with it): its inner optimizer
    gets this rank's gradients only inside its own ``step()``, so wrappers that read
    ``.grad`` or step one parameter at a time refuse it."""
    return type(optimizer).__name__ == "ShardedOptimizer" and hasattr(optimizer, "inner")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """``0 <= x < 1`` style text for an interval."""
    text = f"{low} {'<' if low_open else '<='} x"
    if high != math.inf:
        text += f" {'<' if high_open else '<='} {high}"
    return f"a number with {text}"
