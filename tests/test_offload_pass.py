"""The ``offload`` pass and option: graph structure from a hand-written plan, the
verifier's invariant, numerics equal to the unoptimized compile, budgets met with
offload, and clear errors for settings that cannot work."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import memopt
from memopt.config import MemoptConfig
from memopt.errors import MemoptOffloadError
from memopt.graph.verify import GraphVerificationError, verify_step
from memopt.passes.base import PassContext
from memopt.passes.instruments import VerifyInstrument
from memopt.passes.manager import PassManager
from memopt.passes.offload import RELOAD_START, RELOAD_WAIT, OFFLOAD, OffloadSavedActivations, offload_target_and_bandwidth
from memopt.plan.plan import MemoryPlan
from memopt.testing.capture import capture_step
from memopt.runtime import synchronous_io
from memopt.testing.measure import measure_peak
from memopt.testing.zoo import zoo_case

FAST_DISK = 2e9  # bytes/s: a fixed bandwidth keeps the plans independent of this disk


def _mlp(x, w1, w2, w3):
    h = torch.tanh(x @ w1)
    g = torch.relu(h @ w2)
    return torch.sigmoid(g @ w3).sum()


def _step():
    torch.manual_seed(0)
    x = torch.randn(128, 128)
    ws = [torch.randn(128, 128, requires_grad=True) for _ in range(3)]
    return capture_step(_mlp, x, *ws)


def _plan(decisions: list[dict]) -> MemoryPlan:
    text = json.dumps({
        "region": "0/0", "baseline_bytes": 0, "estimated_peak_before": 0, "estimated_peak_after": 0,
        "peak_breakdown_before": {}, "peak_breakdown_after": {}, "decisions": decisions,
    })  # fmt: skip
    return MemoryPlan.from_dict(json.loads(text))


def _offload_tanh(lead: int, tmp_path) -> tuple:
    step = _step()
    action = {"kind": "offload", "target": "disk", "reload_lead": lead}
    plan = _plan([{"name": "forward:tanh", "region": "0/0", "action": action, "reason": "test", "bytes": 65536}])
    config = MemoptConfig(codegen="eager", strict=True, offload="disk", offload_dir=str(tmp_path))
    result = PassManager([OffloadSavedActivations()], [VerifyInstrument()]).run(step, PassContext(config, "0/0", plan=plan))
    return result.step, result.records[0]


def test_offload_and_reload_are_placed_as_planned(tmp_path):
    """The offload follows tanh's last forward reader (the second matmul) and its token
    is saved instead of tanh; backward starts the reload two compute nodes before the
    wait, which comes right before tanh's first backward use."""
    step, record = _offload_tanh(2, tmp_path)
    fw = list(step.forward.graph.nodes)
    (offload,) = [n for n in fw if n.target is OFFLOAD]
    assert offload.args[0].name == "tanh" and fw[fw.index(offload) - 1].name == "mm_1"
    saved = {fw_node.name for fw_node, _ in step.saved_pairs()}
    assert offload.name in saved and "tanh" not in saved
    bw = [n for n in step.backward.graph.nodes if n.op == "call_function"]
    (start,) = [n for n in bw if n.target is RELOAD_START]
    (wait,) = [n for n in bw if n.target is RELOAD_WAIT]
    assert bw.index(wait) - bw.index(start) == 3  # two compute nodes run in between
    first_use = min(bw.index(u) for u in wait.users)
    assert first_use > bw.index(wait)
    assert record.applied[0].details["reload_lead_placed"] == 2


def test_auto_beside_an_accelerator_uses_host_memory_whatever_offload_dir_says(tmp_path, monkeypatch):
    """offload="auto" with an offload_dir (for the runs that pick disk) compiles where
    "auto" picks host memory: the pass handed offload_dir to the host store, which takes
    no directory, so every compile on a GPU raised ValueError("offload_dir applies to
    the 'disk' target only") where the same options work on a CPU. (A CPU graph stands
    in for the GPU one: host stores accept it here.)"""
    import memopt.runtime.store_registry as store_registry
    from memopt.runtime.host_store import CudaTransfers, HostStore

    monkeypatch.setattr(store_registry, "_check_host_device", lambda device: None)
    monkeypatch.setattr(store_registry, "_make_store", lambda sid: HostStore(sid, transfers=CudaTransfers()))
    step = _step()
    action = {"kind": "offload", "target": "host", "reload_lead": 1}
    plan = _plan([{"name": "forward:tanh", "region": "0/0", "action": action, "reason": "test", "bytes": 65536}])
    config = MemoptConfig(codegen="eager", strict=True, offload="auto", offload_dir=str(tmp_path))
    result = PassManager([OffloadSavedActivations()], [VerifyInstrument()]).run(step, PassContext(config, "0/0", plan=plan))
    (offload,) = [n for n in result.step.forward.graph.nodes if n.target is OFFLOAD]
    assert offload.args[1] == "host"
    monkeypatch.setattr(HostStore, "measure", lambda self, nbytes, device: (1e9, 1e9))
    assert offload_target_and_bandwidth(config, torch.device("cuda"))[0] == "host"  # the planner's measurement
    store_registry.get_store("host").close()


