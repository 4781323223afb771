"""Node metadata accessors: the one module that names ``node.meta`` keys.

torch stores what memopt needs in ``node.meta`` under keys that move between releases
(``val``, ``stack_trace``, ``tensor_meta``...). Everything else in memopt goes through
these functions, so a rename in torch is a one-line fix here, pinned by
``tests/test_graph_meta.py``.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memopt._compat import optimization_hint

__all__ = [
    "SourceLocation",
    "fake_value",
    "has_fake_value",
    "set_fake_value",
    "set_example_value",
    "example_value_is_none",
    "fake_mode_of",
    "saved_without_version_check",
    "tensor_value",
    "value_bytes",
    "is_symbolic",
    "dynamo_source_name",
    "dynamo_input_of",
    "source_location",
    "module_path",
    "is_tangent",
    "is_primal",
    "is_random",
    "has_side_effects",
    "must_save_tag",
    "set_must_save_tag",
    "checkpoint_must_save",
    "checkpoint_hint",
    "drop_checkpoint_hints",
    "set_memopt_tag",
    "memopt_tag",
    "copy_meta",
    "copy_provenance",
    "copy_dynamo_provenance",
    "graph_fake_mode",
    "running_fake",
]

_VAL = "val"
_DESC = "desc"  # AOTAutograd's descriptor of what a placeholder holds (torch >= 2.9)
_EXAMPLE_VALUE = "example_value"  # Dynamo-level graphs record values under this key
_STACK_TRACE = "stack_trace"
_MODULE_STACK = "nn_module_stack"
_MEMOPT = "memopt"  # memopt's own tags live under one key: meta["memopt"][name]
_RECOMPUTE = "recompute"  # torch's CheckpointPolicy of a joint-graph node
_AC_GRAPH_ID = "ac_graph_id"  # which torch.utils.checkpoint region traced the node
_HAS_BACKWARD_HOOK = "has_backward_hook"
_PINNED = "pinned"  # memopt tag: memopt itself tagged the node must-save (set_must_save_tag)


def fake_value(node: fx.Node) -> Any:
    """The example value AOTAutograd/Dynamo recorded for ``node`` (FakeTensor, SymInt,
    tuple of them, ...), or None if the graph carries no metadata for it. Dynamo-level
    graphs (before AOTAutograd) record it under a different key; both are read."""
    if _VAL in node.meta:
        return node.meta[_VAL]
    return node.meta.get(_EXAMPLE_VALUE)


def has_fake_value(node: fx.Node) -> bool:
    """Whether ``node`` of an AOTAutograd graph carries its fake value (``val``; None
    included: an op that returns nothing). Dynamo-level graphs record theirs under
    another key, which `fake_value` also reads and this does not."""
    return _VAL in node.meta


def tensor_value(node: fx.Node) -> torch.Tensor | None:
    """The node's example value if it is a single tensor, else None."""
    val = fake_value(node)
    return val if isinstance(val, torch.Tensor) else None


def value_bytes(node: fx.Node) -> int:
    """Bytes of ``node``'s value if it is a single tensor (0 otherwise); a symbolic
    size counts at its example input's value (`memopt._compat.optimization_hint`)."""
    value = tensor_value(node)
    if value is None:
        return 0
    numel = value.numel()
    return (numel if isinstance(numel, int) else optimization_hint(numel)) * value.element_size()


def set_fake_value(node: fx.Node, value: Any) -> None:
    """Record ``value`` as the node's example value."""
    node.meta[_VAL] = value


def fake_mode_of(nodes: list[fx.Node]) -> Any:
    """The FakeTensorMode the nodes' example values were made in (None if they hold no
    fake tensor). Dynamo hands its backend a tracing context with a fresh fake mode,
    so the mode of the values themselves is the one to re-run a Dynamo graph in."""
    from torch._subclasses.fake_tensor import FakeTensor

    for node in nodes:
        value = fake_value(node)
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return None


def saved_without_version_check(node: fx.Node) -> bool:
    """AOTAutograd marks values stashed on ``ctx`` (not ``save_for_backward``), which
    its partitioner keeps last among the saved values."""
    return bool(node.meta.get("saved_tensor_with_no_vc_check", False))


