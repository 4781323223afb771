"""memory_budget with the default codegen (Inductor): requested, estimated and measured
peak of one training step.

    .venv/bin/python benchmarks/budget_inductor.py                       # zoo + Llama (~5 min)
    .venv/bin/python benchmarks/budget_inductor.py --models gpt --budgets 0.75 0.5
    .venv/bin/python benchmarks/budget_inductor.py --hf-defaults bert gpt2 llama --budgets 0.7 0.5

``--hf-defaults`` runs `memopt.testing.hf` families at their default configs (dropout on,
size "medium": 4 layers, hidden 256; batch 4 x 256) under both codegens, seeding the
generator before every step, and adds the loss of the measured step against the
unbudgeted run of the same codegen.

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


def run_hf(family: str, budget: float | None, codegen: str) -> tuple[int | None, int, int, bool, float]:
    """One ``memopt.testing.hf`` family at its default config: (requested, estimated,
    measured, feasible, loss of the measured step); every step starts from seed 0."""
    from memopt.testing.hf import build

    torch._dynamo.reset()
    model, kwargs = build(family, batch=4, seq=256, size="medium")
    options: dict[str, object] = {"codegen": codegen}
    if budget is not None:
        options["memory_budget"] = budget
    compiled = torch.compile(model, backend="memopt", options=options)
    losses: list[float] = []

    def step() -> None:
        torch.manual_seed(0)
        loss = compiled(**kwargs).loss
        loss.backward()
        losses.append(loss.item())

    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            step()
    model.zero_grad(set_to_none=True)
    growth = measure_peak(step).peak_growth_bytes
    plan = explanation.regions[0].plan
    requested = plan.budget_bytes if budget is not None else None
    measured = growth + explanation.timeline().baseline_bytes
    feasible = all(r.plan.feasible for r in explanation.regions if r.plan is not None)
    return requested, explanation.estimated_peak_bytes, measured, feasible, losses[-1]


def main_hf(families: list[str], budgets: list[float], codegens: list[str]) -> None:
    mib = 2**20
    print("| model | codegen | budget | requested MiB | estimated MiB | measured MiB | measured / requested "
          "| measured / estimated | within +5% | loss = unbudgeted |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for family in families:
        for codegen in codegens:
            reference = None
            for budget in [None, *budgets]:
                print(f"[budget_inductor] {family} {codegen} budget {budget}", file=sys.stderr, flush=True)
                requested, estimated, measured, feasible, loss = run_hf(family, budget, codegen)
                if requested is None:
                    reference = loss
                    print(f"| {family} | {codegen} | none | - | {estimated / mib:.2f} | {measured / mib:.2f} | - | "
                          f"{measured / estimated:.3f} | - | - |", flush=True)
                    continue
                verdict = ("yes" if measured <= 1.05 * requested else "NO") if feasible else "infeasible"
                same = "yes" if loss == reference else f"NO ({loss:.6f} vs {reference:.6f})"
                print(f"| {family} | {codegen} | {budget} | {requested / mib:.2f} | {estimated / mib:.2f} | "
                      f"{measured / mib:.2f} | {measured / requested:.3f} | {measured / estimated:.3f} | {verdict} "
                      f"| {same} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["gpt", "transformer_block", "mlp", "cnn_bn", "hf_llama"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.75, 0.5])
    parser.add_argument("--hf-defaults", nargs="*", metavar="FAMILY",
                        help="memopt.testing.hf families at default configs (bert gpt2 llama), both codegens")
    parser.add_argument("--codegens", nargs="*", default=["eager", "inductor"])
    args = parser.parse_args()
    if args.hf_defaults:
        main_hf(args.hf_defaults, args.budgets, args.codegens)
        return
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
