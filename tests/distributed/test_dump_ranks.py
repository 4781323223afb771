"""Graph dumps of a process group's ranks do not collide (docs/usage.md, "Dumps")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist


@pytest.mark.parametrize("rank", [0, 3])
def test_each_rank_dumps_under_its_own_folder(tmp_path: Path, rank: int) -> None:
    """Every rank compiles the same regions under the same compile ids, so with one
    ``dump_dir`` (a shared file system, one node) each rank wrote, and interleaved,
    the same ``0_0/forward/000_input.py``. Each rank now writes under ``rank<R>/``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
    try:
        torch._dynamo.reset()
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "dump_dir": str(tmp_path)})
        compiled(torch.randn(4, 8)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"rank{rank}"]
    inputs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("000_input.py"))
    assert inputs and all(p.startswith(f"rank{rank}/") for p in inputs), inputs
    assert f"rank{rank}/0_0/forward/000_input.py" in inputs and f"rank{rank}/0_0/backward/000_input.py" in inputs
