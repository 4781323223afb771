"""The eager codegen's in-place softmax backwards (`memopt.analysis.eager_inplace`):
the kernels give the same bits written into their input, the memory timeline and the
generated code agree on which nodes do it, and the measured peak drops as estimated."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import memopt
from memopt.analysis.aliasing import analyze_aliasing
from memopt.analysis.eager_inplace import OUT_VARIANTS, eager_inplace_writes
from memopt.analysis.liveness import last_reads
from memopt.codegen.eager import write_in_place
from memopt.testing.measure import measure_peak

aten = torch.ops.aten


SOFTMAX_BACKWARDS = [op for op, v in OUT_VARIANTS.items() if v.last_dim]
ELEMENTWISE = [op for op, v in OUT_VARIANTS.items() if not v.last_dim]
SHAPES = [(1024, 2048), (3, 7, 33), (5, 1), (64, 16, 1000)]


@pytest.mark.parametrize("op", SOFTMAX_BACKWARDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_backward_written_into_its_gradient_is_bitwise(op, shape):
    """What the rewrite relies on: CPU kernels over the last dimension (vectorized,
    multithreaded at the largest shape) read each row's reduction before writing it."""
    x = torch.randn(*shape)
    out = torch.log_softmax(x, -1) if "log" in str(op) else torch.softmax(x, -1)
    grad = torch.randn(*shape)
    expected = op(grad, out, -1, torch.float32)
    variant = OUT_VARIANTS[op]
    written = grad.clone()
    result = variant.overload(written, out, -1, torch.float32, **{variant.out_name: written})
    assert result.data_ptr() == written.data_ptr()
    assert torch.equal(written, expected)


def _operands(op, shape):
    """Operands in each op's domain (threshold's third argument is its threshold)."""
    a, b = torch.randn(*shape), torch.randn(*shape)
    if op is aten.threshold_backward.default:
        return (a, b, 0.0)
    if op is aten.div.Tensor:
        return (a, b.abs() + 0.5)
    return (a,) if len(OUT_VARIANTS[op].writable) == 1 else (a, b)


@pytest.mark.parametrize("op", ELEMENTWISE, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_elementwise_kernel_written_into_either_operand_is_bitwise(op, shape):
    """Element i of the output reads only element i of each operand: writing into any
    operand (vectorized, multithreaded at the largest shapes, scalar tails at the odd
    ones) gives the fresh output's bits."""
    args = _operands(op, shape)
    expected = op(*args)
    variant = OUT_VARIANTS[op]
    for position in variant.writable:
        operands = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        written = operands[position]
        result = variant.overload(*operands, **{variant.out_name: written})
        assert result.data_ptr() == written.data_ptr()
        assert torch.equal(written, expected), (op, position)


def _loss(x, w):
    logits = x @ w
    return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1])


def _backward_graph():
    x = torch.randn(256, 64, requires_grad=True)
    w = torch.randn(64, 512, requires_grad=True)
    gm = make_fx(lambda x, w: torch.autograd.grad(_loss(x, w), (x, w)), tracing_mode="fake")(x, w)
    return gm, (x.detach(), w.detach())


def test_the_timeline_and_the_codegen_pick_the_same_nodes():
    gm, args = _backward_graph()
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    aliasing = analyze_aliasing(gm.graph)
    index = {n: i for i, n in enumerate(nodes)}
    picked = eager_inplace_writes(gm.graph, aliasing, last_reads(gm.graph, aliasing, index), index)
    assert aten._log_softmax_backward_data.default in [n.target for n in picked]
    overloads = [OUT_VARIANTS[n.target].overload for n in picked]
    expected = gm(*args)
    assert write_in_place(gm.graph) == len(picked)
    gm.recompile()
    rewritten = [n.target for n in gm.graph.nodes if n.op == "call_function" and set(n.kwargs) & {"out", "grad_input"}]
    assert rewritten == overloads
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), expected))


def test_inputs_and_outputs_are_never_written():
    """A softmax backward reading a graph input, or whose gradient is also returned,
    keeps a fresh output."""

    def f(grad, out):
        return aten._softmax_backward_data(grad, out, -1, torch.float32)

    def g(grad, out):
        doubled = grad * 2
        return aten._softmax_backward_data(doubled, out, -1, torch.float32), doubled

    def h(a, b):  # elementwise: operands are graph inputs
        return a * b

    def k(a, b):  # the dying storage read through two overlapping views, neither all of it
        c = a * 2
        return c[1:] + c[:-1]

    for fn in (f, g, h, k):
        gm = make_fx(fn, tracing_mode="fake")(torch.randn(8, 16), torch.randn(8, 16))
        assert write_in_place(gm.graph) == 0, fn.__name__


