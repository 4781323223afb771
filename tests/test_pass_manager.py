"""PassManager: verification catches broken passes, disabling works, dumps name their
pass, analyses are cached and invalidated, failures fall back (or raise when strict)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import memopt
from memopt.analysis.manager import Analysis, AnalysisManager, PreservedAnalyses
from memopt.backends.record import recording
from memopt.config import MemoptConfig
from memopt.graph.step import StepGraphs
from memopt.graph.verify import GraphVerificationError, verify_graph
from memopt.passes import Pass, PassContext, PassFailure, PassManager, PassResult
from memopt.passes.dce import DeadCodeElimination
from memopt.passes.instruments import DumpInstrument, OpCountInstrument, VerifyInstrument
from memopt.testing.numerics import assert_step_matches_eager
from memopt.testing.zoo import zoo_case


def _f(x, w):
    unused = x.sin()  # noqa: F841 - dead code for DCE
    return torch.relu(x @ w).sum(dim=1)


def _step() -> StepGraphs:
    gm = make_fx(_f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 3))
    return StepGraphs(gm, None, 1, region="test")


def _calls(step: StepGraphs, op) -> int:
    return sum(1 for n in step.forward.graph.nodes if n.target is op)


class RewireRelu(Pass):
    """Test pass: feeds relu the wrong tensor (shape [4, 8] instead of [4, 3])."""

    name = "rewire_relu"

    def run(self, step, analyses, ctx):
        graph = step.forward.graph
        relu = next(n for n in graph.nodes if n.target is torch.ops.aten.relu.default)
        relu.args = (self.new_input(graph, relu),)
        return PassResult(True)

    def new_input(self, graph, relu):
        return graph.find_nodes(op="placeholder")[0]


class Boom(Pass):
    """Test pass: raises."""

    name = "boom"

    def run(self, step, analyses, ctx):
        raise RuntimeError("kaboom")


def _ctx(**options) -> PassContext:
    return PassContext(MemoptConfig.from_options(options), region="test")


def test_verification_catches_pass_that_breaks_metadata():
    manager = PassManager([RewireRelu()], [VerifyInstrument()])
    with pytest.raises(PassFailure, match="rewire_relu.*relu.*shape"):
        manager.run(_step(), _ctx(strict=True))


def test_broken_pass_keeps_the_passes_before_it_with_one_warning():
    """A pass whose output fails verification is undone; the passes before it are kept
    (replayed on the pipeline's input and verified)."""
    step = _step()
    manager = PassManager([DeadCodeElimination(), RewireRelu()], [VerifyInstrument()])
    with pytest.warns(memopt.MemoptWarning, match="pass 'rewire_relu' failed on region test") as caught:
        result = manager.run(step, _ctx())
    assert len(caught) == 1
    assert "keeps the passes before it (dce)" in str(caught[0].message)
    assert result.fallback is not None and result.fallback.pass_name == "rewire_relu"
    assert result.fallback.stage == "passes"
    assert _calls(result.step, torch.ops.aten.sin.default) == 0  # DCE's change is kept
    relu = next(n for n in result.step.forward.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert relu.args[0].target is torch.ops.aten.mm.default  # the rewiring is undone
    assert [r.status for r in result.records] == ["ran", "failed"]


class BreakLint(RewireRelu):
    """Test pass: makes relu read a value defined after it (FX lint fails)."""

    name = "break_lint"

    def new_input(self, graph, relu):
        output = graph.find_nodes(op="output")[0]
        with graph.inserting_before(relu):
            return graph.call_function(torch.ops.aten.neg.default, (output.args[0],))


def test_a_pass_that_breaks_lint_is_caught_at_once_without_verify():
    """Without ``verify``, a pass whose graph fails FX lint (a use before its
    definition; a backward reading a forward node) is caught right after it, inside
    the pipeline's fail-soft: it is undone and the passes before it kept. Before, it
    went unnoticed until torch compiled or ran the graph (``KeyError: primals_3`` in
    backward), outside memopt's fail-soft, or until a later pass raised and nothing
    was kept."""
    step = _step()
    manager = PassManager([DeadCodeElimination(), BreakLint(), Boom()])
    with pytest.warns(memopt.MemoptWarning, match="pass 'break_lint' failed on region test.*FX lint") as caught:
        result = manager.run(step, _ctx())
    assert len(caught) == 1 and "keeps the passes before it (dce)" in str(caught[0].message)
    assert [r.status for r in result.records] == ["ran", "failed"]  # boom never ran
    assert _calls(result.step, torch.ops.aten.sin.default) == 0  # DCE's change is kept
    result.step.forward.graph.lint()


def test_verify_graph_detects_lint_error():
    step = _step()
    graph = step.forward.graph
    relu = next(n for n in graph.nodes if n.target is torch.ops.aten.relu.default)
    output = graph.find_nodes(op="output")[0]
    with graph.inserting_before(relu):
        late = graph.call_function(torch.ops.aten.neg.default, (output.args[0],))
    relu.args = (late,)
    with pytest.raises(GraphVerificationError, match="lint"):
        verify_graph(step.forward, name="forward")


def test_disable_by_name_skips_pass():
    step = _step()
    manager = PassManager([DeadCodeElimination()], disabled=["dce"])
    result = manager.run(step, _ctx())
    assert [r.status for r in result.records] == ["skipped"]
    assert _calls(result.step, torch.ops.aten.sin.default) == 1


def test_dce_removes_dead_code_and_reports_op_diff():
    manager = PassManager([DeadCodeElimination()], [VerifyInstrument(), OpCountInstrument()])
    result = manager.run(_step(), _ctx())
    assert _calls(result.step, torch.ops.aten.sin.default) == 0
    assert result.records[0].modified
    assert result.records[0].op_delta == {"aten.sin.default": -1}


def test_dce_keeps_random_and_mutating_ops():
    def f(x):
        torch.rand_like(x)  # unused, but it advances the RNG
        x.add_(1)  # mutates the input
        return x * 2

    gm = make_fx(f)(torch.randn(3))
    step = StepGraphs(gm, None, 1)
    result = PassManager([DeadCodeElimination()]).run(step, _ctx())
    code = result.step.forward.code
    assert "aten.rand_like.default(" in code
    assert "aten.add_.Tensor(" in code


def test_unknown_disabled_name_lists_pipeline():
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['dcee'\].*dce"):
        PassManager([DeadCodeElimination()], disabled=["dcee"])


def test_duplicate_pass_names_rejected():
    with pytest.raises(ValueError, match="unique"):
        PassManager([DeadCodeElimination(), DeadCodeElimination()])


def test_dumps_are_numbered_and_name_their_pass(tmp_path):
    manager = PassManager([DeadCodeElimination()], [DumpInstrument(str(tmp_path))])
    manager.run(_step(), _ctx())
    folder = tmp_path / "test" / "inference"
    assert sorted(os.listdir(folder)) == ["000_input.py", "001_dce.py"]
    header = (folder / "001_dce.py").read_text().splitlines()[0]
    assert "after pass 'dce' (#1), which modified the graph" in header
    assert "aten.sin.default(" in (folder / "000_input.py").read_text()
    assert "aten.sin.default(" not in (folder / "001_dce.py").read_text()


class CountNodes(Analysis[int]):
    name = "count_nodes"
    computed = 0

    def compute(self, step, manager):
        CountNodes.computed += 1
        return len(step.forward.graph.nodes)


class ReadCount(Pass):
    name = "read_count"

    def __init__(self, name: str, preserve: bool, modify: bool = True):
        self.name = name  # type: ignore[misc]
        self.preserve = preserve
        self.modify = modify

    def run(self, step, analyses, ctx):
        analyses.get(CountNodes)
        kept = PreservedAnalyses.only("count_nodes") if self.preserve else PreservedAnalyses.none()
        return PassResult(self.modify, kept)


def test_analysis_cached_until_a_pass_does_not_preserve_it():
    CountNodes.computed = 0
    passes = [ReadCount("a", preserve=True), ReadCount("b", preserve=False), ReadCount("c", preserve=True)]
    PassManager(passes).run(_step(), _ctx())
    assert CountNodes.computed == 2  # computed by a, reused by b, recomputed for c


def test_analysis_manager_invalidate():
    manager = AnalysisManager(_step())
    assert manager.get(CountNodes) == manager.get(CountNodes)
    assert manager.invalidate(PreservedAnalyses.everything()) == []
    assert manager.invalidate(PreservedAnalyses.none()) == ["count_nodes"]
    assert not manager.cached("count_nodes")


def test_backend_fallback_keeps_numerics_and_is_recorded(monkeypatch):
    import memopt.backends.region as region

    monkeypatch.setattr(region, "default_pipeline", lambda config: [DeadCodeElimination(), Boom()])
    case = zoo_case("mlp")
    model = case.build()
    with recording() as regions, pytest.warns(memopt.MemoptWarning, match="'boom' failed.*kaboom"):
        assert_step_matches_eager(model, case.inputs(4), options={"codegen": "eager"}, steps=1)
    assert [fb.pass_name for r in regions for fb in r.fallbacks] == ["boom"]


def test_backend_strict_raises(monkeypatch):
    import memopt.backends.region as region

    monkeypatch.setattr(region, "default_pipeline", lambda config: [Boom()])
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "strict": True})
    with pytest.raises(Exception, match="memopt pass 'boom' failed"):
        compiled(torch.randn(2, 4)).sum().backward()


