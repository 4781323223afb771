"""Pins the node.meta keys memopt reads from torch (they move between releases)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import memopt
from memopt.graph import meta
from memopt.testing.capture import capture_step


def _model_fn(x, w):
    h = torch.tanh(x @ w)  # the line the test looks for
    return (h * h).sum()


def test_fake_values_and_source_lines_survive_aot_autograd():
    step = capture_step(_model_fn, torch.randn(4, 5), torch.randn(5, 6, requires_grad=True))
    mm = [n for n in step.forward.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(mm) == 1
    value = meta.tensor_value(mm[0])
    assert value is not None and tuple(value.shape) == (4, 6) and value.dtype == torch.float32
    loc = meta.source_location(mm[0])
    assert loc is not None, "stack_trace missing: memopt cannot trace values to user lines"
    assert loc.filename == __file__
    assert "the line the test looks for" in loc.code
    assert loc.function == "_model_fn"


def test_saved_pairs_line_up():
    step = capture_step(_model_fn, torch.randn(4, 5), torch.randn(5, 6, requires_grad=True))
    pairs = step.saved_pairs()
    assert pairs, "a tanh-matmul step must save something for backward"
    for fw_node, bw_node in pairs:
        a, b = meta.fake_value(fw_node), meta.fake_value(bw_node)
        assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def test_tangents_and_primals_naming():
    step = capture_step(_model_fn, torch.randn(4, 5), torch.randn(5, 6, requires_grad=True))
    assert all(meta.is_primal(p) for p in step.forward.graph.find_nodes(op="placeholder"))
    assert any(meta.is_tangent(p) for p in step.backward.graph.find_nodes(op="placeholder"))


def test_placeholders_name_the_dynamo_input_they_hold():
    """AOTAutograd's descriptors: plain inputs map one to one (a DTensor's local tensor
    and mesh map to its index with a part name: tests/distributed/test_shard_explain.py)."""
    step = capture_step(_model_fn, torch.randn(4, 5), torch.randn(5, 6, requires_grad=True))
    placeholders = step.forward.graph.find_nodes(op="placeholder")
    assert [meta.dynamo_input_of(p) for p in placeholders] == [(0, ""), (1, "")]


def test_random_and_side_effect_classification():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        y = torch.nn.functional.dropout(x, 0.5, True)
        x.mul_(2)
        return y

    gm = make_fx(f)(torch.randn(4))
    kinds = {str(n.target): (meta.is_random(n), meta.has_side_effects(n)) for n in gm.graph.nodes if n.op == "call_function"}
    random_ops = [k for k, (r, _) in kinds.items() if r]
    assert random_ops, kinds
    assert kinds["aten.mul_.Tensor"] == (False, True)


def _meta_keys_named(tree: ast.AST) -> list[int]:
    """Lines that read or write ``<x>.meta["key"]`` or call ``<x>.meta.get("key")``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault") and node.args:
            target, key = node.func.value, node.args[0]
        elif isinstance(node, ast.Compare) and len(node.comparators) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            target, key = node.comparators[0], node.left
        else:
            continue
        if isinstance(target, ast.Attribute) and target.attr == "meta" and isinstance(key, ast.Constant) and isinstance(key.value, str):
            lines.append(node.lineno)
    return lines


def test_only_graph_meta_names_node_meta_keys():
    """docs/architecture.md: `memopt/graph/meta.py` is the one module that names
    ``node.meta`` keys, so a key torch renames is mended in one place."""
    root = Path(memopt.__file__).parent
    found = {
        str(path.relative_to(root)): lines
        for path in sorted(root.rglob("*.py"))
        if path != root / "graph" / "meta.py" and (lines := _meta_keys_named(ast.parse(path.read_text())))
    }
    assert not found, f"node.meta keys named outside memopt/graph/meta.py (file: lines): {found}"


def test_value_bytes_counts_symbolic_sizes_at_their_example_value():
    """One byte count for a node's value (the planner, recompute_saved_casts and the
    in-backward update used three, one of which did not concretize symbolic sizes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: (x * 2, x.shape[0]), tracing_mode="symbolic")(torch.randn(3, 5))
    doubled = next(n for n in gm.graph.nodes if n.op == "call_function" and meta.tensor_value(n) is not None)
    assert isinstance(meta.tensor_value(doubled).numel(), torch.SymInt)
    assert meta.value_bytes(doubled) == 3 * 5 * 4
    assert meta.value_bytes(gm.graph.find_nodes(op="output")[0]) == 0


def test_running_fake_keeps_sizes_symbolic_as_dynamo_does():
    """`meta.running_fake` runs ops with torch's Python dispatcher on, as Dynamo records
    values. Without it, torch 2.11's CPU attention with dropout guarded a symbolic
    sequence length to its example value (a replacement in the shape environment);
    torch 2.13 did not either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    dims = [DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
    x = mode.from_tensor(torch.randn(2, 24, 16), symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
    with meta.running_fake(mode):
        q = x.view(2, x.shape[1], 2, 8).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    assert isinstance(out.shape[2], torch.SymInt) and not shape_env.replacements


class _CheckpointedBlocks(torch.nn.Module):
    """Two checkpointed blocks in a row; the first reads a step counter the forward
    increments after both."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.register_buffer("step", torch.zeros(()))

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.first(x) * torch.sigmoid(self.step))

    def _two(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.second(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self._two, checkpoint(self._one, x, use_reentrant=False), use_reentrant=False)
        self.step += 1
        return h.sum()


def test_checkpoint_tags_are_hints_and_memopts_own_tags_bind():
    """Who tagged a value must-save decides whether the planner may recompute it: the
    boundary torch tags between two checkpointed blocks (and every other policy tag of
    the user's checkpoint) is a hint; memopt's tag on a read of a buffer the step
    writes (`pin_reads_of_mutated_inputs`) binds, though the read lies inside a
    checkpoint. `drop_checkpoint_hints` strips the hints from a copy only."""
    from memopt.graph.step import clone_graph_module
    from memopt.plan.segments import must_save

    step = capture_step(_CheckpointedBlocks(), torch.randn(4, 8))
    nodes = {n.name: n for n in step.joint.module.graph.nodes}
    boundary, = [n for n in nodes.values() if n.target is torch.ops.aten.tanh.default and meta.must_save_tag(n)]
    pinned, = [n for n in nodes.values() if n.target is torch.ops.aten.sigmoid.default]
    assert meta.checkpoint_must_save(boundary) and meta.checkpoint_hint(boundary) and not must_save(boundary)
    assert meta.must_save_tag(pinned) and not meta.checkpoint_must_save(pinned) and not meta.checkpoint_hint(pinned)
    assert must_save(pinned)
    hinted = [n.name for n in nodes.values() if meta.checkpoint_hint(n)]
    assert len(hinted) > 1 and step.joint.has_checkpoint_hints(), hinted
    copy = clone_graph_module(step.joint.module)
    assert meta.drop_checkpoint_hints(copy.graph) == len(hinted)
    copied = {n.name: n for n in copy.graph.nodes}
    assert not any(meta.checkpoint_hint(n) for n in copy.graph.nodes)
    assert meta.must_save_tag(copied[pinned.name]) and not meta.must_save_tag(copied[boundary.name])
    assert [n.name for n in nodes.values() if meta.checkpoint_hint(n)] == hinted  # the original keeps its tags
