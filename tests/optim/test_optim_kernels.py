"""memopt's fused optimizer kernels against their PyTorch references.

The Triton kernels run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set per
test with monkeypatch: memopt reads the mode when it launches a kernel, so this works
even when triton was imported earlier in the session). Tolerances: fp32 weights and
moments within 1e-5 max abs error; 8-bit codes exactly equal. The codes can be exact
because the reference performs the same fp32 operations in the same order (no fused
multiply-add) and the interpreter computes them with numpy's IEEE fp32, like PyTorch on
CPU; a value that falls exactly between two code values goes to the lower code in both.
On a GPU the kernel is compiled without FMA contraction (`FP_FUSION`), so it should
round as the reference does; until that has run on one, the GPU test allows a value
within one ulp of a midpoint to land one code away, for at most 1% of elements.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

from memopt._compat import triton_interpreter_loops_to_runtime_bounds, triton_version
import memopt.codegen.adam8bit as adam8bit
import memopt.codegen.lowrank_adam as lowrank_adam
from memopt.codegen._triton import HAS_TRITON, device_guard
from memopt.codegen.adam8bit import adam8bit_step, code_tables
from memopt.codegen.lowrank_adam import lowrank_adam_step
from memopt.optim import AdamW8bit, GaLoreAdamW, SubspaceAdamW
from optim_testing import tiny_mlp, train

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

loops_to_runtime_bounds = pytest.mark.skipif(
    HAS_TRITON and not triton_interpreter_loops_to_runtime_bounds(),
    reason="the low-rank kernel loops to a runtime bound, which the interpreter of triton "
    f"{'.'.join(map(str, triton_version() or ()))} cannot run with numpy {np.__version__} "
    "(memopt._compat.triton_interpreter_loops_to_runtime_bounds); numpy < 2.4 runs it",
)
"""For tests that run the low-rank Adam kernel in the interpreter."""



def coefficients(step: int, lr: float = 1e-2, weight_decay: float = 0.1, scale: float = 1.0) -> dict[str, float]:
    """AdamW's scalars at ``step`` (betas 0.9, 0.999), written out here from the paper."""
    return dict(
        beta1=0.9, beta2=0.999, eps=1e-8, step_size=lr * scale / (1 - 0.9**step),
        bias_correction2_sqrt=(1 - 0.999**step) ** 0.5, decay=1 - lr * weight_decay,
    )  # fmt: skip



@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def lowrank_operands(m: int, n: int, r: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g)
    projector = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    lowrank_grad = torch.randn(r, n, generator=g)
    exp_avg = 0.1 * torch.randn(r, n, generator=g)
    exp_avg_sq = 0.01 * torch.rand(r, n, generator=g)
    return [t.to(device) for t in (weight, lowrank_grad, projector, exp_avg, exp_avg_sq)]


def max_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [(x.double() - y.double()).abs().max().item() for x, y in zip(a, b)]


@loops_to_runtime_bounds
@pytest.mark.parametrize(
    "m, n, r, block",
    [(32, 16, 4, 16), (40, 24, 5, 16), (16, 48, 3, 32), (64, 64, 8, 64), (96, 8, 65, 64)],
    ids=["32x16r4", "40x24r5-masked-tiles", "16x48r3", "64x64r8-one-tile", "96x8r65-wide-tile-launch-options"],
)
def test_lowrank_kernel_matches_reference(interpreter: None, m: int, n: int, r: int, block: int) -> None:
    ref = lowrank_operands(m, n, r, seed=m + n)
    tri = [t.clone() for t in ref]
    for step in (1, 2, 7):  # several steps: moments feed back
        lowrank_adam_step(*ref, kernel="torch", **coefficients(step, scale=0.5))
        lowrank_adam_step(*tri, kernel="triton", tile=(block, block), **coefficients(step, scale=0.5))
    weight_err, _, _, m_err, v_err = max_errors(ref, tri)
    assert max(weight_err, m_err, v_err) <= 1e-5
    assert not torch.equal(ref[0], lowrank_operands(m, n, r, seed=m + n)[0])  # it did update


