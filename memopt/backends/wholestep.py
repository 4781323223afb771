"""Whole-step planning across graph breaks, under a memory budget.

A graph break splits a training step into regions. Dynamo compiles each the first
time it runs, so when the first region is planned the later ones are unknown; yet its
saved values stay live while they run, and its outputs (say, the logits) are handed
to them. memopt plans such a step in three moves:

1. A region compiled while earlier regions of the step wait for their backward (their
   forward ran, their backward has not started) is planned with them in place
   (`memopt.plan.step_context.StepContext.earlier`): their saved values, as planned,
   are live throughout it.
2. A region with no waiting predecessor is planned alone, assuming the caller keeps
   its outputs through its backward: safe, but it may recompute more than the budget
   requires.
3. A `StepTracker` watches the regions run: forwards in order, then each backward
   (an autograd pre-hook on the region's backward node). When a step completes (every
   region's backward has started) with more than one region, and each non-final
   region's outputs were released before its backward (no storage of them alive when
   its backward starts: the next region consumed them), the non-final regions are
   compiled once more, at their next call, planned for the whole step
   (`StepContext.later`): their plan keeps room for the later regions' peak on top of
   their saved values. The later regions keep their plans, which the re-planned
   region took as given.

Re-planning happens at most once per compiled region, only under a memory budget,
and only for graphs with static shapes (it traces the Dynamo graph again on fake
copies of the example inputs). A step that does not follow the forward-in-order,
backward-in-reverse pattern (gradient accumulation, a forward with no backward, a
region whose outputs the caller keeps) is not used: those regions stay planned alone.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from memopt.backends.region import RegionCompiler
from memopt.failsoft import fail_soft
from memopt.graph import meta
from memopt.plan.step_context import RegionInStep, StepContext

__all__ = ["CompiledRegion", "StepTracker", "TRACKER"]

log = logging.getLogger("memopt")

Compile = Callable[[RegionCompiler, fx.GraphModule, Sequence[Any]], Callable[..., Any]]
"""Compiles a Dynamo graph (after the pre-autograd stage) with a region compiler."""


class CompiledRegion:
    """What the backend hands Dynamo for one region under a memory budget: the compiled
    callable, and what it needs to compile the region again for the whole step."""

    def __init__(
        self, compiler: RegionCompiler, compile: Compile, gm: fx.GraphModule, example_inputs: Sequence[Any]
    ) -> None:
        self.compiler = compiler
        earlier = tuple(view for view in (r.in_step() for r in TRACKER.waiting()) if view is not None)
        compiler.context = StepContext(earlier) if earlier else None
        self._compile = compile
        self._gm = gm
        self._fakes = _fake_copies(gm, example_inputs)
        self.fn = compile(compiler, gm, example_inputs)
        compiler.example_inputs = ()  # real tensors: not kept past the compile
        self.tracking = compiler.record.kind == "training"
        self.steps_seen = 0
        self.replanned = False
        self._step: list[CompiledRegion] | None = None  # set: re-plan in this step at the next call

    @property
    def name(self) -> str:
        return self.compiler.region

    @property
    def can_replan(self) -> bool:
        return self._fakes is not None and not self.replanned

    def in_step(self) -> RegionInStep | None:
        """The region as the planner sees it from another region (None if its
        pipeline did not run, e.g. a training region loaded from a cache)."""
        record = self.compiler.record
        if record.kind != "training" or record.step is None or record.step_before is None:
            return None
        if record.timeline_before is None or record.timeline_after is None:
            return None
        return RegionInStep(record.step_before, record.timeline_before, record.step, record.timeline_after)

    def replan_in(self, step: list[CompiledRegion]) -> None:
        """Compile again, planned for ``step`` (the regions in forward order), at the
        next call."""
        self._step = step

    def __call__(self, *args: Any) -> Any:
        if self._step is not None:
            self._replan(self._step)
        outputs = self.fn(*args)
        if self.tracking:
            TRACKER.forward_ran(self, args, outputs)
        return outputs

    def _replan(self, step: list[CompiledRegion]) -> None:
        self._step, self.replanned = None, True
        context = _context_of(step, step.index(self))
        assert self._fakes is not None
        old = self.compiler
        compiler = old.replanned(context, self._fakes)
        log.info("region %s: compiling again (%s)", self.name, context.describe())
        try:
            self.fn = self._compile(compiler, self._gm, self._fakes)
        except Exception as exc:  # noqa: BLE001 - fail soft, see memopt.failsoft
            compiler.hand_back_record(old)
            old.record.fallbacks.append(
                fail_soft(
                    "whole-step recompile", self.name, exc, strict=old.config.strict,
                    outcome="it keeps the plan made for it alone",
                )  # fmt: skip
            )
            return
        self.compiler = compiler
        for i, other in enumerate(step):
            if other is not self:
                other.compiler.place_in(_context_of(step, i))


def _context_of(step: list[CompiledRegion], i: int) -> StepContext:
    """Region ``i``'s context in ``step`` (regions in forward order, each with a
    plan: checked when the step completed), as planned now."""
    earlier, later = [r.in_step() for r in step[:i]], [r.in_step() for r in step[i + 1 :]]
    assert None not in earlier and None not in later
    return StepContext(tuple(earlier), tuple(later))  # type: ignore[arg-type]


def _fake_copies(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """Fake copies of the example inputs in Dynamo's fake mode, or None (the region is
    then never compiled again) when a shape is symbolic, an input is not a plain tensor
    (a symbol, a tensor subclass) or there is no Dynamo tracing context."""
    if any(meta.is_symbolic(ph) for ph in gm.graph.find_nodes(op="placeholder")):
        return None
    if not all(type(x) in (torch.Tensor, torch.nn.Parameter) for x in example_inputs):
        return None  # symbols, tensor subclasses: not re-traced
    tracing = torch._guards.TracingContext.try_get()
    if tracing is None or tracing.fake_mode is None:
        return None
    mode = tracing.fake_mode
    return tuple(mode.from_tensor(x, static_shapes=True) for x in example_inputs)


@dataclass(eq=False)
class _Run:
    """One forward run of a region whose backward is expected."""

    region: CompiledRegion
    outputs: list[StorageWeakRef]
    node: Callable[[], Any] | None = None
    """Weak reference to the region's backward node (None: not weakly referable)."""
    released: bool | None = None
    """Set when its backward starts: whether no output storage was alive then."""

    @property
    def abandoned(self) -> bool:
        """Its autograd graph is gone before its backward started (a forward whose
        result was dropped, e.g. an evaluation with gradients enabled)."""
        return self.released is None and self.node is not None and self.node() is None


