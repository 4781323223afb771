"""The typed plan is the only input to the rewrites (issue 15, step 1).

Golden tests feed a hand-written plan (JSON, as a user or a test would write it) to
each plan-driven pass alone and check the graphs it produces; the rest checks the
house rules: the plan is JSON-able without graphs, the final plan reads the passes'
typed decisions (not their names), and planners and passes do not call each other.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import memopt
from memopt.config import MemoptConfig
from memopt.graph import meta
from memopt.passes.base import PassContext, PassFailure
from memopt.passes.compress import CompressSavedActivations
from memopt.passes.instruments import VerifyInstrument
from memopt.passes.manager import PassManager
from memopt.passes.offload import OffloadSavedActivations
from memopt.passes.remat import Rematerialize
from memopt.plan.decisions import Compress, Offload, Recompute, Save, action_from_dict, action_to_dict
from memopt.plan.plan import MemoryPlan, finish_plan
from memopt.testing.capture import capture_step
from memopt.analysis.memory import build_timeline

PACKAGE = Path(memopt.__file__).parent


def _mlp(x, w1, w2):
    h = torch.tanh(x @ w1)
    return torch.sigmoid(h @ w2).sum()


def _step():
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    w1, w2 = (torch.randn(64, 64, requires_grad=True) for _ in range(2))
    return capture_step(_mlp, x, w1, w2)


def _plan(**fields) -> MemoryPlan:
    """A plan written by hand, as JSON."""
    text = json.dumps(
        {
            "region": "0/0", "baseline_bytes": 0, "estimated_peak_before": 0, "estimated_peak_after": 0,
            "peak_breakdown_before": {}, "peak_breakdown_after": {}, **fields,
        }
    )  # fmt: skip
    return MemoryPlan.from_dict(json.loads(text))


def _decision(name: str, action: dict) -> dict:
    return {"name": f"forward:{name}", "region": "0/0", "action": action, "reason": "hand-written", "bytes": 16384}


def _run(pass_, step, plan):
    manager = PassManager([pass_], [VerifyInstrument()])
    return manager.run(step, PassContext(MemoptConfig(codegen="eager", strict=True), "0/0", plan=plan))


def _calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_remat_saves_exactly_the_hand_written_set():
    """Saving only ``mm`` (tanh's input) makes backward recompute tanh, and the second
    matmul and sigmoid from it; the forward's saved tensors are mm and the primals."""
    step = _step()
    result = _run(Rematerialize(), step, _plan(saved_values=["mm"]))
    saved = {fw.name for fw, _ in result.step.saved_pairs()}
    assert "mm" in saved and "tanh" not in saved and not saved & {"sigmoid", "detach_2", "mm_1"}
    backward = _calls(result.step.backward)
    assert "aten.tanh.default" in backward and "aten.sigmoid.default" in backward


def test_compress_stores_only_the_hand_written_value():
    """``Compress(bf16)`` on ``tanh``: forward saves a bf16 copy made after tanh's last
    forward reader, backward casts it back to fp32 before its first use; the other
    saved values are untouched."""
    step = _step()
    plan = _plan(decisions=[_decision("tanh", {"kind": "compress", "format": "bf16"})])
    result = _run(CompressSavedActivations(), step, plan)
    saved = [fw for fw, _ in result.step.saved_pairs()]
    (cast,) = [fw for fw in saved if meta.tensor_value(fw).dtype == torch.bfloat16]
    assert cast.target is torch.ops.prims.convert_element_type.default and cast.args[0].name == "tanh"
    assert {fw.name for fw in saved if fw is not cast} == {"detach_2", "t_1", "t_2"}  # untouched, fp32
    fw = list(result.step.forward.graph.nodes)
    assert fw.index(cast) > fw.index(next(n for n in fw if n.name == "mm_1"))  # after tanh's last reader
    bw = result.step.backward.graph
    restore = [n for n in bw.nodes if n.target is torch.ops.prims.convert_element_type.default]
    assert len(restore) == 1 and restore[0].args[1] == torch.float32
    (applied,) = result.records[0].applied
    assert applied.name == "forward:tanh" and applied.details["bytes_after"] == 64 * 64 * 2


def test_compress_without_a_compress_decision_changes_nothing():
    step = _step()
    before = step.forward.code
    plan = _plan(decisions=[_decision("tanh", {"kind": "save"})])
    result = _run(CompressSavedActivations(), step, plan)
    assert not result.records[0].modified and result.step.forward.code == before


def test_actions_round_trip_through_json():
    for action in (Save(), Recompute(3, "selective"), Compress("fp8", 32), Offload("disk", reload_lead=4)):
        assert action_from_dict(json.loads(json.dumps(action_to_dict(action)))) == action


def test_a_hand_written_decision_with_a_slip_names_what_to_write():
    """A misspelt action field failed with ``Compress.__init__() got an unexpected
    keyword argument 'fmt'`` and a decision without ``reason`` with a bare
    ``KeyError: 'reason'``; each now names the slip and what a decision holds."""
    with pytest.raises(ValueError, match=r"'compress' action has no field 'fmt'; its fields are 'format', 'block_size'"):
        action_from_dict({"kind": "compress", "fmt": "bf16"})
    decision = {"name": "forward:tanh", "region": "0/0", "action": {"kind": "compress", "format": "bf16"}}
    with pytest.raises(ValueError, match=r"decision 'forward:tanh' lacks 'reason', 'bytes': a decision needs"):
        _plan(decisions=[decision])


def test_a_budgeted_plan_is_json_without_graphs():
    """The plan a real budgeted compile makes (torch's own partition among the
    candidates) serializes to JSON and back to an equal plan."""
    from memopt.testing.zoo import zoo_case

    torch._dynamo.reset()
    case = zoo_case("gpt")
    model = case.build()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.75})
    with memopt.record() as explanation:
        compiled(*case.inputs(8)).backward()
    plan = explanation.regions[0].plan
    text = json.dumps(plan.to_dict())
    assert "GraphModule" not in text
    assert MemoryPlan.from_dict(json.loads(text)) == plan
    assert any(isinstance(d.action, Recompute) for d in plan.decisions)