@loops_to_runtime_bounds
def test_lowrank_kernel_on_transposed_views(interpreter: None) -> None:
    """A right projection runs the kernel on W^T, R^T, M^T, V^T: strided views, no copies."""
    weight, lowrank_grad, projector, exp_avg, exp_avg_sq = lowrank_operands(24, 40, 4, seed=1)
    # Store W as (n, m) and M, V as (n, r) so that their transposes are the kernel's views.
    ref = [weight.T.contiguous().T, lowrank_grad, projector, exp_avg.T.contiguous().T, exp_avg_sq.T.contiguous().T]
    tri = [t.clone(memory_format=torch.preserve_format) for t in ref]
    assert tri[0].stride() == (1, 24)
    lowrank_adam_step(*ref, kernel="torch", **coefficients(3))
    lowrank_adam_step(*tri, kernel="triton", tile=(16, 16), **coefficients(3))
    assert max(max_errors(ref, tri)) <= 1e-5


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=loops_to_runtime_bounds)])
@pytest.mark.parametrize("transposed", [False, True], ids=["left", "right"])
def test_identity_projector_is_torch_adamw(interpreter: None, kernel: str, transposed: bool) -> None:
    """With P = I the low-rank step is AdamW itself: five steps match torch.optim.AdamW,
    on the weight as given (left) and through transposed views (right)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 24))
    reference = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1, foreach=False)
    mine = weight.detach().clone()
    exp_avg, exp_avg_sq = torch.zeros(24, 24), torch.zeros(24, 24)
    for step in range(1, 6):
        grad = torch.randn(24, 24)
        weight.grad = grad
        reference.step()
        views = [mine, grad, exp_avg, exp_avg_sq]
        if transposed:  # the kernel sees W^T and the moments' transposes
            views = [v.T for v in views]
        w, g, m, v = views
        lowrank_adam_step(w, g, torch.eye(24), m, v, kernel=kernel, tile=(16, 16), **coefficients(step))
    torch.testing.assert_close(mine, weight.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("numel, block", [(1000, 64), (4096, 256), (100, 16)])
def test_adam8bit_kernel_matches_reference(interpreter: None, numel: int, block: int) -> None:
    tables = code_tables()
    g = torch.Generator().manual_seed(numel)
    blocks = -(-numel // block)
    init = [
        torch.randn(numel, generator=g),
        torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g),
        torch.rand(blocks, generator=g),
        torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g),
        0.01 * torch.rand(blocks, generator=g),
    ]
    ref, tri = [t.clone() for t in init], [t.clone() for t in init]
    for step in (1, 2, 3):
        grad = torch.randn(numel, generator=g)
        for state, kernel in ((ref, "torch"), (tri, "triton")):
            adam8bit_step(state[0], grad, *state[1:], tables=tables, block_size=block, kernel=kernel, **coefficients(step))
    assert torch.equal(ref[1], tri[1]) and torch.equal(ref[3], tri[3])  # codes: exact
    assert max(max_errors([ref[0], ref[2], ref[4]], [tri[0], tri[2], tri[4]])) <= 1e-5


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda p, k: GaLoreAdamW(p, rank=4, update_proj_gap=2, kernel=k), marks=loops_to_runtime_bounds),
        pytest.param(lambda p, k: SubspaceAdamW(p, rank=4, update_proj_gap=2, kernel=k), marks=loops_to_runtime_bounds),
        lambda p, k: AdamW8bit(p, block_size=64, min_8bit_size=100, kernel=k),
    ],
    ids=["galore", "subspace", "adamw8bit"],
)
def test_optimizers_through_the_kernels(interpreter: None, factory) -> None:
    """kernel="triton" (interpreted) and kernel="torch" train the same tiny MLP alike."""
    models = [tiny_mlp(), tiny_mlp()]
    for model, kernel in zip(models, ("torch", "triton")):
        train(model, factory(model.parameters(), kernel), range(3))
    for a, b in zip(*(m.parameters() for m in models)):
        assert (a - b).abs().max().item() <= 1e-5


def _recording_guard(module, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace ``module``'s `device_guard` and `launchable` by recorders: the device
    each guard made current, and whether the kernel was launched inside it."""
    events: list[tuple] = []
    launchable = module.launchable

    @contextlib.contextmanager
    def guard(tensor: torch.Tensor):
        events.append(("enter", tensor.device))
        yield
        events.append(("exit",))

    def launch(kernel):
        events.append(("launch",))
        return launchable(kernel)

    monkeypatch.setattr(module, "device_guard", guard)
    monkeypatch.setattr(module, "launchable", launch)
    return events


