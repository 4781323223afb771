"""Whole-step planning across graph breaks under a memory budget, and the observation
of region calls that it shares with memopt's recorded step estimate.

A graph break splits a training step into regions. Dynamo compiles each the first
time it runs, so when the first region is planned the later ones are unknown; yet its
saved values stay live while they run, and its outputs (say, the logits) are handed
to them. memopt plans such a step in four moves:

1. A region compiled while earlier regions of the step wait for their backward (their
   forward ran, their backward has not started) is planned with them in place
   (`memopt.plan.step_context.StepContext.earlier`): their saved values, as planned,
   are live throughout it.
2. A region with no waiting predecessor is planned alone, assuming the caller keeps
   its outputs through its backward: safe, but it may recompute more than the budget
   requires.
3. `TRACKER`, a `StepTracker`, observes the regions run, forwards in order, then
   each backward (below, "Observing a call"): which of a region's outputs the caller
   keeps, and which inputs of a region are an earlier region's outputs. When a step
   completes (every region's backward has started) with more than one region, the
   non-final regions are compiled once more, at their next call, planned for the
   whole step (`StepContext.later`, with the kept outputs and input sources
   observed): their plan keeps room for the later regions' peak on top of their
   saved values, and counts the outputs the caller keeps as live after the step and
   the others as handed on. The final region keeps its plan, which the re-planned
   regions take as given, unless it was planned (move 1) without outputs the step
   shows the caller keeps: it assumed them handed on, so its budget was a fraction
   of another step peak, and it is compiled again too, after the others (its next
   call comes after theirs), so that every region plans against the same step.

4. A step planned so stays watched: the plan assumed the outputs the caller did not
   keep handed on, and holds as long as the caller keeps no more. When a later step
   keeps an output the plan assumed handed on (a loop whose first step ran
   ``loss = model(**x).loss`` and whose later steps run ``out = model(**x)``), the
   regions are compiled again as in move 3, planned for the outputs either step kept,
   at most `MAX_REPLANS` compiles per region; past that they keep their plan and
   warn once (`MemoptWarning`, at the first region's next call). A step that keeps
   fewer outputs changes nothing, and so does a change in the final region's kept
   outputs (they are live after the step either way).

A region compiled while it may still be planned again (moves 1 and 2) holds its
`MemoptBudgetWarning`s until it keeps its plan (a provisional plan may judge a budget
infeasible that its step meets); a region compiled again for its step holds them too.
When a step completes with no re-plan to come, its regions emit what they hold, the
budget warnings of several regions as one for the step (`_settle_step`): planned as a
whole, they state the same budget and step peak.

Re-planning happens only under a memory budget, and only for graphs with static shapes
(it traces the Dynamo graph again on fake copies of the example inputs). A step that
does not follow the forward-in-order, backward-in-reverse pattern (gradient
accumulation, a forward with no backward) is not used: before a decision its regions
stay planned alone, after one it changes nothing. Nor is a step that mixes regions
planned for another step with others (a branch after a graph break that runs another
loss region): the planned regions keep the plan for their step. A step in which the caller keeps
outputs is used from the second step on: during the compile step Dynamo's tracing
state may still hold a region's outputs.

Observing a call. The tracker observes a call of a `WatchedRegion` that is
``tracking`` (a `CompiledRegion` until its step is decided, and while its step is
watched, move 4) or ``recording`` (below). A call with a backward (not a run on fake
tensors) is observed in full; a call without one (inference, fake tensors) only for
its inputs' sources and its outputs' storages (the second item), which is all a
recorded estimate needs of it:

* its outputs, by weak reference: the tensor, and its storages that are not the
  call's inputs. When the region's backward starts (an autograd pre-hook on its
  backward node) an output is *kept* by the caller if the tensor object is alive, or
  a storage of it that the region does not save for its own backward is (the caller
  keeps a view; a storage the region saves is alive then anyway). The graphs cannot
  tell: the Python code after a graph break may drop an output once the next region
  has read it (hidden states handed on) or keep it (a Hugging Face model's output
  object holds the logits and the key/value caches, and the user's
  ``out = model(**x); out.loss.backward()`` keeps ``out`` through backward);
* its inputs that are a live output storage of an earlier observed call, of this
  step or an earlier one (GPT-2's loss region saves the logits its first region
  returns: when the caller keeps them too, the two are one storage, counted once).

Recording. While memopt records (`memopt.explain`, `memopt.record`), a region
compiled then is ``recording``: every call of it is observed, for as long as the
compiled region lives (after the ``record()`` block too: its record holds the latest
observation), through a `CompiledRegion`, or a `WatchedRegion` around the compiled
callable of a region planned without one, and the observation goes to the region's
current record (a region compiled again has a new one): ``RegionRecord.input_sources``
at the forward
(inference calls and calls on fake tensors included: an inference step's loss region
takes the logits the region before it returned),
``RegionRecord.kept_outputs`` (the latest step's) when its backward starts. The
step's composed timeline (`memopt.analysis.compose.compose_timelines`) keeps the kept
outputs live after the step and counts each such input once. A call that is only
recorded takes no part in step decisions (it neither joins, restarts nor holds up the
step of the tracking regions), and an error in observing it is dropped: the
observation never breaks a step. The compile step's observation can over-report, as
above; loops that run two steps or more record the steady state.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from memopt.backends.record import RegionRecord
from memopt.backends.region import RegionCompiler
from memopt.errors import MemoptBudgetWarning, MemoptRanksError, MemoptWarning
from memopt.failsoft import fail_soft
from memopt.graph import meta
from memopt.plan.step_context import RegionInStep, StepContext
from memopt.units import format_bytes

__all__ = ["CompiledRegion", "StepTracker", "TRACKER", "WatchedRegion", "one_step"]

log = logging.getLogger("memopt")

Compile = Callable[[RegionCompiler, fx.GraphModule, Sequence[Any]], Callable[..., Any]]
"""Compiles a Dynamo graph (after the pre-autograd stage) with a region compiler."""


class WatchedRegion:
    """A compiled region whose calls `TRACKER` may observe: ``fn`` (Dynamo's calling
    convention) called through it. A region compiled while memopt records
    (`memopt.explain`, `memopt.record`) is ``recording``: every call writes its
    observation to the region's current record (where its inputs came from; for a
    call with a backward, the outputs the caller kept; module docstring,
    "Recording"). On its own it takes no part in step decisions (a `CompiledRegion`
    does, while ``tracking``); a region neither recording nor tracking runs
    unobserved."""

    tracking: bool = False
    """Whether its calls take part in whole-step decisions (only a `CompiledRegion`'s
    do: until the tracker has decided about its step, and after a decision that
    planned its step again, move 4)."""

    def __init__(self, compiler: RegionCompiler, fn: Callable[..., Any]) -> None:
        self.compiler = compiler
        self.fn = fn
        self.recording = compiler.recording

    @property
    def name(self) -> str:
        return self.compiler.region

    def record_to(self) -> RegionRecord | None:
        """The record a call's observation goes to: the current compiler's (a region
        compiled again has a new record), or None when it is not ``recording``."""
        return self.compiler.record if self.recording else None

    def __call__(self, *args: Any) -> Any:
        outputs = self.fn(*args)
        TRACKER.forward_ran(self, args, outputs)
        return outputs


class CompiledRegion(WatchedRegion):
    """What the backend hands Dynamo for one region under a memory budget: the compiled
    callable, and what it needs to compile the region again for the whole step."""

    def __init__(
        self, compiler: RegionCompiler, compile: Compile, gm: fx.GraphModule, example_inputs: Sequence[Any]
    ) -> None:
        earlier = tuple(view for view in (r.in_step() for r in TRACKER.waiting()) if view is not None)
        compiler.context = StepContext(earlier) if earlier else None
        self._compile = compile
        self._gm = gm
        self._fakes = _fake_copies(gm, example_inputs)
        provisional = self._fakes is not None and not _ONE_STEP.get()  # it may be planned again (module docstring)
        with _holding_budget_warnings(provisional) as held:
            fn = compile(compiler, gm, example_inputs)
        super().__init__(compiler, fn)
        compiler.example_inputs = ()  # real tensors: not kept past the compile
        self.tracking = compiler.record.kind == "training"
        self._held = held
        self._held_at = (next(_COMPILES), 0)  # (compile order, calls before it)
        if not self.tracking:
            self.settle()  # no step to wait for
        self.steps_seen = 0
        self.calls = 0
        self.replans = 0
        self._step: tuple[list[CompiledRegion], _Observed] | None = None  # set: re-plan at the next call
        self._warning: str | None = None  # set: warn at the next call
        self.decided: tuple[tuple[CompiledRegion, ...], _Observed] | None = None
        """The step (its regions in forward order) and the observation this region's
        plan is for, once the tracker has decided about a step of several regions."""

    @property
    def can_replan(self) -> bool:
        return self._fakes is not None and self.replans < MAX_REPLANS

    def in_step(self) -> RegionInStep | None:
        """The region as the planner sees it from another region (None if its
        pipeline did not run, e.g. a training region loaded from a cache)."""
        record = self.compiler.record
        if record.kind != "training" or record.step is None or record.step_before is None:
            return None
        if record.timeline_before is None or record.timeline_after is None:
            return None
        return RegionInStep(record.step_before, record.timeline_before, record.step, record.timeline_after)

    def planned_without(self, observed: _Observed) -> bool:
        """Whether its plan assumed handed on an earlier region's outputs that
        ``observed`` shows the caller keeps (it was planned in a context with no
        observations, move 1, or with a step that kept fewer)."""
        context = self.compiler.context
        planned = context.kept_outputs if context is not None else ()
        return any(
            kept - ((planned[i] or frozenset()) if i < len(planned) else frozenset())
            for i, kept in enumerate(observed.kept_outputs[:-1])
        )

    def replan_in(self, step: list[CompiledRegion], observed: _Observed) -> None:
        """Compile again, planned for ``step`` (the regions in forward order, run as
        ``observed``), at the next call."""
        self._step = (step, observed)

    def warn_at_next_call(self, message: str) -> None:
        """Warn (`MemoptWarning`) at the region's next forward call, outside the backward
        in which the tracker decided it (an error raised from an autograd hook would
        stop that backward midway)."""
        self._warning = message

    def __call__(self, *args: Any) -> Any:
        if self._warning is not None:
            message, self._warning = self._warning, None
            warnings.warn(message, MemoptWarning, stacklevel=2)
        if self._step is not None:
            self._replan(self._step)
        self.calls += 1
        if self._held and self.calls > self._held_at[1] + OBSERVED_STEPS + 1:
            self.settle()  # no step of it completed since its compile: it keeps its plan
        return super().__call__(*args)

    def settle(self) -> None:
        """The region keeps the plan it has: emit the budget warnings its compile held."""
        _emit(self.take_held())

    def take_held(self) -> list[warnings.WarningMessage]:
        """The warnings its compile held (they are then no longer held)."""
        held, self._held = self._held, []
        return held

    def _replan(self, planned: tuple[list[CompiledRegion], _Observed]) -> None:
        self._step = None
        self.replans += 1
        step, observed = planned
        context = _context_of(step, step.index(self), observed)
        assert self._fakes is not None
        old = self.compiler
        compiler = old.replanned(context, self._fakes)
        log.info("region %s: compiling again (%s)", self.name, context.describe())
        try:
            with _holding_budget_warnings(True) as held:  # emitted once for the step (`_settle_step`)
                self.fn = self._compile(compiler, self._gm, self._fakes)
        except MemoptRanksError:
            raise  # the ranks no longer compile together: keeping the old plan would mismatch their collectives
        except Exception as exc:  # noqa: BLE001 - fail soft, see memopt.failsoft
            self.settle()
            compiler.hand_back_record(old)
            old.record.fallbacks.append(
                fail_soft(
                    "whole-step recompile", self.name, exc, strict=old.config.strict,
                    outcome="it keeps the plan made for it alone",
                )  # fmt: skip
            )
            return
        self.compiler = compiler
        self._held = held  # the step's plan replaces the one the earlier ones were about
        self._held_at = (next(_COMPILES), self.calls)
        for i, other in enumerate(step):
            if other is not self:
                other.compiler.place_in(_context_of(step, i, observed))


@dataclass(frozen=True)
class _Observed:
    """How a step's regions ran (`StepContext.kept_outputs`, ``input_sources``)."""

    kept_outputs: tuple[frozenset[int], ...]
    input_sources: tuple[dict[int, tuple[int, int]], ...]

    def covers(self, other: _Observed) -> bool:
        """Whether a plan made for this observation holds for a step run as ``other``
        (the same regions): every output of a non-final region it shows kept is kept
        here too (an output kept here and handed on there only leaves the plan room;
        the final region's outputs are live after the step either way)."""
        pairs = zip(self.kept_outputs[:-1], other.kept_outputs[:-1], strict=True)
        return all(theirs <= ours for ours, theirs in pairs)

    def merged(self, other: _Observed) -> _Observed:
        """The outputs either kept, with ``other``'s input sources (the same regions)."""
        kept = tuple(ours | theirs for ours, theirs in zip(self.kept_outputs, other.kept_outputs, strict=True))
        return _Observed(kept, other.input_sources)


