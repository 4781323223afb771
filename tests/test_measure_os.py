"""measure_peak's OS view (resident-set growth, Linux): sees a known allocation in a
fresh process with glibc's malloc thresholds fixed, resets between measurements, and
says why where it cannot measure."""

from __future__ import annotations

import sys

import pytest
import torch

import memopt.testing.os_memory as os_memory
from memopt.testing.measure import Workload, measure_in_fresh_process, measure_peak

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OS view reads Linux's /proc")
MiB = 2**20


def touch_pages(mib: list[int]) -> Workload:
    """Call i of the step allocates ``mib[i]`` MiB and writes one byte per 4 KiB page,
    then frees it (a fresh-process factory for the tests below)."""
    sizes = iter(mib)

    def step() -> None:
        block = torch.empty(next(sizes) * MiB, dtype=torch.uint8)
        block[::4096] = 1

    return Workload(step=step, info=lambda: {"sizes": mib})


@linux_only
def test_os_view_sees_known_allocation_and_resets():
    """A 64 MiB block touched page by page grows the resident set by 64 MiB (within 2%);
    the next measurement's 16 MiB block reads 16 MiB, so the high-water mark was reset.
    The 1 MiB warm-up step absorbs first-call costs (the intra-op thread pool, kernels).
    Each measurement runs the step three times (allocator view, then the cold- and
    warm-heap OS views)."""
    mib = [1] + [64] * 3 + [16] * 3
    result = measure_in_fresh_process(f"{__file__}:touch_pages", kwargs={"mib": mib}, warmup=1, repeat=2)
    big, small = result.measurements
    assert big.os_reliable and small.os_reliable, (big.os_note, small.os_note)
    assert big.os_peak_growth_bytes == pytest.approx(64 * MiB, rel=0.02)
    assert big.os_warm_peak_growth_bytes == pytest.approx(64 * MiB, rel=0.02)  # mapped anew each time
    assert small.os_peak_growth_bytes == pytest.approx(16 * MiB, rel=0.02)
    assert big.os_end_growth_bytes < MiB and small.os_end_growth_bytes < MiB  # unmapped on free
    assert (big.peak_growth_bytes, small.peak_growth_bytes) == (64 * MiB + 1, 16 * MiB + 1)
    assert result.info == {"sizes": mib}
    assert result.env["MALLOC_MMAP_THRESHOLD_"] == os_memory.MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]


@linux_only
def test_median_is_the_step_of_the_median_os_view():
    """Three measurements of 32, 8 and 16 MiB: the median OS view is the 16 MiB one's."""
    mib = [1] + [32] * 3 + [8] * 3 + [16] * 3
    result = measure_in_fresh_process(f"{__file__}:touch_pages", kwargs={"mib": mib}, warmup=1, repeat=3)
    assert result.median is result.measurements[2]
    assert result.median.os_peak_growth_bytes == pytest.approx(16 * MiB, rel=0.02)


_PIN: list[torch.Tensor] = []


def small_blocks(mib: int) -> Workload:
    """The step allocates ``mib`` MiB as 16 KiB tensors (under glibc's 64 KiB mmap
    threshold, so they come from the heap), writes them and frees them. The first call
    also keeps one block alive above them, so the heap's top cannot shrink over the
    freed ones: they stay resident until ``malloc_trim``, as in a real process."""

    def step() -> None:
        blocks = [torch.ones(4096) for _ in range(mib * 64)]
        if not _PIN:
            _PIN.append(torch.ones(4096))
        del blocks

    return Workload(step=step)


@linux_only
def test_warm_heap_view_reuses_resident_heap_pages():
    """16 MiB of small blocks: the allocator sees 16 MiB; the OS view measured after
    ``malloc_trim`` sees the heap pages fault back in (16 MiB); the warm-heap view, the
    same step as the previous one left the heap, grows by almost nothing."""
    m = measure_in_fresh_process(f"{__file__}:small_blocks", kwargs={"mib": 16}, warmup=1).last
    assert m.os_reliable, m.os_note
    assert m.peak_growth_bytes == pytest.approx(16 * MiB, rel=0.02)
    assert m.os_peak_growth_bytes == pytest.approx(16 * MiB, rel=0.1)
    assert m.os_warm_peak_growth_bytes < 2 * MiB


def test_os_view_none_with_reason_off_linux(monkeypatch):
    monkeypatch.setattr(os_memory.sys, "platform", "darwin")
    m = measure_peak(lambda: torch.ones(10))
    assert m.os_peak_growth_bytes is None and m.os_end_growth_bytes is None
    assert not m.os_reliable
    assert "needs Linux" in m.os_note and "darwin" in m.os_note
    assert m.peak_growth_bytes == 40  # the allocator view is unaffected


@linux_only
def test_os_view_none_with_reason_when_proc_unwritable(monkeypatch, tmp_path):
    monkeypatch.setattr(os_memory, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    m = measure_peak(lambda: torch.ones(10))
    assert m.os_peak_growth_bytes is None
    assert "cannot reset the resident-set peak" in m.os_note


def test_malloc_env_note(tmp_path):
    environ = tmp_path / "environ"
    environ.write_bytes(b"HOME=/root\0MALLOC_MMAP_THRESHOLD_=65536\0")
    assert "MALLOC_TRIM_THRESHOLD_" in os_memory.malloc_env_note(str(environ))
    assert "MALLOC_MMAP_THRESHOLD_" not in os_memory.malloc_env_note(str(environ)).split(":")[0]
    environ.write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in os_memory.MALLOC_ENV.items()))
    assert os_memory.malloc_env_note(str(environ)) == ""
    assert "cannot read" in os_memory.malloc_env_note(str(tmp_path / "absent"))


def test_fresh_process_reports_factory_errors():
    with pytest.raises(ValueError, match="expected FILE.py:FACTORY or package.module:FACTORY"):
        measure_in_fresh_process("no_colon_here")
    with pytest.raises(RuntimeError, match="has no function 'absent'"):
        measure_in_fresh_process(f"{__file__}:absent", warmup=0)