def test_device_guard_makes_a_cuda_tensors_device_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current device: a tensor on cuda:1 while cuda:0 is current
    needs ``torch.cuda.device(cuda:1)`` around the launch; a CPU tensor needs nothing."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: (entered.append(d), contextlib.nullcontext())[1])
    with device_guard(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    with device_guard(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_adam8bit_kernel_launches_on_its_parameters_device(interpreter: None, monkeypatch) -> None:
    """Before, the 8-bit Adam kernel launched on whatever device was current (the
    quantize kernels had a guard, the optimizer kernels none)."""
    events = _recording_guard(adam8bit, monkeypatch)
    param = torch.randn(64)
    state = [torch.full((64,), 127, dtype=torch.uint8), torch.zeros(1), torch.zeros(64, dtype=torch.uint8), torch.zeros(1)]
    adam8bit_step(param, torch.randn(64), *state, tables=code_tables(), block_size=64, kernel="triton", **coefficients(1))
    assert events == [("enter", param.device), ("launch",), ("exit",)]


@loops_to_runtime_bounds
def test_lowrank_kernel_launches_on_its_weights_device(interpreter: None, monkeypatch) -> None:
    events = _recording_guard(lowrank_adam, monkeypatch)
    operands = lowrank_operands(16, 16, 2, seed=0)
    lowrank_adam_step(*operands, kernel="triton", tile=(16, 16), **coefficients(1))
    assert events == [("enter", operands[0].device), ("launch",), ("exit",)]


def _fake_launches(monkeypatch: pytest.MonkeyPatch, fits) -> list[tuple]:
    """Replace the low-rank kernel's launch: ``fits(block_m, block_n, stages)`` decides
    whether it loads (else Triton's ``OutOfResources``, raised before any write); the
    configurations tried are recorded."""
    from triton.runtime.errors import OutOfResources

    tried: list[tuple] = []

    def launch(operands, c, blocks, stages):
        tried.append((blocks[0], blocks[1], stages))
        if not fits(blocks[0], blocks[1], stages):
            raise OutOfResources(2 * 232448, 232448, "shared memory")

    monkeypatch.setattr(lowrank_adam, "_LAUNCHES", {})
    monkeypatch.setattr(lowrank_adam, "_launch", launch)
    return tried


def test_lowrank_kernel_too_large_for_the_gpu_retries_with_smaller_tiles(interpreter: None, monkeypatch) -> None:
    """A rank whose tiles overflow shared memory (GaLore at rank 512) made Triton raise
    OutOfResources and the step fail. Now smaller tiles are tried, and the one that
    launched is used from then on."""
    tried = _fake_launches(monkeypatch, lambda m, n, stages: m <= 32)
    operands = lowrank_operands(64, 64, 8, seed=0)
    lowrank_adam_step(*operands, kernel="triton", **coefficients(1))
    assert tried == [(64, 64, None), (32, 32, None)]
    lowrank_adam_step(*operands, kernel="triton", **coefficients(2))
    assert tried[2:] == [(32, 32, None)]


def test_lowrank_kernel_that_never_fits_is_an_error_or_the_reference(interpreter: None, monkeypatch) -> None:
    """Down to 16 x 16 and then one stage; where even that does not fit,
    kernel="triton" says so and how to go on, kernel="auto" runs the reference."""
    tried = _fake_launches(monkeypatch, lambda m, n, stages: False)
    operands = lowrank_operands(64, 64, 8, seed=0)
    with pytest.raises(RuntimeError, match="does not fit this GPU's shared memory at rank 8.*kernel='torch'"):
        lowrank_adam_step(*operands, kernel="triton", **coefficients(1))
    assert tried == [(64, 64, None), (32, 32, None), (16, 16, None), (16, 16, 1)]
    monkeypatch.setattr(lowrank_adam, "use_triton", lambda kernel, tensor: True)  # as for a CUDA weight
    expected = [t.clone() for t in operands]
    lowrank_adam_step(*operands, kernel="auto", **coefficients(1))
    lowrank_adam_step(*expected, kernel="torch", **coefficients(1))
    assert all(torch.equal(a, b) for a, b in zip(operands, expected))
    assert len(tried) == 4  # the shape known not to fit is not tried again


def test_forcing_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lowrank_adam_step(*lowrank_operands(8, 8, 2, seed=0), kernel="triton", **coefficients(1))


def test_dispatcher_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops = lowrank_operands(16, 8, 2, seed=0)
    expected = [t.clone() for t in ops]
    lowrank_adam_step(*ops, **coefficients(1))  # kernel="auto"
    lowrank_adam_step(*expected, kernel="torch", **coefficients(1))
    assert all(torch.equal(a, b) for a, b in zip(ops, expected))


def test_operand_shapes_are_checked() -> None:
    weight, lowrank_grad, projector, exp_avg, exp_avg_sq = lowrank_operands(16, 8, 2, seed=0)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        lowrank_adam_step(weight, lowrank_grad, projector, exp_avg.T, exp_avg_sq, **coefficients(1))
    with pytest.raises(ValueError, match="power of two"):
        adam8bit_step(
            torch.zeros(48), torch.zeros(48), torch.zeros(48, dtype=torch.uint8), torch.zeros(1),
            torch.zeros(48, dtype=torch.uint8), torch.zeros(1), tables=code_tables(), block_size=48,
            **coefficients(1),
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [16, 128], ids=["rank16-defaults", "rank128-8-warps-255-registers"])
def test_lowrank_kernel_on_cuda_matches_reference(rank: int) -> None:
    """Both launch settings of `lowrank_adam.launch_options`: Triton's defaults, and the
    wide tile's 8 warps with ``maxnreg=255``."""
    ref = lowrank_operands(256, 128, rank, seed=0, device="cuda")
    tri = [t.clone() for t in ref]
    lowrank_adam_step(*ref, kernel="torch", **coefficients(2, scale=0.25))
    lowrank_adam_step(*tri, kernel="triton", **coefficients(2, scale=0.25))
    assert max(max_errors(ref, tri)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adam8bit_kernel_on_cuda_matches_reference() -> None:
    numel, block = 100_000, 256
    tables = code_tables("cuda")
    state = [torch.randn(numel, device="cuda"), torch.full((numel,), 127, dtype=torch.uint8, device="cuda"),
             torch.zeros(-(-numel // block), device="cuda"), torch.zeros(numel, dtype=torch.uint8, device="cuda"),
             torch.zeros(-(-numel // block), device="cuda")]  # fmt: skip
    ref8, tri8 = [t.clone() for t in state], [t.clone() for t in state]
    grad = torch.randn(numel, device="cuda")
    for state, kernel in ((ref8, "torch"), (tri8, "triton")):
        adam8bit_step(state[0], grad, *state[1:], tables=tables, block_size=block, kernel=kernel, **coefficients(1))
    for codes in (1, 3):
        differ = (ref8[codes].int() - tri8[codes].int()).abs()
        assert differ.max().item() <= 1 and differ.bool().float().mean().item() <= 0.01
    assert max(max_errors([ref8[0], ref8[2], ref8[4]], [tri8[0], tri8[2], tri8[4]])) <= 1e-5
