"""Block-wise quantization: the reference, the Triton kernels (under Triton's
interpreter, in a subprocess), and the ``torch.ops.memopt`` custom ops."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from memopt.codegen import quantize as q
from memopt.codegen import quantize_reference as ref
from memopt.codegen._triton import HAS_TRITON, can_run_triton
from memopt.codegen.quantize import (
    dequantize_blockwise_reference,
    quantize_blockwise_reference,
)

INT8, FP8 = torch.int8, torch.float8_e4m3fn
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
WORKER = pathlib.Path(__file__).with_name("quantize_kernel_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Student-t with 2 degrees of freedom: a few large outliers per block."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen)
    chi2 = torch.randn(n, generator=gen) ** 2 + torch.randn(n, generator=gen) ** 2
    return normal / (chi2 / 2).sqrt()


def _normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _per_element(scales: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(block_size)[:numel]


def _roundtrip(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(x as float32 flat, x_hat float32 flat, per-element scale, codes)``."""
    codes, scales = quantize_blockwise_reference(x, block_size, dtype)
    x_hat = dequantize_blockwise_reference(codes, scales, x.shape, block_size, torch.float32)
    scale = _per_element(scales, block_size, x.numel())
    return x.float().reshape(-1), x_hat.reshape(-1), scale, codes


def _int8_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rounding to the nearest code: half a scale, plus float32 division/product slack."""
    return scale * (0.5 + 1e-4)


def _e4m3_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an e4m3 ulp at ``y = x / scale``: ulp = 2**(max(floor(log2|y|), -6) - 3)
    (3 mantissa bits; -6 is the smallest normal exponent, below it spacing 2**-9)."""
    exponent = torch.frexp(x / scale)[1] - 1
    ulp = torch.exp2((exponent.clamp(min=-6) - 3).float())
    return scale * ulp / 2 * (1 + 1e-5)


BOUNDS: dict[torch.dtype, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    INT8: _int8_bound,
    FP8: _e4m3_bound,
}


# ---------------------------------------------------------------- reference format


def test_int8_codes_match_hand_computation() -> None:
    """Scales 127/127 = 1 and 254/127 = 2 are exact, so ties stay ties: 2.5 -> 2,
    -3.5 -> -4, 0.5 -> 0 (half to even); the all-zero tail block gets scale 1."""
    x = torch.tensor([127, 2.5, -3.5, 0.5, -254, 5, 7, 1, 0, 0])
    codes, scales = quantize_blockwise_reference(x, 4, INT8)
    assert codes.tolist() == [127, 2, -4, 0, -127, 2, 4, 0, 0, 0]
    assert codes.dtype == INT8 and codes.shape == (10,)
    assert scales.tolist() == [1.0, 2.0, 1.0] and scales.dtype == torch.float32


def test_fp8_codes_match_hand_computed_bits() -> None:
    """absmax 448 gives scale 1. Bits sEEEEMMM, bias 7: 448 = 1.75*2**8 -> 0x7E;
    1.0625 ties to 1.0 (0x38); 1.1875 ties to 1.25 (0x3A); -2**-9 is the smallest
    subnormal (0x81); 2**-10 ties to +0 (0x00); 1.5*2**-9 ties to 2*2**-9 (0x02);
    17 ties to 16 (0x58); 300 -> 288 = 1.125*2**8 (0x79); -0.0 keeps its sign (0x80)."""
    x = torch.tensor([448, 1.0625, 1.1875, -(2**-9), 2**-10, 1.5 * 2**-9, 17, 300, -0.0])
    codes, scales = quantize_blockwise_reference(x, 16, FP8)
    assert codes.view(torch.uint8).tolist() == [
        0x7E, 0x38, 0x3A, 0x81, 0x00, 0x02, 0x58, 0x79, 0x80
    ]  # fmt: skip
    assert scales.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("make", [_normal, _heavy_tailed], ids=["normal", "heavy"])
