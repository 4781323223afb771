"""Graph verification: run between passes (``verify=True``) and in tests.

Three layers, cheapest first:

1. FX lint: topological order, every use defined, one output node.
2. Fake-tensor metadata re-check: the graph is re-executed on fake tensors built from
   its placeholders' recorded values, and every node's recomputed shape, dtype and
   device must equal what its metadata claims. A pass that rewires a node to the
   wrong value, forgets to update metadata, or adds a node computing a tensor without
   recording its value, fails here.
3. Step invariants: properties of a forward/backward pair that no single graph can
   check (saved values line up: as many on each side, each forward value of the
   dtype, device and shape of the backward input that receives it; later passes add
   their own, e.g. every offload has
   its reload before first use) via `register_step_invariant`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from memopt.graph import meta
from memopt.graph.step import StepGraphs, output_values

__all__ = [
    "GraphVerificationError",
    "verify_graph",
    "verify_step",
    "register_step_invariant",
    "step_interface",
    "check_interface",
]


class GraphVerificationError(RuntimeError):
    """A graph or step failed verification. The message names the graph, the node
    and the broken property."""


StepInvariant = Callable[[StepGraphs], None]
_STEP_INVARIANTS: list[StepInvariant] = []


def register_step_invariant(check: StepInvariant) -> StepInvariant:
    """Register ``check(step)``, which raises `GraphVerificationError` when a memopt
    invariant does not hold. Usable as a decorator; passes register theirs at import."""
    _STEP_INVARIANTS.append(check)
    return check


def verify_graph(gm: fx.GraphModule, *, name: str = "graph", check_meta: bool = True) -> None:
    """Lint ``gm`` and, when its placeholders carry fake values, re-check every node's
    recorded shape/dtype/device by re-running it on fake tensors."""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with a useful message
        raise GraphVerificationError(f"{name}: FX lint failed: {exc}") from exc
    if check_meta:
        _check_fake_metadata(gm, name)


def verify_step(step: StepGraphs, *, check_meta: bool = True) -> None:
    """`verify_graph` on every graph of the step, then the registered step invariants."""
    for name, gm in step.graphs():
        verify_graph(gm, name=f"region {step.region} {name}", check_meta=check_meta)
    if step.backward is not None:
        try:
            pairs = step.saved_pairs()
        except ValueError as exc:
            raise GraphVerificationError(str(exc)) from exc
        for fw, bw in pairs:
            _check_saved_pair(step.region, fw, bw)
    for check in _STEP_INVARIANTS:
        check(step)


def _check_saved_pair(region: str, fw: fx.Node, bw: fx.Node) -> None:
    """The forward value saved in a slot and the backward placeholder that receives it
    agree on dtype, device and shape. Each graph's own metadata can be consistent while
    the pairing is not (a pass that saved its values in the wrong order, or saved a
    different value than the backward expects): backward would then fail at run time on
    the wrong tensor, far from the pass."""
    saved, received = _described(fw), _described(bw)
    if saved is None or received is None:
        return  # a SymInt, or a hand-built graph without metadata
    if not _same_value(saved, received):
        raise GraphVerificationError(
            f"region {region}: forward saves {fw.name!r} for backward input {bw.name!r}, but they "
            f"differ ({_format(saved)} != {_format(received)}, forward's first). A pass saved the wrong value or reordered the "
            f"saved outputs; keep the forward's saved outputs and the backward's first "
            f"placeholders in the same order (memopt.passes.saved_rewrite does)."
        )


StepInterface = dict[str, list[Any]]
"""What a step's caller reads: (dtype, device, shape) or None for each output it
receives, per graph (`step_interface`)."""


def step_interface(step: StepGraphs) -> StepInterface:
    """The values a region hands back to the code around it, as their metadata records
    them: the forward's user outputs (the first ``num_fwd_outputs``; every output of a
    single graph) and the backward's gradients. No pass may change them: AOTAutograd
    returns them to the caller as the traced graphs promised."""
    forward = output_values(step.forward)
    interface = {step.single_graph_name if step.backward is None else "forward": [
        _described(n) for n in (forward if step.backward is None else forward[: step.num_fwd_outputs])
    ]}
    if step.backward is not None:
        interface["backward"] = [_described(n) for n in output_values(step.backward)]
    return interface


def check_interface(step: StepGraphs, expected: StepInterface) -> None:
    """Raise `GraphVerificationError` when ``step`` returns to its caller other values
    than ``expected`` (`step_interface` of the pipeline's input): a user
    output or a gradient of another dtype, device or shape, or another count of them.
    A gradient may become None (the optimizer update inside backward consumes it)."""
    for graph, now in step_interface(step).items():
        before = expected.get(graph, [])
        if len(now) != len(before):
            raise GraphVerificationError(
                f"region {step.region} {graph}: returns {len(now)} values, the pipeline's input "
                f"returned {len(before)}; a pass must keep the values the caller receives."
            )
        for i, (was, new) in enumerate(zip(before, now)):
            if was is None or (new is None and graph == "backward") or _same_value(was, new):
                continue
            what = "user output" if graph != "backward" else "gradient"
            raise GraphVerificationError(
                f"region {step.region} {graph}: {what} {i} is {_format(new)}, the pipeline's input "
                f"returned {_format(was)}. A pass replaced or rewired a value the caller receives; "
                f"it must return the same values (rewrite what computes them, not the output node)."
            )


def _described(node: fx.Node | None) -> Any:
    value = None if node is None else meta.tensor_value(node)
    if value is None:
        return None
    return (value.dtype, value.device, tuple(value.shape))


def _same_value(was: Any, new: Any) -> bool:
    return (
        new is not None
        and was[:2] == new[:2]
        and len(was[2]) == len(new[2])
        and all(_same_size(a, b) for a, b in zip(was[2], new[2]))
    )


def _format(described: Any) -> str:
    if described is None:
        return "None"
    dtype, device, shape = described
    return f"{dtype} on {device} of shape {tuple(shape)}"


class _MetadataChecker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.graph_name = name

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # the op refuses its rewired inputs: name the node
            first_line = (str(exc).splitlines() or [""])[0].rstrip(".")
            _fail(self.graph_name, n, f"fails on fake tensors of its inputs ({type(exc).__name__}: {first_line})")
        if n.op not in ("placeholder", "output"):
            recorded = meta.fake_value(n)
            if recorded is None and n.op == "call_function" and isinstance(result, torch.Tensor):
                _fail(self.graph_name, n, "computes a tensor but records no value (node.meta['val']), which the "
                      "memory analyses then count as 0 bytes; set it (memopt.graph.meta.set_fake_value or copy_meta)")  # fmt: skip
            _compare(self.graph_name, n, recorded, result)
        return result


def _check_fake_metadata(gm: fx.GraphModule, name: str) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    inputs = [meta.fake_value(p) for p in placeholders]
    if not placeholders or any(v is None for v in inputs):
        return  # hand-built graph without metadata: lint only
    with meta.graph_fake_mode(gm.graph) as fake_mode, _quiet_fake_tensor_log():
        if fake_mode is not None:
            _MetadataChecker(gm, name).run(*inputs)


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Keep torch's fake-tensor logger from printing its own traceback (dozens of
    ERROR lines on stderr) for an op the re-run refuses: the verifier raises a
    `GraphVerificationError` naming the node instead, which the pass manager reports."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def _compare(graph: str, node: fx.Node, recorded: Any, actual: Any) -> None:
    if recorded is None:
        return
    if isinstance(recorded, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            _fail(graph, node, f"recorded a tensor but computes {type(actual).__name__}")
        if recorded.dtype != actual.dtype:
            _fail(graph, node, f"dtype {actual.dtype} != recorded {recorded.dtype}")
        if recorded.device != actual.device:
            _fail(graph, node, f"device {actual.device} != recorded {recorded.device}")
        if len(recorded.shape) != len(actual.shape) or not all(
            _same_size(a, b) for a, b in zip(recorded.shape, actual.shape)
        ):
            _fail(graph, node, f"shape {tuple(actual.shape)} != recorded {tuple(recorded.shape)}")
    elif isinstance(recorded, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(recorded) != len(actual):
            _fail(graph, node, f"{len(actual)} outputs != recorded {len(recorded)}")
        for r, a in zip(recorded, actual):
            _compare(graph, node, r, a)


def _same_size(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b)) or str(a) == str(b)
    except Exception:
        return str(a) == str(b)


def _fail(graph: str, node: fx.Node, problem: str) -> None:
    target = getattr(node.target, "__name__", str(node.target))
    raise GraphVerificationError(
        f"{graph}: node {node.name!r} ({target}): {problem}. A pass rewired this node "
        f"or left its metadata stale; fix the pass or update node.meta via memopt.graph.meta."
    )