@pytest.mark.parametrize("strict", [True, False])
def test_a_failed_pass_leaves_the_callers_step_as_it_came_in(strict):
    """Trying passes one by one on one captured step: a pass that rewrites the graph
    in place and then fails verification must not leave that step broken for the next
    try (strict raises, non-strict falls back; either way the input is unchanged)."""
    step = _step()
    module, code = step.forward, step.forward.code
    manager = PassManager([DeadCodeElimination(), RewireRelu()], [VerifyInstrument()])
    if strict:
        with pytest.raises(PassFailure):
            manager.run(step, _ctx(strict=True))
    else:
        with pytest.warns(memopt.MemoptWarning):
            result = manager.run(step, _ctx())
        assert result.fallback is not None and result.step.forward.code != code  # DCE's work kept
    assert step.forward is module and step.forward.code == code
    verify_graph(step.forward)
    assert _calls(step, torch.ops.aten.sin.default) == 1


class SwapSavedValues(Pass):
    """Test pass: swaps the first two saved values of a training step (of different
    shapes), so the backward receives each in the other's slot."""

    name = "swap_saved"

    def run(self, step, analyses, ctx):
        output = step.forward.graph.find_nodes(op="output")[0]
        values = list(output.args[0])
        k = step.num_fwd_outputs
        values[k], values[k + 1] = values[k + 1], values[k]
        output.args = (tuple(values),)
        return PassResult(True)


