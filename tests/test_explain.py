"""memopt.explain: graphs after each pass, pass timings, fallbacks, report and JSON."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

import memopt
from memopt.testing.zoo import zoo_case

EAGER = {"codegen": "eager", "verify": True}


def _mlp_with_dead_code():
    def f(x, w):
        unused = x.cos()  # noqa: F841
        return torch.relu(x @ w).sum()

    return f, torch.randn(4, 8), torch.randn(8, 3, requires_grad=True)


def test_training_explanation_has_both_graphs_after_each_pass():
    f, x, w = _mlp_with_dead_code()
    explanation = memopt.explain(f, x, w, options=EAGER)
    assert explanation.ran_backward
    region = explanation.region(0)
    assert region.kind == "training"
    graphs = {(s.graph, s.after) for s in region.snapshots}
    assert ("forward", "input") in graphs and ("backward", "input") in graphs
    assert "aten.mm.default(" in explanation.graph_code("forward", after="input")
    assert [p.name for p in region.passes] == memopt.passes.pass_names()
    assert w.grad is None  # explain does not touch .grad


def test_report_and_json():
    case = zoo_case("graph_break")
    model = case.build()
    explanation = memopt.explain(model, *case.inputs(4), options=EAGER)
    assert len(explanation.regions) == 2
    text = explanation.report()
    assert "2 region(s)" in text and "dce" in text and "(training)" in text
    data = json.loads(json.dumps(explanation.to_dict()))
    assert data["schema_version"] == 1
    assert data["config"]["codegen"] == "eager"
    assert len(data["regions"]) == 2
    assert [p["name"] for p in data["regions"][0]["passes"]] == memopt.passes.pass_names()
    assert data["regions"][0]["op_counts"]["forward"]["aten.addmm.default"] >= 1


def test_forward_only_under_no_grad():
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        explanation = memopt.explain(model, torch.randn(2, 3), options=EAGER)
    assert not explanation.ran_backward
    assert explanation.region(0).kind == "inference"


@dataclasses.dataclass
class _Output:
    loss: torch.Tensor
    hidden: torch.Tensor
    note: str = "plain dataclass, not registered with pytree"


class _DataclassOutputModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> _Output:
        hidden = self.linear(x)
        return _Output(loss=hidden.square().mean(), hidden=hidden)


def test_explain_runs_the_backward_of_a_dataclass_output_and_of_a_complex_one():
    # a dataclass that pytree does not know was taken for a leaf: no tensor found, no
    # backward, and memopt.fit said the model's outputs did not require grad
    explanation = memopt.explain(_DataclassOutputModel(), torch.randn(2, 4, 8), options=EAGER)
    assert explanation.ran_backward
    # a complex output was summed through .float(), which dropped its imaginary part
    # with a UserWarning from inside memopt
    linear = torch.nn.Linear(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explanation = memopt.explain(lambda x: torch.fft.fft(linear(x)), torch.randn(2, 8), options=EAGER)
    assert explanation.ran_backward


def test_memopt_logs_env_switches_on_logging():
    code = (
        "import torch, memopt\n"
        "c = torch.compile(torch.nn.Linear(3, 3), backend='memopt', options={'codegen': 'eager'})\n"
        "c(torch.randn(2, 3)).sum().backward()\n"
    )
    env = dict(os.environ, MEMOPT_LOGS="info")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "[memopt INFO] region 0/0: compiling" in out.stderr
    assert "training pipeline ran" in out.stderr
    quiet = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "MEMOPT_LOGS"}, check=True,
    )
    assert "[memopt" not in quiet.stderr


def test_dump_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_DUMP_DIR", str(tmp_path))
    compiled = torch.compile(torch.nn.Linear(3, 3), backend="memopt", options={"codegen": "eager"})
    compiled(torch.randn(2, 3)).sum().backward()
    dumped = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py"))
    assert "0_0/forward/000_input.py" in dumped
    assert "0_0/backward/001_remat.py" in dumped and "0_0/backward/002_dce.py" in dumped


def test_explain_logs_nothing_at_default_level(caplog):
    with caplog.at_level(logging.WARNING, logger="memopt"):
        memopt.explain(torch.nn.Linear(2, 2), torch.randn(1, 2), options=EAGER)
    assert not [r for r in caplog.records if r.name.startswith("memopt")]


def test_info_logs_name_only_the_passes_the_user_disabled(caplog):
    """Under a budget the planner's trial of its plan runs the pipeline without the
    collective passes; MEMOPT_LOGS=info printed "pass dedupe_collectives disabled" (three
    passes, twice per region) though the user disabled nothing; and it said the pass the
    user did disable three times per region (the trials' runs and the real one), now once."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32), torch.nn.Tanh())
    x = torch.randn(8, 32)
    options = {"codegen": "eager", "memory_budget": 0.9, "disable_passes": ["schedule"]}
    with caplog.at_level(logging.INFO, logger="memopt"), warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        memopt.explain(model, x, options=options)
    skipped = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and " disabled" in r.getMessage()]
    assert skipped and all("pass schedule disabled (disable_passes)" in m for m in skipped), skipped
    assert len(skipped) == len({r.region for r in memopt.explain(model, x, options=options).regions}), skipped


