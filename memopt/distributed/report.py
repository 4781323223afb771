"""The per-rank memory report of a sharded model (issue 16, Build 6).

    import memopt.distributed as md
    explanation = memopt.explain(model, *inputs, options={"codegen": "eager"})
    print(md.report(model, explanation, optimizer))

Three tables, each for one rank (every rank runs rank 0's plan, so they agree):

* **model state in ZeRO terms**: parameters, gradients and optimizer state, full (one
  unsharded replica) against this rank's, measured from the tensors
  (`model_state_bytes`), beside ZeRO's formula for the stage
  (`zero_model_state_bytes`, for the dtypes in use and the optimizer's state per
  element, `memopt.optim.state_size`);
* **gathered parameters**: every all-gathered parameter (or bucket of them) of the step,
  the parameters it holds by module path, its bytes, where its gathered value lives on
  the timeline (forward and backward node indices of the
  planned graphs), and whether backward gathers it (or some of a bucket's parameters)
  again instead of keeping it;
* **collectives per step**: count, bytes each rank sends or receives, modelled time
  (`memopt.analysis.cost`, the device's network bandwidth) and how much of it compute
  does not hide (`memopt.analysis.collective_time`: the waits' stalls, in the final
  order) per collective and graph;

then the planned peak per rank. Preconditions: ``model`` went through `shard`;
``explanation`` (optional) is `memopt.explain`'s or `memopt.record`'s for the compiled
model; ``optimizer`` (optional) is the one stepping it. Nothing is allocated.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from tabulate import tabulate

from memopt.analysis.collective_time import CollectiveClock
from memopt.analysis.cost import device_model, node_cost
from memopt.analysis.memory import main_device
from memopt.distributed.memory import model_state_bytes, zero_model_state_bytes
from memopt.distributed.api import shard_state
from memopt.graph import meta
from memopt.graph.step import InputInfo, parameter_name
from memopt.optim.state_size import group_of, predicted_state_bytes
from memopt.units import format_bytes

__all__ = ["report", "CollectiveRow", "GatheredRow", "collectives", "gathered_parameters"]

_KINDS = {
    "_c10d_functional.all_gather_into_tensor.default": "all_gather",
    "_c10d_functional.reduce_scatter_tensor.default": "reduce_scatter",
    "_c10d_functional.all_reduce.default": "all_reduce",
    "_c10d_functional.all_reduce_.default": "all_reduce",
}


@dataclass(frozen=True)
class CollectiveRow:
    """One kind of collective in one graph of one region, per step and rank."""

    region: str
    graph: str
    kind: str
    count: int
    bytes_moved: int
    seconds: float
    exposed: float = 0.0
    """Of ``seconds`` (and time queued behind other collectives), what blocks compute at
    the waits (`memopt.analysis.collective_time`)."""


@dataclass(frozen=True)
class GatheredRow:
    """One all-gathered parameter (or bucket of them): its gathered bytes, where the
    gathered value is live (timeline indices, inclusive; ``end`` None: to the end of the
    step), and whether backward gathers any of its parameters again instead of keeping
    them."""

    region: str
    name: str
    nbytes: int
    start: int
    end: int | None
    gathered_again: bool
    parameters: tuple[str, ...] = ()
    """The parameters it gathers (one, or a bucket's), by their module path."""
    again: tuple[str, ...] = ()
    """Those of ``parameters`` an all-gather of the final backward graph gathers again
    (a forward bucket may be re-gathered in part, in other buckets)."""


def collectives(explanation: Any) -> list[CollectiveRow]:
    """The collectives of every region's final graphs, grouped by region, graph and kind."""
    rows: list[CollectiveRow] = []
    for record in explanation.regions:
        if record.step is None:
            continue
        device = device_model(main_device(record.step))
        clock = CollectiveClock(device)
        for graph_name, gm in record.step.graphs():
            totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
            times = clock.times(gm.graph)
            for node in gm.graph.nodes:
                kind = _KINDS.get(str(node.target)) if node.op == "call_function" else None
                if kind is None:
                    continue
                cost = node_cost(node, device)
                total = totals[kind]
                total[0] += 1
                total[1] += cost.bytes_moved
                total[2] += cost.seconds
                total[3] += times[node].exposed if node in times else 0.0
            for kind, (count, moved, seconds, exposed) in sorted(totals.items()):
                rows.append(CollectiveRow(record.region, graph_name, kind, int(count), int(moved), float(seconds), float(exposed)))
    return rows


def gathered_parameters(explanation: Any) -> list[GatheredRow]:
    """The all-gathered parameters of every region (the waits on their all-gathers), with
    their live ranges on the region's planned timeline, and which of them the final
    backward graph gathers again (read from its all-gathers, not from the plan's
    decisions: the collective passes regroup gathers into buckets of other names)."""
    rows: list[GatheredRow] = []
    for record in explanation.regions:
        if record.step is None or record.timeline_after is None:
            continue
        inputs = dict(zip(record.step.forward.graph.find_nodes(op="placeholder"), record.step.inputs))
        again = _regathered(record.step, inputs)
        for interval in record.timeline_after.intervals:
            node = interval.node
            if not isinstance(node, fx.Node) or interval.graph == "backward" or not meta.is_regatherable(node):
                continue
            params = _parameters_above(node.all_input_nodes, inputs)
            mine = tuple(p for p in params if p in again)
            rows.append(
                GatheredRow(record.region, node.name, interval.nbytes, interval.start, interval.end, bool(mine), params, mine)
            )
    return rows


def _regathered(step: Any, inputs: dict[fx.Node, InputInfo]) -> set[str]:
    """The parameters whose shards (saved for backward) an all-gather of ``step``'s
    backward graph reads."""
    if step.backward is None:
        return set()
    forward_of = {bw: fw for fw, bw in step.saved_pairs()}
    found: set[str] = set()
    for node in step.backward.graph.nodes:
        if node.op != "call_function" or _KINDS.get(str(node.target)) != "all_gather":
            continue
        saved = [forward_of[p] for p in _placeholders_above(node.all_input_nodes) if p in forward_of]
        found.update(_parameters_above(saved, inputs))
    return found


def _placeholders_above(start: list[fx.Node]) -> list[fx.Node]:
    """The placeholders ``start`` is computed from (``start``'s own included)."""
    seen: set[fx.Node] = set()
    stack, found = list(start), []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        else:
            stack.extend(n.all_input_nodes)
    return found


def _parameters_above(start: list[fx.Node], inputs: dict[fx.Node, InputInfo]) -> tuple[str, ...]:
    """The parameters (module paths, in graph order) whose forward placeholders
    ``start`` is computed from: the shards an all-gather reads, through its casts,
    padding and a bucket's concatenation."""
    found = [n for n in _placeholders_above(start) if (info := inputs.get(n)) is not None and info.kind == "parameter"]
    order = {n: i for i, n in enumerate(inputs)}
    return tuple(parameter_name(inputs[n].name) for n in sorted(found, key=order.__getitem__))


def _backward_cell(row: GatheredRow) -> str:
    if not row.again:
        return "kept"
    if len(row.again) == len(row.parameters):
        return "gathered again"
    return f"{len(row.again)} of {len(row.parameters)} gathered again"


def _names_cell(names: tuple[str, ...], shown: int = 2) -> str:
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} (+{len(names) - shown} more)"


