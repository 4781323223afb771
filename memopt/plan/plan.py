"""`MemoryPlan`: what memopt decided for a region, and why. Frozen and JSON-able.

The planner builds it from analyses (it never touches a graph); passes carry it out;
the report is a rendering of it. One `TensorDecision` per saved value says what
happens to it (saved, recomputed, offloaded, compressed), why, and which line of the
user's code produced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memopt.analysis.aliasing import concrete_int
from memopt.analysis.memory import LiveInterval, MemoryTimeline
from memopt.graph import meta

__all__ = ["TensorDecision", "MemoryPlan", "POLICIES", "decision_for", "decision_for_node", "finish_plan"]

POLICIES = ("save", "recompute", "offload", "compress")


@dataclass(frozen=True)
class TensorDecision:
    """What happens to one value the backward needs."""

    name: str
    region: str
    policy: str
    reason: str
    bytes: int
    shape: tuple[int, ...] = ()
    dtype: str = ""
    source: str | None = None
    source_file: str | None = None
    source_line: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "policy": self.policy,
            "reason": self.reason,
            "bytes": self.bytes,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "source": self.source,
            "source_file": self.source_file,
            "source_line": self.source_line,
            "details": dict(self.details),
        }


def decision_for(
    interval: LiveInterval, policy: str, reason: str, **details: Any
) -> TensorDecision:
    """A decision about the value behind ``interval`` (shape, dtype, source from its
    producing node)."""
    return decision_for_node(interval.node, interval.name, interval.region, interval.nbytes, policy, reason, **details)


def decision_for_node(
    node: Any, name: str, region: str, nbytes: int, policy: str, reason: str, **details: Any
) -> TensorDecision:
    """A decision about the value ``node`` produces."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    value = meta.tensor_value(node)
    loc = meta.source_location(node)
    return TensorDecision(
        name=name,
        region=region,
        policy=policy,
        reason=reason,
        bytes=nbytes,
        shape=() if value is None else tuple(concrete_int(s) for s in value.shape),
        dtype="" if value is None else str(value.dtype).replace("torch.", ""),
        source=None if loc is None else str(loc),
        source_file=None if loc is None else loc.filename,
        source_line=None if loc is None else loc.lineno,
        details=dict(details),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The plan for one region: budget, estimated peaks, decisions, fallbacks."""

    region: str
    baseline_bytes: int
    estimated_peak_before: int
    estimated_peak_after: int
    peak_breakdown_before: dict[str, int]
    peak_breakdown_after: dict[str, int]
    budget_bytes: int | None = None
    decisions: tuple[TensorDecision, ...] = ()
    schedule: dict[str, Any] = field(default_factory=dict)
    tradeoff: tuple[dict[str, Any], ...] = ()
    fallbacks: tuple[dict[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    saved_values: tuple[str, ...] | None = None
    graphs: Any = None
    """(forward, backward) to install as they are instead of splitting for
    ``saved_values`` (the plan is torch's own partition); not serialized."""
    """Names of the joint-graph values to save (None: keep the partitioner's)."""
    segment_options: tuple[str, ...] = ()
    solver: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True
    min_feasible_peak: int | None = None
    blockers: dict[str, int] = field(default_factory=dict)
    """At the smallest peak found: bytes by category remat cannot remove."""

    @classmethod
    def unplanned(cls, region: str, timeline: MemoryTimeline, budget_bytes: int | None = None) -> MemoryPlan:
        """The plan when memopt keeps the partitioner's choices: every saved value is
        saved."""
        decisions = tuple(
            decision_for(iv, "save", "needed by backward; kept by the min-cut partition")
            for iv in timeline.saved_activations()
        )
        return cls(
            region=region,
            baseline_bytes=timeline.baseline_bytes,
            estimated_peak_before=timeline.peak_bytes,
            estimated_peak_after=timeline.peak_bytes,
            peak_breakdown_before=timeline.peak_breakdown,
            peak_breakdown_after=timeline.peak_breakdown,
            budget_bytes=budget_bytes,
            decisions=decisions,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "budget_bytes": self.budget_bytes,
            "baseline_bytes": self.baseline_bytes,
            "estimated_peak_before": self.estimated_peak_before,
            "estimated_peak_after": self.estimated_peak_after,
            "peak_breakdown_before": dict(self.peak_breakdown_before),
            "peak_breakdown_after": dict(self.peak_breakdown_after),
            "decisions": [d.to_dict() for d in self.decisions],
            "schedule": dict(self.schedule),
            "tradeoff": [dict(t) for t in self.tradeoff],
            "fallbacks": [dict(f) for f in self.fallbacks],
            "notes": list(self.notes),
            "saved_values": None if self.saved_values is None else list(self.saved_values),
            "segment_options": list(self.segment_options),
            "solver": dict(self.solver),
            "feasible": self.feasible,
            "min_feasible_peak": self.min_feasible_peak,
            "blockers": dict(self.blockers),
        }


def finish_plan(plan: MemoryPlan, after: MemoryTimeline, result: Any) -> MemoryPlan:
    """``plan`` with the estimate of the graphs the pipeline produced, the schedule
    pass's report and any fallback (``result`` is the pipeline's `PipelineResult`)."""
    schedule = {}
    decisions = plan.decisions
    for record in result.records:
        if record.name == "schedule" and record.status == "ran":
            schedule = dict(record.details)
        if record.name == "compress_activations" and record.status == "ran":
            decisions = _with_compression(decisions, record.details)
    fallbacks = plan.fallbacks
    if result.fallback is not None:
        fallbacks = fallbacks + (result.fallback.to_dict(),)
    return dataclasses.replace(
        plan,
        estimated_peak_after=after.peak_bytes,
        peak_breakdown_after=after.peak_breakdown,
        schedule=schedule or plan.schedule,
        decisions=decisions,
        fallbacks=fallbacks,
    )


def _with_compression(decisions: tuple[TensorDecision, ...], details: dict[str, Any]) -> tuple[TensorDecision, ...]:
    """``decisions`` with the values the ``compress_activations`` pass stored
    compressed (its ``details``) marked ``compress``, with the format and bytes."""
    why = "to meet the budget" if details.get("budget_bytes") is not None else "compress_activations is set"
    stored: dict[str, dict[str, Any]] = {}
    for c in details.get("compressed", []):
        for name in c["saved_as"]:
            stored[f"forward:{name}"] = c
    out = []
    for d in decisions:
        c = stored.get(d.name)
        if c is None or d.policy != "save":
            out.append(d)
            continue
        reason = (
            f"saved, stored as {c['format']} ({c['bytes_before']} -> {c['bytes_after']} bytes) {why}"
        )
        out.append(dataclasses.replace(d, policy="compress", reason=reason, details={**d.details, "format": c["format"]}))
    return tuple(out)