@pytest.mark.parametrize("block_size", [1, 7, 64, 128])
def test_roundtrip_error_within_format_bound(
    dtype: torch.dtype, make: Callable[[int, int], torch.Tensor], block_size: int
) -> None:
    """int8: |x - x_hat| <= scale/2. e4m3: <= half an e4m3 ulp of x/scale, times scale."""
    x = make(1000, 0) * 3
    x_flat, x_hat, scale, _ = _roundtrip(x, block_size, dtype)
    assert ((x_flat - x_hat).abs() <= BOUNDS[dtype](x_flat, scale)).all()


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_block_absmax_maps_to_qmax_and_roundtrips(dtype: torch.dtype) -> None:
    """The largest element of each block codes to +-qmax (saturation point) and comes
    back within float32 rounding."""
    x = _heavy_tailed(640, 1).reshape(10, 64)
    codes, scales = quantize_blockwise_reference(x, 64, dtype)
    arg = x.abs().argmax(dim=1)
    top = codes.reshape(10, 64).float().gather(1, arg[:, None]).squeeze(1)
    assert torch.equal(top.abs(), torch.full((10,), ref.qmax(dtype)))
    torch.testing.assert_close(top * scales, x.gather(1, arg[:, None]).squeeze(1))


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_zero_and_underflowing_blocks_get_scale_one(dtype: torch.dtype) -> None:
    """absmax 0, or absmax/qmax underflowing float32 to 0 (absmax = 2**-149), gives
    scale 1: codes 0 and an exact zero back (the tiny value is lost, error <= 2**-149)."""
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 2**-149, 0.0, 0.0, 0.0, 2.0, -2.0])
    x_flat, x_hat, _, codes = _roundtrip(x, 4, dtype)
    _, scales = quantize_blockwise_reference(x, 4, dtype)
    assert scales[:2].tolist() == [1.0, 1.0]
    assert codes[:8].float().abs().sum() == 0 and x_hat[:8].abs().sum() == 0
    assert x_hat[8:].tolist() == x_flat[8:].tolist()


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_negation_flips_only_the_code_sign(dtype: torch.dtype) -> None:
    """The format is symmetric: quantize(-x) has the same scales and negated codes."""
    x = _normal(300, 2)
    codes, scales = quantize_blockwise_reference(x, 32, dtype)
    neg_codes, neg_scales = quantize_blockwise_reference(-x, 32, dtype)
    assert torch.equal(scales, neg_scales)
    assert torch.equal(neg_codes.float(), -codes.float())


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_last_partial_block_is_scaled_by_its_own_elements(dtype: torch.dtype) -> None:
    """13 elements in blocks of 5: three scales, the last from elements 10..12 only;
    codes stay flat (13,), not padded."""
    x = torch.arange(1, 14, dtype=torch.float32).reshape(13)
    codes, scales = quantize_blockwise_reference(x, 5, dtype)
    assert codes.shape == (13,) and scales.shape == (3,)
    assert torch.equal(scales, torch.tensor([5.0, 10.0, 13.0]) / ref.qmax(dtype))


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_half_inputs_quantize_as_their_float32_values(
    in_dtype: torch.dtype, dtype: torch.dtype
) -> None:
    """Arithmetic is float32: a half input gives the codes of its exact float32 value,
    and dequantizes to ``out_dtype`` by rounding the float32 result."""
    x = _normal(500, 3).to(in_dtype)
    codes, scales = quantize_blockwise_reference(x, 64, dtype)
    codes32, scales32 = quantize_blockwise_reference(x.float(), 64, dtype)
    assert torch.equal(codes.view(torch.uint8), codes32.view(torch.uint8))
    assert torch.equal(scales, scales32)
    x_hat = dequantize_blockwise_reference(codes, scales, x.shape, 64, in_dtype)
    as32 = dequantize_blockwise_reference(codes, scales, x.shape, 64, torch.float32)
    assert x_hat.dtype == in_dtype and torch.equal(x_hat, as32.to(in_dtype))