def test_prefetch_never_climbs_above_the_graph_start(tmp_path):
    step, record = _offload_tanh(1000, tmp_path)
    bw = [n for n in step.backward.graph.nodes if n.op != "placeholder"]
    assert bw[0].target is RELOAD_START  # as early as it goes
    assert record.applied[0].details["reload_lead_placed"] < 1000


def test_verifier_rejects_an_offload_without_its_reload(tmp_path):
    step, _ = _offload_tanh(1, tmp_path)
    verify_step(step)
    wait = next(n for n in step.backward.graph.nodes if n.target is RELOAD_WAIT)
    start = wait.args[0]
    token = start.args[0]
    for user in list(start.users):
        user.args = (token, *user.args[1:])  # wait reads the token directly: no reload_start
    step.backward.graph.erase_node(start)
    with pytest.raises(GraphVerificationError, match="reload_start"):
        verify_step(step, check_meta=False)


def _train(options: dict, batch: int = 8):
    torch._dynamo.reset()
    torch.manual_seed(0)
    case = zoo_case("gpt")
    model = case.build()
    torch.manual_seed(1)
    inputs = case.inputs(batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "strict": True, "verify": True, **options})
    with memopt.record() as explanation:
        loss = compiled(*inputs)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with synchronous_io():  # the store's copies on this thread, where the profiler sees them
        measured = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes
    return loss.detach(), grads, explanation.regions[0].plan, measured


@pytest.fixture(scope="module")
def reference():
    return _train({})


def test_offload_without_budget_is_bitwise_and_offloads_every_large_value(reference, tmp_path):
    loss0, grads0, _, _ = reference
    options = {"offload": "disk", "offload_dir": str(tmp_path), "offload_bandwidth": FAST_DISK, "offload_min_bytes": 1 << 16}
    loss, grads, plan, measured = _train(options)
    assert torch.equal(loss, loss0)
    assert all(torch.equal(grads[n], grads0[n]) for n in grads0)
    offloaded = [d for d in plan.decisions if d.policy == "offload"]
    assert offloaded and all(d.bytes >= 1 << 16 for d in offloaded)
    assert plan.estimated_peak_after < plan.estimated_peak_before
    assert measured == pytest.approx(plan.estimated_peak_after - plan.baseline_bytes, rel=0.01)


def test_offload_meets_a_budget_remat_alone_cannot(reference, tmp_path):
    """Below the rematerialization floor, offload takes the plan (its exact estimate
    on the rewritten graphs) to the budget, and so does the step's measured peak (the
    allocator's view, the store's copies on the step's thread: `synchronous_io`);
    numerics are bitwise. (The OS view with the I/O thread running is measured by
    benchmarks/offload.py.)"""
    loss0, grads0, _, _ = reference
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, floor_plan, _ = _train({"memory_budget": 0.05, "strict": False})
    floor = floor_plan.min_feasible_peak
    budget = int(floor_plan.baseline_bytes + 0.95 * (floor - floor_plan.baseline_bytes))
    options = {
        "memory_budget": budget, "offload": "disk", "offload_dir": str(tmp_path), "offload_bandwidth": FAST_DISK,
        "offload_min_bytes": 1 << 14,
    }  # fmt: skip
    loss, grads, plan, measured = _train(options)
    assert plan.feasible and plan.estimated_peak_after <= budget < floor
    estimated = plan.estimated_peak_after - plan.baseline_bytes
    assert measured <= budget - plan.baseline_bytes and measured == pytest.approx(estimated, rel=0.01)
    assert any(d.policy == "offload" for d in plan.decisions)
    # the planner timed the transfers on the graphs' order: the schedule pass keeps it
    assert plan.schedule["applied"] is False and "offloads" in plan.schedule["skipped"]
    assert torch.equal(loss, loss0)
    assert all(torch.equal(grads[n], grads0[n]) for n in grads0)


def test_infeasible_budget_with_offload_on_names_its_size_threshold(tmp_path):
    """With offload on and every saved value of the zoo GPT under offload_min_bytes (the
    default 1 MiB), nothing can be offloaded: the budget warning names the threshold as a
    way to go lower, instead of saying nothing about the option the user set."""
    import warnings

    options = {"memory_budget": 0.05, "strict": False, "offload": "disk", "offload_dir": str(tmp_path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, plan, _ = _train(options, batch=2)
    assert not any(d.policy == "offload" for d in plan.decisions)
    messages = [str(w.message) for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning)]
    assert messages and all("offload_min_bytes below 1.00 MiB" in m for m in messages), messages
    assert not any("offload='auto'" in m for m in messages)


def test_host_offload_of_a_cpu_graph_is_a_clear_error():
    with pytest.raises(Exception) as info:
        _train({"offload": "host", "memory_budget": 0.5})
    error = info.value
    while error is not None and not isinstance(error, MemoptOffloadError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, MemoptOffloadError) and "offload='disk'" in str(error)


def test_a_full_disk_is_a_clear_error_at_compile_time(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1024, 1024))
    with pytest.raises(Exception) as info:
        _train({"offload": "disk", "offload_dir": str(tmp_path), "offload_bandwidth": FAST_DISK, "offload_min_bytes": 1 << 16})
    assert "free" in str(info.value) and "offload_dir" in str(info.value)