def test_a_pass_that_saves_values_in_the_wrong_slots_is_caught_without_verify():
    """Each graph of the step stays consistent on its own when a pass reorders the
    saved values, so neither FX lint nor the fake-tensor re-run sees it: the pairing
    check compares each saved value with the backward input that receives it. Before,
    the step passed verification and backward failed at run time ("mat1 and mat2
    shapes cannot be multiplied"), outside memopt's fail-soft."""
    from memopt.testing.capture import capture_step

    w = torch.randn(8, 3, requires_grad=True)
    step = capture_step(lambda x, w: torch.tanh(x @ w).sum(), torch.randn(4, 8), w)
    shapes = [tuple(fw.meta["val"].shape) for fw, _ in step.saved_pairs()]
    assert shapes[0] != shapes[1], shapes
    with pytest.raises(PassFailure, match=r"swap_saved.*forward saves .* for backward input .*shape"):
        PassManager([SwapSavedValues()]).run(step, _ctx(strict=True))


class ReturnSavedAsLoss(Pass):
    """Test pass: returns a saved value (4x3) where the forward returned the loss (a
    scalar). Every node still computes what its metadata says."""

    name = "return_saved"

    def run(self, step, analyses, ctx):
        output = step.forward.graph.find_nodes(op="output")[0]
        values = list(output.args[0])
        values[0] = values[step.num_fwd_outputs]
        output.args = (tuple(values),)
        return PassResult(True)


def test_verify_catches_a_pass_that_changes_what_the_caller_receives():
    """The fake-tensor re-run checks each node against its own metadata, not which node
    the output returns: a pass that returned another value in place of a user output
    (or a gradient) passed ``verify=True``, and the compiled step failed at run time
    ("output with shape [] doesn't match the broadcast shape"). VerifyInstrument now
    compares the step's user outputs and gradients with the pipeline's input."""
    from memopt.testing.capture import capture_step

    step = capture_step(lambda x, w: torch.tanh(x @ w).sum(), torch.randn(4, 8), torch.randn(8, 3, requires_grad=True))
    with pytest.raises(PassFailure, match=r"return_saved.*forward: user output 0 is .*shape \(4, \d\).*returned .*shape \(\)"):
        PassManager([ReturnSavedAsLoss()], [VerifyInstrument()]).run(step, _ctx(strict=True))


class SwapMatmulOperands(Pass):
    """Test pass: swaps the operands of the forward's matmul (4x8 @ 8x3 becomes
    8x3 @ 4x8), which the op itself refuses."""

    name = "swap_mm"

    def run(self, step, analyses, ctx):
        mm = next(n for n in step.forward.graph.nodes if n.target is torch.ops.aten.mm.default)
        mm.args = (mm.args[1], mm.args[0])
        return PassResult(True)


