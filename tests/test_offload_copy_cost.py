"""The offload cost model's CPU copy cost (`memopt.analysis.storage_cost.Bandwidth.copy_bytes_per_s`):
where the disk store's copies run on the cores the step computes on, each offload adds
its bytes at the copy rate to the modelled step time, and the planner weighs that
against recomputation."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import memopt.analysis.storage_cost as storage_cost
from memopt.analysis import cost
from memopt.analysis.storage_cost import Bandwidth, bandwidth_for, share_link, storage_candidates
from memopt.config import MemoptConfig
from memopt.errors import MemoptWarning
from memopt.plan.planner import plan_region
from memopt.plan.storage import StorageOptions

FAST = 1e12  # a link that hides every transfer


def _chain(x, *ws):
    for w in ws:
        x = torch.tanh(x @ w)
    return x.sum()


@pytest.fixture(scope="module")
def mlp_step():
    """Eight layers whose 512 KiB activations, all saved, make the peak at the start
    of backward: recomputing or offloading them both lower it. Captured as it enters
    memopt's pipeline, with its joint graph (the region planner's input)."""
    import memopt
    from memopt.passes.pipeline import pass_names

    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    ws = [torch.randn(128, 128, requires_grad=True) for _ in range(8)]
    compiled = torch.compile(_chain, backend="memopt", options={"codegen": "eager", "disable_passes": tuple(pass_names())})
    with memopt.record() as explanation:
        compiled(x, *ws).backward()
    (record,) = explanation.step_regions()
    return record.step, record.timeline_before


def _offloads(step, timeline, band: Bandwidth):
    candidates, _ = storage_candidates(step, timeline, offload="disk", bandwidth=band, min_offload_bytes=0)
    return {c.names: c for c in candidates if c.kind == "offload"}


def test_each_offload_adds_its_bytes_at_the_copy_rate(mlp_step):
    """Same windows and transfers with and without the copy cost; the modelled seconds
    differ by exactly nbytes / rate, per value, alone and on the shared link."""
    step, timeline = mlp_step
    rate = 1e9
    free = _offloads(step, timeline, Bandwidth(FAST, FAST))
    charged = _offloads(step, timeline, Bandwidth(FAST, FAST, copy_bytes_per_s=rate))
    assert free and free.keys() == charged.keys()
    for names, c in charged.items():
        f = free[names]
        assert f.copy_seconds == 0.0
        assert c.copy_seconds == pytest.approx(c.full_bytes / rate)
        assert c.seconds == pytest.approx(f.seconds + c.full_bytes / rate)
        same = ("away", "back", "full_bytes", "transfer_seconds", "hidden_seconds", "reload_lead", "first", "last")
        assert [getattr(c, k) for k in same] == [getattr(f, k) for k in same]
    kept_free, _ = share_link(list(free.values()))
    kept_charged, _ = share_link(list(charged.values()))
    assert sum(c.seconds for c in kept_charged) == pytest.approx(
        sum(c.seconds for c in kept_free) + sum(c.full_bytes for c in kept_charged) / rate
    )


def _plan(step, timeline, band: Bandwidth, budget: int):
    config = MemoptConfig.from_options({"memory_budget": budget, "offload": "disk", "offload_min_bytes": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoptWarning)
        plan = plan_region(step, timeline, config, StorageOptions(None, "disk", band, min_offload_bytes=0))
    return {d.policy for d in plan.decisions}, plan


def test_the_planner_recomputes_when_copying_costs_more(mlp_step):
    """At a budget recomputation meets: with copies beside the compute the planner
    offloads (a free transfer beats recomputing a matmul); with copies on the step's
    cores at a slow rate it recomputes instead, and the reason it gives for any
    offload it keeps names the copying."""
    step, timeline = mlp_step
    budget = int(timeline.baseline_bytes + 0.8 * (timeline.peak_bytes - timeline.baseline_bytes))
    beside, _ = _plan(step, timeline, Bandwidth(FAST, FAST), budget)
    assert "offload" in beside
    shared, plan = _plan(step, timeline, Bandwidth(FAST, FAST, copy_bytes_per_s=1e6), budget)
    assert "offload" not in shared and "recompute" in shared
    assert plan.estimated_peak_after <= budget


def test_the_reason_names_the_copying(mlp_step):
    step, timeline = mlp_step
    budget = int(timeline.baseline_bytes + 0.2 * (timeline.peak_bytes - timeline.baseline_bytes))
    _, plan = _plan(step, timeline, Bandwidth(FAST, FAST, copy_bytes_per_s=1e12), budget)
    offloaded = [d for d in plan.decisions if d.policy == "offload"]
    assert offloaded
    for d in offloaded:
        assert "of copying on the step's cores" in d.reason
        assert d.details["copy_seconds"] == pytest.approx(d.bytes / 1e12)


@pytest.mark.parametrize(
    "device, threads, cores, shared",
    [("cpu", 2, 2, True), ("cpu", 4, 2, True), ("cpu", 1, 2, False), ("meta", 2, 2, True), ("cuda", 16, 16, False)],
)
def test_copies_share_the_cores_when_the_step_uses_them_all(monkeypatch, device, threads, cores, shared):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cost.copies_share_compute_cores(torch.device(device)) is shared
    band = bandwidth_for(torch.device(device), 1e9, 2e9)
    assert (band.write, band.read) == (1e9, 2e9)
    expected = cost.device_model(torch.device(device)).spill_copy_bytes_per_s if shared else None
    assert band.copy_bytes_per_s == expected


def test_the_disk_store_measures_its_copies_in_cpu_seconds(tmp_path):
    """The rate is this machine's: 32 MiB out to the page cache and back into a fresh
    tensor, in the calling thread's CPU time (a memory copy each way: between 50 MiB/s
    and 200 GiB/s of CPU time on any host), and it leaves no file behind."""
    from memopt.runtime import get_store, register_store

    store = get_store(register_store("disk", str(tmp_path)))
    before = set(os.listdir(store.directory))
    rate = store.measure_copies(32 << 20)
    assert 50 * 2**20 < rate < 200 * 2**30, rate
    assert set(os.listdir(store.directory)) == before


def test_the_planner_charges_the_measured_copy_rate_unless_a_bandwidth_is_given(monkeypatch, tmp_path):
    """Without ``offload_bandwidth`` the planner's copy rate is measured once per
    process (then cached); with it given, the device model's figure, measured nowhere,
    so that the plan does not depend on this machine."""
    from memopt.passes import offload as offload_pass
    from memopt.runtime import disk_store

    monkeypatch.setattr(offload_pass, "copies_share_compute_cores", lambda device: True)
    monkeypatch.setattr(storage_cost, "copies_share_compute_cores", lambda device: True)
    calls = []
    real = disk_store.DiskStore.measure_copies

    def counted(self, nbytes, rounds=3):
        calls.append(nbytes)
        return real(self, nbytes, rounds)

    monkeypatch.setattr(disk_store.DiskStore, "measure_copies", counted)
    cpu = torch.device("cpu")
    options = {"offload": "disk", "offload_dir": str(tmp_path)}
    _, measured = offload_pass.offload_target_and_bandwidth(MemoptConfig.from_options(options), cpu)
    _, again = offload_pass.offload_target_and_bandwidth(MemoptConfig.from_options(options), cpu)
    assert len(calls) == 1 and measured.copy_bytes_per_s == again.copy_bytes_per_s
    assert measured.copy_bytes_per_s != cost.device_model(cpu).spill_copy_bytes_per_s

    given = {**options, "offload_bandwidth": 1e9}
    _, pinned = offload_pass.offload_target_and_bandwidth(MemoptConfig.from_options(given), cpu)
    assert len(calls) == 1
    assert pinned.copy_bytes_per_s == cost.device_model(cpu).spill_copy_bytes_per_s
    assert (pinned.write, pinned.read) == (1e9, 1e9)
