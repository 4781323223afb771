"""Precision lowering (``precision="bf16"|"fp16"``): the policy table decides each op's
dtype, parameters stay fp32 masters with fp32 gradients, values saved for backward are
low precision, user outputs keep their dtype; numbers stay close to fp32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt.analysis.memory import build_timeline
from memopt.config import MemoptConfig
from memopt.graph import meta
from memopt.passes.precision_policy import DEFAULT_POLICY, FP32, resolve_policy
from memopt.testing.numerics import run_training_step
from memopt.testing.training import final_loss, successor_tokens, train_losses
from memopt.testing.zoo import GPT, ZOO, GPTConfig, zoo_case

BF16 = {"codegen": "eager", "verify": True, "strict": True, "precision": "bf16"}
TINY_GPT = GPTConfig(vocab=64, context=32, dim=32, heads=2, layers=1)


def _gpt_inputs(batch: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, TINY_GPT.vocab, (batch, seq + 1))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _pass(explanation: memopt.Explanation, name: str) -> dict:
    return next(p for p in explanation.to_dict()["regions"][0]["passes"] if p["name"] == name)


def _nodes(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is target]


# -------------------------------------------------------------------- the policy


def test_policy_overrides_are_validated_and_applied():
    config = MemoptConfig.from_options({"precision": "bf16", "precision_policy": {"softmax": "fp32"}})
    assert resolve_policy(config.precision_policy)["softmax"] == FP32
    same = MemoptConfig.from_options({"precision": "bf16", "precision_policy": {"softmax": "fp32"}})
    assert hash(config) == hash(same) and config == same  # configs stay hashable
    with pytest.raises(TypeError, match="read-only"):
        config.precision_policy["linear"] = "fp32"  # type: ignore[index]
    assert DEFAULT_POLICY["softmax"] != FP32  # the override changed something
    with pytest.raises(ValueError, match=r"'softmx' is not a torch function.*Did you mean 'softmax'"):
        MemoptConfig.from_options({"precision_policy": {"softmx": "fp32"}})
    with pytest.raises(ValueError, match=r"mode 'half' for 'linear' is not allowed; choose one of 'low'"):
        MemoptConfig.from_options({"precision_policy": {"linear": "half"}})
    with pytest.raises(ValueError, match=r"precision='bf8' is not allowed; choose one of 'bf16', 'fp16', or None"):
        MemoptConfig.from_options({"precision": "bf8"})


def test_default_is_off_and_graph_untouched():
    model = GPT(TINY_GPT)
    explanation = memopt.explain(model, *_gpt_inputs(), options={"codegen": "eager", "strict": True})
    record = _pass(explanation, "precision")
    assert record["modified"] is False and record["details"] == {"why": "precision=None"}
    assert "bf16[" not in explanation.graph_code("forward")  # dtype annotations (paths may say bf16)


def test_a_policy_without_precision_warns_that_it_changes_nothing():
    """``precision_policy`` overrides the table the ``precision`` pass reads; with
    ``precision=None`` nothing reads it, and it was silently dropped."""
    model = nn.Linear(8, 8)
    options = {"codegen": "eager", "precision_policy": {"linear": "fp32"}}
    with pytest.warns(memopt.MemoptWarning, match=r"ignores precision_policy=\{'linear': 'fp32'\}: precision is None"):
        torch.compile(model, backend="memopt", options=options)(torch.randn(2, 8))


# ------------------------------------------------------------ structure of the graphs


def test_gpt_graphs_compute_matmuls_in_bf16_and_loss_in_fp32():
    """Every mm/addmm/bmm of forward and backward reads bf16; layer norms and the loss
    read fp32; one cast node per parameter, the tied embedding included."""
    model = GPT(TINY_GPT)
    explanation = memopt.explain(model, *_gpt_inputs(), options=BF16)
    step = explanation.region(0).step
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    for _, gm in step.graphs():
        seen = [n for n in gm.graph.nodes if n.target in matmuls]
        assert seen
        for node in seen:
            dtypes = {meta.tensor_value(a).dtype for a in node.all_input_nodes}
            assert dtypes == {torch.bfloat16}, (node.name, dtypes)
    for node in _nodes(step.forward, torch.ops.aten.native_layer_norm.default):
        assert meta.tensor_value(node.args[0]).dtype == torch.float32
    (loss,) = _nodes(step.forward, torch.ops.memopt.cross_entropy.default)  # blocked_cross_entropy
    # computed in fp32: the bf16 logits widened block by block (the precision pass's
    # fp32 cast of them, read by the loss alone, is folded into the op)
    assert meta.tensor_value(loss.args[0]).dtype == torch.bfloat16 and loss.args[4] is True
    (value,) = [u for u in loss.users if u.args[1] == 0]
    assert meta.tensor_value(value).dtype == torch.float32
    assert "aten.mm.default(" in explanation.graph_code("forward")

    dynamo = explanation.region(0).snapshots[1]
    assert (dynamo.graph, dynamo.after) == ("dynamo", "precision")
    casts = [line for line in dynamo.code.splitlines() if "parameters_weight_.to(torch.bfloat16)" in line]
    wte = [line for line in casts if "wte_parameters_weight_.to(" in line]
    assert len(wte) == 1  # embedding and lm_head share one copy
    params = [line.split("=")[1].split(".to(")[0].strip() for line in casts]
    assert len(params) == len(set(params))


def test_parameters_get_fp32_gradients_close_to_fp32_training():
    model = GPT(TINY_GPT)
    reference = copy.deepcopy(model)
    inputs = _gpt_inputs()
    compiled = torch.compile(model, backend="memopt", options=BF16)
    loss = compiled(*inputs)
    loss.backward()
    want = reference(*inputs)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        error = (p.grad - q.grad).norm() / q.grad.norm()
        assert error < 0.05, (name, float(error))  # bf16 has 8 mantissa bits: ~0.4% per op


def test_saved_activations_are_bf16():
    """Apart from the loss's log-probabilities (fp32 by policy), every saved value worth
    a byte count is bf16, and the saved total is about half of fp32's."""
    model = GPT(TINY_GPT)
    inputs = _gpt_inputs(batch=8)
    with memopt.record() as lowered:
        torch.compile(copy.deepcopy(model), backend="memopt", options=BF16)(*inputs).backward()
    torch._dynamo.reset()
    with memopt.record() as full:
        torch.compile(model, backend="memopt", options={**BF16, "precision": None})(*inputs).backward()
    saved = build_timeline(lowered.region(0).step).saved_activations()
    big = [iv for iv in saved if iv.nbytes >= 4096 and iv.node.target is not torch.ops.aten._log_softmax.default]
    assert big and all(meta.tensor_value(iv.node).dtype == torch.bfloat16 for iv in big), [
        (iv.name, meta.tensor_value(iv.node).dtype) for iv in big
    ]
    fp32_bytes = sum(iv.nbytes for iv in build_timeline(full.region(0).step).saved_activations())
    assert sum(iv.nbytes for iv in saved) < 0.65 * fp32_bytes