def example_value_is_none(node: fx.Node) -> bool:
    """Whether a node of a Dynamo-level graph records None as its example value (as
    Dynamo does for some nodes that produce no tensor); passes that recompute example
    values keep such a None."""
    return _EXAMPLE_VALUE in node.meta and node.meta[_EXAMPLE_VALUE] is None


def set_example_value(node: fx.Node, value: Any) -> None:
    """Record ``value`` as the example value of a node of a Dynamo-level graph (the
    key Dynamo and Inductor's pre-grad passes read)."""
    node.meta[_EXAMPLE_VALUE] = value


@dataclass(frozen=True)
class SourceLocation:
    """The user source line that produced a value."""

    filename: str
    lineno: int
    function: str
    code: str

    def __str__(self) -> str:
        short = self.filename.rsplit("/", 1)[-1]
        return f"{short}:{self.lineno} in {self.function}: {self.code}".rstrip(": ")

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "lineno": self.lineno,
            "function": self.function,
            "code": self.code,
        }


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')
_INTERNAL = ("/torch/", "<eval_with_key>", "/functorch/")
_MEMOPT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MEMOPT_USER_CODE = os.path.join(_MEMOPT_ROOT, "testing")  # the zoo's models are user code


def _is_internal(filename: str) -> bool:
    if any(part in filename for part in _INTERNAL):
        return True
    return filename.startswith(_MEMOPT_ROOT) and not filename.startswith(_MEMOPT_USER_CODE)


_LIBRARY = ("/site-packages/", "/dist-packages/")
_LIBRARY_MODELS = ("/transformers/models/", "/torchvision/models/", "/timm/models/")
"""Folders of installed libraries that hold model definitions (``modeling_gpt2.py``),
as opposed to the helpers every model calls (``transformers/pytorch_utils.py``'s
``Conv1D``, ``activations.py``, ``integrations/sdpa_attention.py``, the loss)."""


def _is_library_helper(filename: str) -> bool:
    path = filename.replace(os.sep, "/")
    return any(part in path for part in _LIBRARY) and not any(part in path for part in _LIBRARY_MODELS)


def source_location(node: fx.Node) -> SourceLocation | None:
    """The line of the model's code that made the node: in its recorded stack trace,
    the innermost frame outside torch and memopt that is not an installed library's
    helper (a file under ``site-packages`` outside a library's model definitions, such
    as ``transformers/models/``): for a value made inside a Hugging Face model's shared
    ``Conv1D``, activation or attention function, the line of ``modeling_*.py`` (or of
    the user's own model) that called it. When every such frame is a library helper,
    the innermost of them. None when the graph recorded no trace (AOTAutograd keeps
    Dynamo's traces on forward nodes and on the backward nodes derived from them)."""
    trace = node.meta.get(_STACK_TRACE)
    if not isinstance(trace, str):
        return None
    lines = trace.splitlines()
    best: SourceLocation | None = None
    helper: SourceLocation | None = None
    for i, line in enumerate(lines):
        match = _FRAME.search(line)
        if match is None:
            continue
        filename = match.group("file")
        if _is_internal(filename):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if _FRAME.search(code):
            code = ""
        location = SourceLocation(filename, int(match.group("line")), match.group("fn"), code)
        if _is_library_helper(filename):
            helper = location
        else:
            best = location
            helper = None  # a helper called from this frame, not beside it
    return helper if best is None else best


_DYNAMO_ROOT = re.compile(r"^L\[[^\]]*\](\[\d+\])*\.?")
_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


def module_path(node: fx.Node) -> str | None:
    """The dotted path, from the compiled model, of the innermost ``nn.Module`` whose
    forward made the node (``model.layers.0.mlp.gate_proj``): what tells two layers'
    values apart where they share a source line. None when Dynamo recorded no module,
    or the node was made by the model's own ``forward``."""
    stack = node.meta.get(_MODULE_STACK) or {}
    # Entries under the compiled callable's arguments (L[...]); a global's (G[...], a
    # function a library wraps as a module) is no path in the model.
    local = [str(entry[0]) for entry in stack.values() if str(entry[0]).startswith("L[")]
    if not local:
        return None
    path = local[-1]
    path = _INDEX.sub(lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), _DYNAMO_ROOT.sub("", path))
    return path.strip(".") or None


