"""Compressed saved activations (``compress_activations="bf16"|"fp8"|"int8"``): only
true activations are stored compressed, forward results are unchanged, backward reads
the restored values, and the saved bytes shrink as the format says."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import memopt
from memopt.analysis.aliasing import analyze_aliasing
from memopt.analysis.compressible import MIN_ELEMENTS, saved_storages
from memopt.analysis.memory import build_timeline
from memopt.analysis.value_ops import VIEW_OPS
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.graph.verify import verify_step
from memopt.passes.compress import CompressionChoice, compress_saved_values
from memopt.testing.capture import capture_step
from memopt.testing.measure import measure_peak
from memopt.testing.zoo import GPT, GPTConfig, zoo_case
from memopt.units import format_bytes

EAGER = {"codegen": "eager", "verify": True, "strict": True}
GPT_CONFIG = GPTConfig(vocab=128, context=64, dim=64, heads=4, layers=2)


def _gpt_inputs(batch: int = 4, seq: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, GPT_CONFIG.vocab, (batch, seq + 1))
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _train_step(model: nn.Module, inputs: tuple[torch.Tensor, ...], options: dict | None):
    """Loss, gradients and the final step graphs of one compiled training step (the
    RNG seeded alike, so dropout draws the same masks)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={**EAGER, **(options or {})})
    with memopt.record() as explanation:
        torch.manual_seed(0)
        loss = compiled(*inputs)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, explanation


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def _grad_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Relative L2 error of all gradients together."""
    return float((_flat(got) - _flat(want)).norm() / _flat(want).norm())


def _saved_bytes(explanation: memopt.Explanation) -> int:
    return sum(iv.nbytes for r in explanation.regions for iv in build_timeline(r.step).saved_activations())


@pytest.fixture(scope="module")
def gpt_runs() -> dict[str, tuple]:
    """One uncompressed and one run per format of the same GPT on the same batch."""
    torch.manual_seed(0)
    model, inputs = GPT(GPT_CONFIG), _gpt_inputs()
    runs = {}
    for fmt in (None, "bf16", "int8", "fp8"):
        runs[str(fmt)] = _train_step(copy.deepcopy(model), inputs, {"compress_activations": fmt})
    return runs


# ------------------------------------------------------------------ eligibility


def _reasons(fn, *args, fmt: str = "fp8") -> dict[str, str | None]:
    step = capture_step(fn, *args)
    return {v.name: g.reason for g in saved_storages(step, fmt) for v in g.values}


def test_parameters_masks_small_and_returned_values_are_not_compressed():
    def f(x, w, small):
        h = torch.tanh(x @ w)  # tanh saves its output: a true activation
        kept = F.dropout(h, 0.5, True)  # saves a bool mask
        s = torch.sigmoid(small)  # saves a tiny output
        return (kept @ w).sum() + s.sum()

    x, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    reasons = _reasons(f, x, w, torch.randn(8, requires_grad=True))
    by_reason = sorted(set(reasons.values()), key=str)
    assert None in by_reason  # the tanh output
    assert "parameter, input or a view of one" in by_reason  # w
    assert "not a floating tensor (masks, indices and symbols are kept exact)" in by_reason
    assert f"fewer than {MIN_ELEMENTS} elements" in by_reason


def test_values_returned_to_the_caller_are_kept():
    def f(x, w):
        h = torch.tanh(x @ w)
        return (h @ w).sum(), h

    x, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    assert "also returned to the caller" in _reasons(f, x, w).values()


def _masked_attention(q, k, v):
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    additive = torch.zeros(64, 64).masked_fill(~mask, float("-inf"))  # saved by attention
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive).sum()


def test_masks_holding_infinities_are_kept_in_block_formats():
    q, k, v = (torch.randn(2, 2, 64, 32, requires_grad=True) for _ in range(3))
    reason = "may hold infinities (e.g. a -inf attention mask)"
    assert reason in _reasons(_masked_attention, q, k, v, fmt="int8").values()
    assert reason not in _reasons(_masked_attention, q, k, v, fmt="bf16").values()  # bf16 has inf


def _transposed_activation(x, w, v):
    return (torch.tanh((x @ w).t() * 2) @ v).sum()  # tanh's output has transposed strides


def test_permuted_dense_values_are_stored_in_storage_order():
    """An elementwise result of a transposed input is dense but not contiguous: it is
    read in storage order (a permute, no copy) and restored with its strides."""
    x, w, v = torch.randn(64, 96), torch.randn(96, 96, requires_grad=True), torch.randn(64, 8)
    step = capture_step(_transposed_activation, x, w, v)
    (group,) = [g for g in saved_storages(step, "bf16") if g.eligible]
    assert group.order == (1, 0)
    grads = []
    for fmt in (None, "bf16"):
        torch._dynamo.reset()
        w.grad = None
        options = {**EAGER, "compress_activations": fmt}
        torch.compile(_transposed_activation, backend="memopt", options=options)(x, w, v).backward()
        grads.append(w.grad.clone())
    error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert 0 < error < 0.01  # bf16 rounding only: a wrong layout would scramble it


def test_relu_outputs_keep_their_zeros():
    """ReLU's backward keeps gradients where its saved output is positive; int8/fp8
    round small positives to zero, so those outputs are only stored as bf16."""

    def f(x, w):
        return (torch.relu(x @ w) @ w).sum()

    x, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    reason = "backward reads its signs or zeros (ReLU), which block rounding flips"
    assert reason in _reasons(f, x, w, fmt="int8").values()
    assert None in _reasons(f, x, w, fmt="bf16").values()


def test_copies_of_parameters_are_not_activations():
    def f(x, w):
        return (x.bfloat16() @ w.bfloat16()).float().sum()

    x, w = torch.randn(64, 64), torch.randn(64, 64, requires_grad=True)
    reasons = _reasons(f, x, w)
    assert "a dtype copy of a parameter or input" in reasons.values()


# ------------------------------------------------------------- graphs and numbers


def _made_by_compression(node: torch.fx.Node) -> bool:
    quantize = torch.ops.memopt.quantize_blockwise.default
    return node.target in (quantize, torch.ops.aten.permute.default) or (
        node.target is operator.getitem and node.args[0].target is quantize
    )


def test_fp8_graphs_store_codes_and_restore_before_use(gpt_runs):
    loss, grads, explanation = gpt_runs["fp8"]
    step = explanation.region(0).step
    forward, backward = explanation.graph_code("forward"), explanation.graph_code("backward")
    assert "memopt.quantize_blockwise.default(" in forward
    assert "memopt.dequantize_blockwise.default(" in backward
    assert "aten.as_strided.default(" in backward  # saved transposes rebuilt from their base
    saved = [meta.tensor_value(n) for n, _ in step.saved_pairs()]
    assert sum(v.dtype == torch.float8_e4m3fn for v in saved) >= 10
    aliasing = analyze_aliasing(step.forward.graph)
    forward_order = {n: i for i, n in enumerate(step.forward.graph.nodes)}
    for q in step.forward.graph.nodes:  # nothing reads a compressed storage afterwards
        if q.target is torch.ops.memopt.quantize_blockwise.default:
            storage = aliasing.storages_of(q.args[0])[0]
            readers = [u for n in step.forward.graph.nodes if storage in aliasing.storages_of(n) for u in n.users]
            assert all(forward_order[u] <= forward_order[q] for u in readers if u.op != "output" and u is not q)
            # ... and codes are made right after the last computation that reads it, not
            # after the detach/transpose views AOTAutograd puts at the end of forward
            last = q.prev
            while _made_by_compression(last):  # several storages may share their last reader
                last = last.prev
            assert last.target not in VIEW_OPS, (q.name, last.name)
            assert last in readers or storage in aliasing.storages_of(last), (q.name, last.name)
    assert all(n.users for n in step.forward.graph.nodes if n.target in VIEW_OPS)  # no dead views left
    order = {n: i for i, n in enumerate(step.backward.graph.nodes)}
    for node in step.backward.graph.nodes:
        if node.target is torch.ops.memopt.dequantize_blockwise.default:
            users = [order[u] for u in node.users] + [order[u] for v in node.users for u in v.users]
            assert min(users) > order[node]


def test_forward_is_unchanged_and_gradients_follow_the_format(gpt_runs):
    """Compression only touches what backward reads: the loss is bit-identical; the
    gradient error grows as the format coarsens (bf16, int8 per-block, fp8 e4m3)."""
    reference_loss, reference, _ = gpt_runs["None"]
    errors = {}
    for fmt in ("bf16", "int8", "fp8"):
        loss, grads, _ = gpt_runs[fmt]
        assert torch.equal(loss, reference_loss)
        errors[fmt] = _grad_error(grads, reference)
    assert 0 < errors["bf16"] < errors["int8"] < errors["fp8"] < 0.1, errors


def test_fp8_saved_bytes_at_most_30_percent_and_peak_lower(gpt_runs):
    _, _, full = gpt_runs["None"]
    _, _, fp8 = gpt_runs["fp8"]
    assert _saved_bytes(fp8) <= 0.30 * _saved_bytes(full)
    details = next(p for p in fp8.to_dict()["regions"][0]["passes"] if p["name"] == "compress_activations")["details"]
    assert details["saved_bytes_before"] == _saved_bytes(full)
    for entry in details["compressed"]:
        assert 0 < entry["rel_error"] < 0.04  # e4m3: 3 mantissa bits
        assert entry["bytes_after"] * 3 < entry["bytes_before"]
    assert f"saved activations {format_bytes(_saved_bytes(full))} ->" in fp8.report()

    torch.manual_seed(0)
    model, inputs = GPT(GPT_CONFIG), _gpt_inputs(batch=16)
    peaks = {}
    for fmt in (None, "fp8"):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="memopt", options={**EAGER, "compress_activations": fmt})
        compiled(*inputs).backward()
        peaks[fmt] = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes
    assert peaks["fp8"] < 0.75 * peaks[None], peaks


def test_dropout_masks_are_stored_as_exact_bits():
    """Masks are never rounded: int8 for the values, masks packed eight per byte
    (`tests/codegen/test_bitpack.py` checks the packing is exact)."""
    case = zoo_case("transformer_block")
    model = case.build().train()
    inputs = case.inputs(8)
    _, want, _ = _train_step(copy.deepcopy(model), inputs, None)
    _, got, explanation = _train_step(copy.deepcopy(model), inputs, {"compress_activations": "int8"})
    saved = [meta.tensor_value(n) for n, _ in explanation.region(0).step.saved_pairs()]
    assert not any(v.dtype == torch.bool for v in saved)
    assert any(v.dtype == torch.uint8 for v in saved) and any(v.dtype == torch.int8 for v in saved)
    assert _grad_error(got, want) < 0.02
    details = next(p for p in explanation.region(0).passes if p.name == "compress_activations").details
    masks = [c for c in details["compressed"] if c["dtype"] == "bool"]
    assert len(masks) == 3 and all(c["format"] == "bits" and c["rel_error"] == 0 for c in masks)
    assert all(c["bytes_after"] * 8 == c["bytes_before"] for c in masks)


# ------------------------------------------------------------ the decisions API


def test_compress_saved_values_follows_a_per_value_decision_map():
    """What a planner would call: compress two chosen values, each its own way."""
    torch.manual_seed(0)
    step = capture_step(GPT(GPT_CONFIG), *_gpt_inputs())
    eligible = [g for g in saved_storages(step, "int8") if g.eligible]
    first, second = eligible[0], eligible[-1]
    decisions = {v: CompressionChoice("int8", block_size=32) for v in first.values}
    decisions.update({v: CompressionChoice("bf16") for v in second.values})
    done = compress_saved_values(step, decisions)
    step.recompile()
    verify_step(step)
    assert [c.base for c in done] == [first.base, second.base]
    assert done[0].bytes_after == first.nbytes // 4 + 4 * (first.nbytes // 4 // 32)
    saved = [meta.tensor_value(n).dtype for n, _ in step.saved_pairs()]
    assert saved.count(torch.int8) == 1


def _shared_storage_step() -> tuple[StepGraphs, tuple[torch.Tensor, ...]]:
    """A hand-built pair saving ``h`` and its transpose (one storage, two saved
    values), traced in one fake mode as AOTAutograd would; and real inputs."""
    mode = FakeTensorMode()

    def forward(primals_1, primals_2):
        h = torch.tanh(primals_1 @ primals_2)
        return h.sum(), h, h.t(), primals_1

    def backward(h, ht, x, tangents_1):
        return ((1 - h * h) * tangents_1) @ ht + x, None

    real = (torch.randn(64, 64), torch.randn(64, 64))
    with mode:
        x, w = (mode.from_tensor(t) for t in real)
        h = torch.tanh(x @ w)
        tangent = torch.ones(())
    fw = make_fx(forward, tracing_mode="fake")(x, w)
    bw = make_fx(backward, tracing_mode="fake")(h, h.t(), x, tangent)
    return StepGraphs(fw, bw, 1, region="hand"), real


def _run_pair(step: StepGraphs, real: tuple[torch.Tensor, ...]) -> torch.Tensor:
    outputs = step.forward(*real)
    return step.backward(*outputs[step.num_fwd_outputs :], torch.ones(()))[0]


def test_views_sharing_a_storage_are_restored_from_one_copy():
    step, real = _shared_storage_step()
    want = _run_pair(step, real)
    (group,) = [g for g in saved_storages(step, "fp8", min_elements=0) if g.eligible]
    assert [v.name for v in group.values] == ["tanh", "t"]
    compress_saved_values(step, {v: CompressionChoice("fp8") for v in group.values})
    step.recompile()
    verify_step(step)
    code = step.backward.code
    assert code.count("memopt.dequantize_blockwise.default(") == 1
    assert code.count("aten.as_strided.default(") == 1
    got = _run_pair(step, real)
    assert 0 < float((got - want).norm() / want.norm()) < 0.1


def test_bad_decisions_raise_before_changing_anything():
    step, _ = _shared_storage_step()
    before = step.forward.code
    h, ht, x = step.saved_outputs()
    with pytest.raises(ValueError, match=r"cannot compress saved value\(s\) \['primals_1_1'\] as fp8: parameter, input"):
        compress_saved_values(step, {x: CompressionChoice("fp8")})
    with pytest.raises(ValueError, match=r"\['mm'\] are not saved tensors"):
        compress_saved_values(step, {h.args[0]: CompressionChoice("fp8")})
    with pytest.raises(ValueError, match="share one storage but were given different choices"):
        compress_saved_values(step, {h: CompressionChoice("fp8"), ht: CompressionChoice("int8")})
    with pytest.raises(ValueError, match="'bf8' is not one of"):
        CompressionChoice("bf8")
    assert step.forward.code == before


@pytest.mark.inductor
def test_precision_and_compression_with_inductor():
    """One Inductor compile (C++ on CPU): bf16 compute and int8 saved activations run
    as extern kernels inside Inductor's graphs and train like eager memopt."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 1))
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    options = {"precision": "bf16", "compress_activations": "int8", "strict": True}
    results = []
    for codegen in ("eager", "inductor"):
        torch._dynamo.reset()
        copy_ = copy.deepcopy(model)
        with memopt.record() as explanation:
            loss = F.mse_loss(torch.compile(copy_, backend="memopt", options={**options, "codegen": codegen})(x), y)
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in copy_.named_parameters()}))
    assert explanation.region(0).compiled_graphs == ["forward", "backward"]
    assert "memopt.quantize_blockwise.default(" in explanation.region(0).step.forward.code
    (eager_loss, eager), (inductor_loss, inductor) = results
    torch.testing.assert_close(inductor_loss, eager_loss, rtol=0.02, atol=0)
    assert _grad_error(inductor, eager) < 0.05


