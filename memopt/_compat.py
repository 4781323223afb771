"""The torch versions memopt runs on, and every place where they differ.

memopt supports torch 2.11 through 2.13 (pyproject.toml). It uses some private torch
APIs (``torch._functorch``, ``torch._inductor``, ``torch.fx.experimental``); where one
of them differs across that range, this module is the only place that knows: one named
gate per difference, whose docstring says which versions have what and what the
fallback does. The rest of the package calls the gate, never ``hasattr(torch...)``.
``tests/test_compat.py`` pins each gate's choice on the installed torch and checks that
the fallback computes what the newer API does.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from typing import Any

import numpy as np
import torch
import torch.fx.experimental.symbolic_shapes as symbolic_shapes

__all__ = [
    "TORCH_VERSION",
    "HAS_OPTIMIZATION_HINT",
    "optimization_hint",
    "triton_version",
    "triton_interpreter_loops_to_runtime_bounds",
    "all_gather_single",
    "reduce_scatter_single",
    "dist_all_gather_single",
    "BACKWARD_FREES_INCOMING_GRADIENTS",
    "COMPILE_ISOLATES_RECOMPILES",
]

TORCH_VERSION: tuple[int, int] = tuple(int(part) for part in torch.__version__.split(".")[:2])  # type: ignore[assignment]
"""The installed torch's (major, minor)."""

HAS_OPTIMIZATION_HINT: bool = hasattr(symbolic_shapes, "optimization_hint")
"""Whether ``torch.fx.experimental.symbolic_shapes.optimization_hint`` exists (torch
2.12 and 2.13; not in 2.11)."""


BACKWARD_FREES_INCOMING_GRADIENTS: bool = TORCH_VERSION >= (2, 13)
"""Whether a compiled backward frees an incoming gradient (a tangent) after its last use
in the backward graph. torch 2.13 does (the boxed calling convention reaches it). In
torch 2.11 AOTAutograd's ``CompiledFunction.backward(ctx, *flat_args)`` holds the
gradients in its argument tuple until the backward returns, so each lives through the
whole backward, whatever the codegen, and so does torch 2.12 (checked: with this gate
forced True there, `tests/test_kept_outputs.py` measures 65 KiB above the estimate).
Measured on a region whose incoming gradient is
256 KiB (`tests/test_kept_outputs.py`: torch 2.11 peaks 256 KiB higher, at the
backward's last ops). `memopt.analysis.memory` keeps tangents live to the end of the
backward where this is False."""


COMPILE_ISOLATES_RECOMPILES: bool = "isolate_recompiles" in inspect.signature(torch.compile).parameters
"""Whether ``torch.compile`` takes ``isolate_recompiles=True`` (torch 2.13 does; it came
with pytorch/pytorch#178351, March 2026; 2.11.0 and 2.12.1 do not have it): that call's
compiled entries are kept apart from every other ``torch.compile`` of the same code,
and count against no other call's ``recompile_limit``. `memopt.explain` compiles with it where it exists: each call is a
new backend, so without it every ``explain`` of a model adds an entry to the cache of
the model's ``forward``, and after 8 (Dynamo's ``recompile_limit``) both ``explain``
and the user's own ``torch.compile`` of that model run eagerly, compiling nothing.
Without it ``explain`` compiles as before (docs/usage.md, "What memopt did")."""


def optimization_hint(value: Any) -> int:
    """An int for a possibly symbolic size, without adding a guard: the example input's
    value for a backed symbol, a guess for an unbacked (data-dependent) one.

    torch 2.12 and 2.13 have ``symbolic_shapes.optimization_hint(a)``: backed symbols take their
    hint; unbacked ones take ``torch._inductor.config.unbacked_symint_fallback`` (8192),
    with heuristics that keep related expressions consistent. torch 2.11 lacks it; the
    fallback is ``symbolic_shapes.size_hint(a, fallback=unbacked_symint_fallback)``: the
    same hint for backed symbols, and the same fallback value for each unbacked symbol
    (without 2.13's consistency heuristics). memopt uses the result for memory estimates
    only.
    """
    if HAS_OPTIMIZATION_HINT:
        return int(symbolic_shapes.optimization_hint(value))
    from torch._inductor.config import unbacked_symint_fallback

    return int(symbolic_shapes.size_hint(value, fallback=unbacked_symint_fallback))


def _functional_collective(new: str, old: str) -> Any:
    """``torch.distributed._functional_collectives.<new>``, or ``<old>`` where it is missing."""
    import torch.distributed._functional_collectives as funcol

    return getattr(funcol, new) if hasattr(funcol, new) else getattr(funcol, old)


all_gather_single = _functional_collective("all_gather_single", "all_gather_tensor")
"""``torch.distributed._functional_collectives``' all-gather along a dimension into
one tensor, ``(tensor, gather_dim, group)``. torch 2.13 names it ``all_gather_single``
(``all_gather_tensor`` is a deprecated wrapper that warns outside compilation); torch
2.11 has only ``all_gather_tensor``. Same op (``_c10d_functional.all_gather_into_tensor``)
in both."""

reduce_scatter_single = _functional_collective("reduce_scatter_single", "reduce_scatter_tensor")
"""Reduce-scatter along a dimension, ``(tensor, reduce_op, scatter_dim, group)``: torch
2.13's ``reduce_scatter_single``, torch 2.11's ``reduce_scatter_tensor`` (a deprecated
wrapper in 2.13). Same op (``_c10d_functional.reduce_scatter_tensor``) in both."""


def dist_all_gather_single(output: torch.Tensor, piece: torch.Tensor, group: Any) -> None:
    """``torch.distributed``'s in-place all-gather of ``piece`` from every rank into
    ``output`` (concatenated along dimension 0). torch 2.13 names it
    ``all_gather_single`` (``all_gather_into_tensor`` is deprecated there); torch 2.11
    has only ``all_gather_into_tensor``."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, piece, group=group)


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """The installed triton's (major, minor), None when it is not installed (read from
    its metadata: triton is not imported)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:2])  # type: ignore[return-value]


@functools.cache
def triton_interpreter_loops_to_runtime_bounds() -> bool:
    """Whether Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) can run a loop
    whose bound is a runtime int argument (``for i in range(0, rows, BLOCK)``), as
    memopt's low-rank Adam kernel does.

    The interpreter holds a scalar argument as a numpy array of shape (1,). Triton 3.7
    (torch 2.12's) and 3.9 (torch 2.13's) squeeze it before ``int()``; triton 3.6
    (torch 2.11's) does not, and numpy >= 2.4 refuses ``int()`` of a 1-d array ("only
    0-dimensional arrays can be converted to Python scalars"). So: False for triton 3.6
    with numpy >= 2.4. Compiled kernels (CUDA) are not affected. There is no fallback in the
    package: the interpreter is a testing aid, and the tests that need it skip, naming
    this reason (numpy < 2.4 makes them run)."""
    version = triton_version()
    if version is None:
        return False
    if version >= (3, 7):
        return True
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return False
    return True
