"""The compiled regions that whole-step planning can compile again: `WatchedRegion`, a
compiled region whose calls a `StepTracker` observes, and `CompiledRegion`, one compiled
under a memory budget that keeps what it needs to be planned again for its whole step
(`memopt.backends.wholestep`, moves 1 to 4), and holds its `MemoptBudgetWarning`s while
its plan may still change.

A region is handed the tracker that observes it (the backend hands it
`memopt.backends.wholestep.TRACKER`); it is told what to do by the whole-step decision
(`replan_in`, `warn_at_next_call`, `settle`) and carries it out at its next call.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from memopt.backends.record import EarlierCall, RegionRecord
from memopt.backends.ranks import RanksCompiledOtherGraphs
from memopt.backends.region import RegionCompiler, grads_held
from memopt.backends.repeats import PendingCalls, repeated_call_message
from memopt.backends.steptracker import StepTracker, Watched
from memopt.errors import MemoptBudgetWarning, MemoptOptimizerError, MemoptRanksError, MemoptWarning
from memopt.failsoft import Fallback, fail_soft
from memopt.graph import meta
from memopt.plan.step_context import RegionInStep, StepContext
from memopt.units import format_bytes

__all__ = [
    "CompiledRegion", "MAX_REPLANS", "OBSERVED_STEPS", "Observed", "WatchedRegion",
    "compiled_regions", "emit", "one_step", "planned_for_their_step", "regions_compiled",
]  # fmt: skip

log = logging.getLogger("memopt")

Compile = Callable[[RegionCompiler, fx.GraphModule, Sequence[Any]], Callable[..., Any]]
"""Compiles a Dynamo graph (after the pre-autograd stage) with a region compiler."""

_COMPILES = itertools.count()
"""Orders the compiles whose budget warnings regions hold."""

MAX_REPLANS = 3
"""Compiles of a region planned for its step, at most: the first, and one for each
later step whose caller keeps outputs the plan assumed handed on."""

OBSERVED_STEPS = 3
"""Steps a region is watched for at most. The first step is also the compile step,
when Dynamo's tracing state may still hold a region's outputs: an inconclusive step
is not the last word."""


class WatchedRegion:
    """A compiled region whose calls ``tracker`` may observe: ``fn`` (Dynamo's calling
    convention) called through it. A region compiled while memopt records
    (`memopt.explain`, `memopt.record`) is ``recording``: every call writes its
    observation to the region's current record (where its inputs came from; for a
    call with a backward, the outputs the caller kept; `memopt.backends.steptracker`,
    "Recording"). On its own it takes no part in step decisions (a `CompiledRegion`
    does, while ``tracking``); a region neither recording nor tracking runs
    unobserved."""

    tracking: bool = False
    """Whether its calls take part in whole-step decisions (only a `CompiledRegion`'s
    do: until the tracker has decided about its step, and after a decision that
    planned its step again, `memopt.backends.wholestep`, move 4)."""

    def __init__(self, compiler: RegionCompiler, fn: Callable[..., Any], tracker: StepTracker) -> None:
        self.compiler = compiler
        self.fn = fn
        self.tracker = tracker
        self.recording = compiler.recording
        self._pending = PendingCalls()  # calls whose backward has not started

    @property
    def name(self) -> str:
        return self.compiler.region

    def record_to(self) -> RegionRecord | None:
        """The record a call's observation goes to: the current compiler's (a region
        compiled again has a new record), or None when it is not ``recording``."""
        return self.compiler.record if self.recording else None

    def __call__(self, *args: Any) -> Any:
        in_backward = self.compiler.config.optimizer_in_backward is not None
        watch = in_backward or self.recording
        parameters = self._parameter_ids(args) if watch else frozenset()
        earlier: list[EarlierCall] = []
        if watch and (pending := self._pending.pending()):
            if in_backward:
                self._refuse_update_before_pending(len(pending))
            record = self.record_to()
            if record is not None:  # the step estimate holds every pending call's saved activations
                record.repeats = max(record.repeats, len(pending))
                earlier = [EarlierCall(c.forward, c.parameters == parameters, c.sources) for c in pending]
        outputs = self.fn(*args)
        call = self._pending.add(outputs, parameters) if watch else None
        self.tracker.forward_ran(self, args, outputs)
        record = self.record_to()
        if call is not None and record is not None:  # a call with a backward: the latest step's observation
            call.forward, call.sources = record.last_forward, dict(record.input_sources)
            record.earlier_calls = tuple(earlier)
        return outputs

    def _parameter_ids(self, args: Sequence[Any]) -> frozenset[int]:
        """The ``id()`` of the parameters among a call's ``args``."""
        return frozenset(id(a) for info, a in zip(self.compiler.inputs, args) if info.kind == "parameter")

    def _refuse_update_before_pending(self, pending: int) -> None:
        """Raise: the region runs again while ``pending`` earlier calls wait for their
        backward, and it updates its parameters in its backward (``optimizer_in_backward``):
        the first backward to run would change the weights the others need."""
        raise MemoptOptimizerError(
            f"optimizer_in_backward: region {self.name} ran again before the backward of its previous call "
            f"({pending} call(s) pending, e.g. loss = f(model(a), model(b))). The first of their backwards "
            "updates the parameters in place, and the other calls' backwards need the weights as they were "
            "(torch would fail with 'modified by an inplace operation'). Fix: call the model once on the "
            "inputs concatenated along the batch (torch.cat), or drop optimizer_in_backward and call "
            "opt.step() after backward."
        )