def test_with_precision_the_sources_of_recast_copies_are_compressed(gpt_runs):
    """``precision="bf16"``: the plan compresses the saved fp32 copies of bf16 values
    (a norm's input, the loss's logits), then ``recompute_saved_casts`` saves their
    bf16 sources instead. The compression stayed planned on the copies, no longer
    saved, and the sources were kept uncompressed (the zoo GPT at the benchmark's size
    saved 0.296 of fp32's bytes against 0.266 with fp8 alone): it now goes to the
    source."""
    torch.manual_seed(0)
    model, inputs = GPT(GPT_CONFIG), _gpt_inputs()
    _, grads, explanation = _train_step(model, inputs, {"compress_activations": "fp8", "precision": "bf16"})
    details = next(p for p in explanation.region(0).passes if p.name == "compress_activations").details
    assert details["not_saved"] == []
    assert details["carried_to_source"]  # the fp32 copies' compression went to their bf16 sources
    step = explanation.region(0).step
    uncompressed = [g.values[0].name for g in saved_storages(step, "fp8") if g.eligible]
    assert uncompressed == []
    assert _saved_bytes(explanation) <= _saved_bytes(gpt_runs["fp8"][2])
    assert _grad_error(grads, gpt_runs["None"][1]) < 0.1


def test_the_reported_error_median_is_over_the_lossy_values_only():
    """Dropout masks packed to bits round-trip exactly (error 0); counted in the report's
    median, three masks beside one fp8 value made it read "median 0.00e+00"."""
    lin = nn.Linear(64, 64)

    def f(x):
        h = torch.tanh(lin(x))  # saves its fp8-compressible output
        for _ in range(3):
            h = F.dropout(h, 0.1, training=True)  # each saves a bool mask
        return h.sum()

    explanation = memopt.explain(f, torch.randn(32, 64), options={**EAGER, "compress_activations": "fp8"})
    record = next(p for p in explanation.region(0).passes if p.name == "compress_activations")
    formats = sorted(c["format"] for c in record.details["compressed"])
    assert formats == ["bits", "bits", "bits", "fp8"]
    fp8_error = next(c["rel_error"] for c in record.details["compressed"] if c["format"] == "fp8")
    assert 0.005 < fp8_error < 0.05
    line = next(line for line in record.summary if "round-trip" in line)
    assert f"median {fp8_error:.2e}, max {fp8_error:.2e} (masks packed to bits are exact)" in line
