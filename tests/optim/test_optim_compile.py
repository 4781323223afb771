"""torch.compile: a training step with memopt's optimizers compiles and stops recompiling.

The model runs under ``backend="memopt"`` (eager codegen: fast to compile on CPU); the
optimizer step is compiled too, with ``fullgraph=True`` (no graph break anywhere in the
update) and a counting backend. The step count is a Python int that Dynamo turns into a
symbolic int after warm-up, so the only variants are "refresh step" and "other step":
after a warm-up that sees both, further steps (including another refresh) must not
recompile anything (``error_on_recompile``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, SubspaceAdamW
from optim_testing import batch, loss_of, tiny_mlp, train

GAP = 3
FACTORIES = {
    "galore": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4, update_proj_gap=GAP),
    "galore_randomized": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4, update_proj_gap=GAP, svd="randomized"),
    "subspace": lambda p: SubspaceAdamW(p, lr=1e-2, rank=4, update_proj_gap=GAP),
    "adamw8bit": lambda p: AdamW8bit(p, lr=1e-2, block_size=64, min_8bit_size=100),
}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def compiled_model(model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model, backend="memopt", options={"codegen": "eager"})


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_compiled_step_has_no_graph_break_and_no_recompile(name: str) -> None:
    model, eager_model = tiny_mlp(), tiny_mlp()
    opt = FACTORIES[name](model.parameters())
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    forward = compiled_model(model)

    def train_compiled(steps: range) -> None:
        for i in steps:
            loss_of(forward, batch(i)).backward()
            step()
            opt.zero_grad(set_to_none=True)

    train_compiled(range(0, GAP + 1))  # steps 1..GAP+1: first, plain and refresh variants
    warm = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_compiled(range(GAP + 1, 2 * GAP + 2))  # crosses the next refresh
    assert counter.frame_count == warm <= 4

    train(eager_model, FACTORIES[name](eager_model.parameters()), range(0, 2 * GAP + 2))
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mezo_with_a_compiled_model_does_not_recompile() -> None:
    model = tiny_mlp()
    forward = compiled_model(model)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3)
    data = batch(0)
    start = loss_of(model, data).item()
    for _ in range(2):
        opt.step(lambda: loss_of(forward, data))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            opt.step(lambda: loss_of(forward, data))
    assert loss_of(model, data).item() != start
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, under no_grad


@pytest.mark.inductor
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")
def test_lr_schedule_steps_with_the_scheduled_lr_and_does_not_recompile() -> None:
    """Learning rates are Python floats that Dynamo does not specialize on, and the
    compiled step (Inductor: it is where a stale learning rate showed) uses the lr of each
    step: parameters match eager steps under the same schedule. The step is compiled
    before the scheduler wraps ``opt.step`` (Dynamo refuses that wrapper)."""

    def make(model: torch.nn.Module) -> GaLoreAdamW:  # a low-rank weight and plain-AdamW biases
        return GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_proj_gap=GAP, weight_decay=0.1)

    model, eager_model = tiny_mlp(), tiny_mlp()
    opt, eager_opt = make(model), make(eager_model)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (1 + i)) for o in (opt, eager_opt)]
    lrs = []

    def train_scheduled(steps: range) -> None:
        for i in steps:
            for m, o, take_step, schedule in zip((model, eager_model), (opt, eager_opt), (step, eager_opt.step), schedules):
                loss_of(m, batch(i)).backward()
                take_step()
                o.zero_grad(set_to_none=True)
                schedule.step()
            lrs.append(opt.param_groups[0]["lr"])
            for a, b in zip(model.parameters(), eager_model.parameters()):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"step {i + 1}: {m}")

    train_scheduled(range(0, GAP + 1))  # first, second, refresh and plain variants
    warm = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_scheduled(range(GAP + 1, 2 * GAP + 1))
    assert counter.frame_count == warm <= 4 and len(set(lrs)) == len(lrs) == 2 * GAP + 1