def test_recompiled_frame_counts_once_in_the_step_timeline():
    class Flag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
            self.seen = False

        def forward(self, x):
            y = self.lin(x).relu() if self.seen else self.lin(x).tanh()
            self.seen = True  # the second call fails Dynamo's guard and recompiles
            return y.sum()

    model = Flag()
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record() as explanation:
        compiled(torch.randn(8, 16)).backward()
        compiled(torch.randn(8, 16)).backward()
    assert [r.region for r in explanation.regions] == ["0/0", "0/1"]
    assert [r.region for r in explanation.step_regions()] == ["0/1"]
    assert explanation.timeline().peak_bytes == explanation.regions[1].timeline_after.peak_bytes


def test_validation_between_training_steps_does_not_replace_the_training_step():
    """A loop that validates under ``torch.no_grad()`` after each training step compiles
    the model's frame again for inference (``0/1``). The summary took that latest
    compile as the step: the eval forward's peak, "saved by memopt 0 B" and a budget
    "set, but the plan recomputes no value"; the step is the training compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record() as explanation:
        for _ in range(2):
            compiled(torch.randn(8, 16)).sum().backward()
            model.eval()
            with torch.no_grad():
                compiled(torch.randn(8, 16))
            model.train()
    assert [(r.region, r.kind) for r in explanation.regions] == [("0/0", "training"), ("0/1", "inference")]
    assert [r.region for r in explanation.step_regions()] == ["0/0"]
    assert explanation.timeline().peak_bytes == explanation.regions[0].timeline_after.peak_bytes

def test_two_models_of_one_class_both_count_in_the_step():
    """A GAN's generator and discriminator are both ``nn.Sequential``: their forwards
    are one code object, so Dynamo compiles the second as a recompile of the first's
    frame (``0/1``). The step summed only the latest compile of each frame and left
    the generator out (its parameters missing from the step's baseline); a compile
    over other parameters is another model, and counts."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    disc = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    g = torch.compile(gen, backend="memopt", options=EAGER)
    d = torch.compile(disc, backend="memopt", options=EAGER)
    z, real = torch.randn(32, 8), torch.randn(32, 16)
    with memopt.record() as explanation:
        for _ in range(2):
            (d(real).mean() - d(g(z).detach()).mean()).backward()  # discriminator's turn
            (-d(g(z)).mean()).backward()  # generator's turn: its input needs grad, a recompile of d
    step = explanation.step_regions()
    gen_bytes = (8 * 64 + 64 + 64 * 16 + 16) * 4
    disc_bytes = (16 * 64 + 64 + 64 + 1) * 4
    assert len(step) == 2, [r.region for r in explanation.regions]
    assert explanation.baseline_bytes >= gen_bytes + disc_bytes, explanation.baseline_bytes


def test_report_names_another_models_step_left_out_of_the_summary():
    """Two models trained in turn, each with its own forward and backward: the summary
    is the last one's step, and the report says which region of the other model it
    leaves out. A recompile of one model (the same parameters) is not named."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh()), backend="memopt", options=EAGER)
    second = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.ReLU()), backend="memopt", options=EAGER)
    with memopt.record() as explanation:
        for _ in range(2):
            first(torch.randn(8, 16)).sum().backward()
            second(torch.randn(8, 16)).sum().backward()
    first_region, second_region = [r.region for r in explanation.regions]  # 0/0 and 0/1: one code object
    assert [r.region for r in explanation.step_regions()] == [second_region]
    report = " ".join(explanation.report().split())
    assert f"not in this summary: region {first_region}, training another model" in report

    torch._dynamo.reset()
    with memopt.record() as alone:
        for _ in range(2):
            first(torch.randn(8, 16)).sum().backward()
    assert "not in this summary" not in alone.report()


class _BreakBeforeLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 64)

    def forward(self, x):
        h = self.lin(x).relu()
        torch._dynamo.graph_break()
        return (h * h).mean()


def test_summary_budget_is_the_budget_of_the_step_it_sums():
    """Training regions planned alone (``plan_across_graph_breaks=False``) under a
    fractional budget each get a fraction of their own peak; after a recompile the
    summary sums the latest compiles. It showed the first region's budget, of a compile
    no longer in the step, as the step's ("memory budget ... (OVER)"); now it says there
    is none for the step as a whole."""
    torch._dynamo.reset()
    options = {**EAGER, "memory_budget": 0.5, "plan_across_graph_breaks": False}
    compiled = torch.compile(_BreakBeforeLoss(), backend="memopt", options=options)
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        for batch in (8, 12):  # the second batch size recompiles both regions
            compiled(torch.randn(batch, 16)).backward()
    step = explanation.step_regions()
    assert len(explanation.regions) == 4 and len(step) == 2
    budgets = {r.region: r.plan.budget_bytes for r in step}
    assert len(set(budgets.values())) == 2
    summary = explanation.report().split("\n\n")[1]
    assert "memory budget" not in summary
    assert "regions planned under different budgets" in summary and all(r in summary for r in budgets)
    assert explanation.to_dict()["budget_bytes"] is None
    assert "memopt.explain runs one step" not in summary  # record() of a loop: planned alone, as asked


def test_explain_says_a_step_of_several_regions_is_planned_whole_only_in_a_loop():
    """`memopt.explain` runs one step, so regions split by a graph break keep the
    budgets they compiled under (a fraction of the peak each saw); the summary says so
    and that a training loop plans the step under one budget (it said "each alone",
    while the later region was planned with the earlier one)."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        explanation = memopt.explain(_BreakBeforeLoss(), torch.randn(8, 16), options={**EAGER, "memory_budget": 0.5})
    summary = " ".join(explanation.report().split("\n\n")[1].split())
    assert "regions planned under different budgets" in summary, summary
    assert "memopt.explain runs one step; a training loop plans a step of several regions as a whole" in summary
    torch._dynamo.reset()


def test_dumped_graphs_load_and_run_as_python(tmp_path):
    """Every dump is a Python file that runs on its own (``runpy``, a fresh namespace)
    and defines the graph as ``GraphModule``; the inference graph, called with the
    Linear's weight, bias and input, gives the Linear's output."""
    torch._dynamo.reset()
    linear = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    compiled = torch.compile(linear, backend="memopt", options={"codegen": "eager", "dump_dir": str(tmp_path)})
    compiled(x).sum().backward()
    with torch.no_grad():
        expected = compiled(x)
    files = sorted(tmp_path.rglob("*.py"))
    assert files
    for path in files:
        namespace = runpy.run_path(str(path))
        namespace["GraphModule"]()
    [inference] = [p for p in files if p.parent.name == "inference" and p.name == "000_input.py"]
    module = runpy.run_path(str(inference))["GraphModule"]()
    (out,) = module.forward(linear.weight.detach(), linear.bias.detach(), x)
    torch.testing.assert_close(out, expected)


def test_repeated_explains_keep_compiling_and_leave_the_models_compile_alone():
    """Each explain is a new backend: its compiled entry used to join the model's
    forward's cache, so after Dynamo's recompile_limit (8) of them explain recorded no
    region ("0 region(s)") and the user's own torch.compile of the model ran it eagerly,
    no budget applied. explain keeps its entries apart (isolate_recompiles)."""
    if not memopt._compat.COMPILE_ISOLATES_RECOMPILES:
        pytest.skip("this torch.compile has no isolate_recompiles (docs/usage.md, Limits)")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(4, 16)
    limit = torch._dynamo.config.recompile_limit
    for _ in range(limit + 1):
        assert len(memopt.explain(model, x, options={"codegen": "eager"}).regions) == 1
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})
    with memopt.record() as explanation:
        compiled(x).sum().backward()
    assert len(explanation.regions) == 1


