"""OffloadedState: optimizer state on disk, streamed one parameter at a time.

The rule every test holds it to: training through the wrapper gives the parameters (and
the state dict) of the plain optimizer, bit for bit; between steps the state tensors are
in the store and only 0-dim ones (step counts) stay in memory; during a step at most one
parameter's state is in the optimizer, and the reads ahead and pending writes are
bounded; the store's directory is gone after close() or process exit; a store that
cannot hold the state is a MemoptOffloadError before the first step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import memopt.runtime.disk_store as disk_store
from memopt.errors import MemoptOffloadError
from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, OffloadedState, SubspaceAdamW, optimizer_state_bytes
from memopt.optim.offload import estimate_state_bytes
from memopt.runtime import get_store, register_store
from optim_testing import batch, loss_of, saved, tiny_mlp, train

REPO = Path(__file__).resolve().parents[2]


def groups(model: torch.nn.Module, **second: object) -> list[dict]:
    """Two groups, the first led by a parameter that never gets a gradient (so positions
    over all parameters differ from positions over those with gradients), the second
    with options ``second``."""
    if not hasattr(model, "unused"):
        model.unused = torch.nn.Parameter(torch.zeros(5))
    first, last = model[0], model[2]
    return [{"params": [model.unused, first.weight, first.bias]},
            {"params": [last.weight, last.bias], **second}]


# update_proj_gap=3 over 8 steps: GaLore refreshes its projector at steps 1, 4, 7 and
# Subspace resamples (resetting its moments), so the schedule must survive streaming.
OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(groups(m, lr=3e-3), lr=1e-2),
    "adamw_foreach": lambda m: torch.optim.AdamW(groups(m), lr=1e-2, foreach=True),
    "adamw_fused": lambda m: torch.optim.AdamW(groups(m), lr=1e-2, fused=True),
    "adamw_amsgrad": lambda m: torch.optim.AdamW(groups(m), lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda m: torch.optim.SGD(groups(m, momentum=0.5), lr=1e-2, momentum=0.9),
    "galore": lambda m: GaLoreAdamW(groups(m, lowrank=False), lr=1e-2, rank=4, update_proj_gap=3),
    "galore_min_state": lambda m: GaLoreAdamW(groups(m), lr=1e-2, rank=4, update_proj_gap=3,
                                              proj_type="min_state"),
    "subspace": lambda m: SubspaceAdamW(groups(m), lr=1e-2, rank=4, update_proj_gap=3, seed=7),
    "adamw8bit": lambda m: AdamW8bit(groups(m), lr=1e-2, block_size=64, min_8bit_size=100),
}


def states_equal(a: dict, b: dict) -> bool:
    """Two optimizer state dicts hold the same keys, in the same order, and equal values."""
    if list(a) != list(b):
        return False
    return all(
        torch.equal(x, b[k]) and x.dtype == b[k].dtype if isinstance(x, torch.Tensor)
        else (states_equal(x, b[k]) if isinstance(x, dict) else x == b[k])
        for k, x in a.items()
    )


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture
def offload_dir(tmp_path):
    path = tmp_path / "offload"
    path.mkdir(mode=0o700)
    return path


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_and_state_are_bitwise_those_of_the_plain_optimizer(name, offload_dir):
    make = OPTIMIZERS[name]
    plain_model, model = tiny_mlp(), tiny_mlp()
    plain = make(plain_model)
    with OffloadedState(make(model), "disk", offload_dir) as opt:
        for i in range(8):
            train(plain_model, plain, range(i, i + 1))
            train(model, opt, range(i, i + 1))
            assert params_equal(plain_model, model), f"parameters differ after step {i + 1}"
        stats = opt.stats()
        assert stats.offloaded_bytes == optimizer_state_bytes(plain) - stats.in_memory_bytes
        assert stats.in_memory_bytes == sum(  # only 0-dim tensors stay: torch's step counts
            v.numel() * v.element_size() for s in plain.state.values() for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() == 0)
        assert states_equal(plain.state_dict(), opt.state_dict())
    assert os.listdir(offload_dir) == []


def test_estimate_before_the_first_step_is_the_state_made(offload_dir):
    """The preflight's figure, per optimizer, is the state bytes after one step (for
    every parameter: ``unused``, which never gets a gradient, never gets state)."""
    for name, make in OPTIMIZERS.items():
        model = tiny_mlp()
        opt = make(model)
        expected = sum(estimate_state_bytes(opt, p, g) for g in opt.param_groups for p in g["params"]
                       if p is not model.unused)
        with OffloadedState(opt, "disk", offload_dir) as wrapped:
            train(model, wrapped, range(1))
            assert wrapped.stats().offloaded_bytes == expected, name


def test_lr_scheduler_on_the_wrapper_changes_the_learning_rate(offload_dir):
    plain_model, model = tiny_mlp(), tiny_mlp()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    opt = OffloadedState(torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", offload_dir)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (plain, opt)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for i in range(5):
            for m, o, s in ((plain_model, plain, schedules[0]), (model, opt, schedules[1])):
                train(m, o, range(i, i + 1))
                s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert params_equal(plain_model, model)
    opt.close()


def test_checkpoint_round_trip_continues_bit_identically(offload_dir):
    """state_dict() reads the state back (and keeps it in the store); load_state_dict()
    into a fresh wrapper moves it to a new store."""
    plain_model, model = tiny_mlp(), tiny_mlp()
    make = OPTIMIZERS["galore"]
    plain = make(plain_model)
    opt = OffloadedState(make(model), "disk", offload_dir)
    train(plain_model, plain, range(4))
    train(model, opt, range(4))
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    opt.close()

    resumed = tiny_mlp(seed=123)
    resumed_opt = OffloadedState(make(resumed), "disk", offload_dir)  # adds resumed.unused
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.stats().offloaded_bytes > 0 and resumed_opt.stats().in_memory_bytes == 0
    train(plain_model, plain, range(4, 8))
    train(resumed, resumed_opt, range(4, 8))
    assert params_equal(plain_model, resumed)
    resumed_opt.close()
    assert os.listdir(offload_dir) == []


def test_add_param_group_trains_the_new_group_too(offload_dir):
    plain_model, model = tiny_mlp(), tiny_mlp()
    plain = torch.optim.AdamW(plain_model[0].parameters(), lr=1e-2)
    opt = OffloadedState(torch.optim.AdamW(model[0].parameters(), lr=1e-2), "disk", offload_dir)
    train(plain_model, plain, range(2))
    train(model, opt, range(2))
    plain.add_param_group({"params": plain_model[2].parameters(), "lr": 3e-3})
    opt.add_param_group({"params": model[2].parameters(), "lr": 3e-3})
    train(plain_model, plain, range(2, 5))
    train(model, opt, range(2, 5))
    assert params_equal(plain_model, model)
    opt.close()


def test_only_the_updated_parameter_has_state_in_the_optimizer(offload_dir):
    """During each per-parameter update the wrapped optimizer holds the state tensors of
    that parameter alone; the reads ahead and the pending writes stay within
    (1 + prefetch) parameters' state plus max_pending tensors."""
    seen = []

    class Probe(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(sum(1 for s in self.state.values() if any(v.dim() for v in s.values())))
            return super().step(closure)

    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    opt = OffloadedState(Probe(model.parameters()), "disk", offload_dir, prefetch=1, max_pending=2)
    for i in range(3):
        model(torch.randn(4, 32, generator=torch.Generator().manual_seed(i))).sum().backward()
        opt.step()
        opt.zero_grad()
        assert set(seen[-12:]) == {1 if i else 0}, "the first step makes the state as it goes"
        stats = opt.stats()
        largest_tensor = 32 * 32 * 4
        assert stats.largest_param_bytes == 2 * largest_tensor
        assert stats.peak_step_bytes <= 2 * stats.largest_param_bytes + 2 * largest_tensor
        assert stats.store.peak_pending_bytes <= 2 * largest_tensor
    assert optimizer_state_bytes(opt.optimizer) == 12 * 4  # the step tensors
    opt.store.flush()
    assert opt.stats().store.files == 24
    opt.close()


def test_an_error_in_one_update_leaves_the_state_in_the_store(offload_dir):
    """The update of the second parameter raises: the first keeps its new state, the
    second its loaded state, the third was read ahead; all go back to the store, and
    later steps run (the parameters after the failure missed one step)."""
    fail = []

    class Flaky(torch.optim.AdamW):
        def step(self, closure=None):
            if fail and self.param_groups[0]["params"][0] is fail[0]:
                fail.clear()
                raise RuntimeError("update failed")
            return super().step(closure)

    model = tiny_mlp()
    opt = OffloadedState(Flaky(model.parameters(), lr=1e-2), "disk", offload_dir)
    train(model, opt, range(2))
    before = opt.stats().offloaded_bytes
    fail.append(model[0].bias)
    loss_of(model, batch(2)).backward()
    with pytest.raises(RuntimeError, match="update failed"):
        opt.step()
    assert opt.stats().offloaded_bytes == before and opt.stats().peak_step_bytes > 0
    assert all(not any(v.dim() for v in s.values()) for s in opt.state.values())
    opt.zero_grad()
    train(model, opt, range(3, 5))
    steps = [int(opt.state_dict()["state"][i]["step"]) for i in range(4)]
    assert steps == [5, 4, 4, 4]
    opt.close()
    assert os.listdir(offload_dir) == []


def test_non_contiguous_state_comes_back_with_its_strides(offload_dir):
    """AdamW makes moments like the parameter (preserve_format): a transposed parameter
    has transposed moments, and the store keeps them contiguous."""
    def model():
        torch.manual_seed(0)
        return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 4).t())])

    plain_params, params = model(), model()
    plain = torch.optim.AdamW(plain_params, lr=1e-2)
    opt = OffloadedState(torch.optim.AdamW(params, lr=1e-2), "disk", offload_dir)
    for o, p in ((plain, plain_params), (opt, params)):
        for _ in range(3):
            (p[0] ** 2).sum().backward()
            o.step()
            o.zero_grad()
    assert torch.equal(plain_params[0], params[0])
    state = opt.state_dict()["state"][0]
    assert state["exp_avg"].stride() == plain.state[plain_params[0]]["exp_avg"].stride() == (1, 4)
    opt.close()


