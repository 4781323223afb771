"""benchmarks/gpu_check.py: the dry run's plumbing on CPU, and the refusal without CUDA.

The GPU numbers themselves need a GPU; these tests check that every section runs at
tiny sizes (``--cpu-dry-run``) and lands in the one table, and that without CUDA and
without the flag the script stops with its own exit status and says why.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
import types
from collections.abc import Iterator

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_without_cuda_it_refuses_with_its_own_status(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "table.md"
    proc = _run("--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device is available" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not out.exists()


@pytest.mark.inductor
def test_cpu_dry_run_fills_every_section(tmp_path: pathlib.Path) -> None:
    """Every section runs at tiny sizes; one table, written to --out and printed; GPU-only
    numbers are marked n/a; the kernels ran (interpreted) and matched their references."""
    out = tmp_path / "table.md"
    proc = _run("--cpu-dry-run", "--models", "zoo_mlp", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    table = out.read_text()
    assert table.strip() in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sections = {row.split(" | ")[0].lstrip("| ") for row in rows}
    assert sections == {"tests", "estimate", "budget", "time", "kernels", "offload", "sharding", "fusion"}
    assert not [row for row in rows if "FAIL" in row]
    cases = " ".join(row.split(" | ")[1] for row in rows)
    for case in ("pytest -m gpu", "zoo_mlp @ 0.75", "zoo_mlp @ 0.5", "zoo_mlp @ min", "quantize int8",
                 "quantize fp8", "low-rank Adam", "8-bit Adam", "zoo_mlp (dry run, C++ kernels) @ 0.5",
                 "disk: round trip, slow producer", "host: copies hidden under compute",
                 "zoo_gpt @ 0.5, offload='disk'", "ZeRO-3, 1 rank(s), gloo"):
        assert case in cases, case
    assert all("n/a (no CUDA)" in row for row in rows)
    assert "Result: every section ran; nothing failed" in table
    for section in ("tests", "kernels", "offload", "sharding", "models", "fusion"):
        assert f"section {section}: done" in proc.stderr
    order = [proc.stderr.index(f"section {section}: start") for section in
             ("tests", "kernels", "offload", "sharding", "models", "fusion")]
    assert order == sorted(order), "the short sections run before the models"


def test_a_failing_case_is_loud(tmp_path: pathlib.Path) -> None:
    """A case that raises becomes a FAIL row naming it, and the exit status is 1."""
    out = tmp_path / "table.md"
    proc = _run("--cpu-dry-run", "--sections", "models", "--models", "no_such_model", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-4000:]
    table = out.read_text()
    assert "FAIL: ValueError" in table and "no_such_model" in table
    assert "Result: FAILED" in table and "gpu_check: FAILED" in proc.stderr


def test_the_hard_limit_keeps_the_rows_measured_so_far(tmp_path: pathlib.Path) -> None:
    """Past ``--hard-limit`` the script writes the rows it has, a failure naming the case
    that was running, and exits 1 (a hung case cannot take the whole run's output)."""
    out = tmp_path / "table.md"
    proc = _run("--cpu-dry-run", "--sections", "kernels", "models", "--models", "zoo_mlp",
                "--hard-limit", "2.5", "--out", str(out))  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-4000:]
    table = out.read_text()
    assert "Result: FAILED: hard limit: the run was stopped at 2 s while running" in table
    assert table.strip() in proc.stdout and "gpu_check: FAILED: hard limit" in proc.stderr


@pytest.fixture
def gpu_check() -> Iterator[types.ModuleType]:
    """benchmarks/gpu_check.py imported as a module (it is a script, not in a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_module", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_table_is_written_after_every_row(tmp_path: pathlib.Path, gpu_check: types.ModuleType) -> None:
    """Each row rewrites --out at once (marked incomplete), so a run killed from outside
    still leaves what it measured."""
    out = tmp_path / "table.md"
    check = gpu_check.Check("cpu", True, gpu_check.DRY_SIZES, out=str(out), sections=("kernels",))
    check.add("kernels", "a case", "1", "2", "0.5", "ok")
    table = out.read_text()
    assert "| kernels | a case | 1 | 2 | 0.5 | ok |" in table and "Result: incomplete: still running" in table


def test_a_progress_line_does_not_rename_the_running_case(gpu_check: types.ModuleType) -> None:
    """What a hard limit names as running is the case, with its last progress line; a
    side remark logged inside it (before: any log line) replaced the case's name."""
    check = gpu_check.Check("cpu", True, gpu_check.DRY_SIZES, sections=("models",))
    seen = []
    check.case("models", "gpt2 @ 0.5", lambda: (check.log("transformers unavailable: zoo models"),
                                                 seen.append(check.running())))  # fmt: skip
    assert seen == ["models: gpt2 @ 0.5 (last said: transformers unavailable: zoo models)"]
    check.case("models", "llama", lambda: seen.append(check.running()))
    assert seen[-1] == "models: llama"


def test_past_the_time_limit_every_case_is_one_failed_row(tmp_path: pathlib.Path) -> None:
    """Cases not started within --time-limit are each a FAIL row of their own (before,
    the first one raised out of its section, "generator didn't yield", and the section's
    later cases were never reported)."""
    out = tmp_path / "table.md"
    proc = _run("--cpu-dry-run", "--sections", "kernels", "--time-limit", "0", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-4000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| kernels |")]
    assert [row.split(" | ")[1] for row in rows] == ["quantize", "low-rank Adam", "low-rank Adam, 4x rank", "8-bit Adam"]
    assert all("FAIL: TimeoutError: not run: the time limit (0 s) was reached" in row for row in rows)


def test_a_child_past_its_timeout_is_killed_with_what_it_started(tmp_path: pathlib.Path,
                                                                 gpu_check: types.ModuleType) -> None:
    """A child that started processes of its own (pytest's subprocess tests, the sharded
    ranks) is killed with them at its timeout. Before, only the child was killed, and
    reading its output waited for the grandchild still holding the pipe: the timeout
    did not end the case."""
    check = gpu_check.Check("cpu", True, gpu_check.DRY_SIZES)
    pidfile = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(120)\n")  # fmt: skip
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="a sleeper ran past 3 s"):
        gpu_check.run_child(check, [sys.executable, "-c", script], 3.0, "a sleeper")
    assert time.monotonic() - start < 30
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert check.child is None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