def test_a_compiled_step_estimates_and_measures_the_in_place_loss_backward(monkeypatch):
    """memopt's estimate of a classifier step with a vocabulary-sized loss counts the
    log-softmax gradient written in place, and the measured peak matches it (the loss
    as written: ``blocked_cross_entropy`` would compute it without that gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4096))
    x, y = torch.randn(512, 64), torch.randint(0, 4096, (512,))
    loss = torch.compile(
        lambda x, y: torch.nn.functional.cross_entropy(model(x), y),
        backend="memopt",
        options={"codegen": "eager", "disable_passes": ["blocked_cross_entropy"]},
    )

    def step():
        loss(x, y).backward()

    import memopt.codegen.eager as eager

    rewritten: list[int] = []
    original = eager.write_in_place
    monkeypatch.setattr(eager, "write_in_place", lambda graph: rewritten.append(original(graph)) or rewritten[-1])
    with memopt.record() as explanation:
        step()
    assert sum(rewritten) >= 2  # the backward's log-softmax gradient and tanh's
    model.zero_grad(set_to_none=True)
    step()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(step).peak_growth_bytes
    estimated = explanation.timeline().peak_growth_bytes
    assert abs(measured - estimated) <= 0.03 * estimated, (measured, estimated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transpose", [False, True])
def test_dropout_backward_as_two_multiplications_is_bitwise(dtype, transpose):
    """Under eager codegen AOTAutograd traces ``native_dropout_backward`` on CPU as the
    two multiplications its ATen kernel runs (`memopt.codegen.eager.DECOMPOSITIONS`):
    out of place and written in place, the bits (and a strided gradient's layout) are
    the kernel's."""
    from memopt.codegen.eager import DECOMPOSITIONS

    decomposed = DECOMPOSITIONS[aten.native_dropout_backward.default]
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        grad, mask = torch.randn(4, 8, 33, 65).to(dtype), torch.rand(4, 8, 33, 65) > p
        if transpose:
            grad, mask = grad.transpose(1, 2), mask.transpose(1, 2)
        expected = aten.native_dropout_backward(grad, mask, 1 / (1 - p))
        ours = decomposed(grad, mask, 1 / (1 - p))
        assert torch.equal(ours, expected) and ours.stride() == expected.stride()
        written = grad.clone()
        aten.mul.out(written, mask, out=written)
        aten.mul.out(written, 1 / (1 - p), out=written)
        assert torch.equal(written, expected)


class _Attention(torch.nn.Module):
    """Scores, softmax, dropout, values: the dropout's backward is the step's peak."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 32)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        probs = self.dropout(torch.softmax(q @ x.transpose(-1, -2), dim=-1))
        return (probs @ x).sum()


def test_a_compiled_step_runs_dropout_backward_in_place():
    """A step whose peak under torch's ``aot_eager`` is an attention dropout's
    backward: memopt's eager codegen holds neither the kernel's scratch nor a second
    gradient-sized buffer there (the multiplications write into the dying gradient),
    two score-sized buffers less, and the step's peak moves to the forward's dropout,
    one score-sized buffer below ``aot_eager``'s, as estimated. Gradients are bitwise
    equal to ``aot_eager``'s (same masks: both draw with ``native_dropout``)."""
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(8, 512, 32)
    scores = 8 * 512 * 512 * 4

    def run(backend: str, **options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)

        def step():
            torch.manual_seed(1)
            compiled(x).backward()

        step()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        peak = measure_peak(step).peak_growth_bytes
        model.zero_grad(set_to_none=True)
        return grads, peak

    reference, torch_peak = run("aot_eager")
    with memopt.record() as explanation:
        grads, peak = run("memopt", codegen="eager")
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))
    step = explanation.region(0).step
    assert step is not None and step.backward is not None
    assert aten.native_dropout_backward.default not in [n.target for n in step.backward.graph.nodes]
    assert peak <= torch_peak - 0.95 * scores, (peak, torch_peak)
    timeline = explanation.timeline()
    assert timeline.points[timeline.peak_index].graph == "forward"
    assert abs(peak - timeline.peak_growth_bytes) <= 0.03 * peak, (peak, timeline.peak_growth_bytes)