def test_closure_runs_once_and_its_loss_is_returned(offload_dir):
    model = tiny_mlp()
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model, batch(0))
        loss.backward()
        return loss

    with OffloadedState(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "disk", offload_dir) as opt:
        loss = opt.step(closure)
    assert len(calls) == 1 and loss.requires_grad


def test_full_disk_is_an_error_before_the_first_step(offload_dir, monkeypatch):
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    usage = shutil.disk_usage(offload_dir)._replace(free=1000)
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(MemoptOffloadError, match=r"has 1000 B free; the plan offloads up to 4.75 KiB"):
        OffloadedState(torch.optim.AdamW(model.parameters()), "disk", offload_dir)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert os.listdir(offload_dir) == []


def test_loading_state_that_does_not_fit_is_an_error_before_loading(offload_dir, monkeypatch):
    model = tiny_mlp()
    opt = OffloadedState(torch.optim.AdamW(model.parameters()), "disk", offload_dir)
    train(model, opt, range(1))
    before = opt.state_dict()
    bigger = OffloadedState(torch.optim.AdamW(model.parameters(), amsgrad=True), "disk", offload_dir)
    train(model, bigger, range(1))
    usage = shutil.disk_usage(offload_dir)._replace(free=1000)
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(MemoptOffloadError, match=r"has 1000 B free; the plan offloads up to 2.38 KiB"):
        opt.load_state_dict(bigger.state_dict())  # amsgrad: 1.5 times the state it replaces
    assert states_equal(opt.state_dict(), before)  # the state it had is kept
    opt.close()
    bigger.close()


