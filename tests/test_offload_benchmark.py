"""benchmarks/offload.py in its fast mode (small Llama): the below-the-floor rows and
the planner's mix table come out as Markdown, with the offloaded run bitwise equal to
the unbudgeted one (docs/offload.md, "Measurements", is written from the full run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offload.py"


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--fast", "--families", "llama"],
        capture_output=True, text=True, timeout=1800, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(f"| {first_cell}")]


def test_floor_rows_in_fast_mode() -> None:
    out = _run("floor", "--codegens", "eager")
    memory, times = _rows(out, "llama")
    assert len(memory) == 12 and memory[1] == "eager"
    assert memory[4].endswith("B")  # the storage floor, in bytes
    inline, versus = memory[7].split(" (")  # the allocator's view with copies inline, vs the estimate
    assert inline.endswith("B") and versus.endswith("%)")
    assert len(times) == 7 and times[2] == "bitwise"


def test_mix_table_in_fast_mode() -> None:
    out = _run("mix", "--mix-points", "0.1", "--bandwidth", "100")
    (row,) = _rows(out, "llama")
    assert len(row) == 8 and row[1] == "100 / 100 MiB/s"
    assert all(cell for cell in row[3:])
