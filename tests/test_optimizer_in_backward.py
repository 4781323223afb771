"""``optimizer_in_backward`` (issue 17, docs/whole_step.md): each parameter's update
inside the backward graph, bitwise equal to a separate ``opt.step()``; what cannot be
fused raises; the gradients die inside backward (the estimate drops by them)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt._compat import BACKWARD_FREES_INCOMING_GRADIENTS
from memopt.errors import MemoptOptimizerError
from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, OffloadedState, SubspaceAdamW
from memopt.optim.in_backward import ConsumedGrad
from memopt.testing.zoo import GPT, MLP, GPTConfig

STEPS = 10
TINY_GPT = GPTConfig(vocab=64, context=16, dim=32, heads=2, layers=2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(d_in=16, hidden=32, depth=2, d_out=4)


def _mlp_batches(n: int = STEPS) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)) for _ in range(n)]


def _wide_batches(n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """MLP batches of 64 rows: activations outweigh the parameters (budgets bite)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)) for _ in range(n)]


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPT(TINY_GPT)


def _gpt_batches(n: int = STEPS) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, TINY_GPT.vocab, (2, 9), generator=g) for _ in range(n)]
    return [(i[:, :-1].contiguous(), i[:, 1:].contiguous()) for i in idx]


MakeOpt = Callable[[Any], torch.optim.Optimizer]


def _train(
    build: Callable[[], nn.Module], batches: list[tuple[torch.Tensor, ...]], make_opt: MakeOpt, *,
    in_backward: bool, codegen: str = "eager", scheduler: Callable[[Any], Any] | None = None,
    **extra: Any,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train with ``opt.zero_grad(); loss.backward(); opt.step()`` (the usual loop),
    with or without ``optimizer_in_backward``."""
    torch._dynamo.reset()
    model = build()
    opt = make_opt(model.parameters())
    sched = scheduler(opt) if scheduler is not None else None
    options: dict[str, Any] = {"codegen": codegen, "strict": True, "verify": True, **extra}
    if in_backward:
        options["optimizer_in_backward"] = opt
    compiled = torch.compile(model, backend="memopt", options=options)
    for batch in batches:
        opt.zero_grad()
        compiled(*batch).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model, opt


def _assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item()}"


OPTIMIZERS: dict[str, MakeOpt] = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
    "AdamW-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-2, block_size=64),
    "GaLoreAdamW": lambda ps: GaLoreAdamW(ps, lr=1e-2, rank=4, update_proj_gap=3),
    "SubspaceAdamW": lambda ps: SubspaceAdamW(ps, lr=1e-2, rank=4, update_proj_gap=3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameters_bitwise_equal_to_separate_step_after_10_steps(name: str) -> None:
    """The update is the optimizer's own per-parameter math, so 10 steps give the same
    bits as ``opt.step()`` (eager codegen, CPU: torch's single-tensor AdamW/SGD, and
    its foreach and fused AdamW run one tensor at a time)."""
    build, batches = (_gpt, _gpt_batches()) if name in ("AdamW", "GaLoreAdamW") else (_mlp, _mlp_batches())
    reference, _ = _train(build, batches, OPTIMIZERS[name], in_backward=False)
    fused, opt = _train(build, batches, OPTIMIZERS[name], in_backward=True)
    _assert_bitwise(reference, fused)
    assert opt._memopt_in_backward.updates == STEPS * len(list(fused.parameters()))
    assert not torch.equal(next(fused.parameters()), next(build().parameters()))  # it trained


def test_bitwise_under_a_memory_budget_with_recomputation() -> None:
    """Under a tight budget the backward recomputes forward values from the weights;
    each update still comes after the last of those reads."""
    batches = _wide_batches()
    budget = {"memory_budget": 0.5, "strict": False}  # below the floor: the most recomputation
    with pytest.warns(memopt.MemoptWarning, match="infeasible"):
        reference, _ = _train(_mlp, batches, OPTIMIZERS["AdamW"], in_backward=False, **budget)
    with memopt.record() as explanation, pytest.warns(memopt.MemoptWarning, match="infeasible"):
        fused, _ = _train(_mlp, batches, OPTIMIZERS["AdamW"], in_backward=True, **budget)
    assert any(d.policy == "recompute" for d in explanation.decisions())
    _assert_bitwise(reference, fused)


def test_lr_scheduler_changes_take_effect() -> None:
    """The learning rate is read when each update runs: a scheduler's decay gives the
    separate-step run's bits, and differs from a constant learning rate."""
    make = OPTIMIZERS["AdamW"]
    decay = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)  # noqa: E731
    batches = _mlp_batches()
    reference, _ = _train(_mlp, batches, make, in_backward=False, scheduler=decay)
    fused, opt = _train(_mlp, batches, make, in_backward=True, scheduler=decay)
    constant, _ = _train(_mlp, batches, make, in_backward=True)
    _assert_bitwise(reference, fused)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1**5)
    assert not torch.equal(next(fused.parameters()), next(constant.parameters()))


