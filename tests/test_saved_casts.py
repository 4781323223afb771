"""recompute_saved_casts: saved dtype copies (low-precision weight copies, fp32 copies
of bf16 activations) are recomputed in backward from their source, bit-exactly."""

from __future__ import annotations

import copy

import torch

import memopt
from memopt.analysis.memory import build_timeline
from memopt.analysis.value_ops import cast_and_view_source
from memopt.graph import meta
from memopt.testing.zoo import GPT, GPTConfig

TINY_GPT = GPTConfig(vocab=64, context=32, dim=32, heads=2, layers=2)
OPTIONS = {"codegen": "eager", "verify": True, "strict": True}


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], options: dict, autocast: bool = False):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options=options)
    with memopt.record() as explanation:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = compiled(*inputs)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return explanation.region(0).step, loss.detach(), grads


def _saved_casts(step) -> list[str]:
    """Saved values that are casts (and views) of a parameter, or fp32 casts of bf16
    values (narrowing casts of activations are legitimately saved: smaller)."""
    found = []
    for fw, _ in step.saved_pairs():
        source = cast_and_view_source(fw)
        value, origin = meta.tensor_value(fw), meta.tensor_value(source)
        if source is fw or value is None or origin is None or value.dtype == origin.dtype:
            continue
        if source.op == "placeholder" or (origin.dtype == torch.bfloat16 and value.dtype == torch.float32):
            found.append(fw.name)
    return found


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, TINY_GPT.vocab, (4, 17))
    return idx[:, :-1], idx[:, 1:]


def test_bf16_copies_are_recomputed_with_identical_gradients():
    model, inputs = GPT(TINY_GPT), _inputs()
    options = {**OPTIONS, "precision": "bf16"}
    step, loss, grads = _run(copy.deepcopy(model), inputs, options)
    kept_step, kept_loss, kept_grads = _run(
        copy.deepcopy(model), inputs, {**options, "disable_passes": ["recompute_saved_casts"]}
    )
    kept = _saved_casts(kept_step)
    assert any(name.startswith("t") for name in kept)  # transposed bf16 weight copies
    assert any(meta.tensor_value(n).dtype == torch.float32 for n, _ in kept_step.saved_pairs() if n.name in kept)
    assert _saved_casts(step) == []
    assert torch.equal(loss, kept_loss)
    assert all(torch.equal(grads[n], kept_grads[n]) for n in grads)
    saved = sum(iv.nbytes for iv in build_timeline(step).saved_activations())
    assert saved < sum(iv.nbytes for iv in build_timeline(kept_step).saved_activations())


def test_graphs_traced_under_user_autocast_benefit_too():
    """memopt without its own precision option, under torch.autocast: the casts that
    autocast inserted are recomputed the same way."""
    model, inputs = GPT(TINY_GPT), _inputs()
    step, loss, grads = _run(copy.deepcopy(model), inputs, OPTIONS, autocast=True)
    kept_step, kept_loss, kept_grads = _run(
        copy.deepcopy(model), inputs, {**OPTIONS, "disable_passes": ["recompute_saved_casts"]}, autocast=True
    )
    assert _saved_casts(kept_step) and not _saved_casts(step)
    assert torch.equal(loss, kept_loss) and all(torch.equal(grads[n], kept_grads[n]) for n in grads)


def test_layout_copies_between_cast_and_saved_value_are_replayed():
    """Inductor's decompositions put clones/reshapes between a cast and what is saved;
    the chain is replayed in backward like views."""
    w = torch.nn.Parameter(torch.randn(8, 8))

    def f(x):
        copy = w.to(torch.bfloat16).clone().reshape(8, 8)
        return (x.to(torch.bfloat16) @ copy).float().sum()

    x = torch.randn(4, 8, requires_grad=True)
    sources, grads = [], []
    for disabled in ((), ("recompute_saved_casts",)):
        x.grad = None
        torch._dynamo.reset()
        with memopt.record() as explanation:
            compiled = torch.compile(f, backend="memopt", options={**OPTIONS, "disable_passes": list(disabled)})
            compiled(x).backward()
        step = explanation.region(0).step
        params = [p for i, p in enumerate(step.forward.graph.find_nodes(op="placeholder")) if step.input_kind(i) == "parameter"]
        sources.append([fw.name for fw, _ in step.saved_pairs() if fw is not cast_and_view_source(fw) and cast_and_view_source(fw) in params])
        grads.append(x.grad.clone())
    assert sources[0] == [] and sources[1]  # the bf16 copy of w is saved only without the pass
    assert torch.equal(grads[0], grads[1])


def test_the_plan_says_which_casts_are_recomputed():
    """The report read "save ... kept by the min-cut partition" for weight copies this
    pass no longer saves: its decisions now replace the plan's for them."""
    model, inputs = GPT(TINY_GPT), _inputs()
    torch._dynamo.reset()
    explanation = memopt.explain(model, *inputs, options={**OPTIONS, "precision": "bf16"})
    region = explanation.regions[0]
    recast = [d for d in region.plan.decisions if "recompute_saved_casts" in d.reason]
    assert recast and all(d.policy == "recompute" and d.action.option == "cast" for d in recast)
    assert any(".weight, which is kept anyway" in d.reason for d in recast)  # named as the user names it
    saved = {fw.name for fw, _ in region.step.saved_pairs()}
    assert not {d.node_name for d in recast} & saved
    assert "cast again in backward" in explanation.report()


def test_casts_viewed_to_symbolic_sizes_are_replayed_with_backwards_symbols():
    """Dynamic shapes: CPU attention with dropout upcasts its bf16 inputs and views them
    to ``[batch * heads, s0, d]``; the view's size list holds the forward's symbol
    node. It used to be copied into backward as is: backward read a forward node and
    failed when AOTAutograd compiled it ("KeyError: primals_..."), on Hugging Face
    GPT-2 at its second sequence length. The size now comes from backward's own
    saved symbol."""
    torch.manual_seed(0)
    proj = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))

    def f(x):
        q, k, v = (p(x).view(2, x.shape[1], 2, 8).transpose(1, 2) for p in proj)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1).float().square().sum()

    compiled = torch.compile(f, backend="memopt", dynamic=True, options={**OPTIONS, "precision": "bf16"})
    with memopt.record() as explanation:
        for seq in (24, 40):
            x = torch.randn(2, seq, 16)
            proj.zero_grad()
            torch.manual_seed(1)
            compiled(x).backward()
            got = [p.weight.grad.clone() for p in proj]
            proj.zero_grad()
            torch.manual_seed(1)
            f(x).backward()
            for g, p in zip(got, proj):
                assert float((g - p.weight.grad).norm() / p.weight.grad.norm()) < 0.03
    passes = {p.name: p for p in explanation.region(0).passes}
    recomputed = passes["recompute_saved_casts"].details["recomputed"]
    step = explanation.region(0).step
    assert any(meta.is_symbolic(ph) for ph in step.forward.graph.find_nodes(op="placeholder"))
    assert any(r["dtype"] == "float32" for r in recomputed)  # an fp32 copy of a bf16 value
