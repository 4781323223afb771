"""Pass ``precision``: bf16/fp16 compute with fp32 master weights, before autograd.

The pass rewrites the Dynamo-level graph (torch functions and Tensor methods) by
inserting ``.to(dtype)`` casts according to the policy table
(``memopt/passes/precision_policy.py``). AOTAutograd then traces and differentiates
the rewritten graph, so the casts' derivatives bring every gradient back to the dtype
of the fp32 parameter it belongs to: masters stay fp32 and receive fp32 gradients,
with no optimizer or GradScaler changes (fp16: see docs/precision.md).

Why before autograd: a cast inserted here is differentiated like user code, so the
backward graph runs the same ops in the same dtypes as the forward (matmul gradients
in low precision, norm gradients in fp32) without a second, backward-side policy.

What makes it use less memory than ``torch.autocast``:

* values flow between lowered ops in low precision: a matmul's result stays bf16, the
  elementwise ops after it run in bf16, norms and softmax compute in fp32 but hand on
  bf16 (``fp32_low_out``), so the values saved for backward are bf16;
* each parameter is cast once per step by one cast node shared by all its uses (tied
  embeddings read one copy), placed right before its first use, so its lifetime is
  part of the graph the memory analysis and the partitioner see (the partitioner
  recomputes the cast in backward rather than saving the copy);
* each activation is cast at most once per dtype, however many lowered ops read it.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from memopt._once import said_since_reset
from memopt.analysis.aliasing import concrete_int
from memopt.analysis.error_probe import compare_with_reference, concrete_inputs
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.errors import MemoptWarning
from memopt.graph import meta
from memopt.graph.step import StepGraphs, clone_graph_module, parameter_name
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.precision_attention import expand_math_attention, math_attention_reason
from memopt.passes.precision_policy import (
    FOLLOW,
    FP32_LOW_OUT,
    LOW,
    LOW_DTYPES,
    op_name,
    resolve_policy,
)
from memopt.units import format_bytes

__all__ = ["PrecisionLowering", "lower_precision", "LoweringReport"]

_HALF = (torch.bfloat16, torch.float16)
HALF_AS_WRITTEN_PREFIX = "inputs already"
"""How the ``skipped`` reason of an op whose floating inputs were all bf16/fp16 before
the rewrite starts (``"inputs already bfloat16 as written"``,
`_Lowering._half_as_written`): the pass leaves such an op as written."""
_NATIVE_FP32_MATH = frozenset({"softmax", "log_softmax"})
"""Ops whose torch kernels (CPU, CUDA, and Inductor's decompositions) already compute
in fp32 for half inputs and round the result once. Under ``fp32_low_out`` they run on
their half input as is: same forward result as ``op(x.float()).to(half)``, and their
backward saves the half result instead of an fp32 one. (Norms instead get an explicit
fp32 input: eager CUDA kernels reject half inputs with fp32 weights; the saved fp32
copy is replaced by its bf16 source by the ``recompute_saved_casts`` pass.)"""
_SAME_DTYPE_OPS = frozenset(
    {
        # matrix products (and composites of them), when a policy override sets them to follow
        "linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "einsum",
        "bilinear", "conv_tbc", "multi_head_attention_forward", "gru_cell", "lstm_cell",
        "rnn_tanh_cell", "rnn_relu_cell", "lstm", "gru", "rnn_tanh", "rnn_relu", "dot", "vdot", "tensordot", "addr",
        # writes of one tensor into another, and ops taking two tensors of one dtype
        "index_add", "index_add_", "index_copy", "index_copy_", "index_put", "index_put_", "put",
        "put_", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
        "scatter_reduce_", "masked_scatter", "masked_scatter_", "cross", "lerp", "lerp_", "prelu",
        "grid_sample", "embedding_bag", "polar", "complex",
    }
)  # fmt: skip
"""Ops whose eager kernels reject floating operands of different dtypes. Their fake
(meta) kernels mostly do not check (``index_add``, ``index_put``, the recurrent cells,
``grid_sample``; 2.13's ``mm``, ``addmm`` and ``linear``), so a lowered activation
reaching one of them with an fp32 operand compiled and then failed in the step; those
that do check failed their fake run, which torch logs at ERROR level. So under
``follow`` a mix of dtypes reaching one of them, or an indexed assignment
(``x[idx] = y``), is promoted without running it first."""
_STORES_SCALARS = frozenset(
    {
        "masked_fill", "masked_fill_", "fill", "fill_", "full_like", "new_full", "index_fill",
        "index_fill_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_",
        "clip", "clip_", "where", "scatter", "scatter_", "nan_to_num", "nan_to_num_",
    }
)  # fmt: skip
"""Ops that write their Python float arguments into their result as elements (a fill
value) or bounds, in the result's dtype. Their eager kernels refuse a finite value
outside that dtype's range ("value cannot be converted to type c10::BFloat16 without
overflow"; ``where`` rounds it to infinity instead), while their fake kernels accept it.
Code that computes such a value from the dtype it saw when Dynamo traced it
(Hugging Face's ``scores.masked_fill(mask, torch.finfo(scores.dtype).min)``, fp32's
-3.40e38) hands a lowered tensor a value its dtype cannot hold."""
_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
_EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast
_INPLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.imatmul,
}  # fmt: skip


@dataclass
class LoweringReport:
    """What `lower_precision` did to one graph (rendered as the pass's details)."""

    dtype: str
    ops: dict[str, Counter[str]] = field(default_factory=dict)
    """mode -> op name -> how many nodes were rewritten under that mode."""
    skipped: Counter[str] = field(default_factory=Counter)
    """reason -> how many policy-listed ops were left as written."""
    promoted: Counter[str] = field(default_factory=Counter)
    """op -> how many unlisted ops needed their inputs cast to one dtype to run."""
    expanded: Counter[str] = field(default_factory=Counter)
    """reason -> how many attention nodes were written out as their ops
    (`memopt.passes.precision_attention`)."""
    parameter_casts: dict[str, int] = field(default_factory=dict)
    """parameter placeholder -> bytes of its low-precision copy (one cast each)."""
    activation_casts: int = 0
    saturated_scalars: Counter[str] = field(default_factory=Counter)
    """op -> how many finite float arguments outside the low dtype's range were set to
    its largest finite value of the same sign (`_STORES_SCALARS`)."""
    rounded_results: int = 0
    output_casts: int = 0
    values_lowered: int = 0
    value_bytes_before: int = 0
    value_bytes_after: int = 0
    lowered_nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        """Whether the graph changed: a cast or rounding inserted, or attention written
        out. An op the policy lists whose inputs already have its dtype (a loss on
        fp32 logits, the region after a graph break) is counted in `ops` but changes
        nothing."""
        return bool(
            self.parameter_casts or self.activation_casts or self.rounded_results or self.output_casts
            or self.promoted or self.expanded or self.saturated_scalars
        )  # fmt: skip

    def to_details(self) -> dict[str, Any]:
        """JSON-able form for the pass's details (and the explanation)."""
        return {
            "dtype": self.dtype,
            "ops": {mode: dict(sorted(c.items())) for mode, c in sorted(self.ops.items())},
            "skipped": dict(self.skipped),
            "promoted": dict(self.promoted),
            "saturated_scalars": dict(self.saturated_scalars),
            "expanded_attention": dict(self.expanded),
            "parameter_casts": len(self.parameter_casts),
            "parameter_cast_bytes": sum(self.parameter_casts.values()),
            "activation_casts": self.activation_casts,
            "rounded_results": self.rounded_results,
            "output_casts": self.output_casts,
            "values_lowered": self.values_lowered,
            "value_bytes_before": self.value_bytes_before,
            "value_bytes_after": self.value_bytes_after,
            "value_bytes_saved": self.value_bytes_before - self.value_bytes_after,
            "lowered_nodes": self.lowered_nodes,
        }


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _nbytes(value: torch.Tensor) -> int:
    return concrete_int(value.numel()) * value.element_size()


def _explicit_dtype(node: fx.Node) -> bool:
    """The call names the dtype it computes in: ``dtype=`` or a positional
    ``torch.dtype`` (``x.softmax(-1, torch.float32)``, ``torch.softmax(x, -1,
    torch.float32)``). Such an op is left as written."""
    return node.kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in node.args)


def _mutates(node: fx.Node) -> bool:
    """The node may write into one of its inputs (in-place method, ``x[i] = v``,
    ``inplace=True``, a mutable aten overload)."""
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    name = getattr(node.target, "__name__", "")
    return (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) or (
        isinstance(node.target, torch._ops.OpOverload) and meta.has_side_effects(node)
    )


class _Lowering:
    """Rewrites one Dynamo graph in place, propagating fake values node by node so that
    every decision sees the dtypes the rewrite has produced so far."""

    def __init__(
        self, gm: fx.GraphModule, low: torch.dtype, policy: Mapping[str, str], parameters: set[fx.Node]
    ) -> None:
        self.graph = gm.graph
        self.module = gm
        self.low = low
        self.policy = policy
        self.parameters = parameters
        self.env: dict[fx.Node, Any] = {}
        self.casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        self.autocasts: list[Any] = []  # autocast contexts the graph entered, innermost last
        self.output_dtypes: list[torch.dtype | None] = []  # of the outputs before rewriting
        self.before: dict[fx.Node, Any] = {}  # each node's fake value before rewriting
        self.report = LoweringReport(str(low).replace("torch.", ""))

    def run(self, fake_mode: Any) -> LoweringReport:
        """Visit every node once, in order, under the graph's fake mode."""
        nodes = list(self.graph.nodes)
        before = {n: meta.fake_value(n) for n in nodes}
        self.before = before
        output = nodes[-1]
        self.output_dtypes = [getattr(before.get(a), "dtype", None) for a in _flat_nodes(output.args)]
        try:
            with meta.running_fake(fake_mode), torch.enable_grad():
                for node in nodes:
                    self._visit(node)
        finally:
            while self.autocasts:  # a failure inside a torch.autocast block
                _EXIT_AUTOCAST(self.autocasts.pop())
        self._count_lowered_values(before)
        return self.report

    # -- per node -----------------------------------------------------------------

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.env[node] = meta.fake_value(node)
            return
        if node.op == "output":
            self._restore_output_dtypes(node)
            return
        if node.op == "call_module":
            raise NotImplementedError(
                f"node {node.name!r} calls submodule {node.target!r}; precision lowering "
                f"needs Dynamo to inline modules (torch._dynamo.config.inline_inbuilt_nn_modules=True)."
            )
        if self._subgraphs(node):
            self._run_body_as_traced(node)
            return
        mode = self._mode(node)
        if mode == LOW and op_name(node) == "scaled_dot_product_attention":
            reason = math_attention_reason(node, self.env)
            if reason is not None:
                self.report.expanded[reason] += 1
                expand_math_attention(
                    self.graph, node, self.env, self._visit, lambda value: self._cast(value, self.low, node)
                )
                return
        if mode != FOLLOW and not (mode == FP32_LOW_OUT and op_name(node) in _NATIVE_FP32_MATH):
            self._cast_inputs(node, mode)
        if mode == FOLLOW:
            self._execute_or_promote(node)
        else:
            self._execute(node)
        self._saturate_scalars(node)
        if mode == FP32_LOW_OUT:
            self._round_result(node)
        if _mutates(node):
            self.casts.clear()  # a cast made before the write would be stale

    def _subgraphs(self, node: fx.Node) -> list[fx.GraphModule]:
        """The graph bodies a higher-order op runs (``torch.utils.checkpoint``'s
        ``tag_activation_checkpoint``, an ``autograd.Function``'s
        ``autograd_function_apply``, ``wrap``), passed to it as ``get_attr`` nodes."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            return []
        bodies = []
        for arg in _flat_nodes((node.args, node.kwargs)):
            if arg.op == "get_attr":
                body = self._owner_attr(str(arg.target))
                if isinstance(body, fx.GraphModule):
                    bodies.append(body)
        return bodies

    def _run_body_as_traced(self, node: fx.Node) -> None:
        """Run a higher-order op's body as written: its graph was traced for the
        operands' dtypes before lowering, and its ops (a matmul of the operand with a
        parameter passed in fp32) reject a lowered operand at run time, while their
        fake kernels let it through. Each floating operand the rewrite lowered is cast
        back to the dtype it was traced with; the body's ops are not lowered, which
        the report counts under ``skipped``."""

        def restore(arg: fx.Node) -> fx.Node:
            value = self.env.get(arg)
            traced = self._traced_dtype(arg)
            if not _floating(value) or traced is None or value.dtype == traced:
                return arg
            return self._cast(arg, traced, node)

        node.args = map_arg(node.args, restore)
        node.kwargs = map_arg(node.kwargs, restore)
        self._execute(node)
        self.report.skipped[f"inside the body of {getattr(node.target, '__name__', node.target)}"] += 1

    def _traced_dtype(self, node: fx.Node) -> torch.dtype | None:
        """The dtype ``node``'s value had before the rewrite; for a cast the rewrite
        inserted (not in the graph it was given), that of the value it casts."""
        while node not in self.before and node.op == "call_method" and node.target == "to":
            source = node.args[0]
            if not isinstance(source, fx.Node):
                return None
            node = source
        return getattr(self.before.get(node), "dtype", None)

    def _mode(self, node: fx.Node) -> str:
        name = op_name(node)
        mode = self.policy.get(name, FOLLOW) if name is not None else FOLLOW
        if mode == FOLLOW:
            return FOLLOW
        inputs = [self.env[a] for a in node.all_input_nodes if _floating(self.env.get(a))]
        reason = None
        if self.autocasts:
            reason = "inside a torch.autocast block"
        elif _explicit_dtype(node):
            reason = "explicit dtype= argument"
        elif any(v.dtype not in (torch.float32, *_HALF) for v in inputs):
            reason = "float64 input"
        elif not inputs:
            return FOLLOW
        elif (half := self._half_as_written(node)) is not None:
            reason = f"{HALF_AS_WRITTEN_PREFIX} {half} as written"
        if reason is not None:
            self.report.skipped[reason] += 1
            return FOLLOW
        self.report.ops.setdefault(mode, Counter())[str(name)] += 1
        loc = meta.source_location(node)
        self.report.lowered_nodes.append(
            {"node": node.name, "op": name, "mode": mode, "source": None if loc is None else str(loc)}
        )
        return mode

    def _half_as_written(self, node: fx.Node) -> str | None:
        """Every floating input of ``node`` was bf16/fp16 before the rewrite: the model
        computes this op in half precision as written (a model converted with
        ``model.to(torch.bfloat16)``). Lowering is for fp32 computation: widening such
        an op's inputs for an ``fp32`` mode made fp32 copies the model never had (a
        LayerNorm's saved fp32 input, a loss's fp32 logits: more memory than the model
        without the option, and other numbers), and ``low`` mode's casts to the other
        half dtype (``precision="fp16"`` on a bf16 model) made fp16 copies of every
        weight. A value whose dtype before the rewrite is unknown (a node the pass
        made) counts as not half. Returns the half dtypes' names (``"bfloat16"``), or
        None when some input was not half."""
        traced = [self._traced_dtype(a) for a in node.all_input_nodes if _floating(self.env.get(a))]
        if not traced or any(dtype not in _HALF for dtype in traced):
            return None
        return " and ".join(sorted({str(dtype).replace("torch.", "") for dtype in traced}))

    def _execute_or_promote(self, node: fx.Node) -> None:
        """Run an op the policy leaves alone. If it rejects the mix of dtypes lowering
        created (ops needing equal dtypes: ``matmul`` under ``follow``,
        ``index_put_``...), cast its floating inputs to one dtype, the widest (for an
        in-place op: its destination's), and run it again, as autocast's "promote" list.
        An op of `_SAME_DTYPE_OPS` (or an indexed assignment) given mixed dtypes is
        promoted without the failed run, which its fake kernel may not make."""
        inputs = [a for a in node.all_input_nodes if _floating(self.env.get(a))]
        dtypes = {self.env[a].dtype for a in inputs}
        must_match = op_name(node) in _SAME_DTYPE_OPS or node.target is operator.setitem
        mixed_product = len(dtypes) > 1 and not self.autocasts and must_match
        if not mixed_product:
            try:
                self._execute(node)
                return
            except Exception:  # noqa: BLE001 - re-raised below unless promotion fixes it
                if len(dtypes) < 2:
                    raise
        first = node.args[0] if node.args else None
        inplace = _mutates(node) and isinstance(first, fx.Node) and first in inputs
        target = self.env[first].dtype if inplace else functools.reduce(torch.promote_types, dtypes)

        def promote(arg: fx.Node) -> fx.Node:
            value = self.env.get(arg)
            if not _floating(value) or value.dtype == target or (inplace and arg is first):
                return arg
            return self._cast(arg, target, node)

        node.args = map_arg(node.args, promote)
        node.kwargs = map_arg(node.kwargs, promote)
        self._execute(node)
        self.report.promoted[str(op_name(node) or node.target)] += 1

    def _saturate_scalars(self, node: fx.Node) -> None:
        """Give an op of `_STORES_SCALARS` whose result lowering made half precision its
        finite float arguments within the half dtype's range: one beyond it becomes the
        largest finite value of that sign, as ``torch.finfo(dtype).min``/``max`` read on
        the lowered dtype would have given. Infinities and NaN stay (every dtype holds
        them); values within the range, and ops whose result stayed fp32, are unchanged.
        The op computes the same fake value, so nothing is re-run."""
        if op_name(node) not in _STORES_SCALARS:
            return
        value = self.env.get(node)
        if not isinstance(value, torch.Tensor) or value.dtype not in _HALF:
            return
        bound = torch.finfo(value.dtype).max

        def saturate(arg: Any) -> Any:
            if isinstance(arg, float) and math.isfinite(arg) and abs(arg) > bound:
                self.report.saturated_scalars[str(op_name(node))] += 1
                return math.copysign(bound, arg)
            return arg

        node.args = tuple(saturate(a) for a in node.args)
        node.kwargs = {k: saturate(v) for k, v in node.kwargs.items()}

    def _cast_inputs(self, node: fx.Node, mode: str) -> None:
        target = self.low if mode == LOW else torch.float32

        def cast(arg: fx.Node) -> fx.Node:
            value = self.env.get(arg)
            if not _floating(value) or value.dtype == target:
                return arg
            if mode != LOW and value.dtype not in _HALF:
                return arg  # fp32 modes only widen half inputs
            return self._cast(arg, target, node)

        node.args = map_arg(node.args, cast)
        node.kwargs = map_arg(node.kwargs, cast)

    def _cast(self, source: fx.Node, dtype: torch.dtype, consumer: fx.Node) -> fx.Node:
        """The shared ``source.to(dtype)`` node, made before its first consumer."""
        key = (source, dtype)
        if key not in self.casts:
            with self.graph.inserting_before(consumer):
                cast = self.graph.call_method("to", (source, dtype))
            meta.copy_meta(consumer, cast)
            kind = "parameter" if source in self.parameters else "activation"
            meta.set_memopt_tag(cast, "precision", f"{kind}_cast")
            value = self._execute(cast)
            if kind == "parameter":
                self.report.parameter_casts[source.name] = _nbytes(value)
            else:
                self.report.activation_casts += 1
            self.casts[key] = cast
        return self.casts[key]

    def _round_result(self, node: fx.Node) -> None:
        """Hand an fp32 result on in the low dtype (``fp32_low_out``)."""
        value = self.env[node]
        if not _floating(value) or value.dtype != torch.float32:
            return
        with self.graph.inserting_after(node):
            rounded = self.graph.call_method("to", (node, self.low))
        meta.copy_meta(node, rounded)
        meta.set_memopt_tag(rounded, "precision", "rounded_result")
        node.replace_all_uses_with(rounded, delete_user_cb=lambda user: user is not rounded)
        self._execute(rounded)
        self.report.rounded_results += 1

    def _restore_output_dtypes(self, output: fx.Node) -> None:
        """Outputs keep the dtype they had: the compiled function's signature is
        unchanged (only its internals run in low precision)."""
        wanted = iter(self.output_dtypes)
        made: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

        def restore(arg: fx.Node) -> fx.Node:
            dtype = next(wanted)
            value = self.env.get(arg)
            if dtype is None or not isinstance(value, torch.Tensor) or value.dtype == dtype:
                return arg
            if (arg, dtype) not in made:
                with self.graph.inserting_before(output):
                    cast = self.graph.call_method("to", (arg, dtype))
                meta.copy_meta(arg, cast)
                meta.set_memopt_tag(cast, "precision", "output_cast")
                self._execute(cast)
                self.report.output_casts += 1
                made[(arg, dtype)] = cast
            return made[(arg, dtype)]

        output.args = map_arg(output.args, restore)

    def _owner_attr(self, target: str) -> Any:
        """The object a ``get_attr`` target names on the graph's module."""
        value: Any = self.module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _execute(self, node: fx.Node) -> Any:
        """Compute ``node``'s fake value from its inputs' and record it."""
        args = map_arg(node.args, self.env.__getitem__)
        kwargs = map_arg(node.kwargs, self.env.__getitem__)
        if node.op == "get_attr":
            value = meta.fake_value(node)
            if value is None:  # a submodule (an autograd.Function's fwd_body/bwd_body)
                value = self._owner_attr(str(node.target))
        elif node.op == "call_method":
            value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)  # type: ignore[operator]
        if node.target is _ENTER_AUTOCAST:
            self.autocasts.append(value)
        elif node.target is _EXIT_AUTOCAST and self.autocasts:
            self.autocasts.pop()
        self.env[node] = value
        if not meta.example_value_is_none(node):
            meta.set_example_value(node, value)
        return value

    def _count_lowered_values(self, before: dict[fx.Node, Any]) -> None:
        for node, old in before.items():
            new = self.env.get(node)
            if _floating(old) and _floating(new) and old.dtype == torch.float32 and new.dtype in _HALF:
                self.report.values_lowered += 1
                self.report.value_bytes_before += _nbytes(old)
                self.report.value_bytes_after += _nbytes(new)