@pytest.mark.inductor
def test_offload_under_inductor_matches_eager(reference, tmp_path):
    loss0, grads0, _, _ = reference
    options = {"offload": "disk", "offload_dir": str(tmp_path), "offload_bandwidth": FAST_DISK, "offload_min_bytes": 1 << 16, "codegen": "inductor"}
    loss, grads, plan, measured = _train(options)
    assert any(d.policy == "offload" for d in plan.decisions)
    # Inductor's generated code frees and reloads where the plan says (copies inline)
    assert measured == pytest.approx(plan.estimated_peak_after - plan.baseline_bytes, rel=0.01)
    torch.testing.assert_close(loss, loss0, rtol=1e-4, atol=1e-5)
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-3, atol=1e-5)


def _train_on_cuda(options: dict, batch: int = 8) -> tuple:
    """Two training steps of the zoo GPT on CUDA; the second step's loss and gradients,
    and the plan."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    case = zoo_case("gpt")
    model = case.build().cuda()
    torch.manual_seed(1)
    inputs = [t.cuda() for t in case.inputs(batch)]
    compiled = torch.compile(model, backend="memopt", options={"strict": True, "verify": True, **options})
    with memopt.record() as explanation:
        for _ in range(2):  # the second step reuses the store's pinned buffers and streams
            model.zero_grad(set_to_none=True)
            loss = compiled(*inputs)
            loss.backward()
    torch.cuda.synchronize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, explanation.regions[0].plan


@pytest.mark.gpu
@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_host_offload_on_cuda_matches_the_unoffloaded_step(codegen):
    """The CUDA path end to end: offloads copied to pinned host memory on a side stream
    after the forward's kernels, the buffers freed by the generated code, reloads waited
    for by the backward's stream; the gradients equal the step without offload."""
    from memopt.runtime import get_store

    loss0, grads0, _ = _train_on_cuda({"codegen": codegen})
    options = {"codegen": codegen, "offload": "host", "offload_bandwidth": 20e9, "offload_min_bytes": 1 << 12}
    loss, grads, plan = _train_on_cuda(options)
    assert any(d.policy == "offload" for d in plan.decisions)
    store = get_store("host")
    store.flush()
    stats = store.stats()
    assert stats.offloads >= 2 and stats.reloads == stats.offloads and stats.handles == 0
    if codegen == "eager":
        assert torch.equal(loss, loss0) and all(torch.equal(grads[n], grads0[n]) for n in grads0)
    else:  # another graph for Inductor to fuse: rounding may differ
        torch.testing.assert_close(loss, loss0, rtol=1e-4, atol=1e-5)
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-3, atol=1e-5)


class _Attention(torch.nn.Module):
    """Saved values of symbolic size, dense (tanh, softmax) and views (transposes of
    chunks) whose strides are symbolic too."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8, -1)
        return self.out(torch.tanh(a @ v))


def test_a_dynamic_shape_compile_offloads_at_every_shape(tmp_path):
    """A second batch shape makes Dynamo compile the region for dynamic shapes, and that
    compile serves every shape. Its saved values have symbolic sizes: they used to stay
    in memory at every shape (offload stopped, with a warning). Now they are offloaded,
    reloaded with their runtime sizes (saved SymInts), bitwise, and no file is left."""
    from memopt.runtime import get_store, register_store

    torch.manual_seed(0)
    model = _Attention()
    copies = {o: copy.deepcopy(model) for o in (True, False)}
    options = {"codegen": "eager", "offload": "disk", "offload_dir": str(tmp_path),
               "offload_bandwidth": FAST_DISK, "offload_min_bytes": 0}  # fmt: skip
    compiled = {
        True: torch.compile(copies[True], backend="memopt", options=options),
        False: torch.compile(copies[False], backend="memopt", options={"codegen": "eager"}),
    }
    store = get_store(register_store("disk", tmp_path))
    for shape in [(4, 32), (2, 16), (3, 24), (4, 32)]:
        x = torch.randn(*shape, 32)
        before = store.stats().offloads
        losses = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for offload in (True, False):
                copies[offload].zero_grad(set_to_none=True)
                losses[offload] = compiled[offload](x).square().sum()
                losses[offload].backward()
        assert not [w for w in caught if issubclass(w.category, memopt.MemoptWarning)], shape
        # the dynamic compile offloads the softmax and the qkv output, whose chunks are saved
        # as views with symbolic strides (rebuilt with as_strided from saved SymInts)
        assert store.stats().offloads - before >= (1 if shape == (4, 32) and before == 0 else 2), shape
        assert not list(tmp_path.rglob("*.bin")), shape
        assert torch.equal(losses[True], losses[False]), shape
        for p, q in zip(copies[True].parameters(), copies[False].parameters()):
            assert torch.equal(p.grad, q.grad), shape
    store.close()
