"""Which device and backend a rank of torchrun's environment takes: NCCL needs a CUDA
device per rank, so a world of more local ranks than devices (two ranks on a machine
with one GPU) runs on CPU with gloo, and asking for CUDA there says why it cannot."""

from __future__ import annotations

import pytest
import torch

from memopt.distributed.testing import gpu_per_rank, init_from_env


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize(("local_world", "expected"), [("1", True), ("2", False)])
def test_ranks_use_cuda_only_with_a_device_each(one_gpu, monkeypatch, local_world, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert gpu_per_rank() is expected


def test_world_size_counts_when_torchrun_gives_no_local_world_size(one_gpu, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not gpu_per_rank()


def test_a_rank_without_a_device_of_its_own_is_a_clear_error(one_gpu, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device was called"))
    with pytest.raises(RuntimeError, match="local rank 1 needs CUDA device 1, and this machine has 1"):
        init_from_env("cuda")
