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

from typing import Any

import torch
import torch.fx.experimental.symbolic_shapes as symbolic_shapes

__all__ = ["TORCH_VERSION", "HAS_OPTIMIZATION_HINT", "optimization_hint"]

TORCH_VERSION: tuple[int, int] = tuple(int(part) for part in torch.__version__.split(".")[:2])  # type: ignore[assignment]
"""The installed torch's (major, minor)."""

HAS_OPTIMIZATION_HINT: bool = hasattr(symbolic_shapes, "optimization_hint")
"""Whether ``torch.fx.experimental.symbolic_shapes.optimization_hint`` exists (torch
2.13; not in 2.11)."""


def optimization_hint(value: Any) -> int:
    """An int for a possibly symbolic size, without adding a guard: the example input's
    value for a backed symbol, a guess for an unbacked (data-dependent) one.

    torch 2.13 has ``symbolic_shapes.optimization_hint(a)``: backed symbols take their
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
