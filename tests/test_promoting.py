"""Mixed-dtype elementwise kernels (`memopt.codegen.promoting`): ATen's CPU kernels copy
a promoted operand, the memory model counts that copy, and the eager codegen runs such
kernels in pieces with the same bits."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memopt.analysis.workspace import workspace_bytes
from memopt.codegen.eager import compile_eager
from memopt.codegen.promoting import PIECE_ELEMENTS, in_pieces, promoted_copy_bytes, runs_in_pieces
from memopt.testing.measure import measure_peak

aten = torch.ops.aten
CPU = torch.device("cpu")

_N = PIECE_ELEMENTS  # one piece: ATen's own kernel runs, whole
_OPERANDS = {
    "float*bool": (lambda: torch.randn(_N), lambda: torch.rand(_N) > 0.5),
    "bool*float": (lambda: torch.rand(_N) > 0.5, lambda: torch.randn(_N)),
    "float*bf16": (lambda: torch.randn(_N), lambda: torch.randn(_N, dtype=torch.bfloat16)),
    "float*int64": (lambda: torch.randn(_N), lambda: torch.randint(0, 5, (_N,))),
    "float*float": (lambda: torch.randn(_N), lambda: torch.randn(_N)),
    "int64*int64": (lambda: torch.randint(0, 5, (_N,)), lambda: torch.randint(1, 5, (_N,))),  # div: both to float
    "float*bool row": (lambda: torch.randn(64, _N // 64), lambda: torch.rand(1, _N // 64) > 0.5),
}


@pytest.mark.parametrize("op", [aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor])
@pytest.mark.parametrize("operands", sorted(_OPERANDS))
def test_the_cpu_kernel_holds_the_promoted_copy_the_model_counts(op, operands):
    """Pins ATen's CPU behaviour the model relies on: the kernel allocates a copy of
    each operand whose dtype is not the one it computes in (the common dtype; for
    ``div`` of integers, float), of that operand's own size, and nothing for operands
    already of it. Measured beyond the op's output."""
    torch.manual_seed(0)
    a, b = (make() for make in _OPERANDS[operands])
    gm = make_fx(lambda a, b: op(a, b), tracing_mode="fake")(a, b)
    (node,) = [n for n in gm.graph.nodes if n.target == op]
    assert not runs_in_pieces(node)
    out = op(a, b)
    measured = measure_peak(lambda: op(a, b)).peak_growth_bytes - out.numel() * out.element_size()
    assert measured == workspace_bytes(node, CPU) == promoted_copy_bytes(node)
    assert workspace_bytes(node, CPU, fused=True) == 0  # Inductor casts in its kernels


_MIXED = [
    (torch.float32, torch.bool),
    (torch.bool, torch.float32),
    (torch.bfloat16, torch.bool),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.int64),
]


