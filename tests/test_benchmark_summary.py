"""benchmarks/summarize_remat.py turns benchmarks/remat.py's table into issue 4's checks;
docs/benchmarks.md is written from it, so its verdicts are pinned on a hand-made table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_remat.py"
_spec = importlib.util.spec_from_file_location("summarize_remat", _PATH)
assert _spec is not None and _spec.loader is not None
summarize_remat = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = summarize_remat  # dataclasses look their module up
_spec.loader.exec_module(summarize_remat)

TABLE = """\
| model | method | budget | measured peak MiB | estimated peak MiB | recompute GFLOP | step time ratio | grads = unbudgeted |
| --- | --- | --- | ---: | ---: | ---: | ---: | --- |
| m | memopt | none | 10.00 | 10.00 | 0.000 | 1.00 | yes |
| m | memopt | 1.0 | 10.00 | 10.00 | 0.000 | 1.00 | yes |
| m | memopt | 0.75 | 7.80 | 7.80 | 0.100 | 1.10 | yes |
| m | memopt | 0.5 | 6.00 | 6.00 | 0.200 | 1.20 | yes |
| m | memopt | 0.3 | 6.00 | 6.00 | 0.200 | 1.20 | yes |
| m | memopt | min | 6.00 | 6.00 | 0.200 | 1.20 | yes |
| m | torch activation_memory_budget | 1.0 | 10.00 | - | 0.000 | 1.00 | yes |
| m | torch activation_memory_budget | 0.5 | 8.00 | - | 0.400 | 1.30 | yes |
| m | memopt at torch's measured peak | 8.00 MiB (torch 0.5) | 7.90 | 7.90 | 0.100 | 1.10 | yes |
"""


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| m |")]


def test_verdicts() -> None:
    rows = summarize_remat.parse(TABLE)
    assert len(rows) == 9
    budgets, equal, smallest = (_rows(part) for part in summarize_remat.summarize(rows).split("\n\n")[1::2])
    verdict = {r[1]: r[5] for r in budgets}
    assert verdict["0.75"] == "yes"  # 7.80 <= 7.5 * 1.05
    assert verdict["0.5"] == "infeasible, at floor"  # 6.00 > 5.0 * 1.05, but 5.0 is below the floor 6.00
    assert verdict["0.3"] == "infeasible, at floor"
    assert equal == [["m", "0.5", "8.00", "yes", "0.400", "7.90", "0.100", "0.25", "yes"]]
    assert smallest == [["m", "6.00", "8.00", "8.00", "0.75", "yes"]]


def test_a_missed_feasible_budget_and_a_rise_are_failures() -> None:
    table = TABLE.replace("| m | memopt | 0.75 | 7.80 | 7.80 |", "| m | memopt | 0.75 | 8.50 | 8.50 |")
    table = table.replace("| m | memopt | 0.3 | 6.00 | 6.00 |", "| m | memopt | 0.3 | 6.50 | 6.50 |")
    budgets = _rows(summarize_remat.summarize(summarize_remat.parse(table)).split("\n\n")[1])
    by_budget = {r[1]: r for r in budgets}
    assert by_budget["0.75"][5] == "NO"  # 8.50 > 7.5 * 1.05 and 7.5 is above the floor 6.00
    assert by_budget["0.3"][5] == "infeasible, NOT at floor"
    assert by_budget["0.3"][6] == "NO"  # 6.50 at 0.3 after 6.00 at 0.5