def dynamo_source_name(node: fx.Node) -> str | None:
    """For a placeholder of a Dynamo graph, the source it was read from, e.g.
    ``L['self']._modules['fc']._parameters['weight']``; None if Dynamo recorded none."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    return name if isinstance(name, str) else None


def dynamo_input_of(node: fx.Node) -> tuple[int | None, str] | None:
    """Which Dynamo-level input an AOTAutograd placeholder holds, from its descriptor:
    ``(i, "")`` for input ``i`` itself, ``(i, "_local_tensor")`` for a part of input
    ``i`` when AOTAutograd flattened a tensor subclass (a DTensor parameter becomes its
    local tensor and its device mesh; sizes and strides read ``"size"``/``"stride"``),
    ``(None, "")`` for an input AOTAutograd added (RNG seeds and offsets, effect
    tokens). None when the node has no descriptor (a hand-built graph)."""
    from torch._functorch._aot_autograd import descriptors as d

    desc = node.meta.get(_DESC)
    if not isinstance(desc, d.AOTInput):
        return None
    parts: list[str] = []
    while isinstance(desc, (d.SubclassGetAttrAOTInput, d.SubclassSizeAOTInput, d.SubclassStrideAOTInput)):
        if isinstance(desc, d.SubclassGetAttrAOTInput):
            parts.append(desc.attr)
        else:
            parts.append("size" if isinstance(desc, d.SubclassSizeAOTInput) else "stride")
        desc = desc.base
    index = desc.idx if isinstance(desc, d.PlainAOTInput) else None
    return index, ".".join(reversed(parts))


def is_symbolic(node: fx.Node) -> bool:
    """The node's value is a SymInt/SymFloat/SymBool (a dynamic-shape symbol)."""
    return isinstance(fake_value(node), (torch.SymInt, torch.SymFloat, torch.SymBool))


def is_tangent(node: fx.Node) -> bool:
    """A backward-graph input that carries an incoming gradient (AOTAutograd naming)."""
    return node.op == "placeholder" and "tangents" in node.name


def is_primal(node: fx.Node) -> bool:
    """A forward-graph input: parameter, buffer or user input (AOTAutograd naming)."""
    return node.op == "placeholder" and "primals" in node.name