def test_backward_returns_no_gradient_and_grad_is_a_consumed_marker() -> None:
    """The compiled backward returns None for updated parameters: AOTAutograd hands the
    None to autograd, so ``autograd.grad`` sees no gradient (pinned torch behaviour),
    and ``.grad`` holds a memory-less marker until ``opt.step()`` clears it."""
    torch._dynamo.reset()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    x, y = _mlp_batches(1)[0]
    params = list(model.parameters())
    grads = torch.autograd.grad(compiled(x, y), params, allow_unused=True)
    assert all(g is None for g in grads)  # updated inside backward, nothing returned
    opt.step()  # the updates above count as this step's
    before = [p.detach().clone() for p in params]
    compiled(x, y).backward()
    assert all(isinstance(p.grad, ConsumedGrad) for p in params)
    with pytest.raises(RuntimeError, match="invalid python storage"):
        params[0].grad.untyped_storage().data_ptr()  # type: ignore[union-attr]  # no memory behind it
    assert not any(torch.equal(a, b) for a, b in zip(before, params))  # updated during backward
    after = [p.detach().clone() for p in params]
    opt.step()  # a no-op for them
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(after, params))


def test_update_placed_after_gradient_and_every_read_of_the_weight() -> None:
    """Each ``apply_update`` comes after its gradient's node and after the last
    backward node that reads the weight (here, the input gradient's matmul)."""
    torch._dynamo.reset()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    with memopt.record() as explanation:
        compiled(*_mlp_batches(1)[0]).backward()
    backward = explanation.region().step.backward
    nodes = list(backward.graph.nodes)
    updates = [n for n in nodes if n.target is torch.ops.memopt.apply_update.default]
    assert len(updates) == len(list(model.parameters()))
    for update in updates:
        grad, param = update.args[0], update.args[1]
        readers = [u for u in nodes if u is not update and u.op == "call_function" and _reads(u, param)]
        assert nodes.index(update) > max([nodes.index(grad)] + [nodes.index(r) for r in readers])
    assert all(v is None for v in backward.graph.find_nodes(op="output")[0].args[0])


def _reads(node: Any, param: Any) -> bool:
    """``node`` reads ``param`` or a view chain of it."""
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n is param:
            return True
        if n.op == "call_function" and n.target in (torch.ops.aten.t.default, torch.ops.aten.permute.default,
                                                     torch.ops.aten.view.default, torch.ops.aten.expand.default):
            stack.extend(n.all_input_nodes)
    return False