@dataclass
class StepTracker:
    """Watches tracked regions run, forward then backward, and calls for whole-step
    re-planning when a step of several regions completes (module docstring)."""

    runs: list[_Run] = field(default_factory=list)
    backward_order: list[_Run] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def waiting(self) -> list[CompiledRegion]:
        """Regions of the current step whose forward ran and whose backward has not
        started, in forward order."""
        with self.lock:
            self._forget_abandoned()
            return [r.region for r in self.runs if r.released is None]

    def forward_ran(self, region: CompiledRegion, args: Sequence[Any], outputs: Any) -> None:
        tensors = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            return  # a run on fake tensors (memopt report, planning studies) allocates nothing
        node = _backward_node(tensors)
        if node is None:
            return  # no gradient flows back through this call: not part of a training step
        inputs = {_storage_key(p) for a in args if isinstance(a, torch.Tensor) for p in _plain(a)}
        plain = [p for t in tensors for p in _plain(t)]
        refs = [StorageWeakRef(p.untyped_storage()) for p in plain if _storage_key(p) not in inputs]
        run = _Run(region, refs, _weak(node))
        with self.lock:
            self._forget_abandoned()
            if any(r.region is region for r in self.runs):  # again before its backward: not one clean step
                self.runs, self.backward_order = [], []
            self.runs.append(run)
        # The hook reaches the node through the run's weak reference: a strong one would
        # make a cycle (node -> hook -> node) that keeps an abandoned graph alive.
        node.register_prehook(functools.partial(self._backward_starts, run))

    def _forget_abandoned(self) -> None:
        """Drop runs whose autograd graph is gone (call with the lock held)."""
        self.runs = [r for r in self.runs if not r.abandoned]

    def _backward_starts(self, run: _Run, grad_outputs: Any) -> None:
        node = run.node() if run.node is not None else None
        own = _saved_storages(node) if node is not None else set()  # die with its backward
        with self.lock:
            if run.released is not None or not any(r is run for r in self.runs):
                return None
            run.released = all(ref.expired() or ref.cdata in own for ref in run.outputs)
            self.backward_order.append(run)
            self._forget_abandoned()
            if any(r.released is None for r in self.runs):
                return None
            runs, order = self.runs, self.backward_order
            self.runs, self.backward_order = [], []
        _step_done(runs, order)
        return None


