"""The examples run (small settings) and do what they say."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

import memopt

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


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_gpt", ROOT / "examples" / "demo_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, expected", [("6000000", 6_000_000), ("0.4", 0.4), ("1", 1.0), ("8MiB", 8 << 20), ("50%", 0.5)])
def test_demo_budget_takes_what_memory_budget_takes(text, expected):
    """``--budget 6000000`` (bytes, as its help says sizes are allowed) became the float
    6000000.0, which memory_budget refuses as a fraction above 1: the demo died in its
    first step inside torch.compile's BackendCompilerFailed."""
    options = {"memory_budget": _demo_module().budget_option(text)}
    assert memopt.MemoptConfig.from_options(options).memory_budget == expected


def test_demo_refuses_a_bad_budget_before_training(capsys):
    with pytest.raises(SystemExit) as info:
        _demo_module().main(["--budget", "6 lb", "--steps", "1"])
    assert info.value.code == 2
    err = capsys.readouterr()
    assert "memory_budget='6 lb'" in err.err and "training" not in err.out