def test_estimated_peak_drops_by_the_gradients() -> None:
    """memopt's timeline of the backward: no gradient lives to the end; each dies at
    its update, so the estimated peak falls by the gradients but the largest one (less
    the few activation-sized temporaries, 2 x 256 fp32 each, alive next to it). Both
    runs give memopt the optimizer, so both estimates count its state."""
    peaks = {}
    for in_backward in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MLP(d_in=64, hidden=256, depth=2, d_out=8)
        opt = torch.optim.AdamW(model.parameters())
        options: dict[str, Any] = {"codegen": "eager", "optimizer_in_backward" if in_backward else "optimizer": opt}
        with memopt.record() as explanation:
            torch.compile(model, backend="memopt", options=options)(torch.randn(2, 64), torch.randn(2, 8)).backward()
        timeline = explanation.timeline()
        peaks[in_backward] = timeline.peak_bytes
        if in_backward:  # on torch 2.11 the loss's incoming gradient (4 bytes) lives through backward
            assert timeline.peak_breakdown["gradients"] == (0 if BACKWARD_FREES_INCOMING_GRADIENTS else 4)
    grads = [p.numel() * 4 for p in model.parameters()]
    activation = 2 * 256 * 4
    assert peaks[False] - peaks[True] >= sum(grads) - max(grads) - 4 * activation


# -- what is left to step() -------------------------------------------------------------


class _EagerHead(nn.Module):
    """A compiled body and an eager head: the head's parameters are outside the region."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = MLP(d_in=16, hidden=32, depth=2, d_out=8)
        self.head = nn.Linear(32, 4)


def test_parameters_outside_the_compiled_region_still_update_in_step() -> None:
    """Only parameters the compiled backward updates are skipped by ``opt.step()``;
    the eager head's get normal gradients and are stepped there, bitwise as before."""
    results = []
    for in_backward in (False, True):
        torch._dynamo.reset()
        model = _EagerHead()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        options: dict[str, Any] = {"codegen": "eager", "strict": True}
        if in_backward:
            options["optimizer_in_backward"] = opt
        body = torch.compile(lambda x: model.body.layers[1](F.gelu(model.body.layers[0](x))), backend="memopt",
                             options=options)
        for x, y in _mlp_batches(4):
            opt.zero_grad()
            F.mse_loss(model.head(body(x)), y).backward()
            if in_backward:
                assert isinstance(model.body.layers[0].weight.grad, ConsumedGrad)
                assert type(model.head.weight.grad) is torch.Tensor
            opt.step()
        results.append(model)
    _assert_bitwise(results[0], results[1])


def test_parameter_not_in_the_optimizer_keeps_its_gradient() -> None:
    """A parameter that requires grad but is not in the optimizer is left to the
    normal path: its gradient is returned and accumulated as usual."""
    torch._dynamo.reset()
    model = _mlp()
    opt = torch.optim.AdamW(model.layers.parameters())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    compiled(*_mlp_batches(1)[0]).backward()
    assert type(model.head.weight.grad) is torch.Tensor
    assert isinstance(model.layers[0].weight.grad, ConsumedGrad)


# -- what cannot be fused says so (Build 2) ----------------------------------------------


def _fused_mlp(opt_factory: MakeOpt = OPTIMIZERS["AdamW"]) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    torch._dynamo.reset()
    model = _mlp()
    opt = opt_factory(model.parameters())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    return model, compiled, opt