OBSERVED_STEPS = 3
"""Steps a region is watched for at most. The first step is also the compile step,
when Dynamo's tracing state may still hold a region's outputs: an inconclusive step
is not the last word."""


def _step_done(runs: list[_Run], order: list[_Run]) -> None:
    """A step completed. If it had several regions, in the clean pattern, and every
    non-final one released its outputs, re-plan those and stop watching; else stop
    watching regions seen in `OBSERVED_STEPS` steps (or in a one-region step)."""
    regions = [r.region for r in runs]
    for region in regions:
        region.steps_seen += 1
        region.tracking = len(runs) > 1 and region.steps_seen < OBSERVED_STEPS
    if len(runs) < 2:
        return
    if [id(r) for r in order] != [id(r) for r in reversed(runs)]:
        log.debug("backwards ran out of the reverse forward order; the step is not used for planning")
        return
    kept = [r.region.name for r in runs[:-1] if not r.released]
    if kept:
        log.debug("the outputs of region(s) %s were alive at their backward; the step is not used", ", ".join(kept))
        if not any(r.tracking for r in regions):
            log.info(
                "the outputs of region(s) %s stay alive through their backward (kept by the caller): "
                "the step's %d regions stay planned alone",
                ", ".join(kept),
                len(regions),
            )
        return
    for region in regions:
        region.tracking = False
    if any(r.in_step() is None for r in regions):
        log.info("a region of the step has no memory plan to compose; the step's regions stay planned alone")
        return
    targets = [r for r in regions[:-1] if r.can_replan]
    for region in targets:
        region.replan_in(regions)
    if targets:
        log.info(
            "the step runs %d regions (graph breaks between %s); region(s) %s will be compiled again "
            "at their next call, planned for the whole step",
            len(regions),
            " | ".join(r.name for r in regions),
            ", ".join(r.name for r in targets),
        )


def _backward_node(tensors: list[torch.Tensor]) -> Any:
    """The autograd node of the compiled region's backward (AOTAutograd's
    ``CompiledFunctionBackward``), reached from the outputs; None if no output needs
    a gradient."""
    nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
    for node in nodes:
        if "CompiledFunction" in type(node).__name__:
            return node
    return nodes[0] if nodes else None


def _weak(node: Any) -> Callable[[], Any] | None:
    try:
        return weakref.ref(node)
    except TypeError:  # a C++ autograd node
        return None


def _saved_storages(node: Any) -> set[int]:
    """The storages (`StorageWeakRef.cdata`) of what ``node`` saved for backward."""
    try:
        saved = node.saved_tensors
    except (AttributeError, RuntimeError):  # not a custom Function, or already freed
        return set()
    return {StorageWeakRef(t.untyped_storage()).cdata for t in saved if isinstance(t, torch.Tensor)}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s memory: itself, or for a wrapper subclass
    (a DTensor) the inner tensors it flattens to."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = [getattr(t, name) for name in names]
    return [p for i in inner if isinstance(i, torch.Tensor) for p in _plain(i)]


TRACKER = StepTracker()
"""The process's tracker (regions of all compiled models; runs are per step)."""
