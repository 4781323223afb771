"""The examples run (small settings) and do what they say."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_trains_and_explains():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo_gpt.py"), "--steps", "12", "--batch", "8"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    lines = out.stdout.splitlines()
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.strip().startswith("step")]
    assert len(losses) >= 2 and losses[-1] < losses[0], out.stdout
    assert "memopt explanation: 1 region(s)" in out.stdout
    assert "(training)" in out.stdout


def test_fit_factory_runs_through_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "memopt", "fit", str(ROOT / "examples" / "fit_model.py") + ":build",
         "--budget", "1GiB", "--seq", "16", "--max-batch", "2", "--global-batch", "4", "--quiet"],
        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT,
    )
    assert "memopt fit: batch 2 x seq 16" in out.stdout and "2 accumulation steps of 2" in out.stdout
