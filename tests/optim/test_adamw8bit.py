"""AdamW8bit: the dynamic code, blockwise quantization to the nearest code value, and an
8-bit step that tracks fp32 AdamW."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memopt.codegen.adam8bit import (
    SECOND_MOMENT_FLOOR,
    SIGNED_ZERO_CODE,
    dequantize_blockwise,
    dynamic_code,
    quantize_blockwise,
)
from memopt.optim import AdamW8bit
from optim_testing import tiny_mlp, train


def test_codes_are_sorted_distinct_and_span_the_range() -> None:
    signed, unsigned = dynamic_code(signed=True), dynamic_code(signed=False)
    for code in (signed, unsigned):
        assert code.numel() == 256 and code.dtype == torch.float32
        assert torch.all(code[1:] > code[:-1])
        assert code[-1] == 1.0
    assert signed[SIGNED_ZERO_CODE] == 0.0 and signed[0] > -1.0
    # The second moment's code has no 0 (the zero-point problem): its floor is 1e-7.
    assert unsigned[0] == SECOND_MOMENT_FLOOR == pytest.approx(1e-7)
    # Seven decades: the smallest non-zero magnitudes are below 1e-6.
    assert 0 < signed[SIGNED_ZERO_CODE + 1] < 1e-6 and unsigned[0] < unsigned[1] < 1e-6
    # The unsigned code has twice the levels in every decade, e.g. in [0.1, 1].
    in_top_decade = lambda code: ((code >= 0.1) & (code < 1.0)).sum()
    assert in_top_decade(unsigned) == 2 * in_top_decade(signed) == 128


def test_quantize_picks_the_nearest_code_value() -> None:
    """Brute force: the stored code minimises |code * absmax - x| (ties: the lower code)."""
    torch.manual_seed(0)
    block = 64
    x = torch.randn(4, block) * torch.logspace(-4, 0, 4)[:, None]  # blocks of very different scale
    x[2, :] = 0.0  # an all-zero block
    code = dynamic_code(signed=True)
    midpoints = (code[:-1] + code[1:]) / 2
    codes, absmax = quantize_blockwise(x, midpoints)
    torch.testing.assert_close(absmax, x.abs().amax(dim=1))
    normalized = x / torch.where(absmax > 0, absmax, 1.0)[:, None]
    nearest = (normalized[..., None] - code).abs().argmin(dim=-1)
    assert torch.equal(codes.long(), nearest)
    restored = dequantize_blockwise(codes.view(-1), absmax, code, block)
    assert torch.equal(restored[2], torch.zeros(block))
    # Relative error of the large entries is small: the top decade has 64 levels per sign.
    big = x.abs() > 0.1 * absmax[:, None]
    assert ((restored - x).abs()[big] / x.abs()[big]).max() < 0.08


def test_eight_bit_training_tracks_fp32_adamw() -> None:
    """Same model, data and hyperparameters: after 30 steps the 8-bit run's weights differ
    from torch's AdamW by a small fraction of how far training moved them."""
    model, ref_model = tiny_mlp(), tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    train(model, AdamW8bit(model.parameters(), lr=1e-2, block_size=64, min_8bit_size=100), range(30))
    train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=1e-2), range(30))
    for p, ref, p0 in zip(model.parameters(), ref_model.parameters(), start):
        moved = (ref - p0).norm()
        assert (p - ref).norm() < 0.05 * moved


