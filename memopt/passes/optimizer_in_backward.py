"""The ``optimizer_in_backward`` pass: each parameter's optimizer update inside the
backward graph, right after its gradient is complete (docs/whole_step.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from memopt.analysis.aliasing import analyze_aliasing
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.errors import MemoptOptimizerError
from memopt.graph import meta
from memopt.graph.step import StepGraphs, output_values, parameter_name
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.units import format_bytes

__all__ = ["UpdateInBackward", "parameter_name"]


@dataclass(frozen=True)
class _Target:
    """A parameter updated in backward: forward input ``index``, its gradient ``grad``
    (the backward output at ``index``)."""

    index: int
    param: torch.Tensor
    name: str
    grad: fx.Node


class UpdateInBackward(Pass):
    """Move each parameter's optimizer update into the backward graph and drop its
    gradient from the backward's outputs.

    Purpose: AOTAutograd's backward returns every gradient at its end, so all of them
    are alive together. With ``optimizer_in_backward=opt``, each parameter of ``opt``
    that this region trains is updated by ``memopt::apply_update(grad, param)``
    (`memopt.codegen.update`) as soon as its gradient is complete, and the gradient
    dies there: the backward returns None for it (AOTAutograd hands None to autograd,
    which leaves ``param.grad`` unset; `memopt.optim.in_backward` then marks it).

    Preconditions: a training region whose forward placeholders are the Dynamo inputs
    in order (`StepGraphs.inputs` says which are parameters, with the identity of the
    real tensor) and whose backward returns one gradient per forward input, in order.

    Guarantees: the update of a parameter comes after its gradient's last
    accumulation (the output node and its other users) and after every read of the
    parameter's storage in the backward graph (saved views of it included), so no
    backward value sees the updated weight. The parameter itself is saved for backward
    if it was not (no memory: it is alive anyway). Parameters not in ``opt``, buffers
    and inputs keep their gradients. Raises `MemoptOptimizerError` at compile time if
    a parameter already receives gradients in another compiled frame (a graph break
    inside the model, a weight shared across regions).

    Ordering: last in the pipeline (after ``schedule`` and ``offload``), so the update
    sits at its final place in the backward's order.
    """

    name = "optimizer_in_backward"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        optimizer = ctx.config.optimizer_in_backward
        if optimizer is None or step.backward is None:
            return PassResult.unchanged()
        import memopt.codegen.update  # noqa: F401 - registers memopt::apply_update
        from memopt.optim.in_backward import attach

        state = attach(optimizer)
        targets = _targets(step, {id(p): p for p in state.params() if p.requires_grad})
        if not targets:
            return PassResult.unchanged(reason="no parameter of the optimizer receives a gradient here")
        frame = ctx.region.split("/")[0]
        for t in targets:
            state.check_claim(t.param, t.name, frame)
        placeholders = _saved_parameters(step, [t.index for t in targets])
        readers = _last_readers(step)
        direct = _direct_readers(step) if ctx.config.codegen == "inductor" else {}
        freed = 0
        for t in targets:
            param = placeholders[t.index]
            _insert_update(step.backward, t, param, readers.get(param), direct.get(param, []))
            freed += meta.value_bytes(t.grad)
        step.recompile()
        for t in targets:
            state.claim(t.param, frame)
        names = [t.name for t in targets]
        summary = (f"{len(targets)} parameter update(s) run inside backward; their gradients "
                   f"({format_bytes(freed)}) are freed there instead of returned",)
        return PassResult(True, PreservedAnalyses.none(), {"updated_in_backward": names, "freed_bytes": freed},
                          summary=summary)


def _targets(step: StepGraphs, params: dict[int, torch.Tensor]) -> list[_Target]:
    """The parameters of ``params`` (by id) among the forward inputs that have a
    gradient node in the backward's outputs.

    Raises `MemoptOptimizerError` for a tensor-subclass parameter (a sharded DTensor:
    AOTAutograd flattens it into several inputs), and ``ValueError`` (the pass then
    falls back: gradients are returned as usual) if the forward's inputs are not the
    region's inputs one to one, or a gradient's shape or dtype is not its parameter's."""
    grads = output_values(step.backward) if step.backward is not None else []
    primals = step.forward.graph.find_nodes(op="placeholder")
    mine = [(i, info) for i, info in enumerate(step.inputs) if info.kind == "parameter" and info.identity in params]
    for i, info in mine:
        if is_traceable_wrapper_subclass(params[info.identity]):
            raise MemoptOptimizerError(
                f"optimizer_in_backward: parameter {parameter_name(info.name)} is a "
                f"{type(params[info.identity]).__name__} (a sharded or wrapped parameter), whose gradient the "
                "backward graph holds in pieces. Fix: drop optimizer_in_backward for sharded models "
                "(memopt.distributed.shard) for now."
            )
    if mine and len(primals) != len(step.inputs):
        raise ValueError(
            f"the forward graph has {len(primals)} inputs for the region's {len(step.inputs)}: which gradient "
            "belongs to which parameter is unknown"
        )
    targets = []
    for i, info in mine:
        grad = grads[i] if i < len(grads) else None
        if grad is None:
            continue
        param, value = params[info.identity], meta.tensor_value(grad)
        if value is None or tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
            raise ValueError(
                f"backward output {i} ({grad.name}) does not look like the gradient of parameter "
                f"{parameter_name(info.name)} (shape {tuple(param.shape)}, {param.dtype})"
            )
        targets.append(_Target(i, param, parameter_name(info.name), grad))
    return targets


