"""Calls of one compiled training region whose backward has not started yet.

A region's plan is for one call per backward: its saved activations live from its
forward to its backward. A step that calls the region again before that backward
(a DPO or contrastive loss over two forwards of one model, ``loss = f(model(a),
model(b))``; a compiled block applied several times by eager code, as with shared
weights) holds every pending call's saved activations at once, beside the latest call's peak,
so the step's peak exceeds what a plan for one call, and ``memory_budget``, counted.
`PendingCalls` counts those calls, so that the region is planned again for them
(`memopt.plan.step_context.StepContext.repeats`), or says why it cannot be
(`memopt.backends.watched.CompiledRegion`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from memopt.backends.steptracker import backward_node
from memopt.units import format_bytes

__all__ = ["PendingCalls", "repeated_call_message"]


@dataclass(eq=False)
class _Call:
    node: Callable[[], Any]
    """Weak reference to the call's backward node."""
    started: bool = False
    """Its backward started (the node's pre-hook ran)."""
    parameters: frozenset[int] = frozenset()
    """The ``id()`` of the parameters it ran on."""
    forward: int | None = None
    """When it ran, on the step tracker's clock (`RegionRecord.last_forward`), when
    recorded."""
    sources: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Where its inputs came from (`RegionRecord.input_sources`), when recorded."""


class PendingCalls:
    """The calls of one region whose autograd graph is alive and whose backward has not
    started. Weak references only: counting keeps no graph alive."""

    def __init__(self) -> None:
        self._calls: list[_Call] = []

    def count(self) -> int:
        """How many calls are pending now."""
        return len(self.pending())

    def pending(self) -> list[_Call]:
        """The calls pending now, in the order they ran."""
        self._calls = [c for c in self._calls if not c.started and c.node() is not None]
        return list(self._calls)

    def add(self, outputs: Any, parameters: frozenset[int] = frozenset()) -> _Call | None:
        """Note a call on ``parameters`` (their ``id()``) that returned ``outputs``, and
        return it (None: nothing to note without a backward, or on fake tensors)."""
        tensors = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            return None
        node = backward_node(tensors)
        if node is None:
            return None
        try:
            call = _Call(weakref.ref(node), parameters=parameters)
        except TypeError:  # a C++ autograd node: not weakly referable
            return None
        self._calls.append(call)
        node.register_prehook(functools.partial(_started, call))
        return call


def _started(call: _Call, grad_outputs: Any) -> None:
    call.started = True


def repeated_call_message(
    region: str, pending: int, planned: int, saved_bytes: int, budget_bytes: int | None, peak_bytes: int, why: str
) -> str:
    """The warning for a region called while ``pending`` earlier calls wait for their
    backward, planned for ``planned + 1`` calls, that cannot be planned again (``why``)."""
    budget = "" if budget_bytes is None else f" (memory_budget {format_bytes(budget_bytes)})"
    extra = pending - planned
    return (
        f"region {region} ran again before the backward of its previous call ({pending} call(s) pending): "
        f"memopt planned it for {planned + 1} call(s) per backward{budget}, estimated peak "
        f"{format_bytes(peak_bytes)}, and cannot plan it again: {why}. Each pending call keeps its saved "
        f"activations ({format_bytes(saved_bytes)} a call under this plan) until its backward, so the step's "
        f"peak is higher by about {format_bytes(extra * saved_bytes)} and "
        "the budget does not hold. Fix: call the model once on the inputs concatenated along the batch "
        "(torch.cat: a DPO or contrastive loss's two batches), or backward each call's loss before the next "
        "call, or lower memory_budget by that much (docs/remat.md, Limits). Warned once per region."
    )
