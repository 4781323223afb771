"""Whether one of memopt's Triton kernels can run on a tensor, and in which mode.

A kernel runs compiled for CUDA tensors, or through Triton's interpreter for CPU tensors
when ``TRITON_INTERPRET=1`` is set (a debugging and testing aid: slow, tiny shapes).
The interpreter mode is read when a kernel is launched, not when it was defined, so a
test can switch it on after ``triton`` has been imported by someone else.

Every kernel module offers ``kernel="auto" | "triton" | "torch"``:

* ``"auto"``: Triton for CUDA tensors when Triton is installed, else the PyTorch reference;
* ``"triton"``: always Triton (CPU tensors need ``TRITON_INTERPRET=1``);
* ``"torch"``: always the PyTorch reference.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

__all__ = ["HAS_TRITON", "KERNEL_CHOICES", "use_triton", "interpreter_enabled", "launchable"]

HAS_TRITON: bool = triton is not None
KERNEL_CHOICES: tuple[str, ...] = ("auto", "triton", "torch")

_INTERPRETED: dict[Any, Any] = {}


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


def use_triton(kernel: str, tensor: torch.Tensor) -> bool:
    """Whether ``kernel`` (one of `KERNEL_CHOICES`) means "launch Triton" for ``tensor``.

    Raises ``ValueError`` for an unknown choice and ``RuntimeError`` when ``"triton"`` is
    forced where it cannot run.
    """
    if kernel == "auto":
        return HAS_TRITON and tensor.is_cuda
    if kernel == "torch":
        return False
    if kernel != "triton":
        raise ValueError(f"kernel={kernel!r} is not valid; expected one of {KERNEL_CHOICES}")
    if not HAS_TRITON:
        raise RuntimeError("kernel='triton' needs the triton package; install it or use kernel='torch'")
    if tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled()):
        return True
    raise RuntimeError(
        f"kernel='triton' cannot run on a {tensor.device} tensor: use CUDA tensors, or set "
        "TRITON_INTERPRET=1 to run on CPU through Triton's interpreter, or use kernel='torch'"
    )


def launchable(kernel: Any) -> Any:
    """``kernel`` (a ``triton.jit`` function) in the mode in force now: as defined, or
    wrapped by Triton's interpreter when ``TRITON_INTERPRET=1`` was set after definition.

    Kernels must not call other ``triton.jit`` functions, including those of triton's
    standard library (``tl.max``, ``tl.sum``, ``tl.cdiv``): when the interpreter is switched
    on after import, those stay compiled-mode functions that refuse to run. Builtins
    (``tl.maximum``, ``tl.dot``, ``tl.where``) are fine, and so is ``tl.reduce`` with a
    ``triton.jit`` combine function (the interpreter calls its Python body).
    """
    if not interpreter_enabled():
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]