def _saved_parameters(step: StepGraphs, indices: list[int]) -> dict[int, fx.Node]:
    """For each forward input index in ``indices``: its backward placeholder, saving the
    input for backward (first among the saved tensors) if it is not saved yet."""
    assert step.backward is not None
    primals = step.forward.graph.find_nodes(op="placeholder")
    saved = {fw: bw for fw, bw in step.saved_pairs()}
    result: dict[int, fx.Node] = {}
    missing = []
    for i in indices:
        if primals[i] in saved:
            result[i] = saved[primals[i]]
        else:
            missing.append(i)
    if not missing:
        return result
    out = step.forward.graph.find_nodes(op="output")[0]
    values = list(out.args[0])
    new = [primals[i] for i in missing]
    out.args = (tuple(values[: step.num_fwd_outputs] + new + values[step.num_fwd_outputs :]),)
    bw_placeholders = step.backward.graph.find_nodes(op="placeholder")
    first = next((p for p in bw_placeholders if not meta.is_symbolic(p)), bw_placeholders[-1])
    for i in missing:
        with step.backward.graph.inserting_before(first):
            ph = step.backward.graph.placeholder(primals[i].name)
        meta.copy_meta(primals[i], ph)
        result[i] = ph
    return result


def _last_readers(step: StepGraphs) -> dict[fx.Node, fx.Node]:
    """Backward placeholder of a saved value -> the last backward node reading any
    storage of it (its views included)."""
    assert step.backward is not None
    graph = step.backward.graph
    aliasing = analyze_aliasing(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    last: dict[fx.Node, fx.Node] = {}
    placeholders = set(graph.find_nodes(op="placeholder"))
    for node in graph.nodes:
        for storage in aliasing.storages_of(node):
            if storage.producer not in placeholders:
                continue
            for user in node.users:
                current = last.get(storage.producer)
                if user.op != "output" and (current is None or order[user] > order[current]):
                    last[storage.producer] = user
    return last


def _direct_readers(step: StepGraphs) -> dict[fx.Node, list[fx.Node]]:
    """Backward placeholder -> the tensor values computed from any storage of it (its
    views' users included; a tuple-valued reader by its ``getitem`` results). Passed to
    the update as ``after`` under Inductor (`memopt.codegen.update`), which then
    computes them before the update instead of inside a later kernel."""
    assert step.backward is not None
    graph = step.backward.graph
    aliasing = analyze_aliasing(graph)
    placeholders = set(graph.find_nodes(op="placeholder"))
    found: dict[fx.Node, dict[fx.Node, None]] = {}
    for node in graph.nodes:
        for storage in aliasing.storages_of(node):
            if storage.producer not in placeholders:
                continue
            for user in node.users:
                if user.op == "output":
                    continue
                values = [user] if isinstance(meta.fake_value(user), torch.Tensor) else [
                    u for u in user.users if isinstance(meta.fake_value(u), torch.Tensor)]
                found.setdefault(storage.producer, {}).update(dict.fromkeys(values))
    return {p: list(values) for p, values in found.items()}


def _insert_update(backward: fx.GraphModule | None, t: _Target, param: fx.Node, reader: fx.Node | None,
                   after: list[fx.Node]) -> None:
    """``apply_update(grad, param)`` after the gradient's and the parameter's last
    readers (``after``: values it takes only to order them before it); the gradient's
    output slot becomes None."""
    assert backward is not None
    graph = backward.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchors = [t.grad, param, *after, *(u for u in t.grad.users if u.op != "output")]
    if reader is not None:
        anchors.append(reader)
    anchor = max(anchors, key=order.__getitem__)
    if anchor.op == "placeholder":
        anchor = graph.find_nodes(op="placeholder")[-1]
    with graph.inserting_after(anchor):
        node = graph.call_function(torch.ops.memopt.apply_update.default, (t.grad, param, t.name, after))
    meta.set_fake_value(node, None)
    meta.copy_provenance(t.grad, node)
    out = graph.find_nodes(op="output")[0]
    values = list(out.args[0])
    values[t.index] = None
    out.args = (tuple(values),)