def test_an_element_with_a_tiny_second_moment_steps_like_adamw() -> None:
    """The zero-point problem (Li et al., 2023): an element whose gradient is 1e-4 of its
    block's largest has a second moment 1e-8 of the block's maximum, below the code's
    lowest nonzero value, while its first moment (1e-4 of the maximum) keeps a nonzero
    code. Had the second moment been stored as 0, the next step with gradient 0 (an
    embedding row absent from the batch) would move it by ``step_size * m / eps``, here
    about 4700 lr; stored as the floor it moves by less than AdamW's lr-sized step."""
    lr, block = 1e-3, 64
    grads = torch.full((block,), 1e-4)
    grads[0] = 1.0
    params = [torch.nn.Parameter(torch.zeros(block)) for _ in range(2)]
    eight_bit = AdamW8bit([params[0]], lr=lr, weight_decay=0.0, block_size=block, min_8bit_size=0)
    adamw = torch.optim.AdamW([params[1]], lr=lr, weight_decay=0.0)
    for step_grads in (grads, torch.where(grads == 1.0, grads, 0.0)):
        before = [p.detach().clone() for p in params]
        for p, opt in zip(params, (eight_bit, adamw)):
            p.grad = step_grads.clone()
            opt.step()
    moved_8bit, moved_adamw = ((p.detach() - b)[1:].abs().max().item() for p, b in zip(params, before))
    assert 0.5 * lr < moved_adamw < lr  # AdamW's own step of such an element: m_hat / sqrt(v_hat) = 0.67
    assert 0 < moved_8bit < lr


def test_small_parameters_keep_exact_adamw() -> None:
    """Parameters below min_8bit_size train bit for bit as under torch's AdamW. The weights
    are frozen so that both runs see the same bias gradients."""
    models = [tiny_mlp(), tiny_mlp()]
    for m in models:
        m[0].weight.requires_grad_(False)
        m[2].weight.requires_grad_(False)
    biases = lambda m: [m[0].bias, m[2].bias]
    opt = AdamW8bit(biases(models[0]), lr=1e-2, block_size=64, min_8bit_size=100)
    train(models[0], opt, range(3))
    train(models[1], torch.optim.AdamW(biases(models[1]), lr=1e-2, foreach=False), range(3))
    assert all(torch.equal(a, b) for a, b in zip(biases(models[0]), biases(models[1])))
    assert opt.state[models[0][0].bias]["exp_avg"].dtype == torch.float32


def test_state_layout_with_a_partial_last_block() -> None:
    param = torch.nn.Parameter(torch.randn(1000))
    opt = AdamW8bit([param], block_size=64, min_8bit_size=0)
    param.grad = torch.randn(1000)
    opt.step()
    state = opt.state[param]
    assert state["exp_avg_code"].dtype == torch.uint8 and state["exp_avg_code"].shape == (1000,)
    assert state["exp_avg_sq_code"].dtype == torch.uint8
    assert state["exp_avg_scale"].shape == (16,) and state["exp_avg_sq_scale"].shape == (16,)
    # After one step m = 0.1 g and v = 0.001 g^2: the scales are their block maxima.
    g = param.grad.view(-1)
    blocks = torch.nn.functional.pad(g, (0, 24)).view(16, 64)
    torch.testing.assert_close(state["exp_avg_scale"], 0.1 * blocks.abs().amax(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(state["exp_avg_sq_scale"], 0.001 * (blocks**2).amax(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("block_size", [8, 48, 8192])
def test_block_size_must_be_a_power_of_two_in_range(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit(tiny_mlp().parameters(), block_size=block_size)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
        | st.sampled_from([0.0, 1e-30, -1e-30, 1e-7, -1e-7]),
        min_size=16,
        max_size=16,
    ),
    signed=st.booleans(),
)
def test_quantization_is_nearest_up_to_midpoint_rounding(values: list[float], signed: bool) -> None:
    """Property over arbitrary blocks (zeros, subnormals, mixed scales): the stored code is a
    nearest code value of x / absmax, up to the fp32 rounding of the midpoints."""
    x = torch.tensor([values], dtype=torch.float32)
    if not signed:
        x = x.abs()
    code = dynamic_code(signed)
    codes, absmax = quantize_blockwise(x, (code[:-1] + code[1:]) / 2)
    normalized = (x / torch.where(absmax > 0, absmax, 1.0)[:, None]).double()
    distances = (normalized[..., None] - code.double()).abs()
    chosen = distances.gather(-1, codes.long()[..., None]).squeeze(-1)
    assert torch.all(chosen <= distances.min(dim=-1).values + 1e-7)
