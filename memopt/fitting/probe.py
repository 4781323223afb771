"""One `memopt.fit` probe: plan the step at one size on fake tensors and record its peak.

A probe plans the step as a training loop settles on it
(`memopt.explain.explain_settled`): a step that graph breaks split into regions is run
again, on the same fake inputs, until its regions are planned as a whole
(`memopt.backends.wholestep`), two steps for the zoo's `GraphBreakMLP`, three for a
Hugging Face model whose output object the caller keeps.

`Runner` is called with a size (in units of the search's ``step``) and says whether the
step's planned peak fits the budget; it keeps every `Probe`, the peaks, the floors the
planner found (`floor_estimate`, for `memopt.fitting.search`'s predictions) and the plan
of the largest size that fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from memopt.config import MemoptConfig
from memopt.errors import MemoptFitError
from memopt.explain import explain_settled
from memopt.explanation import Explanation
from memopt.fitting.fake import planning, reset_optimizer
from memopt.units import format_bytes

__all__ = ["Probe", "Runner", "Sizes", "as_call", "input_shapes"]


@dataclass(frozen=True)
class Probe:
    """One planning run of the search."""

    size: int
    """The batch size (or sequence length) probed."""
    planned_peak_bytes: int
    """`Explanation.estimated_peak_bytes` at this size under the budget."""
    unoptimized_peak_bytes: int
    """The estimated peak without memopt's plan (for reference)."""
    fits: bool
    """``planned_peak_bytes <= budget``."""
    seconds: float


@dataclass(frozen=True)
class Sizes:
    """How a probed size becomes ``make_inputs``'s arguments."""

    search: str
    batch: int
    seq: int | None
    step: int

    def call_args(self, size: int) -> tuple[int, ...]:
        if self.search == "seq":
            return (self.batch, size)
        return (size,) if self.seq is None else (size, self.seq)

    def batch_at(self, size: int) -> int:
        return size if self.search == "batch" else self.batch

    def seq_at(self, size: int) -> int | None:
        return size if self.search == "seq" else self.seq

    def name(self, size: int) -> str:
        return f"{self.search} {size}"


def assume_outputs_kept(explanation: Explanation) -> Explanation:
    """Count every user output of a region whose kept outputs were not observed as
    kept by the caller through the step. The step tracker observes them on fake tensors
    as on real ones (`memopt.backends.steptracker`: at each region's backward, which
    outputs the caller still holds, such as a Hugging Face output object's logits and
    caches), so a training probe's regions all have theirs and this changes nothing
    (GraphBreakMLP's first region: none kept; GPT-2's: the logits and the key/value
    caches, as on real tensors). It is a fallback for a region with no backward
    observed (a ``training=False`` probe, where an output counted kept lives to the
    end of the step, as the end of its forward already is): an upper bound."""
    for r in explanation.regions:
        if r.kept_outputs is None and r.step is not None:
            n = r.step.num_user_outputs if r.step.num_user_outputs is not None else r.step.num_fwd_outputs
            r.kept_outputs = frozenset(range(n))
    return explanation


def floor_estimate(explanation: Explanation, peak: int) -> int | None:
    """The smallest peak memopt's planner found at this size, as a step peak: the
    step's planned ``peak`` less the most any region's plan says it could still lower
    its own peak (``estimated_peak_after - min_feasible_peak``: 0 for a plan at its
    floor, as under an infeasible budget). None when no region ran the planner (the
    unoptimized estimate fit). An estimate for choosing probes, never a verdict."""
    plans = [r.plan for r in explanation.step_regions() if r.plan is not None and r.plan.min_feasible_peak is not None]
    if not plans:
        return None
    return peak - max(max(p.estimated_peak_after - int(p.min_feasible_peak or 0), 0) for p in plans)


def as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def input_shapes(inputs: Any) -> tuple[tuple[int, ...], ...]:
    import torch.utils._pytree as pytree

    return tuple(tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))