def _flat_nodes(args: Any) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    map_arg(args, nodes.append)
    return nodes


def _parameters(step: StepGraphs) -> set[fx.Node]:
    """Placeholders the region's inputs describe as parameters, and ``get_attr`` nodes
    of parameters (graphs traced without inlining nn modules)."""
    params = {
        ph for i, ph in enumerate(step.forward.graph.find_nodes(op="placeholder")) if step.input_kind(i) == "parameter"
    }
    for node in step.forward.graph.find_nodes(op="get_attr"):
        if isinstance(getattr(step.forward, str(node.target), None), torch.nn.Parameter):
            params.add(node)
    return params


def lower_precision(step: StepGraphs, precision: str, overrides: Mapping[str, str] | None = None) -> LoweringReport:
    """Rewrite the Dynamo-level graph ``step.forward`` in place to compute in
    ``precision`` (``"bf16"``/``"fp16"``) per the policy (defaults + ``overrides``).

    Raises ``ValueError`` if the graph's inputs carry no fake example values (not a
    Dynamo graph) and ``NotImplementedError`` for ``call_module`` nodes. A graph that
    takes no tensor (its tensors made inside it: ``torch.ones``, ``torch.arange``) runs
    in the fake mode of the first tensor it makes; one with no tensor at all is left
    unchanged.
    """
    gm = step.forward
    placeholders = gm.graph.find_nodes(op="placeholder")
    if any(meta.fake_value(p) is None for p in placeholders):
        raise ValueError(
            f"region {step.region}: the graph's inputs carry no fake example values, so "
            f"dtypes cannot be propagated; precision lowering needs the Dynamo graph "
            f"(run it through the pre-autograd pipeline)."
        )
    low = LOW_DTYPES[precision]
    fake_mode = meta.fake_mode_of(list(gm.graph.nodes))  # the placeholders' first
    if fake_mode is None:
        return LoweringReport(str(low).replace("torch.", ""))
    lowering = _Lowering(gm, low, resolve_policy(overrides or {}), _parameters(step))
    return lowering.run(fake_mode)