class _TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 256), torch.nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).tanh())


def test_explain_of_a_model_compiled_in_place_compiles_it_with_explains_options():
    """``model.compile(backend="memopt", options=...)`` (how docs/usage.md hands a model
    to HF Trainer) leaves the model's class but calls its own compiled code: explain ran
    that, so a fresh model was reported under the in-place compile's options (here no
    budget, explain's 0.5 ignored) and a model already trained a step reported "0
    region(s)", nothing reaching memopt. explain compiles the model's uncompiled call
    with its own options, and without options warns as for a `torch.compile` result."""
    torch._dynamo.reset()
    x = torch.randn(8, 64)
    budget = {"codegen": "eager", "memory_budget": 0.5}
    for trained in (False, True):
        torch.manual_seed(0)
        model = _TwoLayers()  # a user's module (an nn.Sequential's call was compiled anew anyway)
        model.compile(backend="memopt", options={"codegen": "eager"})
        if trained:
            model(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
            explanation = memopt.explain(model, x, options=budget)
        assert [r.config.memory_budget for r in explanation.regions] == [0.5], trained
        assert explanation.regions[0].plan.budget_bytes is not None
    with pytest.warns(memopt.MemoptWarning, match=r"_TwoLayers compiled in place \(model.compile\) and no options"):
        memopt.explain(model, x)


def test_explain_of_a_compiled_model_without_options_says_its_options_are_not_read():
    """``memopt.explain(torch.compile(model, backend="memopt", options={budget}), x)``
    reported the step with explain's defaults (codegen inductor, no budget: "saved by
    memopt 0 B"), silently: the compiled model's options cannot be read back. It warns,
    naming the fix; given ``options`` it does not."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.5})
    x = torch.randn(4, 16)
    with pytest.warns(memopt.MemoptWarning, match=r"OptimizedModule made by torch.compile and no options.*options=\{"):
        memopt.explain(compiled, x)
    compiled_fn = torch.compile(lambda x: model(x).sum(), backend="memopt")
    with pytest.warns(memopt.MemoptWarning, match="function <lambda> made by torch.compile"):
        memopt.explain(compiled_fn, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", memopt.MemoptWarning)
        memopt.explain(compiled, x, options={"codegen": "eager"})
        memopt.explain(model, x)


def test_graph_code_after_a_pass_that_changed_nothing_is_the_graph_it_left():
    """``graph_code(after="dce")`` raised KeyError when the pass changed nothing (only
    changing passes keep a snapshot); it is now the graph as that pass left it, and a
    name that is no pass says which names there are."""

    def f(x, w):
        h = x
        for _ in range(4):
            h = torch.tanh(h @ w)
        return h.sum()

    x, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    with pytest.warns(memopt.MemoptBudgetWarning):
        explanation = memopt.explain(f, x, w, options={**EAGER, "memory_budget": 0.8})
    modified = {p.name: p.modified for p in explanation.region(0).passes}
    assert modified["remat"] and not modified["precision"] and not modified["dce"] and not modified["schedule"]
    for graph in ("forward", "backward"):
        code = functools.partial(explanation.graph_code, graph)
        assert code(after="remat") != code(after="input")
        assert code(after="precision") == code(after="input")  # ran before remat, changed nothing
        assert code(after="dce") == code(after="schedule") == code(after="remat") == code()
    with pytest.raises(KeyError, match=r"after='shedule' names no pass .*'schedule'"):
        explanation.graph_code("forward", after="shedule")
