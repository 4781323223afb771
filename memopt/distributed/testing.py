"""Run a script on several local ranks, as ``torchrun --nproc_per_node N`` would, for tests.

    from memopt.distributed.testing import run_ranks
    outputs = run_ranks("tests/distributed/worker.py", ["numerics", "--stages", "0,1,2,3"])

Each rank is a fresh Python process with torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port) and one
thread per process (``OMP_NUM_THREADS=1``); the script calls `init_from_env`. A rank that
fails or times out fails the call with every rank's exit status and the failing ranks'
output. Nothing is pickled between processes: results come back on stdout or in files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["RanksFailed", "free_port", "run_ranks", "init_from_env", "gpu_per_rank"]


class RanksFailed(RuntimeError):
    """A rank of `run_ranks` exited with an error or timed out."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    world_size: int = 2,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run ``python script *args`` on ``world_size`` ranks; return each rank's stdout."""
    port = free_port()
    root = str(Path(__file__).resolve().parents[2])
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [base.get("PYTHONPATH")])])
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="memopt-ranks-") as logs:
        procs = []
        for rank in range(world_size):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
            out = open(Path(logs) / f"{rank}.out", "w+")
            err = open(Path(logs) / f"{rank}.err", "w+")
            cmd = [sys.executable, str(script), *args]
            procs.append((subprocess.Popen(cmd, env=rank_env, stdout=out, stderr=err), out, err))
        codes = _wait_all([p for p, _, _ in procs], timeout)
        texts = []
        for _, out, err in procs:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    if any(code != 0 for code in codes):
        failed = "\n".join(
            f"--- rank {rank} (exit {code}) stderr:\n{texts[rank][1][-6000:]}"
            for rank, code in enumerate(codes)
            if code != 0
        )
        raise RanksFailed(f"{script} {' '.join(args)}: exit codes {codes}\n{failed}")
    return [stdout for stdout, _ in texts]


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """Wait for every process; once one fails (or ``timeout`` passes) the others, which
    would wait forever in a collective, are killed (exit -9)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            time.sleep(2.0 if failed else 0.0)  # let the others print their own error
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            break
        time.sleep(0.05)
    return [p.wait() for p in procs]


def gpu_per_rank() -> bool:
    """Whether each local rank of torchrun's environment has a CUDA device of its own
    (``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE``, at most the device count): NCCL needs
    one device per rank. Every rank computes the same answer, so all pick one backend."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and local_world <= torch.cuda.device_count()


def init_from_env(device: str | None = None, timeout: timedelta | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment: NCCL on CUDA
    (one device per local rank), gloo on CPU. ``device=None``: CUDA when every local rank
    has a device of its own (`gpu_per_rank`), else CPU (2 ranks on a machine with one
    GPU run on CPU). ``timeout``: the process group's (`init_process_group`'s; None:
    torch's default). Returns the rank's device."""
    if device is None:
        device = "cuda" if gpu_per_rank() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local >= count:
            raise RuntimeError(
                f"local rank {local} needs CUDA device {local}, and this machine has {count}: NCCL runs "
                "one rank per device; start at most that many ranks per machine, or use device='cpu' (gloo)"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return torch.device("cuda", local)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")