class Runner:
    """Probes sizes (in units of ``step``); remembers each probe's peak and the plan of
    the largest fitting size."""

    def __init__(
        self, model: Callable[..., Any], make_inputs: Callable[..., Any], sizes: Sizes, config: MemoptConfig,
        mode: Any, training: bool, progress: IO[str] | None, budget: int,
    ) -> None:
        self.model, self.make_inputs, self.sizes, self.config = model, make_inputs, sizes, config
        self.mode, self.training, self.progress, self.budget = mode, training, progress, budget
        self.probes: list[Probe] = []
        self.peaks: dict[int, int] = {}
        self.explanations: dict[int, Explanation] = {}
        self.floor: Explanation | None = None
        self.floors: dict[int, int] = {}
        """Units -> estimated floor bytes, for probes the planner planned (`floor_estimate`)."""
        self.fixed_bytes = 0
        """Parameter and buffer bytes (the part of the peak that does not grow with the size)."""
        self._shapes: dict[tuple[tuple[int, ...], ...], int] = {}

    def __call__(self, units: int) -> bool:
        size = units * self.sizes.step
        started = time.perf_counter()
        torch._dynamo.reset()  # a new size is a new compile, never a dynamic-shape recompile
        explanation = self._plan(size)
        peak = explanation.estimated_peak_bytes
        fits = peak <= self.budget
        unoptimized = explanation.timeline(optimized=False).peak_bytes
        breakdown = explanation.timeline().peak_breakdown
        self.fixed_bytes = breakdown.get("parameters", 0) + breakdown.get("buffers", 0)
        floor = floor_estimate(explanation, peak)
        if floor is not None:
            self.floors[units] = floor
        probe = Probe(size, peak, unoptimized, fits, time.perf_counter() - started)
        self.probes.append(probe)
        self.peaks[units] = peak
        if fits and all(u < units for u in self.explanations):
            self.explanations = {units: explanation}
        if units == 1 and not fits:
            self.floor = explanation
        self._say(probe)
        return fits

    def _plan(self, size: int) -> Explanation:
        what = self.sizes.name(size)
        try:
            with planning(self.mode, self.training):
                inputs = self.make_inputs(*self.sizes.call_args(size))
                args, kwargs = as_call(inputs)
                try:
                    explanation = assume_outputs_kept(explain_settled(self.model, *args, options=self.config, **kwargs))
                finally:
                    reset_optimizer(self.config)
                explanation.timeline()  # raises if memopt compiled nothing
        except MemoptFitError:
            raise
        except Exception as exc:
            raise MemoptFitError(
                f"planning the step at {what} failed: {type(exc).__name__}: {exc}. Check that make_inputs"
                f"({', '.join(map(str, self.sizes.call_args(size)))}) returns the model's inputs and that "
                "the model runs on them."
            ) from exc
        self._check(size, inputs, explanation)
        return explanation

    def _check(self, size: int, inputs: Any, explanation: Explanation) -> None:
        if self.training and not explanation.ran_backward:
            raise MemoptFitError(
                f"at {self.sizes.name(size)} no backward was planned: the model's outputs do not require grad "
                f"(a model in eval mode under torch.no_grad, or parameters with requires_grad=False?). fit plans a "
                f"training step; make the loss require grad, or pass training=False to fit a forward only."
            )
        self.saw(size, inputs)

    def saw(self, size: int, inputs: Any) -> None:
        """Remember ``make_inputs``'s shapes at ``size``; raise if another size gave the same."""
        shapes = input_shapes(inputs)
        if shapes in self._shapes and self._shapes[shapes] != size:
            raise MemoptFitError(
                f"make_inputs returned inputs of the same shapes {list(shapes)} for {self.sizes.search} "
                f"{self._shapes[shapes]} and {size}: it ignores the size it is given. Build the inputs from "
                f"its argument, e.g. torch.randint(0, vocab, (batch, seq))."
            )
        self._shapes[shapes] = size

    def _say(self, p: Probe) -> None:
        if self.progress is None:
            return
        verdict = "fits" if p.fits else "over"
        print(
            f"[memopt fit] {self.sizes.name(p.size)}: planned peak {format_bytes(p.planned_peak_bytes)} "
            f"(unoptimized {format_bytes(p.unoptimized_peak_bytes)}) {verdict} budget "
            f"{format_bytes(self.budget)} [{p.seconds:.1f}s]",
            file=self.progress, flush=True,
        )