class PrecisionLowering(Pass):
    """Run matmuls, convolutions and attention in bf16/fp16 with fp32 master weights.

    Purpose: halve the bytes of activations and of the values saved for backward, and
    use low-precision compute, when ``precision`` is set (opt-in: changes numerics).
    Each op follows the policy table (`memopt.passes.precision_policy`, overridable
    with ``precision_policy``): ``low`` ops get low-precision inputs (one shared cast
    per parameter and per activation), ``fp32`` ops (losses, reductions) get fp32
    inputs, ``fp32_low_out`` ops (norms, softmax, embedding) compute in fp32 and hand
    their result on in low precision; other ops run in their inputs' dtype.

    Preconditions: ``step`` is the Dynamo-level graph of a region
    (``single_graph_name == "dynamo"``: no backward yet), with Dynamo's fake example
    values on its nodes and ``step.inputs`` telling which placeholders are parameters.

    Guarantees: graph inputs and outputs keep their dtypes (outputs are cast back), so
    AOTAutograd's gradients for fp32 parameters are fp32; at most one cast node per
    (value, dtype); ops inside a user's ``torch.autocast`` block, ops with an explicit
    ``dtype=`` and float64 ops are left as written; every node's example value is
    re-propagated. With ``measure_error`` the details hold the output and per-parameter
    gradient errors against the unlowered graph on the example inputs.

    Ordering: the first pass of the pre-autograd pipeline, before AOTAutograd (the
    partitioner then decides which low-precision values to save).
    """

    name = "precision"
    numerics_preserving = False

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        precision = ctx.config.precision
        if precision is None:
            return PassResult.unchanged(why="precision=None")
        if step.is_training or step.single_graph_name != "dynamo":
            raise ValueError(
                f"pass 'precision' rewrites the Dynamo graph before AOTAutograd, but got the "
                f"{'forward/backward pair' if step.is_training else step.single_graph_name + ' graph'}; "
                f"run it in memopt.passes.pipeline.pre_autograd_pipeline."
            )
        reference = clone_graph_module(step.forward) if ctx.measure_error else None
        report = lower_precision(step, precision, ctx.config.precision_policy)
        if not report.modified:
            _warn_nothing_to_lower(precision, report)
            return PassResult.unchanged(**report.to_details())
        details = report.to_details()
        if reference is not None:
            step.forward.recompile()
            details["error"] = _measure(reference, step, ctx)
        return PassResult(True, PreservedAnalyses.none(), details, summary=tuple(_summary(details)))


