"""The whole step of a 7B Llama (Llama-2-7B's config, fp32, batch 1 x 2048) with AdamW,
estimated on fake tensors (nothing is allocated): the step's peak with a separate
``opt.step()`` (``optimizer=opt``: the plan counts the state and the update) against
each update inside backward (``optimizer_in_backward=opt``).

    python benchmarks/whole_step_7b.py            # about a minute per row on 2 cores

Prints a markdown table (docs/whole_step.md): P parameters, G gradients, S AdamW's
state (predicted: no step has run), the estimate and its breakdown at the peak, and the
issue's reference sums P+G+S+A and P+S+A+(largest layer's gradients), with A the
activations (saved values, inputs, outputs) and T the temporaries live at the peak
(inside backward with the fused update: the gradients not yet applied and the update's
own temporaries; at a separate step: the step's temporaries).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memopt  # noqa: E402
from memopt.units import format_bytes  # noqa: E402


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _row(mode: str, layers: int, seq: int, budget: str | None = None, report: bool = False) -> dict[str, object]:
    import llama7b

    torch._dynamo.reset()
    with FakeTensorMode():
        model, inputs = llama7b.build(seq=seq)
        if layers:
            model.model.model.layers = model.model.model.layers[:layers]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        options = {"codegen": "eager", mode: opt, **({"memory_budget": budget} if budget else {})}
        explanation = memopt.explain(model, *inputs, options=options)
        seconds = time.perf_counter() - start
    timeline = explanation.timeline()
    if report:
        from memopt.plan.report import dominant_table, savings_table

        print(f"{mode}: what each option saves or would save at the estimated peak", file=sys.stderr)
        print(savings_table(explanation.savings()), file=sys.stderr)
        shares = explanation.dominant_parameters(share=0.01)
        print("parameters over 1% of the peak:\n" + dominant_table(shares, timeline.peak_bytes), file=sys.stderr)
    breakdown = timeline.peak_breakdown
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in model.model.model.layers)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    state = breakdown["optimizer_state"]
    activations = sum(breakdown[k] for k in ("inputs", "saved_activations", "outputs"))
    return {
        "mode": f"{mode}=opt" + (f", memory_budget={budget}" if budget else ""), "peak": timeline.peak_bytes, "P": params, "S": state, "G at peak": breakdown["gradients"],
        "A": activations, "T": breakdown["temporaries"], "layer": layer, "largest": largest, "seconds": seconds,
        "at": timeline.points[timeline.peak_index].graph,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all 32)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--budget", help="one more row: optimizer_in_backward with this memory_budget (e.g. 80GiB)")
    parser.add_argument("--report", action="store_true", help="print each run's savings and dominant-parameter tables on stderr")
    args = parser.parse_args()
    rows = [_row(mode, args.layers, args.seq, report=args.report) for mode in ("optimizer", "optimizer_in_backward")]
    if args.budget:
        rows.append(_row("optimizer_in_backward", args.layers, args.seq, args.budget))
    print("| option | estimated peak | at | P | G (returned gradients) | S (AdamW, predicted) | A (activations) | "
          "T (temporaries) | P+G+S+A | P+S+A+layer | seconds |")
    print("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        p, s, a, layer = (int(r[k]) for k in ("P", "S", "A", "layer"))  # type: ignore[call-overload]
        print(f"| `{r['mode']}` | {_gib(int(r['peak']))} | {r['at']} | {_gib(p)} | {_gib(int(r['G at peak']))} | "  # type: ignore[call-overload]
              f"{_gib(s)} | {_gib(a)} | {_gib(int(r['T']))} | {_gib(p + p + s + a)} | {_gib(p + s + a + layer)} | "  # type: ignore[call-overload]
              f"{float(r['seconds']):.0f} |")  # type: ignore[arg-type]
    first = rows[0]
    print(f"\nlargest decoder layer's parameters {format_bytes(int(first['layer']))}; largest parameter "  # type: ignore[call-overload]
          f"{format_bytes(int(first['largest']))} (embedding / LM head)")  # type: ignore[call-overload]


if __name__ == "__main__":
    main()
