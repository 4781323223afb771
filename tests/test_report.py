"""The memory report: JSON fields, tables, plot, snapshot export, CLI."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch.cuda import _memory_viz

import memopt
from memopt.analysis.timeline import CATEGORIES
from memopt.cli.main import main as cli_main
from memopt.testing.zoo import zoo_case

ROOT = pathlib.Path(__file__).resolve().parent.parent
EAGER = {"codegen": "eager"}


@pytest.fixture(scope="module")
def gpt_explanation():
    torch._dynamo.reset()
    case = zoo_case("gpt")
    return memopt.explain(case.build(), *case.inputs(4), options=EAGER)


def test_to_dict_memory_fields(gpt_explanation):
    data = json.loads(json.dumps(gpt_explanation.to_dict()))
    params = sum(p.numel() * 4 for p in zoo_case("gpt").build().parameters())
    inputs = 2 * 4 * 32 * 8  # two int64 [4, 32] tensors
    assert data["baseline_bytes"] == params + inputs
    assert data["estimated_peak_bytes"] > data["baseline_bytes"]
    assert set(data["peak_breakdown"]) == set(CATEGORIES)
    assert sum(data["peak_breakdown"].values()) == data["estimated_peak_bytes"]
    assert data["peak_breakdown"]["parameters"] == params
    decisions = data["decisions"]
    assert decisions and all(d["policy"] == "save" for d in decisions)
    assert decisions == sorted(decisions, key=lambda d: -d["bytes"])
    assert any(d["source_file"] and d["source_file"].endswith("zoo.py") for d in decisions)
    plan = data["regions"][0]["plan"]
    assert plan["estimated_peak_after"] == data["estimated_peak_bytes"]


def test_report_tables(gpt_explanation):
    text = gpt_explanation.report(top=3)
    assert "estimated peak, with memopt" in text
    assert "saved activations" in text
    assert "values saved for backward (largest first):" in text
    assert "zoo.py:" in text  # the source line of the largest saved values
    assert "smaller value(s)" in text


def test_plot_writes_png_and_svg(gpt_explanation, tmp_path):
    png = gpt_explanation.plot(str(tmp_path / "t.png"))
    svg = gpt_explanation.plot(str(tmp_path / "t.svg"))
    assert pathlib.Path(png).read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in pathlib.Path(svg).read_text()[:1000]


def test_plot_of_a_step_with_a_graph_break_marks_and_labels_each_regions_graphs(tmp_path, monkeypatch):
    """The plot of a step of several regions marked only where the first backward
    began; it now marks where each region's forward and backward start and labels
    them, in the step's order: forwards in order, backwards in reverse."""
    import matplotlib.axes

    torch._dynamo.reset()
    case = zoo_case("graph_break")
    explanation = memopt.explain(case.build(), *case.inputs(8), options=EAGER)
    first, second = (r.region for r in explanation.regions)
    texts, lines = [], []
    text, axvline = matplotlib.axes.Axes.text, matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, x, y, s, *a, **k: (texts.append(s), text(ax, x, y, s, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x=0, *a, **k: (lines.append(x), axvline(ax, x, *a, **k))[1])
    explanation.plot(str(tmp_path / "step.png"))
    labels = [t for t in texts if not t.startswith("peak")]
    assert labels == [f"{first} forward", f"{second} forward", f"{second} backward", f"{first} backward"], texts
    assert len(lines) == 3 and lines == sorted(lines) and lines[0] > 0, lines


def test_memory_snapshot_opens_in_torch_visualizer(gpt_explanation, tmp_path):
    snapshot = gpt_explanation.memory_snapshot()
    trace = snapshot["device_traces"][0]
    live = peak = 0
    for event in trace:
        if event["action"] == "alloc":
            live += event["size"]
        elif event["action"] == "free_completed":
            live -= event["size"]
        peak = max(peak, live)
    timeline = gpt_explanation.timeline()
    assert peak == timeline.peak_bytes
    text = _memory_viz.trace(snapshot)  # torch's own renderer of snapshots
    assert "entries" in text and "MEM[" in text
    html = _memory_viz.trace_plot(snapshot)
    assert "Active Memory Timeline" in html
    path = gpt_explanation.save_memory_snapshot(str(tmp_path / "s.pickle"))
    with open(path, "rb") as f:
        assert pickle.load(f)["device_traces"][0] == trace


def test_cli_report_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "mem.png"
    snap = tmp_path / "mem.pickle"
    code = cli_main(["report", str(ROOT / "examples" / "report_model.py") + ":build", "--json",
                     "--plot", str(plot), "--snapshot", str(snap), "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["estimated_peak_bytes"] > data["baseline_bytes"] > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert snap.stat().st_size > 0


def _fake_and_real(target: str, capsys, options: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """`memopt report --json` of ``target`` on fake tensors, then on real ones."""
    reports = []
    for extra in ([], ["--real"]):
        torch._dynamo.reset()
        assert cli_main(["report", target, "--json", "--quiet", *options, *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    return reports[0], reports[1]


def test_cli_fake_and_real_agree(capsys):
    fake, real = _fake_and_real(str(ROOT / "examples" / "report_model.py") + ":build", capsys)
    assert fake["estimated_peak_bytes"] == real["estimated_peak_bytes"]


@pytest.mark.parametrize(
    "target, message",
    [
        ("nonexistent.py:build", "no such file: 'nonexistent.py'"),
        ("examples/report_model.py:nope", "has no function 'nope'; functions defined there: build"),
        ("examples/report_model.py", "expected FILE.py:FACTORY"),
    ],
)
def test_cli_clear_errors(target, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["report", target]) == 2
    assert message in capsys.readouterr().err


def test_cli_takes_a_module_name(capsys, monkeypatch):
    """FACTORY may be package.module:NAME, importable from the working folder (which the
    console script does not put on sys.path, as `python -m` does)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT))])
    assert cli_main(["report", "examples.report_model:build", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimated_peak_bytes"] > 0
    assert cli_main(["report", "examples.report_model:nope", "--quiet"]) == 2
    assert "has no function 'nope'; functions defined there: build" in capsys.readouterr().err


def test_cli_bad_factory_return(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    return 3\n")
    assert cli_main(["report", f"{bad}:build", "--quiet"]) == 2
    assert "must return (model, inputs) or (model, inputs, optimizer); got int" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report"], ["fit", "--budget", "3MiB"]])
def test_cli_factory_that_takes_arguments(tmp_path, capsys, command):
    """FACTORY is called with no arguments: one that needs some is refused before it is
    called (it was a TypeError traceback, exit status 1, under `memopt fit`)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def build(batch):\n    raise AssertionError('called')\n")
    assert cli_main([command[0], f"{bad}:build", "--quiet", *command[1:]]) == 2
    assert "build(batch) takes arguments; FACTORY is called with none" in capsys.readouterr().err


def test_python_dash_m_memopt_shows_progress(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "memopt", "report", "examples/report_model.py:build"],
        capture_output=True, text=True, cwd=ROOT, check=True, timeout=300,
        env=dict(os.environ),
    )
    assert "[memopt" in out.stderr and "compiling forward and backward" in out.stderr
    assert "estimated peak, with memopt" in out.stdout


def test_cli_output_piped_into_a_closed_pipe_exits_cleanly():
    """`memopt report ... --json | head -c 10`: no traceback, exit status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memopt", "report", "examples/report_model.py:build", "--json", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10).startswith(b"{")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err


def test_optimizer_state_bytes_in_report():
    from memopt.optim import AdamW8bit

    case = zoo_case("mlp")
    model = case.build()
    optimizer = AdamW8bit(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record(optimizer=optimizer) as explanation:
        compiled(*case.inputs(8)).backward()
        optimizer.step()
    assert explanation.optimizer_state_bytes == optimizer.state_bytes() > 0
    data = explanation.to_dict()
    assert data["optimizer_state_bytes"] == optimizer.state_bytes()
    assert "optimizer state (outside the step's graphs)" in explanation.report()


def test_optimizer_state_bytes_of_an_optimizer_given_in_the_options():
    """An optimizer given in the compile options (the plan counts its state) is the
    step's optimizer for ``optimizer_state_bytes`` too (it was null while the breakdown
    showed the state); the summary adds no "outside" row, since the peak counts it."""
    case = zoo_case("mlp")
    model = case.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "optimizer": optimizer})
    with memopt.record() as explanation:
        compiled(*case.inputs(8)).backward()
        optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert explanation.to_dict()["optimizer_state_bytes"] == state > 0
    assert explanation.to_dict()["peak_breakdown"].get("optimizer_state", 0) > 0
    assert "optimizer state (outside the step's graphs)" not in explanation.report()


LITERALS = '''
import torch
import torch.nn as nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        h = torch.relu(self.a(x)) * torch.tensor(0.5)  # literals: real constants in the graph
        y = self.b(h) * torch.tensor(2.0)
        return (torch.tanh(y) * torch.tensor(3.0)).pow(2).mean()


def factory():
    return M(), (torch.randn(16, 64),)
'''


def test_cli_fake_report_of_a_graph_holding_real_constants_under_a_budget(tmp_path, capsys):
    """Regression: on fake tensors under an infeasible budget the plan recomputes ops
    on ``torch.tensor`` literals in backward; AOTAutograd's lazy backward deep-copied
    that graph under the fake mode and failed ("storage on different device"). The
    report compiles the backward with the forward (`memopt.explain.backward_with_forward`)."""
    path = tmp_path / "literals.py"
    path.write_text(LITERALS)
    with pytest.warns(memopt.MemoptWarning, match="infeasible"):
        status = cli_main(["report", f"{path}:factory", "--quiet", "--options", '{"memory_budget": 1024}'])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "memopt explanation: 1 region(s)" in out


def _point(peak: int, chosen: bool = False) -> dict[str, float]:
    return {"predicted_peak_bytes": float(peak), "recompute_seconds": 1e-3, "recompute_flops": 1e6,
            "segments_recomputed": 1.0, "chosen": float(chosen)}  # fmt: skip


def test_tradeoff_table_marks_the_chosen_plan_once():
    """Rows within 2% of the chosen peak were all marked "chosen" (two on a small
    GPT-2); now the chosen plan's own row is, or else the one nearest its peak."""
    from memopt.plan.report import tradeoff_table

    points = [_point(1000), _point(990), _point(985, chosen=True), _point(700)]
    marked = [line for line in tradeoff_table(points, chosen_peak=980).splitlines() if "<-" in line]
    assert len(marked) == 1 and "<- chosen" in marked[0] and "985 B" in marked[0]
    unflagged = [_point(1000), _point(990), _point(700)]
    marked = [line for line in tradeoff_table(unflagged, chosen_peak=985).splitlines() if "<-" in line]
    assert len(marked) == 1 and "<- nearest" in marked[0] and "990 B" in marked[0]
    assert "<-" not in tradeoff_table(unflagged, chosen_peak=500)


def test_a_planned_regions_tradeoff_flags_its_chosen_plan_at_most_once():
    case = zoo_case("gpt")
    plan = memopt.explain(case.build(), *case.inputs(8), options={**EAGER, "memory_budget": 0.6}).regions[0].plan
    assert sum(p["chosen"] for p in plan.tradeoff) <= 1
    assert all(set(p) >= {"predicted_peak_bytes", "chosen"} for p in plan.tradeoff)


def test_a_region_without_a_tradeoff_curve_says_why_and_where_one_is(tmp_path):
    """Under a budget the passes alone meet, the planner does not run and draws no
    curve; plot_tradeoff said "set options={'memory_budget': ...}" although one was set."""
    torch._dynamo.reset()
    case = zoo_case("mlp")
    model, inputs = case.build(), case.inputs(8)
    explanation = memopt.explain(model, *inputs, options={**EAGER, "memory_budget": 1.0})
    with pytest.raises(ValueError, match=r"region 0 \(0/0\) has no trade-off curve: the budget planner did not run") as raised:
        explanation.plot_tradeoff(str(tmp_path / "t.png"))
    assert "set options" not in str(raised.value) and "fits the budget" in str(raised.value)
    torch._dynamo.reset()
    explanation = memopt.explain(model, *inputs, options=EAGER)
    with pytest.raises(ValueError, match=r"without a memory_budget.*set options=\{'memory_budget': \.\.\.\}"):
        explanation.plot_tradeoff(str(tmp_path / "t.png"))


def test_savings_rows_name_the_options_in_use_and_read_an_attached_optimizer():
    """The rows showed fixed options (offload='auto' with offload='disk' in use), a
    bf16 figure for precision in use that was what lowering left, not what it took,
    and "pass optimizer=opt" with the optimizer given to `memopt.record`."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    model = case.build()
    opt = torch.optim.AdamW(model.parameters())
    options = {**EAGER, "precision": "fp16", "memory_budget": "80%", "compress_activations": "fp8"}
    compiled = torch.compile(model, backend="memopt", options=options)
    with memopt.record(optimizer=opt) as explanation:
        compiled(*case.inputs(4)).backward()
        opt.step()
    rows = {s.technique: s for s in explanation.savings()}
    assert rows["rematerialization"].option == "memory_budget=0.8"
    assert rows["compression"].option == "compress_activations='fp8'"
    assert rows["offload"].option == "offload='auto'"  # not in use: the option to try
    precision = rows["precision"]
    assert (precision.option, precision.in_use, precision.saved_bytes) == ("precision='fp16'", True, None)
    assert rows["8-bit state"].saved_bytes > 0  # AdamW's state now minus AdamW8bit's
    torch._dynamo.reset()
    in_bytes = memopt.explain(model, *case.inputs(4), options={**EAGER, "memory_budget": "2MiB"})
    option = {s.technique: s.option for s in in_bytes.savings()}["rematerialization"]
    assert option == "memory_budget='2.00 MiB'", option  # was memory_budget=2097152
    assert "options={'optimizer': opt}" in rows["fused update"].basis
    assert any(s.state_bytes > 0 for s in explanation.dominant_parameters(share=0.0))


def test_an_inference_step_has_no_savings_table_but_says_why():
    """A step of inference regions saves nothing for backward and updates nothing: the
    savings table read 0 B in every row (precision and offload included), as though
    no option could help because of the model. It is one line saying why; a training
    step keeps the table."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    model = case.build().eval()
    with torch.no_grad():
        text = " ".join(memopt.explain(model, *case.inputs(4), options=EAGER).report().split())
    assert "what each option saves: nothing, in a step of inference regions only" in text, text
    assert "what each option saves or would save" not in text and "offload='auto'" not in text, text
    torch._dynamo.reset()
    training = " ".join(memopt.explain(case.build(), *case.inputs(4), options=EAGER).report().split())
    assert "what each option saves or would save" in training and "in a step of inference regions" not in training


def test_savings_of_a_recorded_step_of_two_models_read_each_models_options():
    """Two models compiled with different options in one recorded step (a bf16 encoder,
    then a head under a budget with its optimizer): the savings rows read the first
    region's options alone, so the budget's row said "memory_budget=..." (option off)
    and the head's optimizer state was not reported. Each option is now read from the
    region of the step that sets it, and no region's options leak into another's graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    head = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(head.parameters())
    first = torch.compile(encoder, backend="memopt", options={**EAGER, "precision": "bf16"})
    second = torch.compile(head, backend="memopt", options={**EAGER, "memory_budget": 0.9, "optimizer": opt})
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        second(first(torch.randn(8, 16))).sum().backward()
        opt.step()
    assert [(r.config.precision, r.config.memory_budget) for r in explanation.step_regions()] == [("bf16", None), (None, 0.9)]
    rows = {s.technique: s for s in explanation.savings()}
    assert rows["rematerialization"].option == "memory_budget=0.9", rows["rematerialization"].option
    assert (rows["precision"].option, rows["precision"].in_use) == ("precision='bf16'", True)
    from memopt.optim import optimizer_state_bytes

    assert explanation.optimizer_state_bytes == optimizer_state_bytes(opt) > 0


def test_state_savings_of_an_optimizer_outside_the_step_are_shares_of_the_peak_plus_its_state():
    """With the optimizer given to `memopt.record` (the demo's loop), its state is outside
    the step's estimated peak: the 8-bit row said 19.9% "of the peak" of ./dev.sh demo,
    a peak that holds none of the state it would shrink. Its share is now of the
    summary's "estimated peak + optimizer state"."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    model = case.build()
    opt = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record(optimizer=opt) as explanation:
        compiled(*case.inputs(4)).backward()
        opt.step()
    state = explanation.optimizer_state_bytes
    assert state and not any(iv.category == "optimizer_state" for iv in explanation.timeline().intervals)
    for technique in ("8-bit state", "low-rank state"):
        row = {s.technique: s for s in explanation.savings()}[technique]
        assert row.peak_bytes == explanation.estimated_peak_bytes + state, technique
    assert "estimated peak + optimizer state" in explanation.report()
    # "parameters that dominate the step" likewise: a parameter whose weight, gradient
    # and state are a share of the peak alone, but not of the peak plus the state, is not
    total = {p.name: p.total_bytes for p in explanation.dominant_parameters(share=0.0)}
    name, biggest = max(total.items(), key=lambda item: item[1])
    share = biggest / (explanation.estimated_peak_bytes + state / 2)
    assert biggest > share * explanation.estimated_peak_bytes
    assert name not in {p.name for p in explanation.dominant_parameters(share=share)}


def test_an_option_set_that_the_plan_uses_for_no_value_reads_as_on():
    """compress_activations='int8' under a budget the step meets uncompressed: the
    plan compresses nothing, and the compression row said "in use: no" as if the
    option were off. It now says the option is on and the plan compresses no value."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    options = {**EAGER, "memory_budget": 1.0, "compress_activations": "int8"}
    explanation = memopt.explain(case.build(), *case.inputs(4), options=options)
    assert not [d for d in explanation.decisions() if d.policy == "compress"]
    rows = {s.technique: s for s in explanation.savings()}
    assert (rows["compression"].in_use, rows["compression"].option_on) == (False, True)
    assert (rows["offload"].in_use, rows["offload"].option_on) == (False, False)  # not set: plainly "no"
    lines = explanation.report().splitlines()
    row = next(line for line in lines if line.startswith("compression  "))
    assert row.split()[2:5] == ["no", "(option", "on)"], row
    assert any("compress_activations='int8' is set, but the plan compresses no value" in line for line in lines)


def test_saved_casts_cast_again_are_not_rematerialization_in_use():
    """Under precision lowering without a budget, `recompute_saved_casts` casts saved
    dtype copies again in backward; the rematerialization row (option memory_budget)
    said "in use" and counted them."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    explanation = memopt.explain(case.build(), *case.inputs(4), options={**EAGER, "precision": "bf16"})
    casts = [d for d in explanation.decisions() if d.policy == "recompute"]
    assert casts and all(d.action.option == "cast" for d in casts)  # what the pass did
    remat = {s.technique: s for s in explanation.savings()}["rematerialization"]
    assert not remat.in_use and remat.option == "memory_budget=..."


KWARGS_FACTORY = """
import torch
import torch.nn as nn


class Scorer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids, labels=None):
        return nn.functional.mse_loss(self.fc(input_ids), labels)


def build():
    return Scorer(), {"input_ids": torch.randn(4, 16), "labels": torch.randn(4, 16)}
"""


def test_cli_report_takes_keyword_inputs(tmp_path, capsys):
    """A Hugging Face model needs ``labels=`` for its loss: a factory may return a dict
    of keyword inputs (it was refused: "expected a tensor or a tuple")."""
    factory = tmp_path / "kw.py"
    factory.write_text(KWARGS_FACTORY)
    torch._dynamo.reset()
    assert cli_main(["report", f"{factory}:build", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["estimated_peak_bytes"] > data["baseline_bytes"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--options", '{"codegen": "eagre"}'], "--options: memopt option codegen='eagre' is not allowed"),
        (["--options", "[1, 2]"], "--options must be a JSON object of memopt options"),
        (["--options", "{bad"], "--options is not valid JSON"),
        (["--plot", "/nonexistent/folder/x.png"], "folder '/nonexistent/folder' does not exist"),
        (["--plot", "mem.txt"], "write a .png, .svg or .pdf file"),
    ],
)
def test_cli_bad_arguments_are_refused_before_the_compile(extra, message, capsys, monkeypatch):
    """Each used to surface after the compile, as a traceback (exit 1)."""
    import memopt.cli.main as cli

    monkeypatch.setattr(cli, "load_factory", lambda spec: pytest.fail("the factory ran before the arguments were checked"))
    assert cli_main(["report", "examples/report_model.py:build", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_negative_top_is_refused(capsys):
    """``--top -3`` sliced the saved values to all but the three smallest and said
    "... and 3 smaller value(s)"; ``report(top=-3)`` likewise."""
    with pytest.raises(SystemExit) as info:
        cli_main(["report", "examples/report_model.py:build", "--top", "-3"])
    assert info.value.code == 2 and "'-3' is not a count" in capsys.readouterr().err
    explanation = memopt.explain(torch.nn.Linear(2, 2), torch.randn(1, 2), options=EAGER)
    with pytest.raises(ValueError, match=r"report\(top=-3\): .* an int >= 0"):
        explanation.report(top=-3)
    assert "memopt explanation" in explanation.report(top=0)


def test_top_zero_lists_no_saved_values_but_says_how_many(gpt_explanation):
    """``report(top=0)`` printed an empty table's header and "... and N smaller
    value(s)"; it now says how many values backward needs, and how to list them."""
    count = len(gpt_explanation.decisions())
    text = gpt_explanation.report(top=0)
    assert f"values saved for backward: {count} value(s) backward needs; report(top=N)" in text, text
    assert "forward value" not in text and "smaller value(s)" not in text


def test_cli_help_is_plain_text(capsys):
    for command in ("report", "fit"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and "`memopt" not in text, text
        # the description is printed as written: a line longer than its neighbours ran
        # off an 88-column terminal ("... keyword arguments. The factory runs under ...")
        description = text.split("positional arguments:")[0]
        assert max(len(line) for line in description.splitlines()) <= 88, description


class _NormDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.drop, self.out = (
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.norm(self.fc(x)))).sum()


def test_each_output_of_a_multi_output_op_is_its_own_decision():
    """``native_layer_norm`` saves its mean and rstd, ``native_dropout`` its mask: each
    saved output is one decision named by the ``getitem`` the forward graph returns,
    with that output's own shape and dtype (not the op's name twice, shape-less)."""
    torch._dynamo.reset()
    ex = memopt.explain(_NormDropout(), torch.randn(5, 8), options=EAGER)
    decisions = ex.to_dict()["decisions"]
    names = [d["name"] for d in decisions]
    assert len(names) == len(set(names)), names
    forward = ex.regions[0].graph_code("forward")
    by_shape = sorted((d["shape"], d["dtype"]) for d in decisions if d["name"].startswith("forward:getitem"))
    # rstd and mean [5, 1] fp32 of the norm, the dropout mask [5, 16] bool
    assert ([5, 1], "float32") in by_shape and ([5, 16], "bool") in by_shape, by_shape
    assert all(d["shape"] or d["bytes"] <= 8 for d in decisions), decisions
    returned = set(re.findall(r"\w+", forward[forward.rindex("return "):]))
    for d in decisions:
        assert d["name"].split(":", 1)[1] in returned, (d["name"], returned)
    text = ex.report()
    assert "scalar" not in text


_HELD_OUTPUT_FACTORY = '''
import torch


class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 256)

    def forward(self, input_ids, labels):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        torch._dynamo.graph_break()  # as Hugging Face's loss function breaks the graph
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}  # as a Hugging Face model returns both


def build():
    ids = torch.randint(0, 64, (4, 32))
    return LM(), {"input_ids": ids, "labels": ids}
'''


@pytest.mark.parametrize("options", [(), ("--options", '{"memory_budget": "64MiB"}')], ids=["no budget", "budget"])
def test_cli_fake_and_real_agree_when_the_model_returns_more_than_the_loss(tmp_path, capsys, options):
    """A model that returns its logits beside the loss (every Hugging Face LM) keeps
    them alive through backward as the caller holds the output, also when a graph break
    hands them to the loss's region: the fake-tensor report must count that as the real
    one does (it assumed them freed after the loss, under-estimating the peak), under a
    budget too (its regions track the step, on fake tensors too)."""
    factory = tmp_path / "lm.py"
    factory.write_text(_HELD_OUTPUT_FACTORY)
    fake, real = _fake_and_real(f"{factory}:build", capsys, options)
    assert fake["estimated_peak_bytes"] == real["estimated_peak_bytes"]
    assert fake["peak_breakdown"] == real["peak_breakdown"]


_GRAPH_BREAK_FACTORY = '''
import torch
from memopt.testing.zoo import GraphBreakMLP


def build():
    return GraphBreakMLP(), (torch.randn(190, 64), torch.randn(190, 8))
'''


def test_cli_fake_and_real_agree_on_a_region_after_a_graph_break_under_a_budget(tmp_path, capsys):
    """Under a budget, the region after a graph break is planned with the earlier
    region's saved values in place (docs/remat.md, "Graph breaks", move 1) on fake
    tensors as on real ones. A run on fake tensors did not join the step, so the region
    was planned alone: GraphBreakMLP at batch 190 under 2 MiB planned nothing and
    reported 2,099,652 B, over the budget, where the real step remats to 1,973,700 B;
    `memopt.fit` returned batch 189 for a budget the real step meets at 217."""
    factory = tmp_path / "graph_break.py"
    factory.write_text(_GRAPH_BREAK_FACTORY)
    fake, real = _fake_and_real(f"{factory}:build", capsys, ("--options", '{"memory_budget": "2MiB"}'))
    assert real["estimated_peak_bytes"] < real["estimated_peak_bytes_unoptimized"]  # the budget makes it plan
    assert fake["estimated_peak_bytes"] == real["estimated_peak_bytes"] <= 2 * 2**20
    assert [r["plan"]["estimated_peak_after"] for r in fake["regions"]] == [
        r["plan"]["estimated_peak_after"] for r in real["regions"]
    ]


def test_cli_report_under_a_budget_is_the_plan_a_training_loop_settles_on(tmp_path, capsys):
    """Under a budget a training loop plans a step split by a graph break as a whole
    (from its second step, docs/whole_step.md); the report runs the step until that plan
    is made, on fake tensors as on real ones, and reports what the loop runs.
    GraphBreakMLP at batch 330 under 2 MiB: the loop plans 2,066,628 B; the report,
    which ran one step, said 2,404,548 B, over the budget."""
    factory = tmp_path / "graph_break.py"
    factory.write_text(_GRAPH_BREAK_FACTORY.replace("190", "330"))
    fake, real = _fake_and_real(f"{factory}:build", capsys, ("--options", '{"memory_budget": "2MiB"}'))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = zoo_case("graph_break").build()
    x, y = torch.randn(330, 64), torch.randn(330, 8)
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": "2MiB"})
    with memopt.record() as loop, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        for _ in range(3):
            compiled(x, y).backward()
            model.zero_grad(set_to_none=True)
    assert fake["estimated_peak_bytes"] == real["estimated_peak_bytes"] == loop.estimated_peak_bytes <= 2 * 2**20


class _LongLines(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first_projection_with_a_long_name, self.second_projection_with_a_long_name = (
            torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first_projection_with_a_long_name(x) * 0.5 + 0.25) * torch.sigmoid(self.first_projection_with_a_long_name(x) - 0.125)  # noqa: E501
        return self.second_projection_with_a_long_name(hidden).sum()


def test_report_fits_in_120_columns():
    """Every line of the report, under a budget too (long reasons, a trade-off table,
    op-count changes), fits in 120 columns, whatever the length of the user's source
    lines; the whole source line stays in ``to_dict()``."""
    torch._dynamo.reset()
    model, x = _LongLines(), torch.randn(16, 8)
    for options in (EAGER, {**EAGER, "memory_budget": 0.7}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
            ex = memopt.explain(model, x, options=options)
        text = ex.report()
        assert max(len(line) for line in text.splitlines()) <= 120, text
        assert "values saved for backward" in text and "test_report.py:" in text
        assert any("torch.sigmoid(self.first_projection_with_a_long_name(x) - 0.125)" in (d["source"] or "")
                   for d in ex.to_dict()["decisions"])


def test_report_names_the_graph_breaks_and_their_reason():
    """A step split by a graph break says so at the top of the report, with Dynamo's
    reason, and ``to_dict()`` lists the reasons; a step without one says nothing."""

    def split(x):
        y = torch.tanh(x)
        print("a print breaks the graph")
        return (y * 2).sum()

    torch._dynamo.reset()
    ex = memopt.explain(split, torch.randn(4, requires_grad=True), options=EAGER)
    head = ex.report().split("\n\n", 1)[0]
    assert "graph breaks: Dynamo split the code into 2 regions" in head, head
    assert "print" in " ".join(ex.to_dict()["graph_breaks"]).lower()
    peak = ex.to_dict()["peak_at"]  # node names repeat across regions: the peak names its region
    assert f"at the peak (during {peak['graph']} {peak['node']} of region {peak['region']})" in ex.report()
    torch._dynamo.reset()
    whole = memopt.explain(torch.nn.Linear(2, 2), torch.randn(1, 2), options=EAGER)
    assert "graph breaks" not in whole.report() and whole.to_dict()["graph_breaks"] == []


class _PrintInLoop(torch.nn.Module):
    """Two ``Linear(8, 8)`` + tanh layers with a ``print`` in the layer loop: Dynamo skips
    this ``forward`` whole ("graph break in loop"). ``reduce``: return the sum."""

    def __init__(self, reduce: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.reduce = reduce

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
            print("a print in a loop skips the frame")
        return x.sum() if self.reduce else x


def test_report_names_a_frame_dynamo_skipped_whole_after_a_graph_break_in_a_loop():
    """A graph break inside a loop (a ``print`` in the layer loop) makes Dynamo skip the
    whole function and run it eagerly: nothing reaches memopt, so the budget does not
    apply. The report, ``to_dict()`` and the estimate's error say so, naming the function,
    the break and the fix (they said "0 region(s)", and the estimate "no region was
    compiled", with no reason)."""

    torch._dynamo.reset()
    for run in ("explain", "record"):
        model = _PrintInLoop(reduce=True)
        if run == "explain":
            ex = memopt.explain(model, torch.randn(4, 8), options={**EAGER, "memory_budget": "1MiB"})
        else:
            compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": "1MiB"})
            with memopt.record() as ex:
                compiled(torch.randn(4, 8)).backward()
        [frame] = ex.to_dict()["skipped_frames"]
        assert frame.startswith("forward (") and "test_report.py line" in frame and "print" in frame, frame
        head = " ".join(ex.report().split())
        assert "Dynamo skipped 1 frame(s) whole and ran them eagerly, without memopt" in head, head
        assert "move the print, .item() or data-dependent branch out of the loop" in head, head
        with pytest.raises(ValueError, match="Dynamo skipped 1 frame"):
            ex.estimated_peak_bytes
        torch._dynamo.reset()


def test_report_advises_dropping_checkpointing_dynamo_could_not_trace():
    """Activation checkpointing Dynamo cannot trace (here: the checkpointed code writes
    Python state; Hugging Face's ``gradient_checkpointing_enable`` on torch 2.13, "HOP:
    Unsafe side effect") makes Dynamo skip the frame: its layers run without memopt.
    The report said only Dynamo's "graph break is fundamental"; it now names
    checkpointing and the fix (turn it off, let memory_budget choose)."""
    from torch.utils.checkpoint import checkpoint

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(8, 8), 0

        def _inner(self, x):
            self.calls += 1
            return torch.tanh(self.lin(x))

        def forward(self, x):
            return checkpoint(self._inner, x, use_reentrant=False)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x.sum()

    compiled = torch.compile(Net(), backend="memopt", options={**EAGER, "memory_budget": 0.5})
    with memopt.record() as ex, warnings.catch_warnings():
        warnings.simplefilter("error", memopt.MemoptWarning)  # the report names the frame: no warning
        compiled(torch.randn(4, 8)).backward()
    [frame] = ex.skipped_frames
    assert ": HOP: " in frame, frame
    text = " ".join(ex.report().split())
    assert "most often activation checkpointing" in text and "gradient_checkpointing_disable()" in text, text
    assert "let memory_budget choose what to recompute" in text, text


def test_a_frame_dynamo_skipped_is_warned_once_at_compile_time():
    """Without `memopt.explain` / `memopt.record`, a frame Dynamo skips whole (here a
    submodule whose layer loop prints) ran without memopt and nothing said so: the user
    saw a peak above the budget and no reason. The next region memopt compiles warns,
    once, naming the frame, the cause and the fix; later steps say nothing again."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.body, self.post = torch.nn.Linear(8, 8), _PrintInLoop(reduce=False), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.post(self.body(self.pre(x))).sum()

    torch._dynamo.reset()
    compiled = torch.compile(Net(), backend="memopt", options=EAGER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            compiled(torch.randn(4, 8)).backward()
    said = [w for w in caught if "Dynamo skipped" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, memopt.MemoptWarning), [str(w.message)[:300] for w in said]
    text = " ".join(str(said[0].message).split())
    assert "Dynamo skipped 1 frame(s) whole and ran them eagerly, without memopt" in text, text
    assert "forward (" in text and "test_report.py line" in text and "move the print" in text, text


def test_report_names_the_unsupported_construct_when_nothing_reached_memopt():
    """An ``nn.LSTM`` makes Dynamo run its caller's frame eagerly without naming the frame
    ("frame skipped" is not in its reason): nothing reaches memopt. The report and the
    estimate's error name the construct and Dynamo's hint (they blamed a compile before
    ``record()``); a model with no such construct keeps the usual text."""

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn = torch.nn.Embedding(50, 8), torch.nn.LSTM(8, 16, batch_first=True)

        def forward(self, x):
            return self.rnn(self.emb(x))[0].sum()

    torch._dynamo.reset()
    compiled = torch.compile(Tagger(), backend="memopt", options={**EAGER, "memory_budget": "1MiB"})
    with memopt.record() as ex:
        compiled(torch.randint(0, 50, (2, 6))).backward()
    assert ex.regions == [] and ex.skipped_frames == []
    text = " ".join(ex.report().split())
    assert "Dynamo met code it does not support" in text and "LSTM(8, 16, batch_first=True)" in text, text
    assert "allow_rnn=True" in text and "compiled before memopt.record()" not in text, text
    with pytest.raises(ValueError, match="does not support"):
        ex.estimated_peak_bytes
    torch._dynamo.reset()


@pytest.mark.parametrize("command", [["report"], ["fit", "--budget", "3MiB"]])
def test_cli_factory_that_raises_is_an_error_without_memopt_frames(tmp_path, capsys, command):
    """A factory that raises is the user's input error: exit status 2, "memopt: error:"
    naming the factory and the exception, and the traceback from the factory's own
    frame (it was a traceback through memopt's CLI, exit status 1)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    raise RuntimeError('no such checkpoint')\n")
    assert cli_main([command[0], f"{bad}:build", "--quiet", *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memopt: error: {bad}:build raised RuntimeError: no such checkpoint"), err
    assert f'File "{bad}", line 2, in build' in err and "memopt/cli" not in err


class _TwoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # one source line for both blocks
        return x.sum()


def test_decisions_name_the_module_that_made_each_value():
    """Two layers run by one line of code: each saved value names its module's path
    (``blocks.0.1``, ``blocks.1.1`` for the tanh outputs), in ``to_dict()`` and in the
    report, so the layers' values can be told apart."""
    torch._dynamo.reset()
    ex = memopt.explain(_TwoBlocks(), torch.randn(4, 8), options=EAGER)
    modules = {d["module"] for d in ex.to_dict()["decisions"]}
    assert {"blocks.0.1", "blocks.1.1"} <= modules, modules
    text = ex.report()
    assert "blocks.0.1" in text and "blocks.1.1" in text


def test_two_functions_compiled_one_by_one_are_not_reported_as_a_graph_break():
    """Under `memopt.record`, two functions each compiled on their own are two Dynamo
    frames with no graph break between them: the report must not tell the user that
    Dynamo split their code (it said "graph breaks: Dynamo split the code into 2 regions")."""

    def first(x):
        return torch.tanh(x) * 2

    def second(x):
        return torch.sigmoid(x).sum()

    torch._dynamo.reset()
    cf = torch.compile(first, backend="memopt", options=EAGER)
    cs = torch.compile(second, backend="memopt", options=EAGER)
    with memopt.record() as ex:
        cs(cf(torch.randn(2, 4, requires_grad=True))).backward()
    assert [r.region.split("/")[0] for r in ex.regions] == ["0", "1"]  # two frames
    assert "graph breaks" not in ex.report() and ex.to_dict()["graph_breaks"] == []


def test_a_step_no_longer_split_is_summed_without_the_earlier_steps_regions():
    """A graph break only in the first step (like transformers' ``warning_once``): the
    first step runs regions 0/0 and 1/0, later steps the whole frame as 0/1. The step
    summary is the latest step's, 0/1 alone; it added 1/0 (another frame) to it, which
    no longer runs (412168 B against 305668 B)."""
    lin1, lin2 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
    split = [True]

    def f(x):
        y = torch.relu(lin1(x))
        if split[0]:
            torch._dynamo.graph_break()
        return torch.tanh(lin2(y)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="memopt", options=EAGER)
    x = torch.randn(32, 64)
    with memopt.record() as ex:
        compiled(x).backward()
        split[0] = False
        compiled(x).backward()
    assert [r.region for r in ex.regions] == ["0/0", "1/0", "0/1"]
    assert [r.region for r in ex.step_regions()] == ["0/1"]
    torch._dynamo.reset()
    with memopt.record() as whole:  # the unsplit step alone
        torch.compile(f, backend="memopt", options=EAGER)(x).backward()
    assert ex.estimated_peak_bytes == whole.estimated_peak_bytes


def test_a_recording_that_saw_no_compile_says_why():
    """A model compiled and warmed up before ``memopt.record()`` runs its cached code
    inside it: nothing reaches memopt. The report read "0 region(s), codegen=inductor
    (forward only)" (the codegen a default config's, the backward run) and the estimate
    "no region was compiled"; both now say why and what to do."""
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 1)
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    compiled(torch.randn(2, 4)).sum().backward()
    with memopt.record() as ex:
        compiled(torch.randn(2, 4)).sum().backward()
    text = " ".join(ex.report().split())
    assert "codegen" not in text and "forward only" not in text, text
    assert "enter record() before the first call, or call torch._dynamo.reset() first" in text, text
    with pytest.raises(ValueError, match="runs its cached code unseen"):
        ex.estimated_peak_bytes
    torch._dynamo.reset()  # the fix the report names: the next call compiles inside record()
    with memopt.record() as ex:
        compiled(torch.randn(2, 4)).sum().backward()
    assert len(ex.regions) == 1 and ex.estimated_peak_bytes > 0


def test_a_torch_nn_container_compiled_in_place_is_named_when_nothing_reached_memopt():
    """torch's ``model.compile`` of an ``nn.Sequential`` compiles nothing (Dynamo skips
    torch.nn's frames, silently: no counter, no warning), so a step runs eagerly with no
    plan and no budget. The report blamed only a compile before record(); it now names
    the in-place compile of a torch.nn container and the two ways that do compile."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model.compile(backend="memopt", options=EAGER)
    with memopt.record() as ex:
        model(torch.randn(2, 4)).sum().backward()
    assert ex.regions == []  # torch's behaviour: if this starts compiling, the sentence goes
    text = " ".join(ex.report().split())
    assert "torch.nn container compiled in place" in text and "torch.compile(model, ...)" in text, text


_WITH_OPTIMIZER = """
import torch


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.randn(4, 16), torch.optim.AdamW(model.parameters())


def not_an_optimizer():
    model, x, _ = build()
    return model, x, {"lr": 1e-3}
"""


def test_cli_report_plans_the_optimizer_a_factory_returns(tmp_path, capsys):
    """The report says what an optimizer would cost or save ("fused update: needs the
    optimizer: options={'optimizer': opt}"), which no JSON of ``--options`` can hold, and
    a factory returning ``(model, inputs, optimizer)`` (as ``memopt fit``'s may) was
    refused. Its optimizer is now planned: the report's peak is ``memopt.explain``'s
    with ``options={"optimizer": opt}`` on real tensors, state included."""
    path = tmp_path / "with_optimizer.py"
    path.write_text(_WITH_OPTIMIZER)
    torch._dynamo.reset()
    assert cli_main(["report", f"{path}:build", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    namespace: dict[str, object] = {}
    exec(_WITH_OPTIMIZER, namespace)
    model, x, optimizer = namespace["build"]()  # type: ignore[operator]
    torch._dynamo.reset()
    real = memopt.explain(model, x, options={**EAGER, "optimizer": optimizer}).to_dict()
    assert report["peak_breakdown"]["optimizer_state"] == 2 * (16 * 16 + 16 + 16 + 1) * 4
    assert report["estimated_peak_bytes"] == real["estimated_peak_bytes"]
    assert cli_main(["report", f"{path}:not_an_optimizer", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "returned a dict as the optimizer; expected a torch.optim.Optimizer" in err, err


def test_buffer_writes_are_not_listed_as_saved_values():
    """A batch norm in training mode writes its running statistics back into its
    buffers (``copy_`` into a forward input): kept in forward as a side effect, never
    handed to backward, no bytes of their own. The table of values saved for backward
    listed each as "save [random op or side effect]"."""
    torch._dynamo.reset()
    case = zoo_case("cnn_bn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        explanation = memopt.explain(case.build(), *case.inputs(8), options={**EAGER, "memory_budget": 0.6})
    names = [d.name for d in explanation.decisions()]
    assert names and not [n for n in names if n.startswith("forward:copy_")], names


class _TwoCheckpointedBlocks(torch.nn.Module):
    """Dropout, then two ``torch.utils.checkpoint`` blocks in a row: torch tags the
    first block's output must-save (the boundary between the blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.dropout(self.blocks[0](x), 0.1)
        for block in self.blocks[1:]:
            h = torch.utils.checkpoint.checkpoint(lambda v, b=block: torch.tanh(b(v)), h, use_reentrant=False)
        return h.pow(2).mean()


def test_must_save_values_say_why():
    """A value saved because torch's checkpoint tagged it must-save was reported as
    "random op or side effect: recomputing would change results", which a checkpoint
    boundary (a tanh) is not. Under a budget the tag is a preference the plan weighs
    (docs/remat.md), and the value's decision, saved or recomputed, says the checkpoint
    tagged it; a random op says it draws random numbers."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        explanation = memopt.explain(_TwoCheckpointedBlocks(), torch.randn(256, 64), options={**EAGER, "memory_budget": 0.5})
    reasons = {d.name: d.reason for d in explanation.decisions()}
    assert reasons["forward:tanh"].endswith(
        "(the model's torch.utils.checkpoint tagged it must-save, a preference the budget's plan weighs)"
    ), reasons
    assert not reasons["forward:tanh"].startswith("tagged must-save, never recomputed"), reasons
    saved = {d.name: d.reason for d in explanation.decisions() if d.policy == "save"}
    random = [r for name, r in saved.items() if "random" in r]
    assert random and all(r == "random op: recomputing would draw new random numbers" for r in random), saved
    assert not [r for r in reasons.values() if "side effect" in r], reasons


class _BrokenBeforeLoss(torch.nn.Module):
    """Two tanh layers, a graph break, then the loss: a step of two regions."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh())
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        torch._dynamo.graph_break()
        return torch.nn.functional.cross_entropy(self.head(h), y)


def test_different_budgets_of_dynamic_regions_name_the_dynamic_shapes():
    """Regions compiled for dynamic shapes are never planned again for their step, so
    a fractional budget stays a fraction of each region's own peak. The note blamed
    planning alone or `memopt.explain`; it now names the dynamic regions and the fix."""
    torch._dynamo.reset()
    compiled = torch.compile(_BrokenBeforeLoss(), backend="memopt", options={**EAGER, "memory_budget": 0.6}, dynamic=True)
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        for rows in (64, 96, 64):
            compiled(torch.randn(rows, 32), torch.randint(0, 8, (rows,))).backward()
    text = " ".join(explanation.report().split())
    assert "regions planned under different budgets" in text, text
    assert "compiled for dynamic shapes" in text and "dynamic=False" in text, text


def test_models_compiled_with_their_own_budgets_are_not_called_fractions_of_one_step():
    """A model trained under a fractional budget and an EMA copy evaluated under one in
    bytes, in one recorded step: the note said both budgets were "each a fraction of the
    peak its region saw when it compiled", blaming planning alone, where each model was
    compiled with its own memory_budget. It now says so and shows each option."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    ema = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).requires_grad_(False)
    trained = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": 0.9})
    evaluated = torch.compile(ema, backend="memopt", options={**EAGER, "memory_budget": "2KiB"})
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        x = torch.randn(8, 16)
        trained(x).sum().backward()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.1)
            evaluated(x)
    text = " ".join(explanation.report().split())
    assert "regions compiled with different memory_budget options" in text, text
    assert "(memory_budget=0.9)" in text and "2.00 KiB" in text, text
    assert "each a fraction of the peak" not in text, text
