"""Summarize the table printed by benchmarks/remat.py against issue 4's acceptance checks.

    .venv/bin/python benchmarks/remat.py > remat.md
    .venv/bin/python benchmarks/summarize_remat.py remat.md

Prints three tables (markdown):

* **budgets**: for each model and nominal budget b, the requested peak (b times the
  unbudgeted estimated peak), memopt's measured peak, the ratio, whether it is within +5%
  (a budget below memopt's smallest measured peak is infeasible: memopt must then run at
  that floor), and whether measured peaks are monotone (never higher at a smaller budget);
* **equal peak**: at each of torch's measured peaks, memopt's recompute FLOPs over
  torch's, and whether memopt's peak stayed within +5% of torch's;
* **smallest peak**: memopt's smallest measured peak against torch's smallest (over all of
  its budgets, and over those whose gradients equal torch's unbudgeted ones).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TOLERANCE = 0.05
MONOTONE_SLACK = 0.005  # measured peaks differ by allocator rounding; 0.5% is "equal"


@dataclass
class Row:
    model: str
    method: str
    budget: str
    measured: float
    estimated: float | None
    gflop: float
    time_ratio: float
    grads_exact: str


def parse(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0] in ("model", "---"):
            continue
        try:
            measured = float(cells[3])
        except ValueError:
            continue
        estimated = None if cells[4] == "-" else float(cells[4])
        rows.append(Row(cells[0], cells[1], cells[2], measured, estimated, float(cells[5]), float(cells[6]), cells[7]))
    return rows


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _ratio(memopt: float, torch: float) -> str:
    if torch == 0:
        return "1.00 (both 0)" if memopt == 0 else f"inf ({memopt:.3f} vs 0)"
    return f"{memopt / torch:.2f}"


def summarize(rows: list[Row]) -> str:
    by_model: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_model[r.model].append(r)
    budgets, equal, smallest = [], [], []
    for model, rs in by_model.items():
        memopt = {r.budget: r for r in rs if r.method == "memopt"}
        torch = [r for r in rs if r.method.startswith("torch")]
        base = memopt.get("none")
        if base is None or base.estimated is None:
            continue
        floor = min(r.measured for r in memopt.values())
        previous = None
        for b in ("1.0", "0.75", "0.5", "0.3", "min"):
            r = memopt.get(b)
            if r is None:
                continue
            monotone = previous is None or r.measured <= previous * (1 + MONOTONE_SLACK)
            previous = r.measured
            if b == "min":
                budgets.append([model, b, "-", f"{r.measured:.2f}", "-", "-", "yes" if monotone else "NO"])
                continue
            requested = float(b) * base.estimated
            if r.measured <= requested * (1 + TOLERANCE):
                verdict = "yes"
            elif requested < floor:  # below reach: memopt must fall back to its smallest peak
                verdict = "infeasible, at floor" if r.measured <= floor * (1 + MONOTONE_SLACK) else "infeasible, NOT at floor"
            else:
                verdict = "NO"
            budgets.append([model, b, f"{requested:.2f}", f"{r.measured:.2f}", f"{r.measured / requested:.3f}",
                            verdict, "yes" if monotone else "NO"])
        at_peak = [r for r in rs if r.method.startswith("memopt at torch")]
        for t in torch[1:]:
            match = next((m for m in at_peak if m.budget.endswith(f"(torch {t.budget})")), None)
            if match is None:
                continue
            within = match.measured <= t.measured * (1 + TOLERANCE)
            equal.append([model, t.budget, f"{t.measured:.2f}", t.grads_exact, f"{t.gflop:.3f}", f"{match.measured:.2f}",
                          f"{match.gflop:.3f}", _ratio(match.gflop, t.gflop), "yes" if within else "NO"])
        m_min = min(r.measured for r in memopt.values())
        t_min = min(r.measured for r in torch)
        valid = [r.measured for r in torch if r.grads_exact == "yes"]
        t_valid = min(valid) if valid else float("nan")
        smallest.append([model, f"{m_min:.2f}", f"{t_min:.2f}", f"{t_valid:.2f}", f"{m_min / t_min:.2f}",
                         "yes" if m_min < t_min else "NO"])
    return "\n\n".join([
        "Budgets (MiB; requested = budget x unbudgeted estimated peak)\n\n" + _table(
            ["model", "budget", "requested", "measured", "measured / requested", "within +5%", "monotone"], budgets),
        "Equal peak (memopt's memory_budget = torch's measured peak + 0.5%)\n\n" + _table(
            ["model", "torch budget", "torch peak MiB", "torch grads exact", "torch GFLOP", "memopt peak MiB",
             "memopt GFLOP", "FLOP ratio memopt / torch", "memopt peak within +5%"], equal),
        "Smallest reachable peak (MiB)\n\n" + _table(
            ["model", "memopt", "torch (any budget)", "torch (exact grads)", "memopt / torch", "memopt lower"], smallest),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="output of benchmarks/remat.py")
    args = parser.parse_args()
    if not args.table.is_file():
        parser.error(f"no such file: {args.table} (write it with: python benchmarks/remat.py > {args.table})")
    rows = parse(args.table.read_text())
    if not rows:
        parser.error(f"{args.table} holds no rows of benchmarks/remat.py's table")
    print(summarize(rows))


if __name__ == "__main__":
    main()
