"""The rematerialization problem: the forward cut into segments, the options each
segment may take, and every option's effect measured on the exact timeline (the
tables the MILP, `memopt.plan.milp`, solves over and the search,
`memopt.plan.remat`, reads).

The problem is staged over the schedule (Checkmate's idea at segment granularity).
The forward is cut into segments at its bottlenecks (`memopt.plan.segments`); each
segment takes one of six options (four beyond 2500 joint-graph nodes, where only
``torch@0.5`` of torch's is tried):

* ``save``: keep what torch's min-cut partition saves (the status quo);
* ``selective``: save only the outputs of expensive ops (matmuls, convolutions,
  attention) and recompute the cheap ops between them;
* ``recompute``: save only what the segment hands to the next one, and recompute the
  whole segment in backward, just before its gradients are needed;
* ``torch@b`` for b in 0.75, 0.5, 0.3: what torch's own partitioner saves inside the
  segment when run with ``activation_memory_budget=b`` (its knapsack over saved
  values). With them, the plans memopt considers include torch's, segment by segment.

Random ops, ops with side effects and must-save values are saved in every option.

Each option's effect is measured, not guessed: the joint graph is split with every
segment on that option and the exact step timeline (`memopt.analysis.memory`) is
attributed to segments. That gives, per segment ``k`` and option ``o``, the bytes it
keeps across the forward/backward boundary ``S[k,o]``, its local peaks in forward and
backward ``F[k,o]``, ``P[k,o]`` and its recompute time ``C[k,o]`` (roofline cost
model). Backward runs segments in reverse, so while segment ``k`` runs every earlier
segment still holds its saved bytes. The MILP (scipy's HiGHS) minimizes recompute
FLOPs (matmuls, convolutions, attention: what costs compute), with the modelled time
(memory-bound pointwise recompute included) as a small tie-breaker::

    minimize    sum C[k,o] z[k,o]
    subject to  sum_o z[k,o] = 1                                   for every k
                sum_o F[k,o] z[k,o] + sum_{j<k,o} S[j,o] z[j,o] <= B  for every k
                sum_o P[k,o] z[k,o] + sum_{j<k,o} S[j,o] z[j,o] <= B  for every k
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from memopt.analysis.cost import device_model, node_cost
from memopt.analysis.memory import build_timeline
from memopt.analysis.timeline import BEFORE, MemoryTimeline
from memopt.graph import meta
from memopt.graph.partition import JointGraph, forward_nodes, joint_values, saved_joint_names, split_joint
from memopt.graph.step import StepGraphs
from memopt.plan.segments import Segment, find_segments, must_save
from memopt.plan.step_context import StepContext, placed
from memopt.plan.storage import StoragePlan

__all__ = ["OPTIONS", "Evaluation", "RematProblem", "Storage", "build_problem", "evaluate", "evaluate_torch_partition"]

_TORCH_BUDGETS = (0.75, 0.5, 0.3)
_LARGE_GRAPH = 2500
OPTIONS = ("save", "selective", "recompute", *(f"torch@{b}" for b in _TORCH_BUDGETS))
_TIME_WEIGHT = 1e-3  # modelled time breaks ties between plans of equal recompute FLOPs
aten = torch.ops.aten
_EXPENSIVE = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.convolution.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}  # fmt: skip


@dataclass
class Evaluation:
    """A saved set, the graphs it yields and their timeline: exact, or with saved
    values held elsewhere as the storage planner chose (modelled)."""

    saved: frozenset[str]
    step: StepGraphs
    timeline: MemoryTimeline
    recompute_flops: int
    recompute_seconds: float
    storage_seconds: float = 0.0
    """Modelled time of the storage plan (compression kernels, exposed transfers)."""
    storage: StoragePlan | None = None
    torch_budget: float | None = None
    """Set when the plan is torch's own partition at this ``activation_memory_budget``,
    to be installed as is (the split `split_joint` would make of its saved set may
    order backward differently)."""

    @property
    def seconds(self) -> float:
        """Modelled extra time of the plan: recomputation plus storage."""
        return self.recompute_seconds + self.storage_seconds


Storage = Callable[[StepGraphs, MemoryTimeline], StoragePlan]
"""Plans where a candidate's saved values wait for backward (`memopt.plan.storage`),
given the candidate and its exact timeline."""


@dataclass
class RematProblem:
    """Segments, their options' saved sets, and the measured stats per option."""

    step: StepGraphs
    segments: list[Segment]
    saved_sets: list[dict[str, frozenset[str]]]  # [segment][option] -> names
    always: frozenset[str]  # saved in every plan (primals are implicit)
    S: np.ndarray  # [K, O] bytes kept across the fwd/bwd boundary
    F: np.ndarray  # [K, O] local forward peak
    P: np.ndarray  # [K, O] local backward peak
    C: np.ndarray  # [K, O] objective: recompute FLOPs, plus 0.1% of the modelled time as FLOPs
    T: np.ndarray  # [K, O] modelled recompute seconds
    FL: np.ndarray  # [K, O] recompute FLOPs
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    torch_whole: dict[float, frozenset[str]] = field(default_factory=dict)  # torch's saved set per budget
    storage: Storage | None = None  # every plan is evaluated with its storage plan
    torch_graphs: dict[float, tuple[fx.GraphModule, fx.GraphModule]] = field(default_factory=dict)

    def saved_for(self, choice: Sequence[str]) -> frozenset[str]:
        names = set(self.always)
        for k, option in enumerate(choice):
            names |= self.saved_sets[k][option]
        return frozenset(names)

    def predicted_peak(self, choice: Sequence[str]) -> float:
        idx = [OPTIONS.index(o) for o in choice]
        peak, earlier = 0.0, 0.0
        for k, o in enumerate(idx):
            peak = max(peak, self.F[k, o] + earlier, self.P[k, o] + earlier)
            earlier += self.S[k, o]
        return peak

    def predicted_seconds(self, choice: Sequence[str]) -> float:
        return float(sum(self.T[k, OPTIONS.index(o)] for k, o in enumerate(choice)))

    def predicted_flops(self, choice: Sequence[str]) -> float:
        return float(sum(self.FL[k, OPTIONS.index(o)] for k, o in enumerate(choice)))