def test_global_norm_clipping_raises_naming_the_fix() -> None:
    """``clip_grad_norm_`` needs every gradient after backward; they were applied and
    freed already, so reading one raises (HF Trainer: ``max_grad_norm=0``)."""
    model, compiled, opt = _fused_mlp()
    compiled(*_mlp_batches(1)[0]).backward()
    with pytest.raises(MemoptOptimizerError, match="clip_grad_norm_.*max_grad_norm=0"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_grad_scaler_raises() -> None:
    """fp16 loss scaling: ``GradScaler.step`` unscales and checks ``.grad`` for infs,
    which the in-backward update already consumed (scaled): it raises."""
    model, compiled, opt = _fused_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale(compiled(*_mlp_batches(1)[0])).backward()
    with pytest.raises(MemoptOptimizerError, match="GradScaler"):
        scaler.step(opt)


def test_gradient_accumulation_raises_on_the_second_backward() -> None:
    """Two backwards before ``opt.step()`` would each update from a partial gradient:
    the second raises before updating."""
    model, compiled, opt = _fused_mlp()
    first, second = _mlp_batches(2)
    compiled(*first).backward()
    with pytest.raises(MemoptOptimizerError, match="gradient accumulation"):
        compiled(*second).backward()


def test_step_with_closure_after_a_backward_raises() -> None:
    """A backward before ``opt.step(closure)`` already updated the parameters; the
    closure's backward would update them a second time."""
    model, compiled, opt = _fused_mlp()
    compiled(*_mlp_batches(1)[0]).backward()
    with pytest.raises(MemoptOptimizerError, match="closure"):
        opt.step(lambda: 0.0)


@pytest.mark.parametrize("name", ["AdamW", "GaLoreAdamW"])
def test_step_with_a_closure_that_runs_backward_trains_as_without(name: str) -> None:
    """``opt.step(closure)`` with the backward inside the closure (PyTorch Lightning's
    automatic optimization): the closure's backward updates the compiled parameters, the
    step skips them, and the closure's loss comes back, bitwise as the same loop with a
    separate step. The first closure's forward compiles the model inside the optimizer's
    own step, which then updates every parameter from ``.grad``: that backward hands its
    gradients over instead of applying them. Before, the step read the consumed
    gradients and raised an error that blamed clipping or GradScaler."""
    batches = _mlp_batches(4)
    reference, _ = _train(_mlp, batches, OPTIMIZERS[name], in_backward=False)
    model, compiled, opt = _fused_mlp(OPTIMIZERS[name])
    for batch in batches:
        def closure(batch: tuple[torch.Tensor, ...] = batch) -> torch.Tensor:
            opt.zero_grad()
            loss = compiled(*batch)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    _assert_bitwise(reference, model)
    assert opt._memopt_in_backward.updates == (len(batches) - 1) * len(list(model.parameters()))


class _TiedAcrossBreak(nn.Module):
    """One weight used on both sides of a graph break: two regions give it gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.shared(x))
        torch._dynamo.graph_break()
        return self.shared(x).square().mean()


def test_parameter_shared_across_regions_raises_at_compile_time() -> None:
    torch._dynamo.reset()
    model = _TiedAcrossBreak()
    opt = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    with pytest.raises(Exception, match="two compiled regions.*graph break") as info:
        compiled(torch.randn(2, 8))
    assert isinstance(getattr(info.value, "inner_exception", info.value), MemoptOptimizerError)  # Dynamo wraps it


def test_a_replacement_optimizer_on_the_same_model_takes_over_its_parameters() -> None:
    """Resuming on the same model: train 3 steps, build a new AdamW, load the old one's
    state_dict, compile again with it (the old optimizer still referenced) and train on.
    The parameters equal 6 uninterrupted steps with a separate step, bitwise; before,
    the second compile raised that each parameter "belongs to two optimizers". An old
    optimizer that has updated a parameter in backward and not stepped still refuses."""
    batches = _gpt_batches(6)
    reference, _ = _train(_gpt, batches, lambda ps: torch.optim.AdamW(ps, lr=1e-2), in_backward=False)
    torch._dynamo.reset()
    model = _gpt()
    old = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": old})
    for batch in batches[:3]:
        old.zero_grad()
        compiled(*batch).backward()
        old.step()
    new = torch.optim.AdamW(model.parameters(), lr=1e-2)
    new.load_state_dict(old.state_dict())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": new})
    for batch in batches[3:]:
        new.zero_grad()
        compiled(*batch).backward()
        new.step()
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))

    new.zero_grad()
    compiled(*batches[0]).backward()  # updated in backward, not stepped yet
    third = torch.optim.AdamW(model.parameters())
    with pytest.raises(Exception, match="belongs to two optimizers.*step") as info:
        torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": third})(*batches[1])
    assert isinstance(getattr(info.value, "inner_exception", info.value), MemoptOptimizerError)


@pytest.mark.parametrize("budget", [None, 0.9], ids=["no budget", "whole-step budget"])
def test_graph_break_without_shared_weights_is_bitwise_exact(budget: float | None) -> None:
    """A graph break that splits the parameters between regions is fine: each
    parameter's gradient is complete in its own region's backward (also when a budget
    compiles the first region again, planned for the whole step)."""
    from memopt.testing.zoo import GraphBreakMLP

    def build() -> nn.Module:
        torch.manual_seed(0)
        return GraphBreakMLP(d_in=16, hidden=32, depth=2, d_out=4)

    batches = _wide_batches()
    extra = {} if budget is None else {"memory_budget": budget, "strict": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)  # a budget below the floor lands there
        reference, _ = _train(build, batches, OPTIMIZERS["AdamW"], in_backward=False, **extra)
        fused, _ = _train(build, batches, OPTIMIZERS["AdamW"], in_backward=True, **extra)
    _assert_bitwise(reference, fused)


def test_weight_also_used_outside_the_region_raises() -> None:
    """A weight whose gradient also comes from eager code: the eager part reaches
    ``.grad`` (before or after the in-backward update) and raises."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    opt = torch.optim.AdamW(lin.parameters())
    compiled = torch.compile(lin, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": opt})
    x = torch.randn(2, 8)
    with pytest.raises(MemoptOptimizerError, match="outside the compiled region"):
        (compiled(x).sum() + lin.weight.square().sum()).backward()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: MeZO(ps, lr=1e-3), "zero-order"),
        (lambda ps: OffloadedState(torch.optim.AdamW(ps), "disk"), "OffloadedState"),
        (lambda ps: torch.optim.LBFGS(ps), "L-BFGS"),
    ],
    ids=["MeZO", "OffloadedState", "LBFGS"],
)
def test_optimizers_without_a_per_parameter_update_are_refused(make: MakeOpt, match: str) -> None:
    opt = make(_mlp().parameters())
    with pytest.raises(MemoptOptimizerError, match=match):
        memopt.MemoptConfig.from_options({"optimizer_in_backward": opt})
    if isinstance(opt, OffloadedState):
        opt.close()