def _context_of(step: list[CompiledRegion], i: int, observed: _Observed) -> StepContext:
    """Region ``i``'s context in ``step`` (regions in forward order, each with a
    plan: checked when the step completed), as planned now."""
    earlier, later = [r.in_step() for r in step[:i]], [r.in_step() for r in step[i + 1 :]]
    assert None not in earlier and None not in later
    return StepContext(tuple(earlier), tuple(later), observed.kept_outputs, observed.input_sources)  # type: ignore[arg-type]


_ONE_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("memopt_one_step", default=False)


@contextlib.contextmanager
def one_step() -> Iterator[None]:
    """Regions compiled inside run one step and are then dropped (`memopt.explain`):
    none is planned again, so none holds its budget warnings (it warns as it compiles,
    as its report says its plan is over the budget)."""
    token = _ONE_STEP.set(True)
    try:
        yield
    finally:
        _ONE_STEP.reset(token)


@contextlib.contextmanager
def _holding_budget_warnings(hold: bool) -> Iterator[list[warnings.WarningMessage]]:
    """While compiling a region that whole-step planning may plan again (planned
    alone, or before its step was observed): collect its `MemoptBudgetWarning`s
    instead of emitting them (such a plan may judge a budget infeasible that its step
    meets); every other warning passes. The caller emits them (`_emit`) once the region keeps its plan."""
    if not hold:
        yield []
        return
    held: list[warnings.WarningMessage] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # type: ignore[assignment]
            warnings.simplefilter("always", MemoptBudgetWarning)
            yield held
    finally:
        held.extend(w for w in caught if issubclass(w.category, MemoptBudgetWarning))
        _emit([w for w in caught if not issubclass(w.category, MemoptBudgetWarning)])


