"""Pass ``recompute_saved_casts``: never keep a dtype copy from forward to backward
when its source is kept (or is smaller) anyway; redo the cast in backward.

Two kinds of saved casts appear once precision is lowered (by memopt or autocast),
because torch's min-cut partitioner never recomputes a value that backward must
materialize anyway:

* **low-precision weight copies**: ``t(w16)`` with ``w16 = w.to(bf16)`` is saved for
  the matmul's input gradient, 2 bytes per parameter held through the backward peak,
  although the fp32 parameter ``w`` is alive for the whole step;
* **fp32 copies of half activations**: ``x32 = x16.to(float32)`` feeding a norm or
  loss computed in fp32 is saved instead of ``x16``, twice the bytes.

Both are recomputed from their source right before their first backward use; casts
and views are deterministic and widening is exact, so gradients are bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, analyze_aliasing, concrete_int
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.value_ops import CAST_OPS, COPY_OPS, VIEW_OPS
from memopt.graph import meta
from memopt.graph.step import StepGraphs, parameter_name
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.saved_rewrite import fake_mode_of_step, is_half, replace_saved_values, run_fake
from memopt.plan.decisions import CAST, Recompute
from memopt.plan.plan import TensorDecision, decision_for_node

__all__ = ["RecomputeSavedCasts", "SavedCast", "saved_cast_of"]

aten = torch.ops.aten
_WIDE = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SavedCast:
    """A saved value that is ``views(cast(source))``: the cast node and the chain of
    view nodes from it to the saved value (empty if the cast itself is saved)."""

    value: fx.Node
    source: fx.Node
    cast: fx.Node
    views: tuple[fx.Node, ...]


def _only_dtype(cast: fx.Node, source: torch.Tensor) -> bool:
    """The cast changes nothing but the dtype (same device, strided, default format)."""
    if cast.target is not aten._to_copy.default:
        return len(cast.args) == 2 and not cast.kwargs
    same = {"device": source.device, "layout": torch.strided, "memory_format": torch.preserve_format}
    for key, value in cast.kwargs.items():
        if key in ("dtype", "non_blocking") or value is None:
            continue
        if key not in same or (torch.device(value) if key == "device" else value) != same[key]:
            return False
    return len(cast.args) == 1


def _replayable(view: fx.Node, symbols: Mapping[fx.Node, fx.Node]) -> bool:
    """A view or layout copy whose other arguments are constants or symbols backward
    receives (``symbols``), at any depth: a size list of a dynamic shape holds the
    forward's symbol nodes (``view(x, [-1, s0])``), which backward must not read."""
    others: list[fx.Node] = []
    fx.node.map_arg((view.args[1:], view.kwargs), others.append)
    return view.target in VIEW_OPS | COPY_OPS and all(a in symbols for a in others)


def saved_cast_of(value: fx.Node, symbols: Mapping[fx.Node, fx.Node] | None = None) -> SavedCast | None:
    """``value`` as views (and layout copies) of a dtype-only cast, if it is one; else
    None. ``symbols`` maps the forward's saved symbols (`StepGraphs.saved_symbols`) to
    their backward placeholders: views sized by them can be replayed in backward,
    views sized by other forward nodes cannot."""
    views: list[fx.Node] = []
    node = value
    while node.op == "call_function" and node.target in VIEW_OPS | COPY_OPS:
        if not _replayable(node, symbols or {}) or not isinstance(node.args[0], fx.Node):
            return None
        views.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target not in CAST_OPS or not isinstance(node.args[0], fx.Node):
        return None
    source = meta.tensor_value(node.args[0])
    if source is None or meta.tensor_value(node) is None or not _only_dtype(node, source):
        return None
    return SavedCast(value, node.args[0], node, tuple(reversed(views)))


def _worth_it(cast: SavedCast, aliasing: GraphAliasing, kept: set[Any], params: set[fx.Node]) -> bool:
    """Recomputing ``cast`` saves memory and is exact: its source is alive anyway (a
    parameter, or already saved), or it widens a half value whose storage is smaller
    than the copy. (Other step inputs may be mutated after forward: not used.)"""
    storages = aliasing.storages_of(cast.source)
    if storages and all(s in kept or s.producer in params for s in storages):
        return True
    before, after = meta.tensor_value(cast.source), meta.tensor_value(cast.cast)
    assert before is not None and after is not None
    copy_bytes = concrete_int(after.numel()) * after.element_size()
    return is_half(before) and after.dtype in _WIDE and sum(s.nbytes for s in storages) < copy_bytes