def is_random(node: fx.Node) -> bool:
    """The op draws from a random number generator (dropout, rand, ...). Attention
    ops are tagged random because of their ``dropout_p`` argument; with
    ``dropout_p=0`` they draw nothing and are deterministic."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    for i, arg in enumerate(target._schema.arguments):
        if arg.name == "dropout_p":
            value = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", arg.default_value)
            return not (isinstance(value, (int, float)) and value == 0)
    return True


def has_side_effects(node: fx.Node) -> bool:
    """The op mutates state or has effects beyond its outputs (in-place ops, copies
    into inputs, collectives, prints): it must run exactly where it is, once (except
    a regatherable all-gather, `is_regatherable`, which the planner may repeat)."""
    if node.op != "call_function":
        return node.op in ("call_module", "call_method")
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if schema.is_mutable or any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
        ):
            return True
        namespace = target.namespace
        if namespace in ("_c10d_functional", "c10d_functional", "_dtensor", "c10d"):
            return True
        # ops torch registers as side-effecting without a mutable schema: stream and
        # event ops, inductor.resize_storage_bytes_ (frees its input's storage),
        # asserts (torch.fx.node.has_side_effect); random draws are `is_random`'s
        return node.is_impure(impure_random=False)
    return node.is_impure()


_GATHER = "_c10d_functional.all_gather_into_tensor.default"
_WAIT = "_c10d_functional.wait_tensor.default"


def is_regatherable(node: fx.Node) -> bool:
    """An all-gather of a step input (a parameter shard, through views, casts and
    padding), or the wait on one: gathering the same shards again gives the same value, so like a
    recomputation it may run again in backward instead of keeping the gathered value
    (ZeRO-3's "reshard after forward"). Every rank must make the same choice."""
    if node.op != "call_function":
        return False
    if str(node.target) == _WAIT:
        source = node.args[0] if node.args else None
        return isinstance(source, fx.Node) and is_regatherable(source)
    if str(node.target) != _GATHER or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return _of_step_inputs(node.args[0])


def is_gathered_copy(node: fx.Node) -> bool:
    """A copy of gathered parameter rows out of a bucket (`memopt.passes.collectives_bucket`:
    each parameter's rows are copied out of the bucket's gathered buffer), reached
    through views of a re-gatherable all-gather: a gathered parameter too, for the
    memory breakdown."""
    if node.op != "call_function" or node.target is not torch.ops.aten.clone.default or not node.args:
        return False
    source = node.args[0]
    while isinstance(source, fx.Node) and source.op == "call_function" and not is_regatherable(source):
        if not (_cast_or_view(source) or source.target is operator.getitem or _is_split(source)):
            return False
        source = source.args[0] if source.args else None
    return isinstance(source, fx.Node) and is_regatherable(source)


def _is_split(node: fx.Node) -> bool:
    return node.target in (torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor)


def _of_step_inputs(source: fx.Node) -> bool:
    """``source`` is step inputs through casts, views and padding, or a concatenation
    of such (a bucket of shards, `memopt.passes.collectives_bucket`)."""
    while source.op == "call_function" and len(source.all_input_nodes) == 1 and _cast_or_view(source):
        source = source.all_input_nodes[0]
    if source.op == "call_function" and source.target is torch.ops.aten.cat.default:
        return all(_of_step_inputs(part) for part in source.all_input_nodes)
    return source.op == "placeholder"


def _cast_or_view(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    aliasing = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return aliasing or target in (
        torch.ops.prims.convert_element_type.default,
        torch.ops.aten._to_copy.default,
        torch.ops.aten.constant_pad_nd.default,  # uneven shards are padded to equal rows
    )


def must_save_tag(node: fx.Node) -> bool:
    """The node is tagged must-save (``CheckpointPolicy.MUST_SAVE``), by whoever: torch's
    checkpoint or partitioner, the user's selective checkpointing policy, or memopt
    (`set_must_save_tag`). Torch's partitioner never recomputes such a value;
    `checkpoint_must_save` says which of these tags are only a checkpoint's preference."""
    from torch.utils.checkpoint import CheckpointPolicy

    return node.meta.get(_RECOMPUTE) == CheckpointPolicy.MUST_SAVE


def set_must_save_tag(node: fx.Node) -> None:
    """Mark ``node``'s value must-save, as selective activation checkpointing does, and
    remember that memopt set it (for correctness: `checkpoint_must_save` is then False,
    whatever tagged the node before). Torch's partitioner and memopt's planner then
    never recompute it."""
    from torch.utils.checkpoint import CheckpointPolicy

    node.meta[_RECOMPUTE] = CheckpointPolicy.MUST_SAVE
    set_memopt_tag(node, _PINNED, True)


def checkpoint_must_save(node: fx.Node) -> bool:
    """The node's must-save tag is the user's activation checkpointing asking for the
    value to be kept, not a correctness constraint: the node was traced inside a
    ``torch.utils.checkpoint`` region (torch records its ``ac_graph_id``) and is tagged
    must-save by the checkpoint's policy (selective checkpointing's ``MUST_SAVE``) or by
    torch's partitioner at the boundary between two consecutive checkpointed regions
    (``cleanup_recompute_tags``). Recomputing such a value gives the same numbers as
    saving it; a planner working to a budget may do either.

    False (the tag stays binding) when memopt tagged the node itself
    (`set_must_save_tag`: a read of an input the step writes), when the node carries a
    backward hook (torch saves a checkpoint output with a backward hook to break a
    cycle between the hook and the recomputation), and when the value is written into a
    graph input (torch's ``force_save_bw_mutation_src``: recomputing the source of a
    mutation would apply it twice). Random ops and ops with side effects are the
    planner's own constraints, whatever their tag (`memopt.plan.segments.must_save`)."""
    if not must_save_tag(node) or _AC_GRAPH_ID not in node.meta:
        return False
    if memopt_tag(node, _PINNED, False) or node.meta.get(_HAS_BACKWARD_HOOK, False):
        return False
    return not any(
        u.op == "call_function"
        and u.target is torch.ops.aten.copy_.default
        and len(u.args) > 1
        and u.args[1] is node
        and isinstance(u.args[0], fx.Node)
        and u.args[0].op == "placeholder"
        for u in node.users
    )


def checkpoint_hint(node: fx.Node) -> bool:
    """The node carries a policy tag of the user's activation checkpointing that only
    says whether the user would rather save or recompute the value: a checkpointed
    node's ``PREFER_RECOMPUTE`` or ``MUST_RECOMPUTE``, or a must-save tag
    `checkpoint_must_save` calls a preference. Saving and recomputing such a value give
    the same numbers."""
    from torch.utils.checkpoint import CheckpointPolicy

    if _AC_GRAPH_ID not in node.meta:
        return False
    tag = node.meta.get(_RECOMPUTE)
    if tag in (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE):
        return True
    return checkpoint_must_save(node)


def drop_checkpoint_hints(graph: fx.Graph) -> int:
    """Remove every `checkpoint_hint` tag from ``graph``'s nodes (binding tags stay), so
    that torch's partitioner sees the graph as if the user had not checkpointed it.
    Mutates the nodes' metadata: call it on a copy (`memopt.graph.step.clone_graph_module`
    copies each node's metadata dict). Returns how many tags were removed."""
    hinted = [n for n in graph.nodes if checkpoint_hint(n)]
    for node in hinted:
        del node.meta[_RECOMPUTE]
    return len(hinted)


def memopt_tag(node: fx.Node, name: str, default: Any = None) -> Any:
    """A tag memopt's own passes put on a node (e.g. ``"recomputed"``)."""
    return node.meta.get(_MEMOPT, {}).get(name, default)


def set_memopt_tag(node: fx.Node, name: str, value: Any) -> None:
    """Attach memopt tag ``name`` to ``node``."""
    node.meta.setdefault(_MEMOPT, {})[name] = value


@contextlib.contextmanager
def running_fake(mode: Any) -> Iterator[None]:
    """Run torch ops under fake mode ``mode`` as Dynamo does when it records a graph's
    values (``torch._dynamo.utils.get_fake_value``): with torch's Python dispatcher on,
    so that ops take their Python meta functions and decompositions, which keep
    symbolic sizes symbolic. Without it, torch 2.11's CPU
    ``scaled_dot_product_attention`` with dropout reads its inputs' sizes as ints (the
    fake tensor's ``aten.size`` handler), which guards a dynamic sequence length to its
    example value: memopt re-running the graph (pass ``precision``, verification)
    specialized it, and Dynamo recompiled for every length. torch 2.13's kernel keeps
    the size symbolic either way."""
    from torch._dispatch.python import enable_python_dispatcher

    with mode, enable_python_dispatcher():
        yield


@contextlib.contextmanager
def graph_fake_mode(graph: fx.Graph) -> Iterator[Any]:
    """Run code under the fake mode the graph's recorded values belong to, as
    `running_fake` does (yields the mode, or None when the graph has no fake values),
    with any other active fake mode (a user's ``FakeTensorMode`` around the whole
    compile) set aside meanwhile."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = fake_mode_of(list(graph.nodes))
    if mode is None:
        yield None
        return
    with unset_fake_temporarily(), running_fake(mode):
        yield mode


def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst`` the user source line, module (`module_path`) and autograd sequence
    number of ``src``: a value a pass makes is reported where the value it stands for was
    made, down to the layer."""
    for key in (_STACK_TRACE, _MODULE_STACK, "seq_nr"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def copy_dynamo_provenance(src: fx.Node, dst: fx.Node) -> None:
    """Give ``dst``, a node of a Dynamo-level graph, the source line and module and
    function stacks of ``src`` (the keys Dynamo records and AOTAutograd carries on)."""
    for key in (_STACK_TRACE, _MODULE_STACK, "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Copy the metadata memopt relies on (value, trace, module, tags) from ``src`` to ``dst``."""
    for key in (_VAL, _STACK_TRACE, _MODULE_STACK, "tensor_meta", "seq_nr", "original_aten"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if _MEMOPT in src.meta:
        dst.meta[_MEMOPT] = dict(src.meta[_MEMOPT])