def _emit(caught: Sequence[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


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


@dataclass(frozen=True)
class _Source:
    """An output of an earlier run, as a later run's input."""

    run: int
    """The producing run's `_Run.serial`."""
    region: str
    output: int
    """Its output position."""


@dataclass(eq=False)
class _Run:
    """One forward run of a watched region: one whose backward is expected (``node``
    set), or, only while recording, one without (inference, fake tensors), kept for
    where later runs' inputs came from."""

    region: WatchedRegion
    serial: int
    """Distinct for every run the tracker has seen."""
    outputs: dict[int, OutputRefs]
    """Output position -> weak references to the output (`OutputRefs`)."""
    sources: dict[int, _Source]
    """Input position -> the earlier run's output it was, for the inputs that were a
    live output storage of a watched run (of this step or an earlier one)."""
    node: Callable[[], Any] | None = None
    """Weak reference to the region's backward node (None: not weakly referable)."""
    kept: frozenset[int] | None = None
    """Set when its backward starts, for a run of the tracked step: the output
    positions the caller still held."""

    @property
    def abandoned(self) -> bool:
        """Its autograd graph is gone before its backward started (a forward whose
        result was dropped, e.g. an evaluation with gradients enabled)."""
        return self.kept is None and self.node is not None and self.node() is None


@dataclass(frozen=True)
class OutputRefs:
    """Weak references to one output of a region call: the tensor, and the plain
    storages holding it that are not the call's inputs."""

    tensor: Callable[[], Any]
    storages: tuple[StorageWeakRef, ...]

    @classmethod
    def of(cls, t: torch.Tensor, inputs: set[int]) -> OutputRefs | None:
        """None when every storage of ``t`` is an input (returned as it came in)."""
        storages = tuple(StorageWeakRef(p.untyped_storage()) for p in _plain(t) if _storage_key(p) not in inputs)
        return cls(weakref.ref(t), storages) if storages else None

    def kept(self, own: Callable[[], set[int]]) -> bool:
        """Whether the caller holds this output as its region's backward starts: the
        tensor object, or a storage of it that the region (whose saved storages
        ``own()`` returns, asked only when a storage outlived the tensor) does not save
        for its own backward, is alive."""
        if self.tensor() is not None:
            return True
        alive = [s for s in self.storages if not s.expired()]
        return bool(alive) and any(s.cdata not in own() for s in alive)


def kept_outputs(outputs: dict[int, OutputRefs], node: Callable[[], Any] | None) -> frozenset[int]:
    """The positions of ``outputs`` the caller holds when the backward of ``node`` (a
    weak reference to the region's backward node) starts."""
    owner = node() if node is not None else None

    @functools.cache
    def own() -> set[int]:  # unpacks every saved tensor: only when a storage outlived its output
        return _saved_storages(owner) if owner is not None else set()

    return frozenset(pos for pos, refs in outputs.items() if refs.kept(own))


MAX_PRODUCED = 4096
"""Output storages `StepTracker.produced` holds at most (the oldest go first)."""


@dataclass
class StepTracker:
    """Observes the calls of watched regions, forward then backward: fills the
    records of those that are recording, and calls for whole-step re-planning when a
    step of several tracking regions completes, or a step planned so keeps more
    outputs than its plan assumed (module docstring)."""

    runs: list[_Run] = field(default_factory=list)
    """The current step's runs of tracking regions, in forward order."""
    backward_order: list[_Run] = field(default_factory=list)
    produced: dict[int, tuple[StorageWeakRef, _Source]] = field(default_factory=dict)
    """The live output storages of watched runs, most recent last: storage
    (`StorageWeakRef.cdata`) -> (a weak reference to it, the output)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    serials: Iterator[int] = field(default_factory=itertools.count)
    """`_Run.serial`s, in order; also the time of a recording region's backward start
    (`RegionRecord.last_backward`)."""

    def waiting(self) -> list[CompiledRegion]:
        """Regions of the current step whose forward ran and whose backward has not
        started, in forward order."""
        with self.lock:
            self._forget_abandoned()
            return _regions([r for r in self.runs if r.kept is None])

    def forward_ran(self, region: WatchedRegion, args: Sequence[Any], outputs: Any) -> None:
        """``region`` returned ``outputs`` for ``args``. Observed when the region is
        tracking or recording: a recording one's input sources go to its record now
        (for every call, inference and fake tensors included), and, when the call has
        a backward, its kept outputs when that backward starts (on fake tensors too:
        `memopt report` and `memopt.fit` then count outputs the caller holds, such as a
        Hugging Face model's logits, as a real run does); a tracking region's run with a
        backward (not on fake tensors) joins the current step. For a region
        that is only recording, an error is logged and dropped: its observation never
        breaks a step."""
        record = region.record_to()
        if not region.tracking and record is None:
            return
        try:
            self._observe(region, record, args, outputs)
        except Exception:  # noqa: BLE001 - see the docstring
            if region.tracking:
                raise
            log.debug("region %s: its call was not observed", region.name, exc_info=True)

    def _observe(self, region: WatchedRegion, record: RegionRecord | None, args: Sequence[Any], outputs: Any) -> None:
        tensors = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        node = None if fake and record is None else _backward_node(tensors)
        if node is None:
            # No backward to watch: no gradient flows back through this call (inference),
            # or it ran on fake tensors in a region that is not recording.
            # While recording, where its inputs came from is noted, for the step estimate:
            # an input that an earlier region returned is not a step input.
            if record is not None:
                with self.lock:
                    run = _Run(region, next(self.serials), _output_refs(args, outputs), self._sources(args))
                    self._remember(run)
                record.input_sources = {pos: (s.region, s.output) for pos, s in run.sources.items()}
                record.last_forward = run.serial
            return
        with self.lock:
            run = _Run(region, next(self.serials), _output_refs(args, outputs), self._sources(args), _weak(node))
            self._remember(run)
            if region.tracking and not fake:  # a step on fake tensors is recorded, not planned
                self._forget_abandoned()
                if any(r.region is region for r in self.runs):  # again before its backward: not one clean step
                    self.runs, self.backward_order = [], []
                self.runs.append(run)
        if record is not None:
            record.input_sources = {pos: (s.region, s.output) for pos, s in run.sources.items()}
            record.last_forward = run.serial
        # The hook reaches the node through the run's weak reference: a strong one would
        # make a cycle (node -> hook -> node) that keeps an abandoned graph alive.
        node.register_prehook(functools.partial(self._backward_starts, run))

    def _forget_abandoned(self) -> None:
        """Drop runs whose autograd graph is gone (call with the lock held)."""
        self.runs = [r for r in self.runs if not r.abandoned]

    def _sources(self, args: Sequence[Any]) -> dict[int, _Source]:
        """Input position -> the live output of a watched run that the input's storage
        is (call with the lock held)."""
        found = {}
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor) and not is_traceable_wrapper_subclass(a):
                entry = self.produced.get(StorageWeakRef(a.untyped_storage()).cdata)
                if entry is not None and not entry[0].expired():
                    found[pos] = entry[1]
        return found

    def _remember(self, run: _Run) -> None:
        """Note ``run``'s output storages, for the inputs of later runs; forget the
        storages that died (call with the lock held)."""
        for key in [k for k, (ref, _) in self.produced.items() if ref.expired()]:
            del self.produced[key]
        for pos, out in run.outputs.items():
            for ref in out.storages:
                self.produced.pop(ref.cdata, None)  # its place: most recent last
                self.produced[ref.cdata] = (ref, _Source(run.serial, run.region.name, pos))
        while len(self.produced) > MAX_PRODUCED:
            del self.produced[next(iter(self.produced))]

    def _backward_starts(self, run: _Run, grad_outputs: Any) -> None:
        kept = kept_outputs(run.outputs, run.node)
        if (record := run.region.record_to()) is not None:
            record.kept_outputs = kept  # the latest step's observation
            record.last_backward = next(self.serials)
        with self.lock:
            if run.kept is not None or not any(r is run for r in self.runs):
                return None
            run.kept = kept
            self.backward_order.append(run)
            self._forget_abandoned()
            if any(r.kept is None for r in self.runs):
                return None
            runs, order = self.runs, self.backward_order
            self.runs, self.backward_order = [], []
        _step_done(runs, order)
        return None


_COMPILES = itertools.count()
"""Orders the compiles whose budget warnings regions hold."""

MAX_REPLANS = 3
"""Compiles of a region planned for its step, at most: the first, and one for each
later step whose caller keeps outputs the plan assumed handed on."""

OBSERVED_STEPS = 3
"""Steps a region is watched for at most. The first step is also the compile step,
when Dynamo's tracing state may still hold a region's outputs: an inconclusive step
is not the last word."""


def _step_done(runs: list[_Run], order: list[_Run]) -> None:
    """A step completed. If it had several regions, in the clean pattern (and, when the
    caller kept outputs, it was not the compile step), re-plan the non-final ones (the
    final one too if it assumed kept outputs handed on) and go on watching them (move
    4); else stop watching regions seen in `OBSERVED_STEPS` steps (or in a one-region
    step). Regions that keep their plan emit the warnings they held."""
    regions = _regions(runs)
    try:
        _decide(runs, order, regions)
    finally:
        if not any(region._step is not None for region in regions):  # else they wait for the re-planned step
            _settle_step([r for r in regions if not r.tracking or r.decided is not None])


def _settle_step(regions: list[CompiledRegion]) -> None:
    """The regions of one step (in forward order) keep their plans: emit the warnings
    they held, the `MemoptBudgetWarning`s of several regions once for the step.
    Planned as a whole, every region states the same budget and the same step peak
    (a region compiled before another's re-plan restates its estimates for the step
    as now planned, `RegionCompiler.place_in`); that is said once, with what holds the
    peak and the advice of the region compiled last (it saw the others' plans as they
    are). Regions whose figures differ are named with theirs, in one warning; each
    region once, with its latest warning."""
    held = [(r, w) for r in regions for w in r.take_held()]
    stated = [(r, w) for r, w in held if isinstance(w.message, MemoptBudgetWarning) and w.message.statement]
    _emit([w for r, w in held if all(w is not v for _, v in stated)])
    latest = {r.name: (r, w) for r, w in stated}  # a region that held two (a re-plan's too) is named once
    budget = list(latest.values())
    if len(budget) < 2:
        _emit([w for _, w in budget])
        return
    last = max(budget, key=lambda rw: rw[0]._held_at)[1]
    figures = [(r.name, *_planned_figures(r, w.message)) for r, w in budget]  # type: ignore[arg-type]
    warning = _step_budget_warning(figures, last.message)  # type: ignore[arg-type]
    warnings.warn_explicit(warning, MemoptBudgetWarning, last.filename, last.lineno, source=last.source)


def _planned_figures(region: CompiledRegion, held: MemoptBudgetWarning) -> tuple[int | None, int | None]:
    """The region's budget and peak as its step is planned now (its record's plan),
    else as its warning stated them."""
    plan = region.compiler.record.plan
    if plan is None:
        return held.budget_bytes, held.min_feasible_peak
    return plan.budget_bytes, plan.estimated_peak_after


def _step_budget_warning(
    figures: list[tuple[str, int | None, int | None]], last: MemoptBudgetWarning
) -> MemoptBudgetWarning:
    """One warning for the budget warnings of a step's regions: ``figures`` (region,
    budget, peak as planned), in forward order; ``last``: the warning of the region
    compiled last."""
    names = [name for name, _, _ in figures]
    regions = f"{', '.join(names[:-1])} and {names[-1]}"
    if len({(b, p) for _, b, p in figures}) == 1:
        message = (
            f"memory_budget {format_bytes(last.budget_bytes)} is infeasible for the step of regions {regions} "
            f"(compiled apart, planned as a whole: each region states this budget and this peak, the step's): "
            f"{last.statement}"
        )
    else:
        stated = "; ".join(f"region {n}: budget {format_bytes(b)}, peak {format_bytes(p)}" for n, b, p in figures)
        message = (
            f"memory_budget is infeasible for the step of regions {regions} (compiled apart), whose plans "
            f"state different budgets or peaks: {stated}. For region {last.region}, compiled last: {last.statement}"
        )
    warning = MemoptBudgetWarning(message)
    warning.region, warning.statement = regions, last.statement
    warning.budget_bytes, warning.min_feasible_peak = last.budget_bytes, last.min_feasible_peak
    return warning


def _decide(runs: list[_Run], order: list[_Run], regions: list[CompiledRegion]) -> None:
    """`_step_done`'s decision: stop watching, wait for another step, re-plan, or (a
    step already planned) re-plan again when the caller now keeps outputs the plan
    assumed handed on."""
    decided = _decided(regions)
    for region in regions:
        region.steps_seen += 1
        # A region planned for its step is watched whatever this step was (move 4).
        region.tracking = region.decided is not None or (len(runs) > 1 and region.steps_seen < OBSERVED_STEPS)
    if len(runs) < 2:
        return
    if decided is None and any(r.decided is not None for r in regions):
        log.debug("a step mixes regions planned for another step with others; it is not used for planning")
        return
    if [id(r) for r in order] != [id(r) for r in reversed(runs)]:
        log.debug("backwards ran out of the reverse forward order; the step is not used for planning")
        return
    kept = [r.region.name for r in runs[:-1] if r.kept]
    if decided is None and kept and min(r.steps_seen for r in regions) < 2:
        log.debug("the outputs of region(s) %s were alive at their backward in the compile step; "
                  "waiting for the next step", ", ".join(kept))  # fmt: skip
        return
    if decided is None and any(r.in_step() is None for r in regions):
        for region in regions:
            region.tracking = False
        log.info("a region of the step has no memory plan to compose; the step's regions stay planned alone")
        return
    index = {r.serial: i for i, r in enumerate(runs)}
    observed = _Observed(
        tuple(r.kept or frozenset() for r in runs),
        tuple({pos: (index[s.run], s.output) for pos, s in r.sources.items() if s.run in index} for r in runs),
    )
    if decided is not None:
        if decided.covers(observed):
            return  # the plan holds for this step
        observed = decided.merged(observed)
    targets = [r for r in regions[:-1] if r.can_replan]
    if regions[-1].can_replan and regions[-1].planned_without(observed):
        targets.append(regions[-1])  # compiled after the others: it sees their new plans
    step = (tuple(regions), observed)
    for region in regions:
        region.tracking = bool(targets)  # a re-planned step stays watched (module docstring)
        region.decided = step if targets else None
    for region in targets:
        region.replan_in(regions, observed)
    if targets and decided is not None:
        log.info(
            "the caller now keeps output(s) of region(s) %s that the step's plan assumed handed on; "
            "region(s) %s will be compiled again at their next call, planned for the step as now run",
            ", ".join(runs[i].region.name for i, k in enumerate(observed.kept_outputs[:-1]) if k - decided.kept_outputs[i]),
            ", ".join(r.name for r in targets),
        )
    elif targets:
        log.info(
            "the step runs %d regions (graph breaks between %s); region(s) %s will be compiled again "
            "at their next call, planned for the whole step",
            len(regions),
            " | ".join(r.name for r in regions),
            ", ".join(r.name for r in targets),
        )
    elif decided is not None:
        regions[0].warn_at_next_call(
            f"the caller now keeps outputs of the regions {', '.join(r.name for r in regions)} that their "
            f"memory plan assumed handed on, and they were planned again {MAX_REPLANS} times already: they "
            "keep their plan, which may exceed memory_budget. Keep (or drop) a model's outputs the same way "
            "in every training step."
        )


def _decided(regions: list[CompiledRegion]) -> _Observed | None:
    """The observation the regions' plans are for, when they were decided together as
    this step (the same regions, in this order); else None."""
    decided = regions[0].decided
    if decided is None or len(decided[0]) != len(regions):
        return None
    if any(a is not b or b.decided is not decided for a, b in zip(decided[0], regions)):
        return None
    return decided[1]


def _regions(runs: list[_Run]) -> list[CompiledRegion]:
    """The regions of ``runs``, runs of tracking regions (only a `CompiledRegion` tracks)."""
    regions = []
    for run in runs:
        assert isinstance(run.region, CompiledRegion)
        regions.append(run.region)
    return regions


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


def _output_refs(args: Sequence[Any], outputs: Any) -> dict[int, OutputRefs]:
    """Output position -> `OutputRefs` of a call's tensor outputs (those not returned as
    they came in)."""
    inputs = {_storage_key(p) for a in args if isinstance(a, torch.Tensor) for p in _plain(a)}
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return {pos: r for pos, t in enumerate(outs) if isinstance(t, torch.Tensor) and (r := OutputRefs.of(t, inputs))}


def _storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (a fake tensor's too, whose data pointers are
    all 0), as `StorageWeakRef.cdata` gives it."""
    return StorageWeakRef(t.untyped_storage()).cdata


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