class CompiledRegion(WatchedRegion):
    """What the backend hands Dynamo for one region under a memory budget: the compiled
    callable, and what it needs to compile the region again for the whole step."""

    def __init__(
        self,
        compiler: RegionCompiler,
        compile: Compile,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        tracker: StepTracker,
        alone: bool = False,
    ) -> None:
        if not alone:
            waiting = compiled_regions(tracker.waiting())
            earlier = tuple(view for view in (r.in_step() for r in waiting) if view is not None)
            compiler.context = StepContext(earlier) if earlier else None
        self._compile = compile
        self._gm = gm
        self._fakes = _fake_copies(gm, example_inputs)
        self._unplanned_grads_warned = False
        self._optimizer_size = _optimizer_size(compiler.config.step_optimizer)
        """Parameters the step's optimizer held when the plan read it (None: no optimizer)."""
        # It may be planned again (memopt.backends.wholestep, moves 1 and 2):
        provisional = self._fakes is not None and not _ONE_STEP.get() and not alone
        with _holding_budget_warnings(provisional) as held:
            fn = compile(compiler, gm, example_inputs)
        super().__init__(compiler, fn, tracker)
        compiler.example_inputs = ()  # real tensors: not kept past the compile
        self.tracking = compiler.record.kind == "training" and not alone
        """``alone`` (``plan_across_graph_breaks=False``): planned by itself, never for
        a step of several regions; it is still planned again for gradients held
        (`_count_held_grads`)."""
        self._held = held
        self.held_at = (next(_COMPILES), 0)  # (compile order, calls before it)
        """When the compile whose warnings it holds ran: which of a step's regions
        compiled last (`memopt.backends.wholestep`), and how long it waits for a step."""
        if not self.tracking:
            self.settle()  # no step to wait for
        self.steps_seen = 0
        self.calls = 0
        self.replans = 0
        self._step: tuple[list[CompiledRegion], Observed] | None = None  # set: re-plan at the next call
        self._warning: str | None = None  # set: warn at the next call
        self._warned_repeat = False
        self.decided: tuple[tuple[CompiledRegion, ...], Observed] | None = None
        """The step (its regions in forward order) and the observation this region's
        plan is for, once the tracker has decided about a step of several regions."""
        if (compiled := _COMPILED.get()) is not None:
            compiled.append(self)

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

    def planned_without(self, observed: Observed) -> bool:
        """Whether its plan assumed handed on an earlier region's outputs that
        ``observed`` shows the caller keeps (it was planned in a context with no
        observations, `memopt.backends.wholestep`, move 1, or with a step that kept
        fewer), or fewer calls before one backward than ``observed`` ran."""
        context = self.compiler.context
        planned = context.kept_outputs if context is not None else ()
        if (context.repeats if context is not None else 0) < observed.repeats:
            return True  # planned for fewer calls before one backward
        return any(
            kept - ((planned[i] or frozenset()) if i < len(planned) else frozenset())
            for i, kept in enumerate(observed.kept_outputs[:-1])
        )

    def planned_before_grads(self, step: list[CompiledRegion]) -> bool:
        """Whether the regions before it in ``step`` (forward order) now count
        parameters' held ``.grad`` (gradient accumulation, `_count_held_grads`) that
        they did not when its plan took them in place: the step's peak, and a
        fractional budget of it, rose since. A region with no parameter's gradient of
        its own to find (a loss region after a graph break) is never planned again for
        them by its own call."""
        context = self.compiler.context
        if context is None or not context.earlier or self not in step:
            return False
        planned = frozenset().union(*(r.step_before.grads_held for r in context.earlier))
        held = frozenset().union(*(r.compiler.grads_held for r in step[: step.index(self)]))
        return bool(held - planned)

    def replan_in(self, step: list[CompiledRegion], observed: Observed) -> None:
        """Compile again, planned for ``step`` (the regions in forward order, run as
        ``observed``), at the next call."""
        self._step = (step, observed)

    @property
    def replan_pending(self) -> bool:
        """Whether it is to be compiled again at its next call (`replan_in`)."""
        return self._step is not None

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
            self._replan(self._step, args)
        training = self.compiler.record.kind == "training"  # a re-plan keeps the kind
        if training:
            self._count_held_grads(args)
            self._check_optimizer()
        self.calls += 1
        if self._held and self.calls > self.held_at[1] + OBSERVED_STEPS + 1:
            self.settle()  # no step of it completed since its compile: it keeps its plan
        if not training:
            return super().__call__(*args)
        pending = self._pending.count()
        if pending:
            if self.compiler.config.optimizer_in_backward is not None:
                self._refuse_update_before_pending(pending)
            self._plan_repeated_calls(pending)
        outputs = self.fn(*args)
        # Its backward pre-hook goes first: the tracker's may raise (a budget warning
        # the user's filter makes an error), and the call must not stay pending then.
        self._pending.add(outputs)
        self.tracker.forward_ran(self, args, outputs)
        return outputs

    def _plan_repeated_calls(self, pending: int) -> None:
        """The region runs while ``pending`` earlier calls of it wait for their backward
        (`memopt.backends.repeats`): each holds its saved activations, so a plan for
        fewer calls does not hold the budget. A region that is its step alone is
        compiled again now, planned for this many calls under one plan
        (`StepContext.repeats`): this call and every later one run it (the pending
        calls ran the earlier plan, so this step's peak may still be above the budget;
        the next ones are not). A region of a step of several (a graph break) is
        planned with the others when the step's backward completes, for the next step
        (`memopt.backends.wholestep`). Where it cannot be compiled again, warn once,
        with the bytes and the fixes."""
        context = self.compiler.context
        planned = context.repeats if context is not None else 0
        if pending <= planned:
            return
        others = [r for r in self.tracker.waiting() if r is not self]  # other regions of this step, so far
        alone = not others and (context is None or not (context.earlier or context.later)) and self.decided is None
        if not alone and self.tracking and self.can_replan:
            return  # when this step's backward completes, its regions are planned for its calls (`wholestep`)
        if self.can_replan and alone:
            assert self._fakes is not None
            repeated = StepContext(repeats=pending) if context is None else dataclasses.replace(context, repeats=pending)
            old = self.compiler
            compiler = old.replanned(repeated, self._fakes)
            log.info("region %s: compiling again (%d earlier call(s) wait for their backward)", self.name, pending)
            if self._compile_again(old, compiler, hold=self.tracking):
                return
            why = "compiling it again failed (see the warning before this one)"
        elif self._fakes is None:
            why = "it cannot be traced again (its inputs have dynamic shapes or are not plain tensors)"
        elif not self.can_replan:
            why = f"it was planned again {self.replans} times already (MAX_REPLANS)"
        else:
            why = (
                f"it is one of several regions of its step ({_step_of_several(others)}), and its steps did not run "
                "in the pattern memopt plans (every region's forward, again for each call, then the backwards in "
                "reverse order)"
            )
        self._warn_repeated_call(pending, planned, why)

    def _warn_repeated_call(self, pending: int, planned: int, why: str) -> None:
        """Warn (once per region) that ``pending`` calls wait for their backward, more
        than the ``planned`` the plan counts, and why it is not planned again."""
        record = self.compiler.record
        if self._warned_repeat or record.timeline_after is None:
            return
        self._warned_repeat = True
        timeline = record.timeline_after
        saved = sum(iv.nbytes for iv in timeline.saved_activations())  # the region's own timeline: one call's
        budget = record.plan.budget_bytes if record.plan is not None else None
        message = repeated_call_message(self.name, pending, planned, saved, budget, timeline.peak_bytes, why)
        warnings.warn(MemoptBudgetWarning(message), stacklevel=4)

    def _count_held_grads(self, args: Sequence[Any]) -> None:
        """Gradient accumulation: a step that starts with parameters' ``.grad`` set
        (a later micro-batch, or gradients zeroed with ``set_to_none=False``) holds
        those gradients throughout, beside the ones its backward returns, so its peak
        is theirs above the plan's. Compile again, planned with them in the baseline,
        when the call finds such gradients the plan did not count (once: the plan then
        holds for a step that starts without them too, whose peak is lower).

        In a step of several regions planned as a whole each region counts its own
        parameters' gradients when it is called, the first before the later ones have:
        the later ones are planned with the earlier ones' new plans, the earlier ones
        restate their estimates for the step as now planned and are planned again at
        their next call (the next micro-batch), as after the step's first re-plan."""
        held = grads_held(self.compiler.inputs, args)
        if held <= self.compiler.grads_held:
            return
        if not self.can_replan:
            self._warn_unplanned_grads(args, held - self.compiler.grads_held)
            return
        old = self.compiler
        context = old.context
        if self.decided is not None:  # the other regions as they are planned now
            regions, observed = self.decided
            step = list(regions)
            context = _context_of(step, step.index(self), observed)
        assert self._fakes is not None
        compiler = old.replanned(context, self._fakes)
        compiler.grads_held = old.grads_held | held
        log.info("region %s: compiling again (%d parameters hold .grad: gradient accumulation)", self.name, len(held))
        if not self._compile_again(old, compiler, hold=self.tracking or self.decided is not None):
            return
        if self.decided is not None:
            for i, other in enumerate(step):
                if other is self:
                    continue
                stale = i > step.index(self) and other.can_replan and other.planned_before_grads(step)
                other.compiler.place_in(_context_of(step, i, observed))
                if other.can_replan and (i < step.index(self) or stale):
                    other.replan_in(step, observed)  # a later one at its call in this micro-batch

    def _shown_budget(self) -> str:
        """The region's ``memory_budget`` as a warning names it (bytes as a size)."""
        budget = self.compiler.config.memory_budget
        return format_bytes(budget) if isinstance(budget, int) else repr(budget)

    def _check_optimizer(self) -> None:
        """Once per region: the step's optimizer (``options={"optimizer": opt}`` or
        ``optimizer_in_backward``) holds another number of parameters than when the plan
        read it (``add_param_group`` after the first call): the plan counts neither the new
        parameters' state nor their update, and nothing recompiles the region for them.
        Say so, and how to have the step planned again."""
        if self._optimizer_size is None:
            return
        now = _optimizer_size(self.compiler.config.step_optimizer)
        if now == self._optimizer_size:
            return
        planned, self._optimizer_size = self._optimizer_size, None  # warned: not checked again
        shown = self._shown_budget()
        warnings.warn(
            f"the optimizer the plan of region {self.name} counts holds {now} parameters, {planned} when the "
            f"region was planned (add_param_group after the model's first call): its plan under memory_budget "
            f"{shown} counts neither the new parameters' optimizer state nor their update, so the step's peak "
            f"can exceed the budget. Add every parameter group before the model's first call, or call "
            f"torch._dynamo.reset() after add_param_group to have the step compiled and planned again. Warned "
            f"once per region.",
            MemoptBudgetWarning,
            stacklevel=3,
        )

    def _warn_unplanned_grads(self, args: Sequence[Any], unplanned: frozenset[int]) -> None:
        """Once per region: a call found gradients held that its plan did not count,
        and it cannot be planned again (`can_replan`): say by how much the step's peak
        may exceed the budget, why, and what to do."""
        from torch.distributed.tensor import DTensor

        if self._unplanned_grads_warned:
            return
        self._unplanned_grads_warned = True
        grads = {
            id(value): value.grad
            for info, value in zip(self.compiler.inputs, args)
            if info.identity in unplanned and isinstance(value, torch.Tensor)
        }
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads.values() if g is not None]
        nbytes = sum({g.untyped_storage()._cdata: g.untyped_storage().nbytes() for g in local}.values())  # views of one bucket
        if self._fakes is None:
            why = (
                "it cannot be traced again: its inputs have dynamic shapes or are not plain tensors "
                "(compile with dynamic=False to let it be planned again)"
            )
        else:
            why = f"it was planned again {self.replans} times already (MAX_REPLANS)"
        shown = self._shown_budget()
        warnings.warn(
            f"region {self.name} was called with {len(unplanned)} parameters' .grad set "
            f"({format_bytes(nbytes)}: gradient accumulation, or zero_grad(set_to_none=False)). A step that "
            f"starts with them holds them throughout; the region's plan under memory_budget {shown} did not "
            f"count them, so this step's peak can exceed the budget by up to {format_bytes(nbytes)}. It is not "
            f"planned again: {why}. To stay within the budget, lower it by that much, or zero the gradients "
            f"with set_to_none=True where you do not accumulate. Warned once per region.",
            MemoptBudgetWarning,
            stacklevel=3,
        )

    def settle(self) -> None:
        """The region keeps the plan it has: emit the budget warnings its compile held."""
        emit(self.take_held())

    def take_held(self) -> list[warnings.WarningMessage]:
        """The warnings its compile held (they are then no longer held)."""
        held, self._held = self._held, []
        return held

    def _replan(self, planned: tuple[list[CompiledRegion], Observed], args: Sequence[Any]) -> None:
        """Compile again for ``planned`` (`replan_in`), at a call with ``args``: counting
        the parameters' ``.grad`` they hold, so that `_count_held_grads` need not
        compile it once more. A later region of the step whose plan did not count the
        gradients the earlier ones now hold is planned again at its call
        (`planned_before_grads`)."""
        self._step = None
        step, observed = planned
        context = _context_of(step, step.index(self), observed)
        assert self._fakes is not None
        old = self.compiler
        compiler = old.replanned(context, self._fakes)
        compiler.grads_held = old.grads_held | grads_held(old.inputs, args)
        log.info("region %s: compiling again (%s)", self.name, context.describe())
        if self._compile_again(old, compiler):
            for i, other in enumerate(step):
                if other is not self:
                    stale = i > step.index(self) and other.can_replan and other.planned_before_grads(step)
                    other.compiler.place_in(_context_of(step, i, observed))
                    if stale:
                        other.replan_in(step, observed)  # at its call in this micro-batch

    def _compile_again(self, old: RegionCompiler, compiler: RegionCompiler, hold: bool = True) -> bool:
        """Compile the region with ``compiler`` (`RegionCompiler.replanned` from
        ``old``, its current one); on a failure warn and keep ``old``'s plan. Whether
        it compiled. ``hold``: keep its budget warnings for the step's decision (else
        they are emitted now)."""
        self.replans += 1
        assert self._fakes is not None
        try:
            # Outside the caller's fake mode, if it runs under one (`memopt.fit`, `memopt report`): the
            # copies are in Dynamo's, as at the first compile, where Dynamo's tracing context named it.
            with _holding_budget_warnings(hold) as held, unset_fake_temporarily():
                self.fn = self._compile(compiler, self._gm, self._fakes)
        except MemoptRanksError:
            raise  # the ranks no longer compile together: keeping the old plan would mismatch their collectives
        except MemoptBudgetWarning:
            raise  # not held, and the user's warning filter made it an error: theirs, not a memopt failure
        except RanksCompiledOtherGraphs as exc:  # the ranks' inputs, not a memopt failure
            if old.config.strict:
                raise
            self.settle()
            compiler.hand_back_record(old)
            _keep_plan_of_ranks_apart(old.record, self.name, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - fail soft, see memopt.failsoft
            self.settle()
            compiler.hand_back_record(old)
            old.record.fallbacks.append(
                fail_soft(
                    "whole-step recompile", self.name, exc, strict=old.config.strict,
                    outcome="it keeps the plan made for it alone",
                )  # fmt: skip
            )
            return False
        self.compiler = compiler
        self._held = held  # the step's plan replaces the one the earlier ones were about
        self.held_at = (next(_COMPILES), self.calls)
        return True


def _keep_plan_of_ranks_apart(record: RegionRecord, region: str, exc: RanksCompiledOtherGraphs) -> None:
    """The whole-step compile of ``region`` found the ranks' graphs (or their requests)
    apart: every rank raised, so every rank keeps the plan it runs (the same collectives
    on every rank). The cause is the ranks' inputs, which the region's first compile
    already warned of when it fell back for the same reason: warn only of a new one."""
    reason = str(exc)
    if any(fallback.reason == reason for fallback in record.fallbacks):
        return
    outcome = "it keeps the plan made for it alone, the same on every rank"
    warnings.warn(f"memopt: region {region}, compiled again for the whole step: {reason}; {outcome}", MemoptWarning, stacklevel=4)
    record.fallbacks.append(Fallback(region, "whole-step recompile", reason, "whole-step recompile", outcome))


@dataclass(frozen=True)
class Observed:
    """How a step's regions ran (`StepContext.kept_outputs`, ``input_sources``)."""

    kept_outputs: tuple[frozenset[int], ...]
    input_sources: tuple[dict[int, tuple[int, int]], ...]
    repeats: int = 0
    """Earlier calls of the step's regions whose backward had not started when the
    latest call ran (`StepContext.repeats`)."""

    def covers(self, other: Observed) -> bool:
        """Whether a plan made for this observation holds for a step run as ``other``
        (the same regions): every output of a non-final region it shows kept is kept
        here too (an output kept here and handed on there only leaves the plan room;
        the final region's outputs are live after the step either way), and it ran
        no more calls before one backward."""
        pairs = zip(self.kept_outputs[:-1], other.kept_outputs[:-1], strict=True)
        return other.repeats <= self.repeats and all(theirs <= ours for ours, theirs in pairs)

    def merged(self, other: Observed) -> Observed:
        """The outputs either kept and the more calls, with ``other``'s input sources
        (the same regions)."""
        kept = tuple(ours | theirs for ours, theirs in zip(self.kept_outputs, other.kept_outputs, strict=True))
        return Observed(kept, other.input_sources, max(self.repeats, other.repeats))


def _context_of(step: list[CompiledRegion], i: int, observed: Observed) -> StepContext:
    """Region ``i``'s context in ``step`` (regions in forward order, each with a
    plan: checked when the step completed), as planned now."""
    earlier, later = [r.in_step() for r in step[:i]], [r.in_step() for r in step[i + 1 :]]
    assert None not in earlier and None not in later
    return StepContext(tuple(earlier), tuple(later), observed.kept_outputs, observed.input_sources, observed.repeats)  # type: ignore[arg-type]


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


_COMPILED: contextvars.ContextVar[list[CompiledRegion] | None] = contextvars.ContextVar("memopt_compiled", default=None)


@contextlib.contextmanager
def regions_compiled() -> Iterator[list[CompiledRegion]]:
    """The `CompiledRegion` s compiled inside the context (regions under a memory
    budget), in compile order, for `planned_for_their_step`."""
    compiled: list[CompiledRegion] = []
    token = _COMPILED.set(compiled)
    try:
        yield compiled
    finally:
        _COMPILED.reset(token)


def planned_for_their_step(regions: Iterable[CompiledRegion]) -> bool:
    """Whether whole-step planning (`memopt.backends.wholestep`) is done with
    ``regions`` for a step run as the latest one: none is to be compiled again at its
    next call, and each is either no longer watched (a step of one region, its
    `OBSERVED_STEPS` seen, a region with no plan to compose) or planned for its step
    (move 4: another step keeping more outputs would plan it again, the same step
    does not). False while a step is still to be observed (the compile step kept an
    output: the decision waits for the next one)."""
    return all(not r.replan_pending and (not r.tracking or r.decided is not None) for r in regions)


@contextlib.contextmanager
def _holding_budget_warnings(hold: bool) -> Iterator[list[warnings.WarningMessage]]:
    """While compiling a region that whole-step planning may plan again (planned
    alone, or before its step was observed): collect its `MemoptBudgetWarning`s
    instead of emitting them (such a plan may judge a budget infeasible that its step
    meets); every other warning passes. The caller emits them (`emit`) once the region keeps its plan."""
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
        emit([w for w in caught if not issubclass(w.category, MemoptBudgetWarning)])


def emit(caught: Sequence[warnings.WarningMessage]) -> None:
    """Issue ``caught`` (held warnings) again, each where it was first raised."""
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _optimizer_size(optimizer: Any) -> int | None:
    """How many parameters ``optimizer``'s groups hold (None without an optimizer)."""
    if optimizer is None:
        return None
    return sum(len(group["params"]) for group in optimizer.param_groups)


def _fake_copies(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """Fake copies of the example inputs in Dynamo's fake mode, or None (the region is
    then never compiled again) when a shape is symbolic, an input is neither a plain
    tensor, a fake one nor a sharded parameter (a symbol, another tensor subclass) or
    there is no Dynamo tracing context.

    A step run on fake tensors (a `memopt.fit` probe, ``memopt report``, a loop under
    a `FakeTensorMode`) hands Dynamo fake example inputs: they are copied as real ones
    are, into Dynamo's fake mode, and the region is compiled again outside the
    caller's fake mode (`CompiledRegion._compile_again`), so that its step is planned
    as a whole as on real tensors (such inputs were refused, and the step's first
    region kept its plan made alone: `memopt.fit` under-reported what fits).

    A sharded parameter (a DTensor, `memopt.distributed`) is faked with its mesh and
    placements, so a sharded region is planned again as any other (gradient
    accumulation, the whole step across graph breaks). Every rank compiles it again at
    the same call, since every rank runs the same program and sees the same step, and
    the ranks agree on the new plan as on the first (`memopt.backends.ranks`)."""
    if any(meta.is_symbolic(ph) for ph in gm.graph.find_nodes(op="placeholder")):
        return None
    from torch.distributed.tensor import DTensor

    if not all(type(x) in (torch.Tensor, torch.nn.Parameter, DTensor, FakeTensor) for x in example_inputs):
        return None  # symbols, other tensor subclasses: not re-traced
    tracing = torch._guards.TracingContext.try_get()
    if tracing is None or tracing.fake_mode is None:
        return None
    mode = tracing.fake_mode
    return tuple(mode.from_tensor(x, static_shapes=True) for x in example_inputs)



def compiled_regions(regions: Iterable[Watched]) -> list[CompiledRegion]:
    """``regions``, regions of tracking runs (only a `CompiledRegion` tracks)."""
    compiled = []
    for region in regions:
        assert isinstance(region, CompiledRegion)
        compiled.append(region)
    return compiled


def _step_of_several(others: Sequence[Watched]) -> str:
    """Why a region's step has other regions, for `CompiledRegion._plan_repeated_calls`'s
    warning: ``others``, the regions whose forward waits for its backward beside it (a
    graph break's other pieces, or another compiled model: a GAN's generator, whose
    output the discriminator's calls read), named; none waiting, a graph break."""
    if not others:
        return "a graph break"
    names = ", ".join(dict.fromkeys(r.name for r in others))
    return (
        f"region(s) {names} ran their forward before it and wait for their backward: a graph break in the model, "
        "or another compiled model"
    )