def test_config_renders_the_optimizer_by_name() -> None:
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    config = memopt.MemoptConfig.from_options({"optimizer_in_backward": opt})
    assert config.to_dict()["optimizer_in_backward"] == "SGD"
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        memopt.MemoptConfig.from_options({"optimizer_in_backward": "adamw"})


@pytest.mark.inductor
def test_inductor_codegen_matches_separate_step() -> None:
    """Under Inductor the op is an extern kernel ordered after the weight's reads;
    the parameters match the separate-step run (within tolerance: Inductor may
    compute the gradients themselves with other roundings)."""
    batches = _mlp_batches(3)
    reference, _ = _train(_mlp, batches, OPTIMIZERS["AdamW"], in_backward=False, codegen="inductor")
    fused, _ = _train(_mlp, batches, OPTIMIZERS["AdamW"], in_backward=True, codegen="inductor")
    for p, q in zip(reference.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q)


class _NormHead(nn.Module):
    """Linear, an RMS norm with a weight, a head: the norm's backward reads its weight in
    a pointwise product that Inductor computes inside a later reduction's kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32, bias=False)
        self.norm = nn.Parameter(torch.rand(32) + 0.5)
        self.head = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        return F.cross_entropy(self.head(h), y)


@pytest.mark.inductor
def test_inductor_computes_every_read_of_a_weight_before_its_update() -> None:
    """SGD at lr 1, one step: the update in backward equals the separate step's, so no
    gradient upstream of the norm came from its updated weight. Before, Inductor
    computed the norm backward's ``grad * weight`` lazily in a kernel after the
    weight's update, and every gradient below the norm was off by 0.1-1%
    (Hugging Face Llama: 0.3%; AdamW then moved small-gradient elements the wrong way)."""
    torch.manual_seed(0)
    batches = [(torch.randn(16, 16), torch.randint(0, 8, (16,)))]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _NormHead()

    sgd = lambda ps: torch.optim.SGD(ps, lr=1.0)  # noqa: E731
    reference, _ = _train(build, batches, sgd, in_backward=False, codegen="inductor")
    fused, _ = _train(build, batches, sgd, in_backward=True, codegen="inductor")
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_updates_in_pieces_are_bitwise_equal_to_whole_steps(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Elementwise updates run over pieces of a parameter (memopt.codegen._chunks):
    with pieces of 100 elements (uneven: 1024-element weights end in a piece of 24;
    8-bit AdamW's pieces round to its 64-element blocks) the in-backward run is bitwise
    equal to the separate step run on whole parameters."""
    from memopt.codegen import _chunks

    build, batches = (_gpt, _gpt_batches(4)) if name in ("AdamW", "GaLoreAdamW") else (_mlp, _mlp_batches(4))
    reference, _ = _train(build, batches, OPTIMIZERS[name], in_backward=False)
    monkeypatch.setattr(_chunks, "UPDATE_CHUNK_ELEMENTS", 100)
    assert any(p.numel() > 100 for p in build().parameters())
    pieced, _ = _train(build, batches, OPTIMIZERS[name], in_backward=True)
    _assert_bitwise(reference, pieced)