def test_non_contiguous_input_uses_row_major_order() -> None:
    x = _normal(96, 4).reshape(8, 12).t()
    for got, want in zip(
        quantize_blockwise_reference(x, 16, INT8), quantize_blockwise_reference(x.contiguous(), 16, INT8)
    ):
        assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 12), min_size=1, max_size=3),
    block_size=st.sampled_from([1, 2, 5, 16, 33, 64]),
    dtype=st.sampled_from([INT8, FP8]),
    in_dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_reference_properties(
    shape: list[int],
    block_size: int,
    dtype: torch.dtype,
    in_dtype: torch.dtype,
    magnitude: float,
    seed: int,
) -> None:
    """Any shape/block/dtype: flat codes, one float32 scale per block equal to that
    block's absmax/qmax (or 1), codes within +-qmax, error within the format bound."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * magnitude).to(in_dtype)
    codes, scales = quantize_blockwise_reference(x, block_size, dtype)
    n = x.numel()
    assert codes.shape == (n,) and codes.dtype == dtype
    assert scales.shape == (ref.num_blocks(n, block_size),) and scales.dtype == torch.float32
    for b in range(scales.numel()):
        absmax = x.float().reshape(-1)[b * block_size : (b + 1) * block_size].abs().max()
        expected = absmax / ref.qmax(dtype)
        assert scales[b] == (expected if expected > 0 else 1.0)
    assert (codes.float().abs() <= ref.qmax(dtype)).all()
    x_flat, x_hat, scale, _ = _roundtrip(x, block_size, dtype)
    assert ((x_flat - x_hat).abs() <= BOUNDS[dtype](x_flat, scale)).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: quantize_blockwise_reference(torch.ones(4), 0, INT8), "block_size must be a positive int, got 0"),
        (lambda: quantize_blockwise_reference(torch.ones(4), 4, torch.uint8), "unsupported code dtype torch.uint8"),
        (lambda: quantize_blockwise_reference(torch.ones(4, dtype=torch.float64), 4, INT8), "cast to torch.float32"),
        (lambda: dequantize_blockwise_reference(torch.zeros(8, dtype=INT8), torch.ones(3), [8], 4, torch.float32), "need 2 scales, got 3"),
        (lambda: dequantize_blockwise_reference(torch.zeros(8, dtype=INT8), torch.ones(2), [3, 3], 4, torch.float32), r"size \[3, 3\] holds 9 elements"),
        (lambda: dequantize_blockwise_reference(torch.zeros(8, dtype=INT8), torch.ones(2), [8], 4, torch.int32), "out_dtype must be one of"),
    ],
    ids=["block_size", "code_dtype", "input_dtype", "scales", "size", "out_dtype"],
)  # fmt: skip
def test_bad_arguments_name_the_problem(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- Triton kernels


def _special_values() -> torch.Tensor:
    """Zeros, -0.0, half-way ties (also under scale 61 = 7747/127, where multiplying by
    a rounded 1/scale instead of dividing breaks half of them), e4m3 subnormal
    territory and a spread of magnitudes."""
    x = _heavy_tailed(1000, 5)
    x[:130] = 0.0
    x[130] = -0.0
    x[200:264] = torch.tensor([127.0, 2.5, -3.5, 0.5] * 16)
    x[264:328] = torch.linspace(-448, 448, 64)
    x[328:392] = torch.tensor([448.0] + [2**-10, 3 * 2**-10, -(2**-12)] * 21)
    x[448:512] = torch.tensor([127.0 * 61] + [(k + 0.5) * 61 for k in range(64, 127)])
    return x


KERNEL_CASES: dict[str, tuple[Callable[[], torch.Tensor], int, torch.dtype]] = {
    "int8-fp32-b64": (lambda: _normal(1000, 10), 64, INT8),
    "fp8-fp32-b128": (lambda: _normal(1000, 11), 128, FP8),
    "int8-special-b64": (_special_values, 64, INT8),
    "fp8-special-b64": (_special_values, 64, FP8),
    "int8-bf16-b128": (lambda: _heavy_tailed(1000, 12).bfloat16(), 128, INT8),
    "fp8-bf16-b64": (lambda: _heavy_tailed(1000, 13).bfloat16(), 64, FP8),
    "fp8-fp16-2d-b100": (lambda: (_normal(33 * 17, 14) * 100).half().reshape(33, 17), 100, FP8),
    "int8-fp16-transposed-b3": (lambda: _normal(30 * 20, 15).half().reshape(30, 20).t(), 3, INT8),
    "fp8-fp32-b1": (lambda: _normal(50, 16), 1, FP8),
    "int8-empty": (lambda: torch.empty(0, 5), 64, INT8),
    # several programs (tiles of 4096 elements), the last one partly out of range
    "int8-fp32-b64-5programs": (lambda: _heavy_tailed(20000, 17), 64, INT8),
    "fp8-bf16-b1000-3programs": (lambda: _normal(9000, 18).bfloat16(), 1000, FP8),
}


KernelRun = dict[str, tuple[dict[str, object], dict[str, object]]]


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory: pytest.TempPathFactory) -> KernelRun:
    """``{name: (case, kernel outputs)}`` for every KERNEL_CASES case, run by the Triton
    kernels under TRITON_INTERPRET=1 in one subprocess (triton reads the variable at
    import, so this process cannot switch). ``case`` holds the input and the
    reference's codes/scales, which the dequantize kernel decodes."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    cases = {}
    for name, (make, block_size, dtype) in KERNEL_CASES.items():
        x = make()
        codes, scales = quantize_blockwise_reference(x, block_size, dtype)
        cases[name] = {"x": x, "block_size": block_size, "dtype": dtype, "codes": codes, "scales": scales}
    folder = tmp_path_factory.mktemp("quantize_kernels")
    torch.save(cases, folder / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(folder / "in.pt"), str(folder / "out.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(folder / "out.pt")
    return {name: (cases[name], results[name]) for name in cases}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_codes_and_scales_equal_reference(kernel_run: KernelRun, name: str) -> None:
    """Bit-identical codes (compared as bytes, so e4m3 -0.0 counts) and scales."""
    case, got = kernel_run[name]
    assert got["codes"].dtype == case["dtype"] and got["codes"].shape == case["codes"].shape
    assert torch.equal(got["codes"].view(torch.uint8), case["codes"].view(torch.uint8))
    assert torch.equal(got["scales"], case["scales"])


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_dequantize_equals_reference(kernel_run: KernelRun, name: str) -> None:
    """The reference's codes dequantized by the kernel: bit-identical to the reference's
    dequantization for every output dtype (stronger than the tolerance the format
    promises), and within that tolerance of the input."""
    case, got = kernel_run[name]
    x, block_size, codes, scales = case["x"], case["block_size"], case["codes"], case["scales"]
    for out_dtype, x_hat in got["dequantized"].items():
        want = dequantize_blockwise_reference(codes, scales, x.shape, block_size, out_dtype)
        assert x_hat.dtype == out_dtype and x_hat.shape == x.shape
        assert torch.equal(x_hat.view(torch.uint8), want.view(torch.uint8)), out_dtype
    x_flat = x.float().reshape(-1)
    x_hat32 = got["dequantized"][torch.float32].reshape(-1)
    scale = _per_element(scales, block_size, x.numel())
    assert ((x_flat - x_hat32).abs() <= BOUNDS[case["dtype"]](x_flat, scale)).all()


def test_cpu_kernel_call_without_interpreter_says_how_to_enable_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In this process the kernels were decorated without TRITON_INTERPRET, so setting
    it now does not help: the error says the variable must be set before import."""
    pytest.importorskip("triton")
    from memopt.codegen import quantize_triton
    from memopt.codegen._triton import kernel_is_interpreted

    if kernel_is_interpreted(quantize_triton._quantize_kernel):
        pytest.skip("this pytest process runs with TRITON_INTERPRET=1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not can_run_triton(torch.ones(2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is not set"):
        quantize_triton.quantize_blockwise_triton(torch.ones(8), 4, INT8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert can_run_triton(torch.ones(2))
    with pytest.raises(RuntimeError, match="set after memopt.codegen.quantize_triton was imported"):
        quantize_triton.quantize_blockwise_triton(torch.ones(8), 4, INT8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_cuda_ops_equal_cpu_reference(name: str) -> None:
    """On CUDA the ops run the compiled kernels: same bits as the CPU reference."""
    make, block_size, dtype = KERNEL_CASES[name]
    x = make()
    codes, scales = q.quantize_blockwise(x.cuda(), block_size, dtype)
    ref_codes, ref_scales = quantize_blockwise_reference(x, block_size, dtype)
    assert torch.equal(codes.cpu().view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales.cpu(), ref_scales)
    for out_dtype in FLOATS:
        got = q.dequantize_blockwise(codes, scales, x.shape, block_size, out_dtype).cpu()
        want = dequantize_blockwise_reference(ref_codes, ref_scales, x.shape, block_size, out_dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ---------------------------------------------------------------- custom ops


def _quant_dequant(x: torch.Tensor) -> torch.Tensor:
    codes, scales = torch.ops.memopt.quantize_blockwise(x * 2, 64, FP8)
    return torch.ops.memopt.dequantize_blockwise(codes, scales, x.shape, 64, torch.bfloat16) + 1


def _quant_dequant_reference(x: torch.Tensor) -> torch.Tensor:
    codes, scales = quantize_blockwise_reference(x * 2, 64, FP8)
    return dequantize_blockwise_reference(codes, scales, x.shape, 64, torch.bfloat16) + 1


def test_op_schemas() -> None:
    assert str(torch.ops.memopt.quantize_blockwise.default._schema) == (
        "memopt::quantize_blockwise(Tensor x, int block_size, ScalarType dtype) -> (Tensor, Tensor)"
    )
    assert str(torch.ops.memopt.dequantize_blockwise.default._schema) == (
        "memopt::dequantize_blockwise(Tensor codes, Tensor scales, SymInt[] size, "
        "int block_size, ScalarType out_dtype) -> Tensor"
    )


def test_fake_tensors_propagate_shapes_and_dtypes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 9, dtype=torch.bfloat16)
        codes, scales = torch.ops.memopt.quantize_blockwise(x, 4, FP8)
        out = torch.ops.memopt.dequantize_blockwise(codes, scales, [7, 9], 4, torch.float16)
    assert (codes.shape, codes.dtype) == ((63,), FP8)
    assert (scales.shape, scales.dtype) == ((16,), torch.float32)
    assert (out.shape, out.dtype) == ((7, 9), torch.float16)


@pytest.mark.parametrize("mode", ["real", "symbolic"])
def test_make_fx_records_the_ops(mode: str) -> None:
    gm = make_fx(_quant_dequant, tracing_mode=mode)(torch.randn(10, 33))
    assert "torch.ops.memopt.quantize_blockwise.default(" in gm.code
    assert "torch.ops.memopt.dequantize_blockwise.default(" in gm.code


@pytest.mark.parametrize("dynamic", [False, True])
def test_aot_eager_compile_matches_reference(dynamic: bool) -> None:
    compiled = torch.compile(_quant_dequant, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape in [(10, 33), (7, 5)]:
        x = _normal(shape[0] * shape[1], 20).reshape(shape)
        assert torch.equal(compiled(x), _quant_dequant_reference(x))


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_opcheck(dtype: torch.dtype) -> None:
    """torch.library's own consistency checks: schema, autograd registration, fake vs
    real, AOT dispatch. ``test_schema`` is skipped for float8 codes: its mutation check
    compares inputs with an aten op that has no float8 kernel on CPU."""
    x = _normal(99, 21).reshape(9, 11).half()
    torch.library.opcheck(torch.ops.memopt.quantize_blockwise.default, (x, 16, dtype))
    codes, scales = q.quantize_blockwise(x, 16, dtype)
    args = (codes, scales, [9, 11], 16, torch.bfloat16)
    checks = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if dtype == INT8:
        checks.append("test_schema")
    torch.library.opcheck(torch.ops.memopt.dequantize_blockwise.default, args, test_utils=checks)


def test_backward_through_the_ops_raises() -> None:
    """No autograd formula (a documented choice): the error says so, instead of the
    gradient silently vanishing."""
    x = torch.randn(8, requires_grad=True)
    codes, scales = q.quantize_blockwise(x, 4, INT8)
    y = q.dequantize_blockwise(codes, scales, [8], 4, torch.float32)
    with pytest.raises(RuntimeError, match="dequantize_blockwise is not differentiable"):
        y.sum().backward()


@pytest.mark.inductor
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_inductor_calls_the_ops() -> None:
    """Inductor (C++ on CPU) keeps the ops as extern calls to the CPU reference."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x = _normal(330, 22).reshape(10, 33)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, sources = run_and_get_code(
            torch.compile(_quant_dequant, backend="inductor", fullgraph=True), x
        )
    assert torch.equal(out, _quant_dequant_reference(x))
    assert any("torch.ops.memopt.quantize_blockwise.default(" in s for s in sources)
