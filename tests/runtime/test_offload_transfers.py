"""The CUDA ordering of the offload stores' copies, checked without a GPU.

* `CudaTransfers` against recorded-call fakes of ``torch.cuda``'s streams and events:
  which stream each copy runs on, what it waits for, where its event is recorded (on
  the tensor's device, whatever the current device).
* `DiskStore` with accelerator values (fake transfers on CPU tensors): the device->host
  copy is queued when ``offload`` is called, on the transfers' side stream; the I/O
  thread writes nothing and holds the source until the copy's event completes; the
  reload's host->device copy goes through the transfers too.
* GPU tests (marked): the same on CUDA, with a slow producer on a non-default stream.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from typing import Any

import pytest
import torch
from offload_testing import FakeEvent

from memopt.runtime.disk_store import DiskStore
from memopt.runtime.host_store import HostStore
from memopt.runtime.transfers import CudaTransfers

CUDA1 = torch.device("cuda", 1)


class _Log:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []


class _FakeStream:
    def __init__(self, log: _Log, name: str, device: torch.device) -> None:
        self.log, self.name, self.device = log, name, device

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.calls.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: _FakeEvent) -> None:
        self.log.calls.append(("wait_event", self.name, event.name))


class _FakeEvent:
    count = 0

    def __init__(self, log: _Log, **flags: Any) -> None:
        _FakeEvent.count += 1
        self.log, self.name, self.flags = log, f"event{_FakeEvent.count}", flags

    def record(self, stream: _FakeStream) -> None:
        self.log.calls.append(("record", self.name, stream.name))


class _FakeTensor:
    """Stands for a tensor in ``copy_`` calls: says which stream was current then."""

    def __init__(self, log: _Log, current: list[str]) -> None:
        self.log, self.current = log, current

    def copy_(self, src: Any, non_blocking: bool = False) -> None:
        self.log.calls.append(("copy", self.current[-1], non_blocking))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[_Log, list[str]]:
    """``torch.cuda``'s Stream, current_stream, stream() and Event, recording calls;
    the current device is cuda:0, and each device has its own current stream."""
    log, current = _Log(), ["compute"]

    def current_stream(device: torch.device | None = None) -> _FakeStream:
        where = torch.device(device) if device is not None else torch.device("cuda", 0)
        return _FakeStream(log, f"current:{where}", where)

    class StreamContext:
        def __init__(self, stream: _FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.append(self.stream.name)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    def make_stream(device: torch.device) -> _FakeStream:
        log.calls.append(("new_stream", str(device)))
        return _FakeStream(log, f"side:{device}", device)

    monkeypatch.setattr(torch.cuda, "Stream", make_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "Event", lambda **flags: _FakeEvent(log, **flags))
    return log, current


def test_a_copy_runs_on_the_tensor_devices_side_stream_after_its_current_stream(fake_cuda):
    """On cuda:1 (the current device being cuda:0): the side stream is made on cuda:1,
    waits for cuda:1's current stream, the copy is queued inside the side stream's
    context (non-blocking), and the event is recorded on the side stream after it,
    made blocking (the I/O thread sleeps on it)."""
    log, current = fake_cuda
    transfers = CudaTransfers()
    event = transfers.copy_async(_FakeTensor(log, current), object(), CUDA1)
    assert log.calls == [
        ("new_stream", "cuda:1"),
        ("wait_stream", "side:cuda:1", "current:cuda:1"),
        ("copy", "side:cuda:1", True),
        ("record", event.name, "side:cuda:1"),
    ]
    assert event.flags.get("blocking") is True
    assert current == ["compute"]  # the side stream's context was left


def test_the_side_stream_is_made_once_per_device_and_reused(fake_cuda):
    """Copies on one device queue on one side stream, in order: a reload's
    host->device copy runs after the offload's device->host copy into the same pinned
    buffer, without any other synchronization."""
    log, current = fake_cuda
    transfers = CudaTransfers()
    for device in (CUDA1, CUDA1, torch.device("cuda", 0)):
        transfers.copy_async(_FakeTensor(log, current), object(), device)
    assert [c for c in log.calls if c[0] == "new_stream"] == [("new_stream", "cuda:1"), ("new_stream", "cuda:0")]
    assert [c[1] for c in log.calls if c[0] == "copy"] == ["side:cuda:1", "side:cuda:1", "side:cuda:0"]


def test_the_consumer_waits_on_its_devices_current_stream(fake_cuda):
    log, current = fake_cuda
    transfers = CudaTransfers()
    event = transfers.copy_async(_FakeTensor(log, current), object(), CUDA1)
    transfers.wait_on_current(event, CUDA1)
    assert log.calls[-1] == ("wait_event", "current:cuda:1", event.name)


# -- DiskStore with accelerator values (fake transfers: CPU tensors stand for CUDA ones) ---


class StagingTransfers(CudaTransfers):
    """CPU tensors treated as accelerator tensors: copies made at once, their events
    completing when the test says so (``hold``); every call recorded."""

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.calls: list[str] = []
        self.events: list[FakeEvent] = []

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        self.calls.append("host_empty")
        return torch.empty(numel, dtype=dtype)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> FakeEvent:
        self.calls.append(f"copy_async on the thread {threading.current_thread().name}")
        dst.copy_(src)
        self.events.append(FakeEvent(done=not self.hold))
        return self.events[-1]

    def synchronize(self, event: FakeEvent) -> None:
        self.calls.append("synchronize")
        event.synchronize()

    def to_device(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.calls.append("to_device")
        return src.clone()


@pytest.fixture
def staging_store(offload_dir):
    store = DiskStore("disk-staging-test", str(offload_dir), transfers=StagingTransfers(hold=True))
    yield store
    store.close()


def test_disk_offload_of_an_accelerator_value_copies_on_the_side_stream_then_writes(staging_store):
    """The device->host copy is queued by ``offload`` itself, on the calling thread (the
    compute stream's order is known there); the I/O thread writes nothing and keeps the
    source alive until the copy's event completes, then drops the source and writes.
    Before, the I/O thread copied with ``.to("cpu")`` on its own default stream."""
    transfers = staging_store.transfers
    value = torch.randn(64)
    expected = value.clone()
    storage = weakref.ref(value.untyped_storage())
    token = staging_store.offload(value, "v")
    del value
    gc.collect()
    main = threading.current_thread().name
    assert transfers.calls[:2] == ["host_empty", f"copy_async on the thread {main}"]
    path = os.path.join(staging_store.directory, f"{int(token.item())}.bin")
    threading.Event().wait(0.2)  # the I/O thread is running: it must be waiting, not writing
    assert not os.path.exists(path) and storage() is not None
    assert staging_store.stats().pending_bytes == 256
    transfers.events[0].done.set()
    staging_store.flush()
    assert os.path.exists(path) and storage() is None
    assert transfers.calls[-1] == "synchronize"
    back = staging_store.reload_wait(int(token.item()), [64], torch.float32, torch.device("cpu"))
    assert transfers.calls[-1] == "to_device"
    assert torch.equal(back, expected)
    assert not os.path.exists(path)


# -- on CUDA -----------------------------------------------------------------------------


def _slow_value(stream: torch.cuda.Stream) -> torch.Tensor:
    """A value produced by long kernels queued on ``stream``, not finished when this
    returns."""
    with torch.cuda.stream(stream):
        a = torch.randn(2048, 2048, device="cuda")
        x = a
        for _ in range(30):  # tens of milliseconds of matmuls the copy must wait for
            x = torch.tanh(x @ a) * 0.5
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["host", "disk"])
def test_cuda_offload_waits_for_a_slow_producer_on_a_non_default_stream(target, offload_dir):
    """The value is offloaded while its kernels still run, on a stream other than the
    default one; it comes back bitwise equal to what those kernels produce."""
    store = HostStore("host-slow-test") if target == "host" else DiskStore("disk-slow-test", str(offload_dir))
    stream = torch.cuda.Stream()
    try:
        with torch.cuda.stream(stream):
            x = _slow_value(stream)
            token = store.offload(x, "slow")
            expected = x.clone()
            del x
            started = store.reload_start(int(token.item()))
            back = store.reload_wait(int(started.item()), list(expected.shape), expected.dtype, expected.device)
            same = torch.equal(back, expected)
        torch.cuda.synchronize()
        assert same
    finally:
        store.close()
