"""Peak memory of a step that calls the model twice before one backward (docs/remat.md,
"Several calls before one backward").

A DPO-shaped loss over a default-config Hugging Face causal LM (train mode, dropout on,
keyword calls): ``loss = -logsigmoid(0.1 * (logp(chosen) - logp(rejected)))``, each
``logp`` a forward of the compiled model, ``-model(input_ids=ids, labels=ids).loss``
(the model's own cross-entropy, inside the compiled region: a log-softmax computed
eagerly on the logits would hold memory memopt does not see, 1.9 MiB a call here).
Each step's peak is
measured (`memopt.testing.measure.measure_peak`, the allocator's view) as growth over
the bytes live at its start (parameters, buffers, both batches) and printed absolute,
beside memopt's estimate and budget (`memopt.record`) and whether the gradients are
bitwise those of the run without a budget. A model compiled into one region is planned
for both calls at the second call of the first step; one a graph break splits (GPT-2)
when its second step completes, for the third.

    PYTHONPATH=. python benchmarks/repeated_calls.py --family llama --budget 0.6
    PYTHONPATH=. python benchmarks/repeated_calls.py --family gpt2 --budget 16MiB

A fractional budget is a fraction of the unoptimized peak of the step as memopt plans
it: both calls (before memopt planned several calls, of one call's).
"""

from __future__ import annotations

import argparse
import gc
import warnings
from typing import Any

import torch
import torch.nn.functional as F

import memopt
from memopt.testing.hf import build
from memopt.testing.measure import measure_peak

SIZES = {
    "llama": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=344, vocab_size=1000),
    "gpt2": dict(n_layer=2, n_embd=128, vocab_size=1000),
}
MiB = 2**20


def _budget(text: str) -> int | float | str:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text  # a size string: memopt parses it


def _logp(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return -model(input_ids=ids, labels=ids).loss  # mean log-likelihood per token


def _run(family: str, budget: str, steps: int) -> tuple[list[int], list[torch.Tensor], str, str, int]:
    torch.manual_seed(0)
    model, inputs = build(family, batch=4, seq=128, **SIZES[family])
    ids = inputs["input_ids"]
    rejected = torch.roll(ids, 1, dims=1)
    options: dict[str, Any] = {"codegen": "eager"}
    if budget != "none":
        options["memory_budget"] = _budget(budget)
    fn = torch.compile(model, backend="memopt", options=options)

    def step() -> None:
        torch.manual_seed(1)  # the same dropout masks in every run
        loss = -F.logsigmoid(0.1 * (_logp(fn, ids) - _logp(fn, rejected))).mean()
        loss.backward()

    start = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    start += ids.nbytes + rejected.nbytes
    peaks, warned = [], 0
    with warnings.catch_warnings(record=True) as caught, memopt.record() as explanation:
        warnings.simplefilter("always")
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            gc.collect()
            peaks.append(start + measure_peak(step).peak_growth_bytes)
    warned = sum(isinstance(w.message, memopt.MemoptBudgetWarning) for w in caught)
    figures = explanation.to_dict()
    estimate = f"{figures['estimated_peak_bytes'] / MiB:.2f}"
    shown = f"{figures['budget_bytes'] / MiB:.2f}" if figures["budget_bytes"] else "-"
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    torch._dynamo.reset()
    return peaks, grads, estimate, shown, warned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(SIZES), default="llama")
    parser.add_argument("--budget", default="0.6", help="memory_budget (bytes, a size string or a fraction)")
    parser.add_argument("--steps", type=int, default=4, help="steps run (at least 3)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps {args.steps}: at least 3 (a step of several regions is planned again after its second)")

    free, reference, free_estimate, _, _ = _run(args.family, "none", args.steps)
    peaks, grads, estimate, budget, warned = _run(args.family, args.budget, args.steps)
    equal = len(grads) == len(reference) and all(torch.equal(g, r) for g, r in zip(grads, reference))
    print(f"{args.family}, two forwards then one backward: absolute peak per step (MiB)")
    print("| memory_budget | budget | step 1 | step 2 | steps 3+ (largest) | memopt estimate | budget warnings | gradients bitwise equal |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    for name, shown, run, est, w, eq in (("none", "-", free, free_estimate, 0, "(reference)"),
                                         (args.budget, budget, peaks, estimate, warned, equal)):  # fmt: skip
        print(f"| {name} | {shown} | {run[0] / MiB:.2f} | {run[1] / MiB:.2f} | {max(run[2:]) / MiB:.2f} | {est} | {w} | {eq} |")


if __name__ == "__main__":
    main()
