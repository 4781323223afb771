"""Pass ``dedupe_collectives``: a tied parameter is gathered once and reduced once.

A parameter read by two modules (GPT-2's token embedding and its output head) goes
through `memopt.distributed.collectives.Unshard` twice, so the traced step holds two
all-gathers of the same shard (stages 2 and 3) and, in backward, two reductions whose
results are added: reduce-scatters at stages 2 and 3, all-reduces at stages 0 and 1.
This pass merges both:

* two all-gathers of the same input (after merging identical views of it) become one,
  waited where the first of the two waits was;
* ``add(v(wait(r(a))), v(wait(r(b))))``, with ``r`` the same reduction on both sides
  (two reduce-scatters or two all-reduces, same reduce op and group) and ``v`` the same
  chain of views, becomes ``v(wait(r(a + b)))``: a sum or average across ranks is
  linear, so one collective of the summed gradients gives the summed result. The merged
  all-reduce's result reaches the graph's output through views only, so
  ``bucket_collectives`` can then bucket it with the other gradients' (the add kept the
  two apart).

AOTAutograd's CSE usually merges the two all-gathers already; the reductions it never
merges (they are separate backward nodes). torch's own ``dedup_fsdp_reduce_scatter``
(`torch/_inductor/fx_passes/fsdp.py`) rewrites the same sum, but only when the add
reads the two waits directly; here each wait is viewed back to the shard's shape first,
so memopt matches the views too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.manager import AnalysisManager
from memopt.graph import meta
from memopt.graph.collectives import is_all_gather, is_reduction, waited_collective, wait_of
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.budget_guard import BudgetGuard
from memopt.passes.saved_rewrite import run_fake

__all__ = ["DedupeCollectives", "merge_duplicate_gathers", "merge_tied_reductions"]

_LINEAR_REDUCTIONS = ("sum", "avg")


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _key(node: fx.Node) -> tuple[Any, ...]:
    return (node.target, repr(node.args), repr(sorted(node.kwargs.items())))


def merge_duplicate_gathers(graph: fx.Graph) -> int:
    """Merge identical views an all-gather reads, then all-gathers of one input; the
    number of all-gathers removed."""
    gathered_views = set()
    for node in graph.nodes:
        source = node.args[0] if is_all_gather(node) and node.args else None
        while isinstance(source, fx.Node) and _is_view(source):
            gathered_views.add(source)
            source = source.args[0] if source.args else None
    seen: dict[tuple[Any, ...], fx.Node] = {}
    for node in list(graph.nodes):
        if node in gathered_views:
            twin = seen.setdefault(_key(node), node)
            if twin is not node:
                node.replace_all_uses_with(twin)
                graph.erase_node(node)
    removed = 0
    gathers: dict[tuple[Any, ...], fx.Node] = {}
    for node in list(graph.nodes):
        if not is_all_gather(node) or wait_of(node) is None:
            continue
        first = gathers.setdefault(_key(node), node)
        if first is node:
            continue
        kept_wait, dup_wait = wait_of(first), wait_of(node)
        assert kept_wait is not None and dup_wait is not None
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order[dup_wait] < order[kept_wait]:
            dup_wait.prepend(kept_wait)  # wait where the first of the two waits was
        dup_wait.replace_all_uses_with(kept_wait)
        graph.erase_node(dup_wait)
        graph.erase_node(node)
        removed += 1
    return removed


def _reduced_chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """For ``v_k(...v_1(wait(r)))`` with each link used once and ``r`` a reduce-scatter
    or an all-reduce: (r, [v_1, ..., v_k])."""
    views: list[fx.Node] = []
    while _is_view(node) and len(node.all_input_nodes) == 1:
        views.append(node)
        node = node.all_input_nodes[0]
        if len(node.users) != 1:
            return None
    collective = waited_collective(node)
    if collective is None or not is_reduction(collective) or len(collective.users) != 1:
        return None
    return collective, list(reversed(views))


def _same_reduction(a: tuple[fx.Node, list[fx.Node]], b: tuple[fx.Node, list[fx.Node]]) -> bool:
    (r_a, views_a), (r_b, views_b) = a, b
    if r_a.target is not r_b.target or r_a.args[1:] != r_b.args[1:] or r_a.kwargs != r_b.kwargs:
        return False  # two reduce-scatters or two all-reduces, same op, group (and size)
    if r_a.args[1] not in _LINEAR_REDUCTIONS:
        return False
    in_a, in_b = meta.tensor_value(r_a.args[0]), meta.tensor_value(r_b.args[0])  # type: ignore[arg-type]
    if in_a is None or in_b is None or in_a.shape != in_b.shape or in_a.dtype != in_b.dtype:
        return False
    return [(v.target, v.args[1:], v.kwargs) for v in views_a] == [(v.target, v.args[1:], v.kwargs) for v in views_b]


def merge_tied_reductions(graph: fx.Graph) -> int:
    """Rewrite ``add(v(wait(r(a))), v(wait(r(b))))`` to ``v(wait(r(a + b)))``, ``r`` a
    reduce-scatter or an all-reduce; the number of reductions removed."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2:
            continue
        if node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        chains = [_reduced_chain(a) for a in node.args]  # type: ignore[arg-type]
        if chains[0] is None or chains[1] is None or not _same_reduction(chains[0], chains[1]):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        early, late = sorted(chains, key=lambda c: order[c[0]])  # type: ignore[arg-type, index]
        r_late = late[0]
        with graph.inserting_before(r_late):
            summed = graph.call_function(torch.ops.aten.add.Tensor, (early[0].args[0], r_late.args[0]))
        meta.copy_provenance(r_late, summed)
        fake_mode = meta.fake_mode_of([r_late])
        if fake_mode is not None:
            run_fake(summed, fake_mode)
        r_late.update_arg(0, summed)
        result = late[1][-1] if late[1] else wait_of(r_late)
        node.replace_all_uses_with(result)  # type: ignore[arg-type]
        graph.erase_node(node)
        r_early = early[0]
        for dead in [*reversed(early[1]), wait_of(r_early), r_early]:
            graph.erase_node(dead)  # type: ignore[arg-type]
        removed += 1
    return removed