def test_user_outputs_keep_their_dtype():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    out = torch.compile(model, backend="memopt", options=BF16)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.02)


class _AutocastOff(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            kept = x @ self.w  # the user keeps this in fp32
        return (kept + x @ self.w).sum()


def test_torch_autocast_blocks_are_left_as_written():
    explanation = memopt.explain(_AutocastOff(), torch.randn(4, 8), options=BF16)
    details = _pass(explanation, "precision")["details"]
    assert details["skipped"] == {"inside a torch.autocast block": 1}
    assert details["ops"]["low"] == {"matmul": 1}
    (lowered,) = [entry for entry in details["lowered_nodes"] if entry["op"] == "matmul"]
    assert "test_precision.py" in lowered["source"] and "kept + x @ self.w" in lowered["source"]
    mms = _nodes(explanation.region(0).step.forward, torch.ops.aten.mm.default)
    assert sorted(str(meta.tensor_value(n).dtype) for n in mms) == ["torch.bfloat16", "torch.float32"]


class _SoftmaxInFp32(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.proj(x)
        if self.how == "keyword":
            return torch.softmax(scores, -1, dtype=torch.float32)
        if self.how == "positional":
            return torch.softmax(scores, -1, torch.float32)
        return scores.softmax(-1, torch.float32)  # the Tensor method, dtype positional


@pytest.mark.parametrize("how", ["keyword", "positional", "method"])
def test_an_explicit_dtype_is_left_as_written_however_it_is_passed(how):
    """``softmax(scores, -1, torch.float32)`` names its dtype as ``dtype=`` does. The
    pass only looked for the keyword: given positionally, the softmax was lowered
    (``fp32_low_out``) and its fp32 result rounded to bf16 (max error 9.1e-04 here
    against the fp32 softmax the user asked for)."""
    torch.manual_seed(0)
    model, x = _SoftmaxInFp32(how), torch.randn(16, 8)
    explanation = memopt.explain(model, x, options=BF16)
    details = _pass(explanation, "precision")["details"]
    assert details["skipped"] == {"explicit dtype= argument": 1}
    assert "softmax" not in details["ops"].get("fp32_low_out", {}) and details["rounded_results"] == 0
    compiled = torch.compile(model, backend="memopt", options=BF16)
    scores = F.linear(x.bfloat16(), model.proj.weight.bfloat16(), model.proj.bias.bfloat16())
    assert torch.equal(compiled(x), torch.softmax(scores, -1, dtype=torch.float32))


def test_policy_override_keeps_an_op_in_fp32():
    model = GPT(TINY_GPT)
    options = {**BF16, "precision_policy": {"softmax": "fp32"}}
    explanation = memopt.explain(model, *_gpt_inputs(), options=options)
    ops = _pass(explanation, "precision")["details"]["ops"]
    assert ops["fp32"]["softmax"] == 1 and "softmax" not in ops["fp32_low_out"]
    (softmax,) = _nodes(explanation.region(0).step.forward, torch.ops.aten._softmax.default)
    assert meta.tensor_value(softmax).dtype == torch.float32


def test_unlisted_op_given_mixed_dtypes_is_promoted():
    """With matmul taken out of the policy, attention's second matmul meets fp32
    probabilities (softmax kept fp32) and bf16 values: both are cast to fp32."""
    model = GPT(TINY_GPT)
    options = {**BF16, "precision_policy": {"matmul": "follow", "softmax": "fp32"}}
    explanation = memopt.explain(model, *_gpt_inputs(), options=options)
    assert _pass(explanation, "precision")["details"]["promoted"] == {"matmul": 1}
    bmms = _nodes(explanation.region(0).step.forward, torch.ops.aten.bmm.default)
    assert [str(meta.tensor_value(n).dtype) for n in bmms] == ["torch.bfloat16", "torch.float32"]


def test_mixed_dtypes_reaching_a_2d_matmul_are_promoted():
    """The rule of the test above for a 2-D product (``aten.mm``), whose fake kernel
    accepts an fp32 x bf16 product that the eager kernel rejects: the pass promotes
    without waiting for a failed fake run, and the step runs."""

    class ScoresTimesValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scores, self.values = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.scores(x), -1) @ self.values(x).T

    model, x = ScoresTimesValues(), torch.randn(4, 8)
    options = {**BF16, "precision_policy": {"matmul": "follow", "softmax": "fp32"}}
    explanation = memopt.explain(model, x, options=options)
    assert _pass(explanation, "precision")["details"]["promoted"] == {"matmul": 1}
    mms = _nodes(explanation.region(0).step.forward, torch.ops.aten.mm.default)
    assert [str(meta.tensor_value(n).dtype) for n in mms][-1] == "torch.float32"
    torch._dynamo.reset()
    torch.compile(model, backend="memopt", options=options)(x).sum().backward()


class _Cells(nn.Module):
    """A Linear feeding recurrent cells over time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gru, self.lstm = nn.Linear(8, 8), nn.GRUCell(8, 8), nn.LSTMCell(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[1], 8)
        for step in self.inp(x):
            h = self.gru(step, h)
            h, c = self.lstm(h, (h, c))
        return h.pow(2).mean()


class _EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.inp(x)).pow(2).mean()


class _Writes(nn.Module):
    """A lowered activation written into fp32 tensors by ops whose eager kernels want
    one dtype (their fake kernels accept the mix, or fail and log an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        added = torch.zeros(4, 8).index_add(0, idx, y)
        scattered = torch.zeros(4, 8).scatter_add(0, idx[:, None].expand(-1, 8), y)
        put = torch.zeros(4, 8)
        put[idx] = y  # index_put_
        return (added + scattered + put).pow(2).mean()


class _Spectral(nn.Module):
    """A Linear feeding a spectral filter (FFT, a complex weight, inverse FFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.filter = nn.Parameter(torch.randn(9, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(torch.fft.rfft(self.lin(x), dim=-1) * self.filter, n=16, dim=-1).pow(2).mean()


@pytest.mark.parametrize(
    "build",
    [
        lambda: (_Cells(), (torch.randn(3, 4, 8),), {"gru_cell", "lstm_cell"}, set()),
        lambda: (_EncoderLayer(), (torch.randn(4, 5, 8),), {"multi_head_attention_forward"}, set()),
        lambda: (_Writes(), (torch.randn(8, 8), torch.arange(8) % 4), set(), {"index_add", "scatter_add"}),
        lambda: (_Spectral(), (torch.randn(4, 16),), {"linear"}, set()),
    ],
    ids=["recurrent-cells", "multi-head-attention", "index-writes", "fft"],
)
def test_ops_that_want_one_dtype_run_under_lowering(build, caplog):
    """A bf16 activation reaching a recurrent cell, torch's multi-head attention or an
    indexed write with fp32 operands compiled (the fake kernels accept the mix) and
    then failed in the step ("mat1 and mat2 must have the same dtype"). The cells and
    attention now run in bf16, as autocast runs them; the writes are promoted, without
    a failed fake run that torch logs at ERROR level. A bf16 activation reaching
    ``torch.fft`` failed the pass ("Unsupported dtype BFloat16") and ran the region
    unlowered with a warning; the transforms now run in fp32, as autocast runs them."""
    torch.manual_seed(0)
    model, inputs, low_ops, promoted = build()
    reference = run_training_step(copy.deepcopy(model), list(inputs))
    torch._dynamo.reset()
    with caplog.at_level("ERROR"):
        compiled = torch.compile(model, backend="memopt", options=BF16)
        result = run_training_step(model, list(inputs), runner=compiled)  # same seed: same dropout
    torch._dynamo.reset()
    details = _pass(memopt.explain(model, *inputs, options=BF16), "precision")["details"]
    lowered = set(details["ops"].get("low", {}))
    assert lowered >= low_ops, lowered
    assert set(details["promoted"]) >= promoted, details["promoted"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text[:2000]
    assert abs(result.loss.item() - reference.loss.item()) <= 0.05 * abs(reference.loss.item()) + 1e-3
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name  # fp32 masters (a complex one stays complex)


class _Sine(torch.autograd.Function):
    """``sin(x @ w)`` with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.sin(x @ w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad = grad * torch.cos(x @ w)
        return grad @ w.t(), x.t() @ grad


class _Bodies(nn.Module):
    """A Linear's (lowered) result handed to a checkpointed function and to a custom
    ``autograd.Function``, each multiplying it by an fp32 parameter inside its body."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda v: F.gelu(self.mid(v)), self.inp(x), use_reentrant=False)
        return self.out(_Sine.apply(self.inp(x) + h, self.w)).pow(2).mean()


def test_checkpoint_and_autograd_function_bodies_run_as_traced():
    """A bf16 value passed to ``torch.utils.checkpoint`` or to a custom
    ``autograd.Function`` reached the body's matmul beside its fp32 parameter: the
    fake kernels accept the mix, so the step compiled and then failed ("mat1 and mat2
    must have the same dtype, but got BFloat16 and Float"). The bodies are not lowered:
    their operands are cast back to the dtypes they were traced with, and the report
    says so."""
    torch.manual_seed(0)
    model, x = _Bodies(), torch.randn(4, 8)
    reference = run_training_step(copy.deepcopy(model), [x])
    torch._dynamo.reset()
    result = run_training_step(model, [x], runner=torch.compile(model, backend="memopt", options=BF16))
    torch.testing.assert_close(result.loss, reference.loss, rtol=0.05, atol=1e-3)
    for name, grad in result.grads.items():
        torch.testing.assert_close(grad, reference.grads[name], rtol=0.1, atol=0.02, msg=name)
    torch._dynamo.reset()
    details = _pass(memopt.explain(model, x, options=BF16), "precision")["details"]
    assert details["skipped"] == {
        "inside the body of tag_activation_checkpoint": 1,
        "inside the body of autograd_function_apply": 1,
    }
    assert details["ops"]["low"] == {"linear": 3}


class _Recurrent(nn.Module):
    """An embedding feeding a bidirectional ``nn.LSTM``, a Linear feeding an ``nn.GRU``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(16, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(ids))
        out, _ = self.gru(self.proj(h))
        return out.pow(2).mean()


def test_whole_recurrent_layers_run_in_bf16_under_allow_rnn():
    """Under ``torch._dynamo.config.allow_rnn`` Dynamo traces ``nn.LSTM``/``nn.GRU`` as
    ``torch.lstm``/``torch.gru``, which the policy did not list: a bf16 activation
    reached them beside their fp32 weights, the fake kernels accepted it, and the step
    failed ("expected m1 and m2 to have the same dtype, but got: c10::BFloat16 !=
    float"). They now run in bf16 like the cells (and like CPU autocast's LSTM)."""
    torch.manual_seed(0)
    model, ids = _Recurrent(), torch.randint(0, 20, (3, 6))
    reference = run_training_step(copy.deepcopy(model), [ids])
    with torch._dynamo.config.patch(allow_rnn=True):
        torch._dynamo.reset()
        result = run_training_step(model, [ids], runner=torch.compile(model, backend="memopt", options=BF16))
        torch._dynamo.reset()
        details = _pass(memopt.explain(model, ids, options=BF16), "precision")["details"]
    assert {"lstm", "gru"} <= set(details["ops"]["low"]), details["ops"]
    torch.testing.assert_close(result.loss, reference.loss, rtol=0.05, atol=1e-3)
    for name, grad in result.grads.items():
        assert grad is not None and grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, reference.grads[name], rtol=0.1, atol=0.01, msg=name)


class _MaskedScores(nn.Module):
    """Attention scores masked with the minimum of the dtype the code sees, as Hugging
    Face's DeBERTa-v2 masks them (``masked_fill``) and others do with ``where``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.q, self.k, self.how = nn.Linear(8, 8), nn.Linear(8, 8), how

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        lowest = torch.finfo(scores.dtype).min
        if self.how == "masked_fill":
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = torch.where(mask, scores, lowest)
        return (scores.softmax(-1) @ x).pow(2).sum()


@pytest.mark.parametrize("how", ["masked_fill", "where"])
def test_a_mask_value_beyond_the_low_dtypes_range_is_saturated(how):
    """Dynamo traces ``torch.finfo(scores.dtype).min`` as fp32's -3.40e38, beyond
    bf16's range, and the pass makes ``scores`` bf16: ``masked_fill`` failed in the step
    ("value cannot be converted to type c10::BFloat16 without overflow": default
    DeBERTa-v2 with precision='bf16'), and ``where`` turned the value into -inf, so a
    fully masked row's softmax was NaN where eager's is uniform. The value is now bf16's
    own minimum, as the code would have read on bf16 scores; the step matches eager."""
    torch.manual_seed(0)
    model = _MaskedScores(how)
    x = torch.randn(2, 4, 8)
    mask = torch.rand(2, 4, 4) > 0.3
    mask[0, 1] = False  # a fully masked row
    reference = copy.deepcopy(model)
    want = reference(x, mask)
    want.backward()
    torch._dynamo.reset()
    got = torch.compile(model, backend="memopt", options=BF16)(x, mask)
    got.backward()
    assert torch.isfinite(got), got
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    scale = max(q.grad.abs().max().item() for q in reference.parameters())  # k's bias: zero up to rounding
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05 * scale, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()
    details = _pass(memopt.explain(model, x, mask, options=BF16), "precision")["details"]
    assert details["saturated_scalars"] == {how: 1}


def test_a_region_that_takes_no_tensor_is_lowered():
    """A region whose tensors are all made inside it (Hugging Face Wav2Vec2's
    SpecAugment mask, from numpy after a graph break) has no fake value on its inputs:
    the pass failed ("the graph's inputs carry no fake example values") and the region
    ran unlowered with a warning calling it a memopt bug. It now runs in the fake mode
    of the first tensor it makes."""

    def made_inside() -> torch.Tensor:
        return torch.ones(4, 8) @ torch.arange(32.0).reshape(8, 4) + 1

    torch._dynamo.reset()
    explanation = memopt.explain(made_inside, options=BF16)  # strict: a failed pass raises
    assert explanation.fallbacks == []
    details = _pass(explanation, "precision")["details"]
    assert details["ops"] == {"low": {"matmul": 1}}, details["ops"]
    torch._dynamo.reset()
    got = torch.compile(made_inside, backend="memopt", options=BF16)()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, made_inside())


def test_disable_passes_skips_lowering_and_unknown_names_raise():
    """The precision pass disabled: nothing is lowered, and memopt says once that the
    ``precision`` option is ignored (it said nothing); a misspelt pass name raises."""
    model = nn.Linear(8, 8)
    with pytest.warns(memopt.MemoptWarning, match=r"memopt ignores precision='bf16': disable_passes names 'precision'"):
        explanation = memopt.explain(model, torch.randn(2, 8), options={**BF16, "disable_passes": ["precision"]})
    assert _pass(explanation, "precision")["status"] == "skipped"
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown pass\(es\) \['precison'\]; memopt's passes are: precision"):
        memopt.explain(model, torch.randn(2, 8), options={**BF16, "disable_passes": ["precison"]})


def test_explain_reports_lowered_ops_bytes_and_measured_error():
    model = GPT(TINY_GPT)
    explanation = memopt.explain(model, *_gpt_inputs(), options=BF16)
    details = _pass(explanation, "precision")["details"]
    assert details["ops"]["low"]["linear"] == 5  # qkv, proj, two MLP layers, lm_head
    assert details["parameter_casts"] == 9  # the weights and biases of those linears, wte once
    assert details["value_bytes_after"] * 2 == details["value_bytes_before"]
    error = details["error"]
    assert error["measured"] is True
    assert set(error["grad_rel_error"]) == {n for n, _ in model.named_parameters()}
    assert 0 < error["grad_rel_error_max"] < 0.05
    assert error["grad_rel_error_max"] == error["grad_rel_error"][error["grad_rel_error_max_of"]]
    assert 0 < error["grad_rel_error_overall"] <= error["grad_rel_error_max"]
    text = explanation.report()
    assert "precision bfloat16: ops 1 fp32, 6 fp32_low_out, 7 low; 9 parameter casts" in text
    assert "measured on the example inputs: output rel. error" in text


def test_inference_and_graph_breaks_are_lowered_too():
    case = zoo_case("graph_break")
    model = case.build()
    x, target = case.inputs(4)
    with torch.no_grad(), memopt.record() as explanation:
        got = torch.compile(model, backend="memopt", options=BF16)(x, target)
    assert [r.kind for r in explanation.regions] == ["inference", "inference"]
    assert all(any(p.name == "precision" and p.modified for p in r.passes) for r in explanation.regions)
    torch.testing.assert_close(got, model(x, target), rtol=0.05, atol=1e-3)


def test_fp16_trains_with_grad_scaler():
    """fp16 compute with fp32 masters and torch.amp.GradScaler (dynamic loss scaling):
    gradients arrive scaled in fp32, the scaler unscales them, training follows fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    reference = copy.deepcopy(model)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    compiled = torch.compile(model, backend="memopt", options={**BF16, "precision": "fp16"})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(20):
        loss = F.mse_loss(compiled(x), y)
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref_loss = F.mse_loss(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert scaler.get_scale() == 2.0**12  # no overflow, no skipped step
    torch.testing.assert_close(loss, ref_loss, rtol=0.02, atol=0)


def test_short_training_runs_follow_fp32():
    """30 AdamW steps of a tiny GPT on the successor task: the loss with bf16 compute
    and with fp8-compressed activations stays within 1% of fp32's (the issue's bars
    for 200 steps are 2% and 3%; those runs, on larger models: docs/precision.md)."""
    torch.manual_seed(0)
    base = GPT(TINY_GPT)
    batches = successor_tokens(TINY_GPT.vocab, 8, 17, steps=30)
    finals = {}
    for name, extra in (("fp32", {}), ("bf16", {"precision": "bf16"}), ("fp8", {"compress_activations": "fp8"})):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", **extra})
        losses = train_losses(lambda b: compiled(b[:, :-1], b[:, 1:]), model.parameters(), batches)
        assert losses[-1] < 0.8 * losses[0], name  # it learns
        finals[name] = final_loss(losses, window=5)
    for name in ("bf16", "fp8"):
        assert abs(finals[name] - finals["fp32"]) < 0.01 * finals["fp32"], finals


def test_mutating_ops_get_fresh_casts():
    """A cast made before an in-place write is not reused after it."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a = x @ w
        x.mul_(2)
        return a + x @ w

    x, w = torch.randn(4, 4), torch.randn(4, 4)
    explanation = memopt.explain(f, x.clone(), w, options=BF16)
    code = explanation.graph_code("dynamo", after="precision")
    assert code.count(".to(torch.bfloat16)") == 4  # w and x before mul_, then both again
    got = torch.compile(f, backend="memopt", options=BF16)(x.clone(), w)
    torch.testing.assert_close(got, f(x.clone(), w), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_trains_with_bf16_and_int8_activations(name):
    """Every zoo model (BatchNorm buffers, dropout, tied weights, graph break, in-place
    input) compiles strictly with both options and follows fp32: loss within 1%, all
    gradients together within 3% (single near-zero gradients, like a conv bias before
    BatchNorm, have meaningless ratios)."""
    case = zoo_case(name)
    model = case.build().train()
    inputs = case.inputs(case.default_batch * 2)
    want = run_training_step(copy.deepcopy(model), inputs)
    compiled_model = copy.deepcopy(model)
    options = {**BF16, "compress_activations": "int8"}
    got = run_training_step(compiled_model, inputs, runner=torch.compile(compiled_model, backend="memopt", options=options))
    torch.testing.assert_close(got.loss, want.loss, rtol=0.01, atol=0)
    names = [n for n, g in want.grads.items() if g is not None]
    flat = [torch.cat([r.grads[n].flatten() for n in names]) for r in (got, want)]
    assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < 0.03
    for buffer, value in want.buffers.items():
        torch.testing.assert_close(got.buffers[buffer], value, rtol=0.02, atol=1e-3)


def test_dynamic_batch_is_lowered_and_compression_skips_symbolic_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    options = {**BF16, "compress_activations": "int8"}
    compiled = torch.compile(model, backend="memopt", dynamic=True, options=options)
    with memopt.record() as explanation:
        for batch in (40, 48):
            x = torch.randn(batch, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=0.05, atol=0.02)
    assert len(explanation.regions) == 1  # one compile serves both batch sizes
    passes = {p.name: p for p in explanation.region(0).passes}
    assert passes["precision"].modified
    assert passes["precision"].details["error"]["why"].startswith("dynamic shapes")
    plan = explanation.region(0).plan
    storage = plan.solver.get("storage") or plan.solver["storage_considered"]
    assert "dynamic shape (compression needs static shapes)" in storage["skipped"]


def test_dynamic_length_through_attention_with_dropout_is_compiled_once():
    """Pass ``precision`` and verification re-run the Dynamo graph on fake tensors.
    Without torch's Python dispatcher (which Dynamo runs with), torch 2.11's CPU
    ``scaled_dot_product_attention`` with dropout read the sequence length as an int,
    guarding it to the first example's: every length compiled again, and the bf16 graph
    was written out at that fixed length. Both now run ops as Dynamo does
    (`meta.running_fake`)."""
    torch.manual_seed(0)
    proj = nn.Linear(16, 48)

    def f(x: torch.Tensor) -> torch.Tensor:
        q, k, v = proj(x).view(2, x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).float().sum()

    compiled = torch.compile(f, backend="memopt", dynamic=True, options=BF16)
    with memopt.record() as explanation:
        for seq in (24, 40):
            compiled(torch.randn(2, seq, 16)).backward()
    assert len(explanation.regions) == 1  # one compile serves both lengths
    forward = explanation.region(0).step.forward.graph
    assert any(meta.is_symbolic(p) for p in forward.find_nodes(op="placeholder"))


# ------------------------------------------- Hugging Face layouts (issue 14, item 5)


class _Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: ``addmm(bias, x, weight)`` with the weight
    stored (in, out), not transposed as ``nn.Linear``'s; called twice, like a weight
    reused across positions or tied."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)
        h = torch.tanh(h)
        return torch.addmm(self.bias, h.view(-1, h.size(-1)), self.weight).view_as(h)


def test_conv1d_addmm_casts_its_weight_once_and_saves_no_weight_copy():
    """One bf16 cast node per parameter for both addmm calls; every saved floating
    activation is bf16; no saved value is a copy of a parameter (the fp32 master is
    alive anyway: ``recompute_saved_casts`` redoes the cast in backward)."""
    from memopt.passes.saved_casts import saved_cast_of

    model = _Conv1D(64, 64)
    x = torch.randn(8, 32, 64)
    explanation = memopt.explain(model, x, options=BF16)
    details = _pass(explanation, "precision")["details"]
    assert details["ops"]["low"] == {"addmm": 2} and details["parameter_casts"] == 2
    step = explanation.region(0).step
    parameters = {p for i, p in enumerate(step.forward.graph.find_nodes(op="placeholder")) if step.input_kind(i) == "parameter"}
    saved = build_timeline(step).saved_activations()
    assert saved
    for iv in saved:
        value = meta.tensor_value(iv.node)
        assert not value.is_floating_point() or value.dtype == torch.bfloat16, (iv.name, value.dtype)
        cast = saved_cast_of(iv.node)
        assert cast is None or cast.source not in parameters, iv.name
    assert all(meta.tensor_value(n).dtype == torch.bfloat16 for n in _nodes(step.forward, torch.ops.aten.addmm.default))
    compiled = copy.deepcopy(model)
    out = torch.compile(compiled, backend="memopt", options=BF16)(x)
    out.sum().backward()
    want = model(x)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.05)
    for p, q in zip(compiled.parameters(), model.parameters()):
        assert p.grad.dtype == torch.float32 and float((p.grad - q.grad).norm() / q.grad.norm()) < 0.03


class _Attention(nn.Module):
    """Projections around ``scaled_dot_product_attention`` with attention dropout, as
    Hugging Face GPT-2/BERT call it in training."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 4, mask: str = "bool", p: float = 0.1) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.mask, self.p = heads, kv_heads, mask, p
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim * kv_heads // heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, -1).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        kwargs: dict = {"is_causal": True} if self.mask == "causal" else {}
        if self.mask == "bool":
            kwargs["attn_mask"] = causal
        elif self.mask == "float":
            kwargs["attn_mask"] = torch.zeros(s, s).masked_fill(~causal, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p, enable_gqa=self.kv_heads != self.heads, **kwargs)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def test_cpu_attention_with_dropout_is_written_out_in_bf16():
    """CPU SDPA with dropout runs the math kernel, which upcasts bf16 inputs to fp32:
    the pass writes it out as its ops, so the probabilities saved for backward (before
    and after dropout) are bf16, and the saved bytes are below autocast's."""
    torch.manual_seed(0)
    model = _Attention()
    x = torch.randn(4, 64, 64)
    explanation = memopt.explain(model, x, options=BF16)
    details = _pass(explanation, "precision")["details"]
    assert sum(details["expanded_attention"].values()) == 1
    step = explanation.region(0).step
    (softmax,) = _nodes(step.forward, torch.ops.aten._safe_softmax.default)
    assert meta.tensor_value(softmax).dtype == torch.bfloat16
    saved = build_timeline(step).saved_activations()
    values = [v for iv in saved for v in torch.utils._pytree.tree_leaves(meta.fake_value(iv.node))]
    floating = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floating and all(v.dtype == torch.bfloat16 for v in floating), [v.dtype for v in floating]
    torch._dynamo.reset()
    with memopt.record() as autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(copy.deepcopy(model), backend="memopt", options={**BF16, "precision": None})(x)
        out.sum().backward()
    autocast_saved = sum(iv.nbytes for iv in build_timeline(autocast.region(0).step).saved_activations())
    assert sum(iv.nbytes for iv in saved) < autocast_saved


@pytest.mark.parametrize("mask,kv_heads", [("bool", 4), ("float", 4), ("causal", 4), ("bool", 2)])
def test_written_out_attention_matches_sdpa(mask, kv_heads):
    """The written-out attention computes what SDPA does (masks of each kind, grouped
    KV heads): a dropout probability of 1e-9 drops nothing but still takes the math
    path, so output and gradients compare with fp32 SDPA without dropout."""
    torch.manual_seed(0)
    model = _Attention(kv_heads=kv_heads, mask=mask, p=1e-9)
    reference = copy.deepcopy(model)
    reference.p = 0.0
    x = torch.randn(2, 16, 64)
    compiled = copy.deepcopy(model)
    with memopt.record() as explanation:
        out = torch.compile(compiled, backend="memopt", options=BF16)(x)
    assert sum(_pass(explanation, "precision")["details"]["expanded_attention"].values()) == 1
    out.sum().backward()
    want = reference(x)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.03)
    for (name, p), q in zip(compiled.named_parameters(), reference.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 0.03, name


def test_hf_gpt2_saves_less_than_autocast():
    """Hugging Face GPT-2 at its default config (dropout 0.1, SDPA, Conv1D, KV cache
    on), small sizes: memopt's estimated saved-activation bytes under bf16 are below
    those of ``torch.autocast`` around the same compile, and at most 65% of fp32's
    (the loss's fp32 log-probabilities, fp32 by policy, weigh more at this size).
    (Measured peaks at medium size: docs/precision.md.)"""
    from memopt.testing.hf import build

    model, kwargs = build("gpt2", batch=4, seq=64)

    def saved_bytes(options: dict, autocast: bool = False) -> int:
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="memopt", options={**BF16, "precision": None, **options})
        with memopt.record() as explanation:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = compiled(**kwargs).loss
            loss.backward()
        return sum(iv.nbytes for r in explanation.regions for iv in build_timeline(r.step).saved_activations())

    fp32, autocast, bf16 = saved_bytes({}), saved_bytes({}, autocast=True), saved_bytes({"precision": "bf16"})
    assert bf16 < autocast and bf16 <= 0.65 * fp32, (fp32, autocast, bf16)


def test_a_gradient_zero_up_to_rounding_is_named_not_maxed():
    """A bias added to every logit of a softmax row has a true gradient of zero (the
    softmax is invariant to it), so its fp32 reference is rounding noise and its
    relative error meaningless (BERT's key biases: 1.7e+05 in fp16). It is named, and
    the maximum is taken over the other gradients."""
    from memopt.analysis.error_probe import compare_with_reference

    def step(x, w, shift, low):
        logits = (x.to(low) @ w.to(low)).float() + shift  # shift: one number for every logit
        return (logits.softmax(dim=-1) * torch.arange(8.0)).sum()

    torch.manual_seed(0)
    inputs = [torch.randn(16, 8), torch.randn(8, 8, requires_grad=True), torch.randn(1, requires_grad=True)]
    result = compare_with_reference(
        lambda x, w, s: step(x, w, s, torch.float32), lambda x, w, s: step(x, w, s, torch.bfloat16), inputs,
        ["x", "w", "shift"],
    )
    assert result["grad_zero_up_to_rounding"] == ["shift"]
    assert result["grad_rel_error_max_of"] == "w"
    assert result["grad_rel_error_max"] == result["grad_rel_error"]["w"] < 0.05
    assert result["grad_rel_error"]["shift"] > 0.05  # what the maximum would have shown

    # A tiny gradient computed wrongly is not rounding noise: it stays in the maximum.
    def tiny_term(scale):
        return lambda x, w, s, t: step(x, w, s, torch.float32) + scale * t.sum()

    result = compare_with_reference(tiny_term(1e-9), tiny_term(1e-5), [*inputs, torch.ones(4, requires_grad=True)],
                                    ["x", "w", "shift", "tiny"])
    assert "tiny" not in result["grad_zero_up_to_rounding"] and result["grad_rel_error_max_of"] == "tiny"


def test_a_graph_already_in_the_policys_dtypes_is_reported_unchanged():
    """The region after a graph break computing a loss from fp32 logits: the loss is an
    ``fp32`` op whose inputs are fp32 already, so no cast is inserted. The pass said it
    changed the graph: the report printed "precision bfloat16: ops 1 fp32; 0 parameter
    casts (0 B); values lowered 0" for it and the error probe ran the region twice."""

    def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    logits = torch.randn(8, 16, requires_grad=True)
    explanation = memopt.explain(loss_of, logits, torch.randint(0, 16, (8,)), options=BF16)
    record = _pass(explanation, "precision")
    assert record["modified"] is False
    assert record["details"]["ops"] == {"fp32": {"cross_entropy": 1}}  # looked up, nothing to cast
    assert "precision bfloat16" not in explanation.report()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_model_already_in_bf16_is_left_as_written_and_told_so(precision):
    """A model converted with ``model.to(torch.bfloat16)``: ``precision="bf16"`` widened
    its LayerNorms' inputs to fp32 (the policy's ``fp32_low_out``), saving fp32 copies
    eager never makes (estimated growth 235,544 B against 205,568 B without the option
    on a 3-layer MLP) and moving every gradient ~1% off eager's; ``"fp16"`` also cast
    every bf16 weight to an fp16 copy (14 parameter casts, 102 KiB). Both said nothing.
    Now the ops whose inputs were half as written are left alone (gradients bitwise
    eager's, the same graphs as without the option) and one warning says why."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16)]
    model = nn.Sequential(*layers, nn.Linear(16, 4)).to(torch.bfloat16)
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    options = {"codegen": "eager", "verify": True, "strict": True, "precision": precision}
    with pytest.warns(memopt.MemoptWarning, match=rf"precision='{precision}' changes nothing here: the 5 op\(s\) .* "
                      r"already compute in bfloat16 as the model is written"):  # fmt: skip
        with memopt.record() as lowered:
            torch.compile(model, backend="memopt", options=options)(x).float().sum().backward()
    details = _pass(lowered, "precision")["details"]
    assert details["skipped"] == {"inputs already bfloat16 as written": 5}
    assert details["parameter_casts"] == 0 and details["rounded_results"] == 0
    torch._dynamo.reset()
    with memopt.record() as unlowered:
        torch.compile(plain, backend="memopt", options={**options, "precision": None})(x).float().sum().backward()
    assert lowered.estimated_peak_bytes == unlowered.estimated_peak_bytes
    reference(x).float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, q.grad), name


def test_fp32_inputs_to_a_bf16_model_are_still_lowered():
    """The rule above is per op: a bf16 model fed fp32 inputs (eager fails: "mat1 and
    mat2 must have the same dtype") still has the fp32 input cast for its first Linear."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    options = {"codegen": "eager", "verify": True, "strict": True, "precision": "bf16"}
    explanation = memopt.explain(model, torch.randn(4, 8), options=options)
    details = _pass(explanation, "precision")["details"]
    assert details["ops"]["low"] == {"linear": 1} and details["activation_casts"] >= 1
    assert details["skipped"] == {}
