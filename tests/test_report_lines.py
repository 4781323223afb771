"""The report's summary of saved values by source line (`memopt.plan.report.lines_table`):
a deep model's layers share their lines, so the per-value table's top rows are the
first layers' copies of one line; grouped, each line is one row for every layer."""

from __future__ import annotations

import re

import torch

import memopt
from memopt.plan.decisions import Save
from memopt.plan.plan import TensorDecision
from memopt.plan.report import lines_table
from memopt.units import format_bytes

EAGER = {"codegen": "eager"}
LAYERS = 6


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) + x  # the block's line: every layer runs it


class _Deep(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.sum()


def _rows(text: str) -> dict[str, list[str]]:
    """The by-line table's rows, keyed by their source line (``file.py:N``)."""
    section = text.split("the same values by the source line that made them", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in section.splitlines()[3:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 5 and re.fullmatch(r"\S+\.py:\d+", cells[3]):
            rows[cells[3]] = cells
    return rows


def test_a_line_every_layer_runs_is_one_row_with_all_its_values() -> None:
    """Six layers share the block's line: the per-value table (top 10) lists the first
    layers' values one by one; the by-line table gives the line once, with all the
    values it made in every layer, their bytes, decisions and ``blocks.*.fc``-style
    modules, and the code under it. Rows and the line left out add up to every value."""
    torch._dynamo.reset()
    explanation = memopt.explain(_Deep(), torch.randn(64, 32), options=EAGER)
    decisions = explanation.decisions()
    text = explanation.report(top=3)
    assert max(len(line) for line in text.splitlines()) <= 120, text
    line = "test_report_lines.py:27"
    made = [d for d in decisions if d.source_file and d.source_file.endswith("test_report_lines.py") and d.source_line == 27]
    assert len(made) >= LAYERS, [d.name for d in made]  # at least each layer's tanh
    rows = _rows(text)
    assert rows[line][:4] == [format_bytes(sum(d.bytes for d in made)), str(len(made)), f"save {len(made)}", line], rows
    assert {d.module for d in made} == {f"blocks.{i}" for i in range(LAYERS)} and rows[line][4] == "blocks.*", rows
    assert "    return torch.tanh(self.fc(x)) + x" in text
    total = sum(d.bytes for d in decisions)
    assert f"({len(decisions)} values, {format_bytes(total)}, from " in text


def _decision(name: str, nbytes: int, line: int, module: str | None) -> TensorDecision:
    return TensorDecision(
        f"forward:{name}", "0/0", Save(), "needed", nbytes, source=f"/src/model.py:{line} in forward: y = f(x)",
        source_file="/src/model.py", source_line=line, module=module,
    )  # fmt: skip


def test_lines_table_orders_by_bytes_and_counts_what_it_leaves_out() -> None:
    """Hand-built decisions: rows by total bytes (a line with many small values above
    one with a single larger value when its total is larger), layer indices written
    ``*``, two modules' values on one line named by their common prefix (without one,
    the first and how many more), and the lines past ``limit`` summed in the last line."""
    decisions = [
        *(_decision(f"a{i}", 100, 10, f"layers.{i}.mlp") for i in range(4)),   # 400 B, line 10
        _decision("b", 300, 20, "head"),                                         # 300 B, line 20
        _decision("c0", 120, 30, "layers.0.mlp.up"), _decision("c1", 120, 30, "layers.0.mlp.gate"),  # 240 B
        _decision("d", 7, 40, None), _decision("e", 5, 50, None),               # left out at limit=3
    ]  # fmt: skip
    text = lines_table(decisions, limit=3)
    body = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:] if ".py:" in line]
    assert [row[3] for row in body] == ["model.py:10", "model.py:20", "model.py:30"], text
    assert body[0][:3] == [format_bytes(400), "4", "save 4"] and body[0][4] == "layers.*.mlp", text
    assert body[1][4] == "head" and body[2][4] == "layers.0.mlp (2 modules)", text
    assert text.splitlines()[-1] == f"... and 2 more line(s): {format_bytes(12)} in 2 value(s)", text
    assert text.count("    y = f(x)") == 3
    encoder_decoder = [_decision("q", 8, 60, "encoder.block.0.attn"), _decision("r", 8, 60, "decoder.block.1.attn")]
    assert "decoder.block.*.attn (+1 more)" in lines_table(encoder_decoder)


def test_the_values_listed_are_the_steps_that_the_summary_adds_up() -> None:
    """A frame compiled again (a new batch size) has two regions; the summary is the
    latest compile's step (`step_regions`), but the value tables and ``to_dict()``'s
    ``decisions`` listed both compiles' values: the same tanh twice, at both sizes,
    summed in the by-line table. Now both are the step's, and an ``nn.Sequential``'s
    value with no source line of the user's names its module."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64), torch.nn.Tanh())
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record() as explanation:
        for batch in (8, 16):
            compiled(torch.randn(batch, 64)).sum().backward()
    step = {r.region for r in explanation.step_regions()}
    assert len(explanation.regions) == 2 and len(step) == 1, [r.region for r in explanation.regions]
    decisions = explanation.decisions()
    assert decisions and {d.region for d in decisions} == step
    assert {d["region"] for d in explanation.to_dict()["decisions"]} == step
    table = explanation.report().split("values saved for backward (largest first):", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("tanh")]
    assert len(rows) == 1 and "16x256" in rows[0] and rows[0].endswith("(no source line)  1"), table
