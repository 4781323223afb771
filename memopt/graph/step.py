"""`StepGraphs`: the graphs of one compiled region, as memopt's passes see them.

A training region is a pair: AOTAutograd's forward graph, whose outputs are the user
outputs followed by the values saved for backward, and the backward graph, whose
inputs are those saved values followed by the incoming gradients (tangents). An
inference region is a single forward graph. Cross-graph rewrites (recompute a saved
value in backward, offload it, compress it) change both graphs at once, which is why
passes take the whole step rather than one graph.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch.fx import _lazy_graph_module as torch_lazy_graph_module
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from memopt.graph import meta

if TYPE_CHECKING:
    from memopt.analysis.optimizer_memory import OptimizerMemory

__all__ = ["StepGraphs", "InputInfo", "clone_graph_module", "output_values", "placeholder_inputs"]

@dataclass(frozen=True)
class InputInfo:
    """One input of a region as the user knows it.

    ``kind``: ``"parameter"``, ``"buffer"``, ``"input"`` (a user tensor),
    ``"activation"`` (a tensor produced by an earlier compiled region, i.e. after a
    graph break), ``"symbol"`` (a SymInt) or ``"other"``. ``name`` is Dynamo's source
    name (``L['self']._modules['fc']._parameters['weight']``) or the placeholder name.
    """

    kind: str
    name: str = ""
    identity: int | None = None  # id() of the real tensor, to count shared inputs once


def parameter_name(source: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` -> ``fc.weight`` (the source
    as given when it has no such parts)."""
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", source)
    return ".".join(parts) if parts else source