def evaluate(
    step: StepGraphs, saved: frozenset[str], storage: Storage | None = None, context: StepContext | None = None
) -> Evaluation:
    """Split ``step``'s joint graph (dropout made recomputable) saving ``saved``; the
    timeline (with the saved values held as ``storage`` plans, if given) and the
    recompute cost of the result. With ``context`` the timeline is the whole step's,
    the other regions in place (`StepContext.place`)."""
    joint: JointGraph = step.joint.recomputable()
    forward, backward = split_joint(joint, sorted(saved), step.region, draft=True)
    return _evaluate_graphs(step, joint, saved, forward, backward, storage, context)


def evaluate_torch_partition(
    step: StepGraphs, budget: float, storage: Storage | None = None, context: StepContext | None = None
) -> Evaluation | None:
    """The timeline and recompute cost of torch's own partition at
    ``activation_memory_budget=budget`` (to be installed as it is), or None when
    torch's partitioner fails or its backward recomputes a random op (new random
    numbers: not a valid plan for memopt)."""
    graphs = step.joint.torch_partition(budget)
    if graphs is None:
        return None
    forward, backward = graphs
    fw_names = {n.name for n in forward_nodes(step.joint)}
    if any(n.name in fw_names and meta.is_random(n) for n in backward.graph.nodes):
        return None
    saved = frozenset(
        o.name for o in forward.graph.find_nodes(op="output")[0].args[0][step.num_fwd_outputs :] if isinstance(o, fx.Node)
    )
    ev = _evaluate_graphs(step, step.joint, saved, forward, backward, storage, context)
    return dataclasses.replace(ev, torch_budget=budget)


def _evaluate_graphs(
    step: StepGraphs,
    joint: JointGraph,
    saved: frozenset[str],
    forward: fx.GraphModule,
    backward: fx.GraphModule,
    storage: Storage | None,
    context: StepContext | None = None,
) -> Evaluation:
    candidate = dataclasses.replace(step, forward=forward, backward=backward)
    timeline = build_timeline(candidate)
    stored = None if storage is None else storage(candidate, timeline)
    if stored is not None and stored.timeline is not None:
        timeline = stored.timeline
    timeline = placed(context, candidate, timeline)
    fw_names = {n.name for n in forward_nodes(joint)}
    device = device_model(timeline.device)
    flops, seconds = 0, 0.0
    for node in backward.graph.nodes:
        if node.name in fw_names:
            cost = node_cost(node, device)
            flops += cost.flops
            seconds += cost.seconds
    return Evaluation(saved, candidate, timeline, flops, seconds, 0.0 if stored is None else stored.seconds, stored)


