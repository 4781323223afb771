"""memory_budget with the default codegen (Inductor): requested, estimated and measured
peak of one training step.

    .venv/bin/python benchmarks/budget_inductor.py                       # zoo + Llama (~5 min)
    .venv/bin/python benchmarks/budget_inductor.py --models gpt --budgets 0.75 0.5

For each model and budget: compile with ``backend="memopt", options={"memory_budget": b}``
(Inductor codegen), run two steps, then measure the next with
``memopt.testing.measure.measure_peak`` plus the bytes live before the step. Prints a
Markdown table; "within" is measured <= requested x 1.05, for feasible budgets.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import memopt
from memopt.testing.measure import measure_peak

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import compile_memopt  # noqa: E402

BATCH = {"gpt": 32, "transformer_block": 64, "mlp": 1024, "cnn_bn": 64}


def run(name: str, budget: float | None) -> tuple[int | None, int, int, bool]:
    model, inputs, compiled = compile_memopt(name, BATCH.get(name, 16), budget, "inductor")
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            compiled(*inputs).backward()
    model.zero_grad(set_to_none=True)
    growth = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes
    plan = explanation.regions[0].plan
    requested = plan.budget_bytes if budget is not None else None
    measured = growth + explanation.timeline().baseline_bytes
    return requested, explanation.estimated_peak_bytes, measured, plan.feasible


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["gpt", "transformer_block", "mlp", "cnn_bn", "hf_llama"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.75, 0.5])
    args = parser.parse_args()
    mib = 2**20
    print("| model | budget | requested MiB | estimated MiB | measured MiB | measured / requested | within +5% |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name in args.models:
        for budget in [None, *args.budgets]:
            print(f"[budget_inductor] {name} budget {budget}", file=sys.stderr, flush=True)
            requested, estimated, measured, feasible = run(name, budget)
            if requested is None:
                print(f"| {name} | none | - | {estimated / mib:.2f} | {measured / mib:.2f} | - | - |", flush=True)
                continue
            verdict = ("yes" if measured <= 1.05 * requested else "NO") if feasible else "infeasible"
            print(f"| {name} | {budget} | {requested / mib:.2f} | {estimated / mib:.2f} | {measured / mib:.2f} | "
                  f"{measured / requested:.3f} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
