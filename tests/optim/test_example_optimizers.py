"""examples/train_optimizers.py runs end to end with tiny arguments, and its measured state
bytes agree with the documented formulas it prints beside them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_optimizers.py"
TINY = [
    "--steps", "4", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
    "--batch-size", "4", "--rank", "4", "--gap", "2", "--eval-batches", "1", "--warmup-steps", "1",
    "--threads", "1",
]  # fmt: skip


def test_example_runs_and_bytes_match_the_formulas() -> None:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *TINY], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}  # rows[0]: header
    assert set(table) == {"adamw", "galore", "subspace", "adamw8bit", "mezo"}
    for name, cells in table.items():
        assert cells[0] == cells[1], f"{name}: measured {cells[0]} bytes, formula {cells[1]}"
    measured = {name: int(cells[0]) for name, cells in table.items()}
    assert measured["subspace"] < measured["galore"] < measured["adamw"]
    assert measured["mezo"] == 0
