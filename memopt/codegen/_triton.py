"""Whether one of memopt's Triton kernels can run on some tensors, and in which mode.

A kernel runs compiled for CUDA tensors, or through Triton's interpreter for CPU
tensors when ``TRITON_INTERPRET=1`` is set (a debugging and testing aid: slow, tiny
shapes). Triton reads that variable in ``@triton.jit``, when the module defining a
kernel is imported (triton 3.9 reads ``triton.knobs.runtime.interpret`` there), so a
kernel defined before the switch is a compiled-mode kernel. The two kernel families
deal with that differently:

* the optimizer kernels (`memopt.codegen.adam8bit`, `lowrank_adam`) are launched
  through `launchable`, which wraps a compiled-mode kernel in the interpreter when the
  switch is on now: a test can turn the interpreter on after ``triton`` was imported.
  That needs kernels that call no other ``triton.jit`` function (see `launchable`);
* the quantization kernels (`memopt.codegen.quantize_triton`) call ``tl.max`` and
  friends, so they run in the mode they were defined in: `kernel_is_interpreted` tells
  which, and their tests run them in a subprocess started with the variable set.

Every optimizer kernel module offers ``kernel="auto" | "triton" | "torch"``:

* ``"auto"``: Triton for CUDA tensors when Triton is installed, else the PyTorch reference;
* ``"triton"``: always Triton (CPU tensors need ``TRITON_INTERPRET=1``);
* ``"torch"``: always the PyTorch reference.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

__all__ = [
    "FP_FUSION",
    "HAS_TRITON",
    "KERNEL_CHOICES",
    "use_triton",
    "interpreter_enabled",
    "launchable",
    "kernel_is_interpreted",
    "triton_unavailable_reason",
    "can_run_triton",
    "device_guard",
]

HAS_TRITON: bool = triton is not None
KERNEL_CHOICES: tuple[str, ...] = ("auto", "triton", "torch")

FP_FUSION: dict[str, bool] = {"adam8bit": False, "quantize": False, "lowrank_adam": True}
"""``enable_fp_fusion`` each kernel family passes at launch (whether the compiler may
contract a multiply and an add into one FMA, rounded once). Given explicitly: Triton 3.9
warns at the first compile of a kernel launched without it, and Triton 3.10 turns its
default from on to off. Off where the kernel must round as its PyTorch reference does
(separate multiplies and adds): the 8-bit step, whose codes flip at a midpoint when a
value moves by an ulp, and the quantization kernels. On for the low-rank step, which
is compared with its reference within a tolerance and multiplies matrices (``tl.dot``).
Triton's interpreter ignores the option (it computes in numpy, op by op)."""

_INTERPRETED: dict[Any, Any] = {}


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is switched on now (``TRITON_INTERPRET=1``);
    kernels defined before the switch stay compiled-mode kernels (module docstring)."""
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


def kernel_is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` object) runs in Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot run on ``tensors``; ``None`` when it can: triton is
    installed and either every tensor is on CUDA, or every tensor is on CPU and the
    interpreter is on."""
    if not HAS_TRITON:
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


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make ``tensor``'s CUDA device the current one while a kernel is launched (a
    no-op for CPU tensors). Triton launches on the current device and its current
    stream, not on the device of the pointers it is given: a kernel for tensors on
    ``cuda:1`` launched while ``cuda:0`` is current runs on device 0 with device 1's
    pointers (an illegal address, or a race with ``cuda:1``'s stream)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
