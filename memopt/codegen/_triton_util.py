"""Can a Triton kernel run on these tensors?

Two ways a Triton kernel runs: compiled for a CUDA device, or executed by Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, for tests). The interpreter is
chosen when ``@triton.jit`` runs, that is when the module defining the kernel is
imported (triton 3.9 reads ``triton.knobs.runtime.interpret`` in ``triton.jit``'s
decorator, not per launch): setting the variable after that import has no effect on
that module's kernels. `kernel_is_interpreted` tells which kind a kernel object is.

Self-contained on purpose: nothing here imports triton at module import.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

__all__ = [
    "triton_importable",
    "interpreter_enabled",
    "kernel_is_interpreted",
    "triton_unavailable_reason",
    "can_run_triton",
]


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` can succeed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter mode is switched on now (``TRITON_INTERPRET=1``).

    Kernels decorated before the switch stay compiled kernels; see
    `kernel_is_interpreted`.
    """
    if not triton_importable():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def kernel_is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` object) runs in Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot run on ``tensors``; ``None`` when it can.

    It can when triton is importable and either every tensor is on CUDA, or every
    tensor is on CPU and the interpreter is enabled.
    """
    if not triton_importable():
        return "triton is not installed (pip install triton; Linux only)"
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        if interpreter_enabled():
            return None
        return "the tensors are on CPU and TRITON_INTERPRET=1 is not set"
    return f"the tensors are on devices {sorted(devices)}; Triton needs all on cuda (or all on cpu with TRITON_INTERPRET=1)"


def can_run_triton(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensors`` (see `triton_unavailable_reason`)."""
    return triton_unavailable_reason(*tensors) is None