@pytest.mark.parametrize(
    "make, per_piece",
    [(lambda ps: torch.optim.AdamW(ps, lr=1e-3), 2), (lambda ps: AdamW8bit(ps, lr=1e-3), 10)],
    ids=["AdamW", "AdamW8bit"],
)
def test_one_update_holds_temporaries_of_one_piece_not_of_the_parameter(
    make: MakeOpt, per_piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16 MiB parameter's update (its state already made) grows the heap by a few
    pieces of 4 MiB (AdamW: its ``sqrt`` and ``div``, 2; 8-bit AdamW's reference: the
    fp32 gradient, moments and parameter, and the int64 code indices, under 10); stepped
    whole (pieces larger than the parameter), by the same multiple of the parameter."""
    from memopt.codegen import _chunks
    from memopt.optim._per_param import per_param_update
    from memopt.testing.measure import measure_peak

    def growth() -> int:
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(4096, 1024))
        opt = make([param])
        update, group = per_param_update(opt), opt.param_groups[0]
        grad = torch.randn_like(param)
        for _ in range(2):  # the first step makes the state
            param.grad = grad
            with torch.no_grad():  # as optimizers step
                peak = measure_peak(lambda: update(opt, group, param, 1)).peak_growth_bytes
        return peak

    param_bytes = 4096 * 1024 * 4
    pieced = growth()
    monkeypatch.setattr(_chunks, "UPDATE_CHUNK_ELEMENTS", 1 << 30)
    whole = growth()
    piece_bytes = (1 << 20) * 4
    assert pieced <= per_piece * piece_bytes + 4096
    assert whole >= 2 * param_bytes and whole >= 3 * pieced


def test_the_update_op_stays_out_of_cuda_graphs() -> None:
    """The update runs the optimizer's Python each step (step count, the scheduler's
    learning rate); a CUDA graph replay (``mode="reduce-overhead"``) would replay the
    captured kernels with the captured scalars instead. Inductor's own test of what a
    CUDA graph may not capture finds the op."""
    import memopt.codegen.update  # noqa: F401  - registers torch.ops.memopt.apply_update
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    op = torch.ops.memopt.apply_update.default
    graph = torch.fx.Graph()
    grad, param = graph.placeholder("grad"), graph.placeholder("param")
    call = graph.call_function(op, (grad, param, "w"))
    graph.output(None)
    assert torch.Tag.cudagraph_unsafe in op.tags
    assert get_first_incompatible_cudagraph_node(torch.fx.GraphModule(torch.nn.Module(), graph)) is call