def _warn_nothing_to_lower(precision: str, report: LoweringReport) -> None:
    """One `MemoptWarning` (since the last ``torch._dynamo.reset()``) when the option
    changed nothing because the ops it would lower already compute in half precision
    as the model is written (a model converted to bf16/fp16): the option is inert
    there, and says so rather than leaving the user to wonder."""
    kept = {reason: n for reason, n in report.skipped.items() if reason.startswith(HALF_AS_WRITTEN_PREFIX)}
    if not kept:
        return
    dtypes = sorted({r.removeprefix(HALF_AS_WRITTEN_PREFIX).removesuffix(" as written").strip() for r in kept})
    message = (
        f"memopt: precision={precision!r} changes nothing here: the {sum(kept.values())} op(s) its policy lists "
        f"already compute in {' and '.join(dtypes)} as the model is written, and the option lowers fp32 "
        f"computation only (it never widens or re-casts a model's half-precision values). Drop the option for "
        f"a model converted to half precision, or keep the parameters fp32 (fp32 masters with fp32 gradients) "
        f"for precision={precision!r} to apply."
    )
    if not said_since_reset(message):
        warnings.warn(message, MemoptWarning, stacklevel=2)


def _sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _summary(details: Mapping[str, Any]) -> list[str]:
    """The report's lines: ops by mode, parameter casts, values lowered, and the error
    measured on the example inputs (docs/precision.md)."""
    ops = details.get("ops", {})
    counts = ", ".join(f"{sum(c.values())} {mode}" for mode, c in ops.items())
    lines = [
        f"precision {details['dtype']}: ops {counts}; {details['parameter_casts']} parameter casts "
        f"({format_bytes(details['parameter_cast_bytes'])}); values lowered {details['values_lowered']} "
        f"({format_bytes(details['value_bytes_before'])} -> {format_bytes(details['value_bytes_after'])})"
    ]
    error = details.get("error")
    if error and error.get("measured"):
        line = f"  measured on the example inputs: output rel. error {_sci(error.get('output_rel_error'))}"
        if error.get("grad_rel_error_overall") is not None:
            line += f", gradient rel. error {_sci(error['grad_rel_error_overall'])} overall"
            if error.get("grad_rel_error_max_of") is not None:
                line += f", max {_sci(error['grad_rel_error_max'])} ({error['grad_rel_error_max_of']})"
        zero = error.get("grad_zero_up_to_rounding") or []
        if zero:
            line += (f"; {len(zero)} gradient(s) zero up to rounding in fp32 not compared "
                     f"({', '.join(zero[:3])}{', ...' if len(zero) > 3 else ''})")
        lines.append(line)
    elif error:
        lines.append(f"  error not measured: {error.get('why')}")
    return lines


def _measure(reference: fx.GraphModule, step: StepGraphs, ctx: PassContext) -> dict[str, Any]:
    """Output and gradient errors of the lowered graph against ``reference``."""
    inputs = concrete_inputs(ctx.example_inputs)
    placeholders = step.forward.graph.find_nodes(op="placeholder")
    if inputs is None or len(inputs) != len(placeholders):
        return {"measured": False, "why": "example inputs are fake or do not match the graph"}
    if any(meta.is_symbolic(p) for p in placeholders):
        return {"measured": False, "why": "dynamic shapes (the graph takes symbolic sizes)"}
    names = [parameter_name(i.name) for i in step.inputs] or [p.name for p in reference.graph.find_nodes(op="placeholder")]
    try:
        result = compare_with_reference(reference, step.forward, inputs, names)
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not fail the pass
        return {"measured": False, "why": f"running the graphs eagerly failed: {type(exc).__name__}: {exc}"}
    return {"measured": True, "on": "example inputs, against the unlowered graph", **result}
