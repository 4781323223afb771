"""HostStore: the stream/event logic against fake transfers (no accelerator needed),
the refusal on CPU graphs, and real CUDA round trips (marked gpu)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from offload_testing import FakeEvent

from memopt.errors import MemoptOffloadError
from memopt.runtime import get_store, measure_bandwidth, register_store
from memopt.runtime.host_store import CudaTransfers, HostStore

ops = torch.ops.memopt
CPU = torch.device("cpu")


class FakeTransfers(CudaTransfers):
    """Copies at once, on CPU tensors; their events complete when the test says so
    (``hold``), and waits of the current stream are recorded."""

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.events: list[FakeEvent] = []
        self.stream_waits: list[FakeEvent] = []

    def supports(self, device):
        return device.type == "cpu"

    def host_empty(self, numel, dtype):
        return torch.empty(numel, dtype=dtype)

    def device_empty(self, numel, dtype, device):
        return torch.empty(numel, dtype=dtype, device=device)

    def copy_async(self, dst, src, device):
        dst.copy_(src)
        self.events.append(FakeEvent(done=not self.hold))
        return self.events[-1]

    def wait_on_current(self, event, device):
        self.stream_waits.append(event)


@pytest.fixture
def fake_store():
    store = HostStore("host-test", transfers=FakeTransfers())
    yield store
    store.close()


def test_source_is_held_until_the_copy_event_completes(fake_store):
    fake_store.transfers.hold = True
    value = torch.randn(64)
    storage = weakref.ref(value.untyped_storage())
    token = fake_store.offload(value, "v")
    del value
    gc.collect()
    assert storage() is not None and fake_store.stats().pending_bytes == 256
    fake_store.transfers.events[0].done.set()
    fake_store.flush()
    assert storage() is None
    stats = fake_store.stats()
    assert (stats.pending_bytes, stats.resident_bytes, stats.bytes_written) == (0, 256, 256)
    del token


def test_reload_makes_the_current_stream_wait_and_frees_the_pinned_buffer(fake_store):
    value = torch.randn(4, 8).to(torch.bfloat16)
    token = fake_store.offload(value, "v")
    started = ops.reload_start(token)
    reload_event = fake_store.transfers.events[-1]
    back = ops.reload_wait(started, [4, 8], torch.bfloat16, CPU)
    assert fake_store.transfers.stream_waits == [reload_event]
    assert torch.equal(back.view(torch.int16), value.view(torch.int16))
    fake_store.flush()
    stats = fake_store.stats()
    assert (stats.resident_bytes, stats.peak_resident_bytes, stats.handles) == (0, 64, 0)


def test_unreloaded_handle_is_released_when_its_token_dies(fake_store):
    token = fake_store.offload(torch.randn(16), "v")
    fake_store.flush()
    assert fake_store.stats().resident_bytes == 64
    del token
    gc.collect()
    fake_store.flush()
    assert (fake_store.stats().resident_bytes, fake_store.stats().handles) == (0, 0)


def test_fake_transfers_give_a_bandwidth(fake_store):
    write, read = fake_store.measure(2**16, CPU)
    assert write > 0 and read > 0


def test_host_target_is_refused_for_cpu_graphs():
    with pytest.raises(MemoptOffloadError, match="already live in host memory.*'disk'"):
        register_store("host", device="cpu")
    with pytest.raises(ValueError, match="disk"):
        register_store("host", "/tmp", device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_host_target_needs_cuda():
    with pytest.raises(MemoptOffloadError, match="without CUDA"):
        register_store("host")
    with pytest.raises(MemoptOffloadError, match="needs an accelerator"):
        get_store("host")


def _cuda_round_trip(store_id: str, value: torch.Tensor) -> torch.Tensor:
    token = ops.offload(value, store_id, "v")
    started = ops.reload_start(token)
    return ops.reload_wait(started, list(value.shape), value.dtype, value.device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_cuda_round_trip_through_host_is_bitwise(dtype):
    sid = register_store("host", device="cuda")
    value = (torch.randn(257, 33, device="cuda") * 100).to(dtype)
    back = _cuda_round_trip(sid, value.t())
    assert back.device == value.device and back.is_contiguous()
    assert torch.equal(back, value.t())


@pytest.mark.gpu
def test_cuda_source_memory_is_freed_once_copied():
    sid = register_store("host", device="cuda")
    store = get_store(sid)
    value = torch.randn(2**20, device="cuda")  # 4 MiB
    value.mul_(2)  # queued work the side stream must wait for
    expected = value.cpu()
    before = torch.cuda.memory_allocated()
    token = ops.offload(value, sid, "v")
    del value
    store.flush()
    assert torch.cuda.memory_allocated() <= before - 2**22
    back = ops.reload_wait(ops.reload_start(token), [2**20], torch.float32, torch.device("cuda"))
    assert torch.equal(back.cpu(), expected)


@pytest.mark.gpu
def test_cuda_round_trip_through_disk_is_bitwise(offload_dir):
    sid = register_store("disk", offload_dir)
    value = torch.randn(64, 3, device="cuda").to(torch.bfloat16)
    assert torch.equal(_cuda_round_trip(sid, value), value)
    get_store(sid).close()


@pytest.mark.gpu
def test_cuda_bandwidth_is_measured():
    write, read = measure_bandwidth("host", "cuda", nbytes=2**24)
    assert write > 1e8 and read > 1e8
