"""The offload custom ops called directly and inside ``torch.compile``: values come
back bitwise equal, handles never collide, the ops trace and pass opcheck."""

from __future__ import annotations

import gc

import pytest
import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime import get_store
from offload_testing import recording_backend

ops = torch.ops.memopt
CPU = torch.device("cpu")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _round_trip(value: torch.Tensor, store_id: str, name: str = "v") -> torch.Tensor:
    token = ops.offload(value, store_id, name)
    token2 = ops.reload_start(token)
    return ops.reload_wait(token2, list(value.shape), value.dtype, value.device)


def _sample(dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(5, 7) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, (5, 7))
    x = torch.randn(5, 7).to(dtype)
    x[0, 0], x[0, 1], x[0, 2] = float("nan"), float("inf"), -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_round_trip_is_bitwise(store_id, dtype):
    value = _sample(dtype)
    back = _round_trip(value, store_id)
    assert back.dtype == dtype and back.shape == value.shape and back.is_contiguous()
    assert torch.equal(_bits(back), _bits(value))


@pytest.mark.parametrize("shape", [(), (0, 3)])
def test_round_trip_of_scalars_and_empty_tensors(store_id, shape):
    value = torch.randn(shape)
    assert torch.equal(_round_trip(value, store_id), value)


def test_non_contiguous_value_comes_back_contiguous(store_id):
    """A non-contiguous value is stored as its contiguous copy: same size, dtype and
    values, contiguous strides."""
    base = torch.randn(6, 8)
    for value in (base.t(), base[1:5, ::2]):
        assert not value.is_contiguous()
        back = _round_trip(value, store_id)
        assert back.is_contiguous() and back.shape == value.shape
        assert torch.equal(_bits(back), _bits(value))


def test_two_outstanding_handles_of_one_value(store_id):
    """Two forwards before one backward (gradient accumulation): each offload gets its
    own handle, and each comes back, in any order."""
    value = torch.randn(4, 4)
    first, second = ops.offload(value, store_id, "v"), ops.offload(value, store_id, "v")
    assert first.dtype == torch.int64 and first.dim() == 0 and first.device == CPU
    assert int(first) != int(second)
    for token in (second, first):
        back = ops.reload_wait(ops.reload_start(token), [4, 4], torch.float32, CPU)
        assert torch.equal(back, value)
    assert get_store(store_id).stats().handles == 0


def test_reload_wait_takes_the_offload_token_too(store_id):
    value = torch.randn(3)
    token = ops.offload(value, store_id, "v")
    assert torch.equal(ops.reload_wait(token, [3], torch.float32, CPU), value)


def test_second_reload_is_a_clear_error(store_id):
    """retain_graph=True double backward: the handle is brought back once."""
    token = ops.offload(torch.randn(3), store_id, "v")
    ops.reload_wait(ops.reload_start(token), [3], torch.float32, CPU)
    with pytest.raises(MemoptOffloadError, match="retain_graph"):
        ops.reload_start(token)


def test_wrong_metadata_is_a_clear_error(store_id):
    value = torch.randn(3)
    token = ops.offload(value, store_id, "v")
    with pytest.raises(MemoptOffloadError, match="wrong metadata"):
        ops.reload_wait(token, [4], torch.float32, CPU)
    with pytest.raises(MemoptOffloadError, match="wrong metadata"):
        ops.reload_wait(token, [3], torch.float64, CPU)
    assert torch.equal(ops.reload_wait(token, [3], torch.float32, CPU), value)


def test_opcheck_reload_start(store_id):
    token = ops.offload(torch.randn(3), store_id, "v")
    torch.library.opcheck(ops.reload_start.default, (token,))


def test_opcheck_offload(store_id):
    """Every opcheck test passes except the AOT-dispatch comparison, which calls the op
    twice and finds two different tokens: a fresh handle per call is the contract.
    AOTAutograd tracing is covered by the aot_eager test below."""
    results = torch.library.opcheck(ops.offload.default, (torch.randn(3), store_id, "v"),
                                    raise_exception=False)
    aot = results.pop("test_aot_dispatch_dynamic")
    assert set(results.values()) == {"SUCCESS"}, results
    assert "Outputs of the operator are different" in str(aot)