def _state_rows(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[list[list[str]], str]:
    state = shard_state(model)
    handles = list(state.params.values())
    numel = sum(h.param.numel() for h in handles)
    itemsize = handles[0].param.element_size() if handles else 4
    have = model_state_bytes(model, optimizer)
    per_element = _state_bytes_per_element(optimizer)
    formula = zero_model_state_bytes(
        numel, state.world, state.stage, param_bytes=itemsize, grad_bytes=itemsize, state_bytes=per_element
    )
    full = zero_model_state_bytes(numel, 1, 0, param_bytes=itemsize, grad_bytes=itemsize, state_bytes=per_element)
    rows = [
        ["parameters", format_bytes(full.params), format_bytes(have.params), format_bytes(formula.params)],
        ["gradients", format_bytes(full.grads), format_bytes(have.grads), format_bytes(formula.grads)],
        ["optimizer state", format_bytes(full.optimizer) if optimizer is not None else "-",
         format_bytes(have.optimizer) if optimizer is not None else "-",
         format_bytes(formula.optimizer) if optimizer is not None else "-"],
        ["total", format_bytes(full.total), format_bytes(have.total), format_bytes(formula.total)],
    ]  # fmt: skip
    title = (
        f"model state, ZeRO stage {state.stage}, rank {state.rank} of {state.world} "
        f"({numel:,} parameter elements; gradients as held now: none between steps after zero_grad)"
    )
    return rows, title


def _state_bytes_per_element(optimizer: torch.optim.Optimizer | None) -> float:
    """The optimizer's state bytes per parameter element, as `predicted_state_bytes`
    gives them after a first step (over whatever tensors it holds: full parameters, or a
    `ShardedOptimizer`'s local parts: the ratio is the same)."""
    if optimizer is None:
        return 0.0
    held = group_of(optimizer).values()
    elements = sum(p.numel() for p, _ in held)
    return sum(predicted_state_bytes(optimizer, p, g) for p, g in held) / elements if elements else 0.0


def _check_arguments(explanation: Any, optimizer: Any) -> None:
    """``explanation`` is an `Explanation` or None, ``optimizer`` an optimizer or None."""
    from memopt.explanation import Explanation

    if explanation is not None and not isinstance(explanation, Explanation):
        swapped = " (an optimizer: pass it as optimizer=...)" if isinstance(explanation, torch.optim.Optimizer) else ""
        raise TypeError(
            f"md.report(model, explanation=None, optimizer=None): explanation is a {type(explanation).__name__}"
            f"{swapped}, expected memopt.explain's or memopt.record's Explanation, or None. Call "
            "md.report(model, optimizer=optimizer) for the model state alone, or md.report(model, explanation, "
            "optimizer)"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"md.report(model, explanation=None, optimizer=None): optimizer is a {type(optimizer).__name__}, "
            "expected the torch.optim.Optimizer stepping the model (a ShardedOptimizer), or None"
        )


def report(model: nn.Module, explanation: Any = None, optimizer: torch.optim.Optimizer | None = None) -> str:
    """The per-rank report of a sharded ``model`` (module docstring). Raises
    `TypeError` when ``explanation`` is not an `Explanation` (an optimizer passed second,
    as `model_state_bytes` takes it) or ``optimizer`` not an optimizer."""
    _check_arguments(explanation, optimizer)
    rows, title = _state_rows(model, optimizer)
    lines = [title, tabulate(rows, headers=["", "full (1 rank)", "this rank", "ZeRO formula"])]
    if explanation is None:
        return "\n".join(lines)
    gathered = gathered_parameters(explanation)
    if gathered:
        again = [g for g in gathered if g.gathered_again]
        params = sum(len(g.parameters) for g in gathered)
        lines += [
            "",
            f"gathered parameters: {len(gathered)}, {format_bytes(sum(g.nbytes for g in gathered))}; "
            f"gathered again in backward: {len(again)}, {sum(len(g.again) for g in gathered)} of {params} parameters",
            tabulate(
                [[g.region, g.name, _names_cell(g.parameters), format_bytes(g.nbytes), g.start,
                  "end" if g.end is None else g.end, _backward_cell(g)] for g in gathered],
                headers=["region", "value", "parameters", "bytes", "live from", "to", "backward"],
            ),
        ]  # fmt: skip
    found = collectives(explanation)
    if found:
        lines += [
            "",
            "collectives per step (each rank):",
            tabulate(
                [[c.region, c.graph, c.kind, c.count, format_bytes(c.bytes_moved), f"{c.seconds * 1e3:.2f}", f"{c.exposed * 1e3:.2f}"]
                 for c in found],
                headers=["region", "graph", "collective", "count", "moved", "modelled ms", "exposed ms"],
            ),
        ]
    lines += ["", f"planned peak on this rank: {format_bytes(explanation.estimated_peak_bytes)}"]
    return "\n".join(lines)