def _tensor(dtype: torch.dtype, numel: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(numel) > 0.3
    if dtype == torch.int64:
        return torch.randint(-3, 4, (numel,))
    x = torch.randn(numel).to(dtype)
    x[::97] = 0.0  # zeros and a negative zero: x * False is -0.0 for negative x
    x[1::97] = -0.0
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (NaN equals NaN, -0.0 differs from 0.0)."""
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


_CASES = [
    pytest.param(overload, dtypes, id=f"{overload._overloadpacket.__name__}-{dtypes[0]}-{dtypes[1]}".replace("torch.", ""))
    for overload in (aten.mul.out, aten.add.out, aten.sub.out, aten.div.out)
    for dtypes in _MIXED
    if not (overload == aten.sub.out and torch.bool in dtypes)  # torch refuses to subtract bools
]


@pytest.mark.parametrize("overload, dtypes", _CASES)
def test_pieces_give_the_kernels_bits(overload, dtypes):
    """`in_pieces` equals one call of the kernel bit for bit (negative zeros, and the
    NaNs of a division by a false mask, included), for a fresh output, for an output
    that is an operand (the in-place writer's form) and with ``alpha``; operands that
    are not contiguous run whole."""
    torch.manual_seed(0)
    numel = 2 * PIECE_ELEMENTS + 12345
    a, b = _tensor(dtypes[0], numel), _tensor(dtypes[1], numel)
    functional = {aten.mul.out: aten.mul.Tensor, aten.add.out: aten.add.Tensor, aten.sub.out: aten.sub.Tensor, aten.div.out: aten.div.Tensor}[overload]
    whole = functional(a, b)
    ours = in_pieces(functional, a, b)
    assert ours.dtype == whole.dtype and torch.equal(_bits(ours), _bits(whole))
    if a.dtype == whole.dtype:
        written = a.clone()
        assert in_pieces(overload, written, b, out=written) is written
        assert torch.equal(_bits(written), _bits(whole))
    if overload in (aten.add.out, aten.sub.out) and whole.is_floating_point():
        assert torch.equal(_bits(in_pieces(functional, a, b, alpha=3)), _bits(functional(a, b, alpha=3)))
    strided = a[: 2 * (numel // 2)].view(-1, 2).t()
    other = b[: 2 * (numel // 2)].view(-1, 2).t()
    ours = in_pieces(functional, strided, other)
    assert torch.equal(_bits(ours), _bits(functional(strided, other))) and ours.stride() == functional(strided, other).stride()


def test_the_eager_codegen_runs_large_mixed_products_in_pieces_as_estimated():
    """A graph of three products, the last a float times a bool mask of four pieces:
    compiled by the eager codegen only that one runs in pieces (the one broadcast over
    rows copies one row; the one of equal dtypes copies nothing), with the same bits,
    and the measured peak is its three outputs plus one piece's copy, as the model's
    workspace says, where ATen's kernel holds the whole mask's copy."""
    rows, cols = 4, PIECE_ELEMENTS
    size = rows * cols * 4

    def f(x, mask, row, y):
        return x * y, x * row, x * mask

    inputs = (torch.randn(rows, cols), torch.rand(rows, cols) > 0.1, torch.rand(1, cols) > 0.1, torch.randn(rows, cols))
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    products = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    assert [runs_in_pieces(n) for n in products] == [False, False, True]
    copies = [workspace_bytes(n, CPU) for n in products]
    assert copies == [0, 4 * cols, 4 * PIECE_ELEMENTS]
    whole = measure_peak(lambda: f(*inputs)).peak_growth_bytes
    run = compile_eager(gm)
    assert [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"].count("in_pieces") == 1
    outputs, expected = run(list(inputs)), f(*inputs)
    assert all(torch.equal(x, y) for x, y in zip(outputs, expected))
    del outputs, expected
    measured = measure_peak(lambda: run(list(inputs))).peak_growth_bytes
    assert measured == 3 * size + copies[-1], (measured, size)
    assert whole == 3 * size + size, whole


class _Dropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 1024)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(x)).square().sum()


def test_a_compiled_dropout_backward_multiplies_its_mask_in_pieces():
    """Dropout's decomposed backward (``grad * mask``: a bool mask) runs in pieces in a
    step compiled with the eager codegen, with the gradients of ``aot_eager``."""
    torch.manual_seed(0)
    model, x = _Dropout(), torch.randn(1024, 64)

    def grads(backend: str, **options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
        torch.manual_seed(1)
        compiled(x).backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    reference = grads("aot_eager")
    import memopt.codegen.eager as eager

    seen: list[int] = []
    original = eager.run_in_pieces
    eager.run_in_pieces = lambda graph: seen.append(original(graph)) or seen[-1]  # type: ignore[assignment]
    try:
        ours = grads("memopt", codegen="eager")
    finally:
        eager.run_in_pieces = original
    assert sum(seen) >= 1
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_memopt_estimates_count_promoted_copies_only_where_eager_holds_them():
    """The unfused model counts a promoted copy, on CPU and on the meta device alike (a
    model estimated on meta tensors); the fused one (Inductor) does not."""
    gm = make_fx(lambda a, b: a * b, tracing_mode="fake")(torch.randn(8, 8), torch.rand(8, 8) > 0.5)
    (node,) = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    assert workspace_bytes(node, CPU) == 8 * 8 * 4
    assert workspace_bytes(node, CPU, fused=True) == 0
    assert workspace_bytes(node, torch.device("meta")) == workspace_bytes(node, CPU)
    on_meta = make_fx(lambda a, b: a * b, tracing_mode="fake")(
        torch.randn(8, 8, device="meta"), torch.empty(8, 8, dtype=torch.bool, device="meta")
    )
    (meta_node,) = [n for n in on_meta.graph.nodes if n.target == aten.mul.Tensor]
    assert workspace_bytes(meta_node, torch.device("meta")) == workspace_bytes(node, CPU)  # a model on the meta device