@pytest.mark.parametrize("check", ["test_schema", "test_autograd_registration", "test_faketensor"])
def test_opcheck_reload_wait(store_id, check):
    """One opcheck test per fresh handle (each reload consumes its handle); the
    AOT-dispatch test, which reloads one handle twice, is covered by aot_eager below."""
    token = ops.offload(torch.randn(2, 3), store_id, "v")
    torch.library.opcheck(ops.reload_wait.default, (token, [2, 3], torch.float32, CPU),
                          test_utils=check)


def _offloading_mm_relu(store_id: str) -> type[torch.autograd.Function]:
    class MmRelu(torch.autograd.Function):
        """relu(x @ w) that offloads ``h = x @ w`` and brings it back in backward."""

        @staticmethod
        def forward(ctx, x, w):
            h = x @ w
            ctx.save_for_backward(x, w, ops.offload(h, store_id, "h"))
            ctx.h_shape = list(h.shape)
            return h.relu()

        @staticmethod
        def backward(ctx, grad):
            x, w, token = ctx.saved_tensors
            started = ops.reload_start(token)
            h = ops.reload_wait(started, ctx.h_shape, grad.dtype, grad.device)
            grad_h = grad * (h > 0)
            return grad_h @ w.t(), x.t() @ grad_h

    return MmRelu


def _grads(fn, x, w):
    """Gradients of a loss that calls ``fn`` twice before one backward (accumulation)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    (fn(x, w).square().sum() + fn(x, w).sum()).backward()
    return x.grad, w.grad


def test_ops_in_compiled_function_give_bitwise_gradients(store_id):
    """A hand-written Function offloading in forward and reloading in backward, compiled
    through Dynamo and AOTAutograd: the forward graph holds the offload, the backward
    graph the reloads, and the gradients equal eager autograd's bit for bit (two
    forwards before one backward: two handles outstanding)."""
    mm_relu = _offloading_mm_relu(store_id)
    backend, codes = recording_backend()
    compiled = torch.compile(lambda x, w: mm_relu.apply(x, w), backend=backend, fullgraph=True)
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    got = _grads(compiled, x, w)
    want = _grads(lambda x, w: (x @ w).relu(), x, w)
    assert all(torch.equal(g, e) for g, e in zip(got, want))
    (forward,), (backward,) = codes["forward"], codes["backward"]
    assert "torch.ops.memopt.offload.default(" in forward
    assert "reload" not in forward
    assert "torch.ops.memopt.reload_start.default(" in backward
    assert "torch.ops.memopt.reload_wait.default(" in backward
    gc.collect()
    assert get_store(store_id).stats().handles == 0


def test_ops_under_aot_eager_give_bitwise_gradients(store_id):
    """The same under backend="aot_eager", whose min-cut partitioner moves the reloads
    (dependent on forward values only) into the forward and saves what backward needs
    of the reloaded value: placement aside, the gradients stay bitwise equal."""
    mm_relu = _offloading_mm_relu(store_id)
    compiled = torch.compile(lambda x, w: mm_relu.apply(x, w), backend="aot_eager", fullgraph=True)
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    got = _grads(compiled, x, w)
    want = _grads(lambda x, w: (x @ w).relu(), x, w)
    assert all(torch.equal(g, e) for g, e in zip(got, want))
    gc.collect()
    assert get_store(store_id).stats().handles == 0


def _graph_calling(op: torch._ops.OpOverload, *args: object) -> torch.fx.GraphModule:
    """A graph whose one call is ``op(token, *args)`` on a placeholder token."""
    graph = torch.fx.Graph()
    token = graph.placeholder("token")
    graph.output(graph.call_function(op, (token, *args)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("op, args", [
    (ops.offload.default, ("disk", "v")),
    (ops.reload_start.default, ()),
    (ops.reload_wait.default, ([4], torch.float32, torch.device("cuda"))),
])  # fmt: skip
def test_offload_ops_stay_out_of_cuda_graphs(op, args):
    """Inductor's own test of what a CUDA graph may not capture finds each op: under
    ``mode="reduce-overhead"`` a replay would not call the store (the value of the
    capture handed back, the store's handles never reloaded). Before the tag, a
    ``reload_wait`` (a CUDA output) went into a cudagraph partition."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    gm = _graph_calling(op, *args)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.Tag.cudagraph_unsafe in op.tags
    assert get_first_incompatible_cudagraph_node(gm) is call