def placeholder_inputs(inputs: tuple[InputInfo, ...], gm: fx.GraphModule) -> tuple[InputInfo, ...]:
    """``inputs`` (one per Dynamo-level input) laid out as ``gm``'s placeholders, which
    AOTAutograd made: it flattens a tensor-subclass input into several placeholders (a
    DTensor parameter into its local tensor and its device mesh) and may add inputs of
    its own (RNG seeds, effect tokens). The first tensor part of an input gets the
    input's kind, name and identity; its other parts are ``"other"`` (``"symbol"`` for
    sizes), as are added inputs. Precondition: ``inputs`` describe the Dynamo graph
    AOTAutograd traced. Returned unchanged when a placeholder carries no descriptor
    (hand-built graphs) or names an input beyond ``inputs``."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    found = [meta.dynamo_input_of(ph) for ph in placeholders]
    if not inputs or any(f is None or (f[0] is not None and f[0] >= len(inputs)) for f in found):
        return inputs
    out: list[InputInfo] = []
    given: set[int] = set()
    for ph, (index, part) in zip(placeholders, found):  # type: ignore[misc]
        if index is None:
            out.append(InputInfo("symbol" if meta.is_symbolic(ph) else "other", ph.name))
        elif not part or (index not in given and meta.tensor_value(ph) is not None):
            given.add(index)
            out.append(inputs[index])
        else:
            kind = "symbol" if meta.is_symbolic(ph) else "other"
            out.append(InputInfo(kind, f"{inputs[index].name}.{part}"))
    return tuple(out)


def clone_graph_module(gm: fx.GraphModule, lazy: bool = False) -> fx.GraphModule:
    """An independent copy of ``gm``: new nodes, shallow-copied node metadata (fake
    values are shared, they are immutable), same submodules and attributes. ``lazy``:
    a lazy graph module (torch's ``_LazyGraphModule``), whose Python code is generated
    when first needed (run, ``.code``) instead of now: for a copy that is rewritten
    before it runs, or never runs (a candidate a search may drop)."""
    if lazy:
        with _use_lazy_graph_module(True):
            new = torch_lazy_graph_module._make_graph_module(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    else:
        new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def output_values(gm: fx.GraphModule) -> list[fx.Node | None]:
    """The flat list of values a graph returns (None for non-node outputs)."""
    out = gm.graph.find_nodes(op="output")[0]
    args = out.args[0]
    if not isinstance(args, (list, tuple)):
        args = (args,)
    return [a if isinstance(a, fx.Node) else None for a in args]


@dataclass
class StepGraphs:
    """The forward (and, for training, backward) graph of one compiled region.

    ``num_fwd_outputs`` counts the forward outputs that are not saved for backward
    (user outputs, mutated inputs, RNG offsets, effect tokens); the rest of the forward
    outputs are the saved values, which the backward takes as its first inputs in the
    same order (after any saved SymInts, see `saved_outputs`).
    """

    forward: fx.GraphModule
    backward: fx.GraphModule | None = None
    num_fwd_outputs: int = 0
    region: str = "0"
    inputs: tuple[InputInfo, ...] = ()
    """What each Dynamo-level input is, in forward-placeholder order (empty when
    unknown, e.g. for hand-built graphs: then every input counts as ``"input"``)."""
    joint: Any = None
    """For training regions: AOTAutograd's joint graph (`memopt.graph.partition.JointGraph`),
    which the rematerialization pass re-partitions. Passes never mutate it."""
    fused_codegen: bool = False
    """The graphs run through a fusing code generator (Inductor): memory analyses
    treat pointwise values fused into their consumers as never materialized."""
    num_user_outputs: int | None = None
    """How many forward outputs the user sees (the rest of the first
    ``num_fwd_outputs`` are mutated inputs written back after the graph); None when
    unknown."""
    optimizer: OptimizerMemory | None = None
    """The training step's optimizer memory (`memopt.analysis.optimizer_memory`), when
    an optimizer is given (``optimizer_in_backward`` or ``optimizer``): the timeline
    then counts its state, and where gradients die. None: not counted."""
    grads_held: frozenset[int] = frozenset()
    """Identities (`InputInfo.identity`) of the parameters whose ``.grad`` exists when
    the step starts (gradient accumulation's later micro-batches, or a loop that zeroes
    gradients with ``set_to_none=False``): the timeline counts each such gradient live
    throughout the step (in the baseline), and the gradient backward returns for it
    dying when backward ends (autograd adds it into ``.grad``). Empty: every
    ``.grad`` is None when the step starts, and backward's gradients become them."""
    single_graph_name: str = "inference"
    """Name of the forward graph when there is no backward: ``"inference"`` for
    AOTAutograd's inference graph, ``"dynamo"`` for the Dynamo-level graph that the
    pre-autograd pipeline (precision lowering) rewrites before AOTAutograd traces it."""

    def input_kind(self, index: int) -> str:
        """Kind of forward placeholder ``index`` (see `InputInfo.kind`)."""
        return self.inputs[index].kind if index < len(self.inputs) else "input"

    @property
    def is_training(self) -> bool:
        return self.backward is not None

    def inputs_with_gradient(self) -> frozenset[int]:
        """Indices of the forward placeholders that get a gradient in this step (a
        parameter that requires grad, an input that does); empty for inference.

        Read from AOTAutograd's joint graph when the step has it (``joint``: after its
        forward outputs it returns one gradient, or None, per forward input, and no pass
        rewrites it), else from the backward's outputs, one per forward input in order:
        the ``optimizer_in_backward`` pass replaces an updated parameter's gradient there
        by None, although the gradient exists until its update."""
        if self.backward is None:
            return frozenset()
        if self.joint is not None:
            grads = output_values(self.joint.module)[self.joint.num_fwd_outputs :]
        else:
            grads = output_values(self.backward)
        return frozenset(i for i, grad in enumerate(grads) if grad is not None)

    def graphs(self) -> Iterator[tuple[str, fx.GraphModule]]:
        """(name, graph) for each graph: ``forward``/``backward``, or the single graph's
        name (``inference``, or ``dynamo`` before AOTAutograd)."""
        if self.backward is None:
            yield self.single_graph_name, self.forward
        else:
            yield "forward", self.forward
            yield "backward", self.backward

    def saved_outputs(self) -> list[fx.Node]:
        """Forward nodes saved for backward, in forward-output order."""
        if self.backward is None:
            return []
        outs = output_values(self.forward)[self.num_fwd_outputs :]
        return [o for o in outs if o is not None]

    def saved_inputs(self) -> list[fx.Node]:
        """Backward placeholders that receive saved values (all non-tangent inputs
        before the first tangent)."""
        if self.backward is None:
            return []
        result = []
        for node in self.backward.graph.find_nodes(op="placeholder"):
            if meta.is_tangent(node):
                break
            result.append(node)
        return result

    def saved_pairs(self) -> list[tuple[fx.Node, fx.Node]]:
        """(forward node, backward placeholder) for every saved value.

        AOTAutograd orders saved tensors before saved SymInts in the forward outputs
        but SymInts first in the backward inputs; each kind keeps its order, so the
        two lists are matched kind by kind.
        """
        fw = self.saved_outputs()
        bw = self.saved_inputs()
        fw_sym = [n for n in fw if meta.is_symbolic(n)]
        bw_sym = [n for n in bw if meta.is_symbolic(n)]
        fw_rest = [n for n in fw if not meta.is_symbolic(n)]
        bw_rest = [n for n in bw if not meta.is_symbolic(n)]
        if len(fw_sym) != len(bw_sym) or len(fw_rest) != len(bw_rest):
            raise ValueError(
                f"region {self.region}: forward saves {len(fw_rest)} values and "
                f"{len(fw_sym)} symbols but backward takes {len(bw_rest)} and "
                f"{len(bw_sym)}; the step's graphs disagree."
            )
        return list(zip(fw_rest, bw_rest)) + list(zip(fw_sym, bw_sym))

    def saved_symbols(self) -> dict[fx.Node, fx.Node]:
        """Forward node -> backward placeholder for every saved symbol (a dynamic
        shape's SymInt): what a rewrite that rebuilds a value in backward reads its
        symbolic sizes from."""
        return {fw: bw for fw, bw in self.saved_pairs() if meta.is_symbolic(fw)}

    def clone(self) -> StepGraphs:
        """A deep copy of the graphs (metadata shared), for fallback snapshots."""
        return dataclasses.replace(
            self,
            forward=clone_graph_module(self.forward),
            backward=None if self.backward is None else clone_graph_module(self.backward),
        )

    def recompile(self) -> None:
        for _, gm in self.graphs():
            gm.recompile()