def test_a_state_dict_the_optimizer_refuses_leaves_the_state_in_place(offload_dir):
    """torch refuses a dict whose groups do not match before touching its state; the
    wrapper dropped its offloaded state first, so its next step raised KeyError 'exp_avg'."""
    plain, model = tiny_mlp(), tiny_mlp()
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt = OffloadedState(torch.optim.AdamW(model.parameters(), lr=1e-2), "disk", offload_dir)
    train(plain, reference, range(2))
    train(model, opt, range(2))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    for optimizer in (reference, opt):
        with pytest.raises(ValueError, match="doesn't match the size"):
            optimizer.load_state_dict(other.state_dict())
    train(plain, reference, range(2, 4))
    train(model, opt, range(2, 4))
    assert params_equal(plain, model)
    assert states_equal(opt.state_dict(), reference.state_dict())
    opt.close()


def test_unusable_offload_dir_is_an_error_before_the_first_step(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(MemoptOffloadError, match="cannot be created"):
        OffloadedState(torch.optim.AdamW(tiny_mlp().parameters()), "disk", afile / "offload")


def test_refusals_name_the_reason():
    model = tiny_mlp()
    with pytest.raises(TypeError, match="not per parameter.*MeZO keeps no state"):
        OffloadedState(MeZO(model.parameters()))
    with pytest.raises(TypeError, match="L-BFGS couples all parameters"):
        OffloadedState(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(MemoptOffloadError, match="target 'host' .* use target='disk'"):
        OffloadedState(torch.optim.AdamW(model.parameters()), "host")
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        OffloadedState(torch.optim.AdamW(model.parameters()), prefetch=-1)


def test_a_given_store_is_used_and_left_open(offload_dir):
    store = get_store(register_store("disk", offload_dir))
    model = tiny_mlp()
    opt = OffloadedState(torch.optim.AdamW(model.parameters()), store, prefetch=0)
    train(model, opt, range(2))
    store.flush()
    assert store.stats().files == 8
    opt.close()
    store.flush()
    assert store.stats().files == 0 and os.path.isdir(store.directory)
    with pytest.raises(MemoptOffloadError, match="was closed"):
        opt.step()
    store.close()


_CHILD = """
import sys, torch
from memopt.optim import OffloadedState
model = torch.nn.Linear(64, 64)
opt = OffloadedState(torch.optim.AdamW(model.parameters()), "disk", sys.argv[1])
for _ in range(2):
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
opt.store.flush()
print(opt.stats().store.files, flush=True)
"""


def test_a_process_that_exits_without_close_leaves_nothing(offload_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", _CHILD, str(offload_dir)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) == 4  # its files were there when it exited
    assert os.listdir(offload_dir) == []