class RecomputeSavedCasts(Pass):
    """Recompute saved dtype casts in backward from their (kept or smaller) source.

    Purpose: with precision lowered, backward needs low-precision weight copies and
    fp32 copies of half activations; keeping them from forward costs 2 bytes per
    parameter and 4 bytes per element at the backward peak, while their sources are
    alive anyway (parameters) or half the size.

    Preconditions: a training step from AOTAutograd (fake values on every node).

    Guarantees: numerics-preserving, bit-exact. A saved value that is a dtype-only
    ``_to_copy``/``convert_element_type`` followed by views (transpose, view, expand,
    ...) and layout copies (clone, reshape: Inductor's decompositions) is replaced in the saved set by the cast's source when that source is a
    parameter, is already saved, or is a bf16/fp16 value widened to fp32/fp64 whose storage
    is smaller than the copy; backward redoes the cast and the views right before the
    first use (one cast per source, shared by the views saved from it).

    Ordering: after passes that change which values are saved (rematerialization),
    before ``compress_activations`` (which then sees the sources, not the copies).
    """

    name = "recompute_saved_casts"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        if not step.is_training:
            return PassResult.unchanged()
        symbols = step.saved_symbols()
        casts = [  # values AOTAutograd stashes without version check must stay last: left alone
            c
            for fw, _ in step.saved_pairs()
            if not meta.saved_without_version_check(fw) and (c := saved_cast_of(fw, symbols)) is not None
        ]
        if not casts:
            return PassResult.unchanged()
        aliasing = analyze_aliasing(step.forward.graph)
        kept = {s for fw, _ in step.saved_pairs() for s in aliasing.storages_of(fw)}
        placeholders = step.forward.graph.find_nodes(op="placeholder")
        params = {ph for i, ph in enumerate(placeholders) if step.input_kind(i) == "parameter"}
        by_cast: dict[fx.Node, list[SavedCast]] = {}
        for c in casts:
            if _worth_it(c, aliasing, kept, params):
                by_cast.setdefault(c.cast, []).append(c)
        fake_mode = fake_mode_of_step(step)
        recomputed = []
        for cast, group in by_cast.items():
            replace_saved_values(step, [c.value for c in group], [group[0].source], _rebuild(group, symbols, fake_mode))
            kept.update(aliasing.storages_of(group[0].source))
            value = meta.tensor_value(cast)
            recomputed.append(
                {"cast": cast.name, "source": group[0].source.name, "saved_as": [c.value.name for c in group],
                 "dtype": str(value.dtype).replace("torch.", "") if value is not None else None,
                 "bytes": meta.value_bytes(cast)}
            )  # fmt: skip
        if not recomputed:
            return PassResult.unchanged()
        applied = tuple(_applied(ctx, step, cast, group[0].source) for cast, group in by_cast.items())
        return PassResult(True, PreservedAnalyses.none(), {"recomputed": recomputed}, applied=applied)


def _applied(ctx: PassContext, step: StepGraphs, cast: fx.Node, source: fx.Node) -> TensorDecision:
    """The decision about the storage ``cast`` makes (saved as it is or through views)
    as this pass carried it out: cast again in backward from ``source`` (the plan's
    decision about it, if it has one, with that action)."""
    name = f"forward:{cast.name}"
    action = Recompute(option=CAST)
    reason = f"a dtype copy of {_readable(step, source)}, which is kept anyway: cast again in backward (recompute_saved_casts)"
    planned = None if ctx.plan is None else next((d for d in ctx.plan.decisions if d.name == name), None)
    if planned is not None:
        return dataclasses.replace(planned, action=action, reason=reason)
    return decision_for_node(cast, name, step.region, meta.value_bytes(cast), action, reason)


def _readable(step: StepGraphs, node: fx.Node) -> str:
    """``node``'s name, or for a step input the user's name of it (``wte.weight``)."""
    if node.op == "placeholder":
        index = step.forward.graph.find_nodes(op="placeholder").index(node)
        if index < len(step.inputs) and step.inputs[index].name:
            return parameter_name(step.inputs[index].name)
    return node.name


def _rebuild(group: list[SavedCast], symbols: Mapping[fx.Node, fx.Node], fake_mode: Any) -> Any:
    """Redo the group's cast once, then each saved value's views (their symbolic sizes
    read from backward's placeholders, ``symbols``)."""

    def rebuild(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
        cast = group[0].cast
        copies: dict[fx.Node, fx.Node] = {cast: _copy(graph, cast, inputs[0], symbols, fake_mode)}
        results = []
        for c in group:
            for view in c.views:
                if view not in copies:
                    copies[view] = _copy(graph, view, copies[view.args[0]], symbols, fake_mode)  # type: ignore[index]
            results.append(copies[c.views[-1]] if c.views else copies[cast])
        return results

    return rebuild


def _copy(graph: fx.Graph, node: fx.Node, first: fx.Node, symbols: Mapping[fx.Node, fx.Node], fake_mode: Any) -> fx.Node:
    args, kwargs = fx.node.map_arg((node.args[1:], node.kwargs), symbols.__getitem__)
    new = graph.call_function(node.target, (first, *args), dict(kwargs))  # type: ignore[arg-type]
    meta.copy_meta(node, new)
    run_fake(new, fake_mode)
    return new