def test_verify_names_the_node_an_op_refuses_and_keeps_stderr_quiet(capfd):
    """A rewired op that raises on the fake re-run is a verification failure naming the
    graph and the node, like a stale shape. Before, torch's own error came out bare
    (no graph named, not said to be verification) and torch's fake-tensor logger
    printed its traceback (dozens of ERROR lines) for every such pass."""
    step = _step()
    with pytest.raises(PassFailure, match=r"swap_mm.*GraphVerificationError.*inference: node 'mm' .*fails on fake tensors"):
        PassManager([SwapMatmulOperands()], [VerifyInstrument()]).run(step, _ctx(strict=True))
    assert "failed while attempting to run meta" not in capfd.readouterr().err


class AddNodeWithoutValue(Pass):
    """Test pass: doubles relu's output through a new node that records no value."""

    name = "no_value"

    def run(self, step, analyses, ctx):
        graph = step.forward.graph
        relu = next(n for n in graph.nodes if n.target is torch.ops.aten.relu.default)
        with graph.inserting_after(relu):
            double = graph.call_function(torch.ops.aten.mul.Tensor, (relu, 2.0))
        relu.replace_all_uses_with(double, delete_user_cb=lambda user: user is not double)
        return PassResult(True)


def test_verify_rejects_a_new_node_without_its_value():
    """A node a pass adds without ``meta["val"]`` passed verification (a missing value
    was skipped as "nothing to compare"), and the memory analyses counted it as 0
    bytes: a silently wrong estimate and plan. Every call computing a tensor must
    record it."""
    with pytest.raises(PassFailure, match=r"no_value.*node 'mul_tensor' .*computes a tensor but records no value"):
        PassManager([AddNodeWithoutValue()], [VerifyInstrument()]).run(_step(), _ctx(strict=True))


class BoomOnLines(Pass):
    """Test pass: raises an error of several lines, as torch's errors are."""

    name = "boom_lines"

    def run(self, step, analyses, ctx):
        raise RuntimeError("kaboom\n\nWhile executing %relu\nOriginal traceback:\n  File x.py, line 1")


def test_the_fallback_dump_of_a_multi_line_failure_is_runnable_python(tmp_path):
    """The header of ``999_fallback.py`` quotes the failure's reason; a reason of several
    lines (any error torch raises while executing a graph) left its later lines
    uncommented, and the dump was a SyntaxError instead of a module that runs on its
    own (docs/usage.md, "Dumps")."""
    import runpy

    manager = PassManager([DeadCodeElimination(), BoomOnLines()], [DumpInstrument(str(tmp_path))])
    with pytest.warns(memopt.MemoptWarning, match="boom_lines"):
        manager.run(_step(), _ctx())
    path = tmp_path / "test" / "inference" / "999_fallback.py"
    assert "# While executing %relu" in path.read_text()
    runpy.run_path(str(path))["_f"]()  # make_fx names the module after the function


def test_a_rejected_pass_leaves_a_dump_of_what_it_produced(tmp_path):
    """Verification rejected a pass before the dump instrument saw it, so the dumps held
    the graphs before it and the fallback, never the broken graph itself, the one a
    pass author needs to read. It is now ``NNN_<pass>_failed.py``, named as not used."""
    manager = PassManager([DeadCodeElimination(), RewireRelu()], [VerifyInstrument(), DumpInstrument(str(tmp_path))])
    with pytest.warns(memopt.MemoptWarning, match="rewire_relu"):
        manager.run(_step(), _ctx())
    folder = tmp_path / "test" / "inference"
    assert sorted(os.listdir(folder)) == ["000_input.py", "001_dce.py", "002_rewire_relu_failed.py", "999_fallback.py"]
    failed = (folder / "002_rewire_relu_failed.py").read_text()
    assert "as pass 'rewire_relu' (#2) left it before it failed, NOT used" in failed
    assert "aten.relu.default(x_1)" in failed  # the rewired input, as the pass left it


class SilentRewire(RewireRelu):
    """Test pass: rewires relu as `RewireRelu` does, but reports no change."""

    name = "silent_rewire"

    def run(self, step, analyses, ctx):
        super().run(step, analyses, ctx)
        return PassResult.unchanged()


def test_verify_catches_a_pass_that_rewrites_but_reports_no_change():
    """A pass returning ``modified=False`` after a rewrite was neither recompiled nor
    verified (the dump even said "left the graph unchanged"), and the compiled step
    failed at run time; under verification that is now the pass's failure."""
    with pytest.raises(PassFailure, match=r"silent_rewire.*changed the graphs but returned PassResult\(modified=False\)"):
        PassManager([DeadCodeElimination(), SilentRewire()], [VerifyInstrument()]).run(_step(), _ctx(strict=True))
