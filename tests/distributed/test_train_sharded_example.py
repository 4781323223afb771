"""``examples/train_sharded.py`` runs under torchrun on 2 CPU ranks (gloo), trains, saves a
checkpoint and reports per-rank bytes next to ZeRO's formula."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memopt.distributed.testing import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """One thread per rank; Python's fault handler prints every thread's stack if a rank
    is killed by a signal (so an abort says where it happened)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}


def _failure(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"


def test_example_trains_under_torchrun(tmp_path):
    env = _env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "examples" / "train_sharded.py"), "--steps", "4", "--layers", "1", "--accumulate", "2",
        "--save", str(tmp_path / "ckpt"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, _failure(out)
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("step   3") for line in lines), out.stdout
    assert sum(line.strip().startswith("rank ") for line in lines) == 2, out.stdout
    assert (tmp_path / "ckpt" / ".metadata").exists()


def test_example_built_on_meta_trains(tmp_path):
    """``--meta``: the GPT is built on the meta device, sharded and materialised."""
    env = _env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "examples" / "train_sharded.py"), "--steps", "11", "--layers", "1", "--meta",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, _failure(out)
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.strip().startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0], out.stdout  # steps 0 and 10: it learns


def test_example_run_without_torchrun_says_how_to_run_it():
    """``python examples/train_sharded.py`` (no torchrun): one line naming torchrun, not
    torch's rendezvous traceback ('environment variable RANK expected')."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, str(ROOT / "examples" / "train_sharded.py"), "--steps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0, _failure(out)
    assert "torchrun --nproc_per_node" in out.stderr and "Traceback" not in out.stderr, _failure(out)


def test_example_refuses_a_batch_that_does_not_split_over_the_ranks():
    """``--batch 3`` on 2 ranks: one line saying so before anything is built. Each rank
    took ``batch // ranks`` rows, so a row of every global batch was never trained on
    (and ``--batch 1`` trained on empty batches: loss nan)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "examples" / "train_sharded.py"), "--steps", "1", "--batch", "3",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode != 0, _failure(out)
    assert "--batch 3 does not split evenly over 2 ranks: give a multiple of 2" in out.stderr, _failure(out)
    assert "step" not in out.stdout, _failure(out)
