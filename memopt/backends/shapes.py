"""A region compiled for dynamic shapes under a budget in bytes: warn when a call is
larger than the shapes its plan was made for.

Dynamo compiles a frame for dynamic shapes once a second input shape reaches it (or at
once with ``dynamic=True``), and that one compile serves every shape from then on.
memopt plans it once, sizing every value by the example inputs' sizes (the hints,
`memopt.analysis.aliasing.concrete_int`): a later call with a longer sequence or a
larger batch runs the same plan on larger tensors, and its peak can pass a budget
given in bytes with nothing said. `watch_shapes` wraps such a region so that the first
call larger than the traced shapes warns, once per region, naming the input, both
sizes and the fix. A fractional budget is a fraction of the peak at whatever shape
runs and is not watched.

An inference region (no gradient: ``torch.no_grad()``, evaluation, each decoding step
of ``model.generate``, whose key/value cache grows by one position a call) keeps
nothing for backward, so no plan lowers its peak: the budget was only checked at the
traced sizes. Its warning says so, and names the fixes that apply to it: neither a
plan per shape (``dynamic=False`` compiles every decoding step's cache length anew,
until Dynamo's recompile limit runs the rest eagerly) nor a fractional budget (not
applied to inference regions) would keep its peak within the budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.backends.region import RegionCompiler
from memopt.errors import MemoptBudgetWarning
from memopt.graph import meta
from memopt.units import format_bytes

__all__ = ["watch_shapes"]


@dataclass(frozen=True)
class _Bound:
    """One tensor input of symbolic shape: its position, its name, its traced shape and
    number of elements (what a call's is compared with)."""

    index: int
    name: str
    traced: tuple[int, ...]
    limit: int


def _bounds(region: RegionCompiler, gm: fx.GraphModule) -> list[_Bound]:
    bounds = []
    for index, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = meta.fake_value(node)
        name = region.inputs[index].name if index < len(region.inputs) else f"input {index}"
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            shape = tuple(concrete_int(s) for s in value.shape)
            bounds.append(_Bound(index, name, shape, int(torch.Size(shape).numel())))
    return bounds


class _ShapeWatch:
    """``fn`` with a check of its inputs' sizes against ``bounds`` until one passes."""

    def __init__(
        self, fn: Callable[..., Any], region: RegionCompiler, bounds: list[_Bound], budget: int, *, inference: bool
    ) -> None:
        self.fn, self.region, self.bounds, self.budget = fn, region, bounds, budget
        self.inference = inference
        self.warned = False

    def __call__(self, *args: Any) -> Any:
        if not self.warned:
            self._check(args)
        return self.fn(*args)

    def _check(self, args: Sequence[Any]) -> None:
        for bound in self.bounds:
            value = args[bound.index] if bound.index < len(args) else None
            if not isinstance(value, torch.Tensor) or value.numel() <= bound.limit:
                continue
            self.warned = True
            warnings.warn(self._message(bound, tuple(value.shape)), MemoptBudgetWarning, stacklevel=2)
            return

    def _message(self, bound: _Bound, shape: tuple[int, ...]) -> str:
        """The warning for a call passing ``shape`` where ``bound`` was traced."""
        traced = f"{bound.name} of shape {bound.traced}. This call passes shape {shape}, larger than"
        if self.inference:
            return (
                f"inference region {self.region.region} was compiled for dynamic shapes, and memory_budget "
                f"{format_bytes(self.budget)} was checked once, at the sizes it was traced with: {traced} those, so "
                f"its peak can exceed the budget. An inference region keeps nothing for backward: no plan lowers its "
                f"peak, at any shape (dynamic=False would compile each shape anew, e.g. every decoding step of "
                f"generate, and a fractional budget is not applied to inference regions). Keep the inputs within "
                f"the sizes that fit (batch, sequence; for generate, the prompt plus max_new_tokens), or raise "
                f"memory_budget to the peak at the largest size (memopt.explain at that size reports it). Warned "
                f"once per region."
            )
        return (
            f"region {self.region.region} was compiled for dynamic shapes and planned once, for "
            f"memory_budget {format_bytes(self.budget)} at the sizes it was traced with: {traced} the plan is "
            f"made for, so the step's peak can exceed the budget. Compile with torch.compile(..., "
            f"dynamic=False) for a plan per shape, or pad the inputs to one size (the largest), or give "
            f"memory_budget as a fraction of the peak. Warned once per region."
        )


def watch_shapes(fn: Callable[..., Any], region: RegionCompiler, gm: fx.GraphModule) -> Callable[..., Any]:
    """``fn``, or, for a region of dynamic shapes under a budget in bytes, ``fn`` that
    warns once when called with a tensor of more elements than the example of its
    placeholder in ``gm`` (Dynamo's graph, whose example values carry the symbolic
    shapes; the example inputs are of the traced sizes only; a symbolic int alone, such as a position offset, is not a
    size memopt planned by)."""
    budget = region.config.memory_budget
    if not isinstance(budget, int) or isinstance(budget, bool):
        return fn
    bounds = _bounds(region, gm)
    if not bounds:
        return fn
    watch = _ShapeWatch(fn, region, bounds, budget, inference=region.record.kind == "inference")
    return torch._dynamo.disable(watch, reason="memopt's compiled region")
