"""`MemoryPlan`: what memopt decided for a region, and why. Frozen and JSON-able.

The planner builds it from analyses (it never touches a graph); passes carry it out;
the report is a rendering of it. One `TensorDecision` per saved value says what
happens to it (a typed `memopt.plan.decisions.Action`: saved, recomputed, offloaded,
compressed), why, and which line of the user's code produced it. Passes read the
actions of the values they rewrite and report back, as typed decisions, what they
carried out (`PassResult.applied`); nothing reads a pass's free-form details by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memopt.analysis.aliasing import concrete_int
from memopt.analysis.timeline import LiveInterval, MemoryTimeline
from memopt.graph import meta
from memopt.plan.decisions import Action, Save, action_from_dict, action_to_dict

__all__ = ["TensorDecision", "MemoryPlan", "decision_for", "decision_for_node", "finish_plan"]


@dataclass(frozen=True)
class TensorDecision:
    """What happens to one value the backward needs: its ``action``, and why.

    ``name`` is ``"forward:<node>"``: the value's node in the joint graph, which keeps
    its name in the forward graph the partition makes of it."""

    name: str
    region: str
    action: Action
    reason: str
    bytes: int
    shape: tuple[int, ...] = ()
    dtype: str = ""
    source: str | None = None
    source_file: str | None = None
    source_line: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    """The dotted path of the ``nn.Module`` that produced the value
    (`memopt.graph.meta.module_path`): tells apart layers sharing a source line."""

    @property
    def policy(self) -> str:
        """The action's kind: one of `memopt.plan.decisions.ACTION_KINDS`."""
        return self.action.kind

    @property
    def node_name(self) -> str:
        """The value's node name (``name`` without the graph prefix)."""
        return self.name.split(":", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "policy": self.policy,
            "action": action_to_dict(self.action),
            "reason": self.reason,
            "bytes": self.bytes,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "source": self.source,
            "source_file": self.source_file,
            "source_line": self.source_line,
            "module": self.module,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorDecision:
        """The decision ``data`` describes (the inverse of `to_dict`). Raises
        ``ValueError`` naming the keys it lacks (a hand-written plan's slip)."""
        missing = [key for key in _REQUIRED_DECISION_KEYS if key not in data]
        if missing:
            raise ValueError(
                f"plan decision {data.get('name', data)!r} lacks {', '.join(map(repr, missing))}: a decision needs "
                f"{', '.join(map(repr, _REQUIRED_DECISION_KEYS))}, e.g. {{'name': 'forward:tanh', 'region': '0/0', "
                f"'action': {{'kind': 'compress', 'format': 'bf16'}}, 'reason': 'by hand', 'bytes': 0}}"
            )
        return cls(
            name=data["name"],
            region=data["region"],
            action=action_from_dict(data["action"]),
            reason=data["reason"],
            bytes=data["bytes"],
            shape=tuple(data.get("shape", ())),
            dtype=data.get("dtype", ""),
            source=data.get("source"),
            source_file=data.get("source_file"),
            source_line=data.get("source_line"),
            details=dict(data.get("details", {})),
            module=data.get("module"),
        )


_REQUIRED_DECISION_KEYS = ("name", "region", "action", "reason", "bytes")
"""The keys `TensorDecision.from_dict` cannot do without (the fields without a default)."""


def decision_for(interval: LiveInterval, action: Action, reason: str, **details: Any) -> TensorDecision:
    """A decision about the value behind ``interval`` (shape, dtype, source from its
    producing node; one output of a multi-output op is named by its ``getitem``)."""
    decision = decision_for_node(
        interval.value_node, interval.name, interval.region, interval.nbytes, action, reason, **details
    )
    loc = meta.source_location(interval.node)
    if decision.source is None and loc is not None:
        decision = dataclasses.replace(decision, source=str(loc), source_file=loc.filename, source_line=loc.lineno)
    if decision.module is None:
        decision = dataclasses.replace(decision, module=meta.module_path(interval.node))
    return decision


def decision_for_node(
    node: Any, name: str, region: str, nbytes: int, action: Action, reason: str, **details: Any
) -> TensorDecision:
    """A decision about the value ``node`` produces."""
    value = meta.tensor_value(node)
    loc = meta.source_location(node)
    return TensorDecision(
        name=name,
        region=region,
        action=action,
        reason=reason,
        bytes=nbytes,
        shape=() if value is None else tuple(concrete_int(s) for s in value.shape),
        dtype="" if value is None else str(value.dtype).replace("torch.", ""),
        source=None if loc is None else str(loc),
        source_file=None if loc is None else loc.filename,
        source_line=None if loc is None else loc.lineno,
        details=dict(details),
        module=meta.module_path(node),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The plan for one region: budget, estimated peaks, decisions, fallbacks.

    What the passes carry out: ``saved_values`` (the joint-graph values the forward
    saves; the rest is recomputed) or, with ``torch_partition`` set, torch's own
    min-cut partition at that ``activation_memory_budget`` installed as it is; then the
    `Compress` and `Offload` actions of ``decisions``. Nothing in it is a graph: it is
    JSON-able (`to_dict`/`from_dict`)."""

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
    """Names of the joint-graph values to save (None: keep the partitioner's)."""
    torch_partition: float | None = None
    """Set when the chosen plan is torch's own partition at this
    ``activation_memory_budget``: the remat pass installs it as torch made it (the
    split memopt would make of its saved set may order backward differently)."""
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
            decision_for(iv, Save(), "needed by backward; kept by the min-cut partition")
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

    def actions(self, kind: type) -> dict[str, Any]:
        """Node name -> action, for the decisions whose action is a ``kind``."""
        return {d.node_name: d.action for d in self.decisions if isinstance(d.action, kind)}

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
            "torch_partition": self.torch_partition,
            "segment_options": list(self.segment_options),
            "solver": dict(self.solver),
            "feasible": self.feasible,
            "min_feasible_peak": self.min_feasible_peak,
            "blockers": dict(self.blockers),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryPlan:
        """The plan ``data`` describes (the inverse of `to_dict`)."""
        fields = dict(data)
        fields["decisions"] = tuple(TensorDecision.from_dict(d) for d in data.get("decisions", ()))
        for key in ("tradeoff", "fallbacks", "notes", "segment_options"):
            fields[key] = tuple(data.get(key, ()))
        if data.get("saved_values") is not None:
            fields["saved_values"] = tuple(data["saved_values"])
        return cls(**fields)


def finish_plan(plan: MemoryPlan, after: MemoryTimeline, result: Any) -> MemoryPlan:
    """``plan`` with the estimate of the graphs the pipeline produced, what the passes
    reported carrying out (``PassResult.applied``: typed decisions replacing the
    planned ones of the same name; ``PassResult.plan_fields``) and any fallback
    (``result`` is the pipeline's `PipelineResult`)."""
    applied: dict[str, TensorDecision] = {}
    fields: dict[str, Any] = {}
    for record in result.records:
        if record.status == "ran":
            applied.update((d.name, d) for d in record.applied)
            fields.update(record.plan_fields)
    unknown = set(fields) - {f.name for f in dataclasses.fields(MemoryPlan)}
    if unknown:
        raise ValueError(f"passes reported unknown MemoryPlan fields {sorted(unknown)}")
    decisions = tuple(applied.pop(d.name, d) for d in plan.decisions) + tuple(applied.values())
    fallbacks = plan.fallbacks
    if result.fallback is not None:
        fallbacks = fallbacks + (result.fallback.to_dict(),)
    return dataclasses.replace(
        plan,
        **fields,
        estimated_peak_after=after.peak_bytes,
        peak_breakdown_after=after.peak_breakdown,
        decisions=decisions,
        fallbacks=fallbacks,
    )