def test_final_plan_reads_typed_decisions_not_pass_names():
    """A compression pass under another name still updates the final plan's decision
    (it reports a typed decision, which replaces the planned one by value name)."""

    class Renamed(CompressSavedActivations):
        name = "my_compression"

    step = _step()
    plan = _plan(decisions=[_decision("tanh", {"kind": "compress", "format": "bf16"})])
    result = _run(Renamed(), step, plan)
    final = finish_plan(plan, build_timeline(result.step), result)
    (decision,) = final.decisions
    assert isinstance(decision.action, Compress) and decision.details["bytes_after"] == 64 * 64 * 2


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_planners_and_passes_do_not_call_each_other():
    """Data flows one way: ``memopt.plan`` never imports a pass; passes import only the
    plan's types (`memopt.plan.plan`, `memopt.plan.decisions`), never a planner."""
    for module in (PACKAGE / "plan").glob("*.py"):
        assert not any(m.startswith("memopt.passes") for m in _imports(module)), module.name
    allowed = {"memopt.plan.plan", "memopt.plan.decisions"}
    for module in (PACKAGE / "passes").glob("*.py"):
        planners = {m for m in _imports(module) if m.startswith("memopt.plan")} - allowed
        assert not planners, (module.name, planners)


def test_a_hand_written_plan_naming_a_missing_value_names_the_close_ones():
    """A typo in ``saved_values`` failed with only "joint graph has no node 'tahn'"; the
    error now offers the graph's close names (docs/usage.md, "Feeding a hand-written
    plan")."""
    with pytest.raises(PassFailure, match=r"joint graph has no node 'tahn'; did you mean 'tanh'"):
        _run(Rematerialize(), _step(), _plan(saved_values=["tahn"]))


@pytest.mark.parametrize(
    "pass_, action",
    [(CompressSavedActivations(), {"kind": "compress", "format": "bf16"}), (OffloadSavedActivations(), {"kind": "offload", "target": "cpu"})],
)
def test_a_compress_or_offload_decision_naming_no_value_is_refused(pass_, action):
    """A typo in a hand-written `Compress`/`Offload` decision was carried out as
    nothing, silently (the pass listed the name as "not saved" and changed nothing);
    it now fails the pass, naming the value and the close saved ones. A real value the
    step does not save stays a quiet "not saved"."""
    with pytest.raises(PassFailure, match=r"the plan names value\(s\) \['tahn'\] .*did you mean 'tanh' for 'tahn'\?"):
        _run(pass_, _step(), _plan(decisions=[_decision("tahn", action)]))
    result = _run(pass_, _step(), _plan(decisions=[_decision("sum_1", action)]))
    assert not result.records[0].modified and result.records[0].details["not_saved"] == ["sum_1"]