def _saved_by(graphs: tuple[fx.GraphModule, fx.GraphModule] | None, joint: JointGraph, fallback: set[str]) -> set[str]:
    if graphs is None:
        return set(fallback)
    outputs = graphs[0].graph.find_nodes(op="output")[0].args[0][joint.num_fwd_outputs :]
    return set(joint_values(joint, outputs))


def _values(nodes: Iterable[fx.Node]) -> set[str]:
    """The names of ``nodes`` as values a backward can be handed: a multi-output op's
    node (a tuple, such as ``native_group_norm`` after a convolution) stands for its
    ``getitem`` outputs. Saved as it is, the tuple reached AOTAutograd's runtime, which
    raised at the region's first call ("expected all tensors_saved_with_vc_check to be
    Tensors")."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(meta.fake_value(node), (tuple, list)):
            names.update(u.name for u in node.users if u.target is operator.getitem)
        else:
            names.add(node.name)
    return names


def _option_sets(segment: Segment, mincut: set[str], torch_saved: dict[float, set[str]]) -> dict[str, frozenset[str]]:
    forced = _values(n for n in segment.nodes if must_save(n))
    keep = _values(segment.crossers) | forced
    expensive = _values(
        n
        for n in segment.nodes
        if n.target in _EXPENSIVE
        or (n.args and isinstance(n.args[0], fx.Node) and n.args[0].target in _EXPENSIVE and n.op == "call_function")
    )
    return {
        "save": frozenset(keep | {n.name for n in segment.nodes if n.name in mincut}),
        "selective": frozenset(keep | expensive),
        "recompute": frozenset(keep),
        **{
            f"torch@{b}": frozenset(keep | {n.name for n in segment.nodes if n.name in names})
            for b, names in torch_saved.items()
        },
    }


def build_problem(step: StepGraphs, storage: Storage | None = None, context: StepContext | None = None) -> RematProblem:
    """Segments, option sets and per-option stats for ``step`` (one evaluation per
    distinct all-segments-on-one-option plan, each with its ``storage`` plan, each
    judged in ``context`` when given)."""
    joint: JointGraph = step.joint.recomputable()
    placeholders = joint.module.graph.find_nodes(op="placeholder")
    activations = {p for i, p in enumerate(placeholders) if step.input_kind(i) in ("input", "activation")}
    fw = forward_nodes(joint)
    core = forward_nodes(joint, required_only=True)
    core_set = set(core)
    mincut = set(saved_joint_names(step))
    weights = {n: meta.value_bytes(n) for n in fw if n.name in _unhinted_saved(step, mincut)}
    segments = find_segments(core, activations, extras=[n for n in fw if n not in core_set], saved_bytes=weights)
    fw_names = {n.name for n in fw}
    always = frozenset(n for n in mincut if n not in fw_names)  # saved symbols etc.
    # torch's knapsack is costly on large graphs: one budget beyond _LARGE_GRAPH nodes
    budgets = _TORCH_BUDGETS if len(joint.module.graph.nodes) <= _LARGE_GRAPH else (0.5,)
    torch_graphs = {b: step.joint.torch_partition(b) for b in budgets}  # the graph as torch sees it
    torch_saved = {b: _saved_by(g, step.joint, mincut) for b, g in torch_graphs.items()}
    for b in _TORCH_BUDGETS:  # budgets not computed repeat the nearest one computed
        torch_saved.setdefault(b, torch_saved[min(torch_saved, key=lambda c: abs(c - b))])
    sets = [_option_sets(s, mincut, torch_saved) for s in segments]
    owner = {n.name: s.index for s in segments for n in s.nodes}
    K, O = len(segments), len(OPTIONS)
    S, F, P, C, T, FL = (np.zeros((K, O)) for _ in range(6))
    forced = {n.name for seg in segments for n in seg.nodes if must_save(n)}
    problem = RematProblem(
        step, segments, sets, always, S, F, P, C, T, FL,
        torch_whole={b: frozenset(names | forced) for b, names in torch_saved.items()}, storage=storage,
        torch_graphs={b: g for b, g in torch_graphs.items() if g is not None},
    )  # fmt: skip
    done: dict[frozenset[str], int] = {}
    for o, option in enumerate(OPTIONS):
        saved = problem.saved_for([option] * K)
        if saved in done:  # the same plan as an earlier option: same stats
            for table in (S, F, P, C, T, FL):
                table[:, o] = table[:, done[saved]]
            continue
        done[saved] = o
        ev = evaluate(step, saved, storage, context)
        problem.evaluations[option] = ev
        _attribute(ev, owner, K, o, problem)
    return problem


def _unhinted_saved(step: StepGraphs, mincut: set[str]) -> set[str]:
    """What torch's min-cut partition saves once the user's activation checkpointing is
    set aside (`JointGraph.torch_partition`): the values that weigh segment boundaries
    (`find_segments`). The step's own partition honours the checkpoint and saves
    almost nothing inside a checkpointed block, so weighed by it the blocks were never
    cut: one segment ran from the first checkpointed layer to past the last, and the
    planner could only recompute it whole (six Linear+gelu layers, two checkpointed:
    2.44 MiB at best against 2.19 MiB for the same model not checkpointed)."""
    if not step.joint.has_checkpoint_hints():
        return mincut
    return _saved_by(step.joint.torch_partition(1.0), step.joint, mincut)


def _attribute(ev: Evaluation, owner: dict[str, int], K: int, o: int, problem: RematProblem) -> None:
    """Fill column ``o`` of S, F, P, C from one all-``o`` evaluation."""
    tl = ev.timeline
    n = len(tl.points)
    owned = np.zeros((K, n))
    region = ev.step.region
    for iv in tl.intervals:
        k = owner.get(iv.node.name) if iv.region == region else None
        if k is None or iv.start == BEFORE or iv.end is None:
            continue  # outputs and gradients live to the end whatever the plan
        end = n - 1 if iv.end is None else min(iv.end, n - 1)
        owned[k, max(iv.start, 0) : end + 1] += iv.nbytes
        crosses = tl.points[max(iv.start, 0)].graph != "backward" and (
            iv.end is None or tl.points[min(iv.end, n - 1)].graph == "backward"
        )
        if crosses:
            problem.S[k, o] += iv.nbytes
    live = np.array([p.live_bytes for p in tl.points], dtype=float)
    below = np.cumsum(owned, axis=0) - owned  # bytes owned by earlier segments
    seg_of_point = _segment_of_points(tl, owner, owned, region)
    for k in range(K):
        for phase, table in (("fw", problem.F), ("bw", problem.P)):
            mask = [(seg_of_point[j] == k) and ((tl.points[j].graph == "backward") == (phase == "bw")) for j in range(n)]
            idx = np.nonzero(mask)[0]
            if len(idx):
                table[k, o] = float(np.max(live[idx] - below[k, idx]))
    device = device_model(tl.device)
    for node in ev.step.backward.graph.nodes if ev.step.backward is not None else []:
        k = owner.get(node.name)
        if k is not None:
            cost = node_cost(node, device)
            problem.T[k, o] += cost.seconds
            problem.FL[k, o] += cost.flops
            problem.C[k, o] += cost.flops + _TIME_WEIGHT * cost.seconds * device.flops_per_s


def _segment_of_points(tl: MemoryTimeline, owner: dict[str, int], owned: np.ndarray, region: str) -> list[int]:
    """Forward points belong to their node's segment; backward points to the latest
    segment that still owns live memory (backward walks segments in reverse). In a
    whole-step timeline, another region's forward points belong to the segment before
    them: an earlier region's to the first, a later region's to the last, whose
    constraint then holds every segment's saved bytes plus the later regions' needs."""
    result: list[int] = []
    last = owned.shape[0] - 1
    current = 0
    in_backward = False
    for j, point in enumerate(tl.points):
        if point.graph != "backward":
            if point.region == region:
                current = owner.get(point.node, current)
            result.append(current)
            continue
        if not in_backward:
            in_backward, current = True, last
        alive = np.nonzero(owned[:, j])[0]
        if len(alive):
            current = min(current, int(alive.max()))
        result.append(current)
    return result