class DedupeCollectives(Pass):
    """Gather a tied parameter once and reduce its gradient once (module docstring).

    Purpose: a parameter read twice costs two all-gathers and two reduce-scatters (or
    two all-reduces) of the same bytes.

    Preconditions: topologically sorted graphs with fake values (``meta["val"]``) on
    the collectives' inputs.

    Guarantees: the merged all-gather gives the same value (a gather moves bytes); the
    merged reduction (a reduce-scatter at stages 2 and 3, an all-reduce at stages 0 and
    1) is the same sum in another order (the gradients' own sum before the ranks' sum),
    equal up to rounding. Kept only while the step's estimated peak
    stays within the budget (`memopt.passes.budget_guard`): the first gradient is held
    unreduced, full size, until the second is ready.

    Ordering: after ``remat`` and ``dce`` (it reads the final split); before
    ``bucket_collectives`` (a bucket must not hold a collective this pass removes).
    """

    name = "dedupe_collectives"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        if not any(is_all_gather(n) or is_reduction(n) for _, gm in step.graphs() for n in gm.graph.nodes):
            return PassResult.unchanged()
        guard = BudgetGuard.before(step, analyses, ctx)
        gathers = sum(merge_duplicate_gathers(gm.graph) for _, gm in step.graphs())
        reductions = sum(merge_tied_reductions(gm.graph) for _, gm in step.graphs())
        if not gathers and not reductions:
            return PassResult.unchanged()
        details = {"gathers_removed": gathers, "reductions_removed": reductions}
        summary = f"merged {gathers} duplicate all-gather(s) and {reductions} tied reduction pair(s)"
        return guard.result(analyses, ctx, details, summary)
