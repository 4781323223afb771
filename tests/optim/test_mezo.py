"""MeZO: an SPSA step from two forward passes with seeded in-place perturbations."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import MeZO
from optim_testing import batch, loss_of, tiny_mlp, train_mezo


def test_linear_loss_step_is_minus_lr_times_directional_derivative_times_z() -> None:
    """For L(theta) = c . theta the SPSA estimate is exact: g = c . z and the step is
    -lr g z. So c . delta = -lr g^2 and |delta|^2 = lr^2 g^2 |z|^2, with |z|^2 close to
    the number of elements for a standard normal z."""
    torch.manual_seed(0)
    n, lr = 4000, 1e-3
    theta = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    c = torch.randn(n, dtype=torch.float64)
    before = theta.detach().clone()
    MeZO([theta], lr=lr, eps=1e-3).step(lambda: c @ theta)
    delta = theta.detach() - before
    g_squared = -(c @ delta) / lr
    assert g_squared > 0  # the step goes downhill
    z_norm_squared = (delta @ delta) / (lr**2 * g_squared)
    assert abs(z_norm_squared - n) < 5 * (2 * n) ** 0.5  # chi-square: mean n, sd sqrt(2n)


def test_zero_lr_restores_the_parameters() -> None:
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=0.0, eps=1e-2)
    train_mezo(model, opt, range(3))
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b, atol=1e-6, rtol=0)  # rounding of +eps -2eps +eps


def test_closure_sees_the_perturbed_model() -> None:
    model = tiny_mlp()
    clean = loss_of(model, batch(0)).item()
    seen = []
    MeZO(model.parameters(), lr=0.0, eps=1e-2).step(lambda: seen.append(loss_of(model, batch(0)).item()) or seen[-1])
    assert len(seen) == 2 and seen[0] != clean and seen[1] != clean and seen[0] != seen[1]


def test_mezo_lowers_the_loss() -> None:
    model = tiny_mlp()
    data = batch(0, size=64)
    opt = MeZO(model.parameters(), lr=5e-2, eps=1e-3, seed=1)
    start = loss_of(model, data).item()
    for _ in range(100):
        opt.step(lambda: loss_of(model, data))
    assert loss_of(model, data).item() < 0.9 * start


def test_leftover_grad_is_refused_with_the_fix() -> None:
    model = tiny_mlp()
    loss_of(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        MeZO(model.parameters()).step(lambda: loss_of(model, batch(0)))


def test_closure_that_calls_backward_is_refused() -> None:
    model = tiny_mlp()

    def closure() -> torch.Tensor:
        with torch.enable_grad():
            loss = loss_of(model, batch(0))
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="after the closure ran"):
        MeZO(model.parameters()).step(closure)


def test_step_without_closure_names_the_fix() -> None:
    with pytest.raises(TypeError, match="closure"):
        MeZO(tiny_mlp().parameters()).step()


def test_frozen_parameters_are_left_alone_and_seeds_repeat() -> None:
    runs = []
    for _ in range(2):
        model = tiny_mlp()
        model[0].weight.requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        train_mezo(model, MeZO(model.parameters(), lr=1e-2, seed=4), range(2))
        assert torch.equal(model[0].weight, frozen)
        runs.append(model[2].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_groups_must_share_eps() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="eps"):
        MeZO([{"params": [model[0].weight], "eps": 1e-2}, {"params": [model[2].weight]}], eps=1e-3)
