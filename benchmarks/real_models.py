"""Issue 14's acceptance on default-config Hugging Face models (`memopt.testing.hf`):
memory budgets met on the operating system's view, and estimates against both views.

    python benchmarks/real_models.py budgets [--families gpt2 llama bert] [--codegens eager inductor]
    python benchmarks/real_models.py estimates [--families ...]
    python benchmarks/real_models.py estimates --disable-passes blocked_cross_entropy   # the loss as written

Every row is one fresh process (`memopt.testing.measure.measure_in_fresh_process`:
glibc's malloc thresholds fixed, heap trimmed before each step), the model at size
"medium" (4 layers, hidden 256) and batch 4 x 256 unless told otherwise, in train mode
with its default dropout and ``use_cache``, called as users call it::

    out = compiled(**inputs); out.loss.backward()      # ``out`` (and its caches) alive

Two compiling steps, three warm-up steps, then ``--repeat`` measured steps (3); a row
shows the step of the median OS view (the allocator view repeats exactly; the resident
set varies by a few MiB from step to step with what glibc's heap reuses). Columns:

* ``requested``: b times the unbudgeted run's estimated peak (what ``memory_budget=b``
  asks for); ``peak``: bytes live before the step (parameters, buffers, inputs) plus the
  measured growth, in the allocator's view and two OS views (peak resident set, in
  steps the profiler does not run): right after ``malloc_trim(0)`` ("trimmed": every
  heap page the step's small allocations touch counts) and with the heap as the
  previous step left it ("warm": a training loop's steady state; issue 14's recipe,
  clear_refs with the mmap threshold fixed and nothing trimmed);
* ``/ requested``: issue 14 asks for at most 1.05 at every feasible budget;
* ``loss = unbudgeted``: the first step's loss (same seed) equals the unbudgeted run's.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch

import memopt
from memopt.units import format_bytes
from memopt.testing.fresh_process import Workload
from memopt.testing.hf import FAMILIES, build
from memopt.testing.measure import measure_in_fresh_process


def workload(
    family: str, codegen: str, budget: float | None, batch: int, seq: int, size: str, disable_passes: list[str] | None = None
) -> Workload:
    """Fresh-process factory: ``family`` compiled with memopt (``budget``; without
    ``disable_passes``), its training step, and the estimate, the budget in bytes and
    the first step's loss as info."""
    model, inputs = build(family, batch=batch, seq=seq, size=size)
    options: dict[str, Any] = {"codegen": codegen, "disable_passes": list(disable_passes or [])}
    if budget is not None:
        options["memory_budget"] = budget
    compiled = torch.compile(model, backend="memopt", options=options)

    def step() -> None:
        out = compiled(**inputs)
        out.loss.backward()  # out, with any key/value cache, is alive through backward

    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)  # infeasible budgets land at the floor
        torch.manual_seed(1)
        loss = compiled(**inputs).loss
        loss.backward()
        for _ in range(2):  # whole-step planning settles by the third call (docs/remat.md)
            model.zero_grad(set_to_none=True)
            step()
    info = {
        "estimated_peak": explanation.estimated_peak_bytes,
        "baseline": explanation.baseline_bytes,
        "estimated_growth": explanation.timeline().peak_growth_bytes,
        "unoptimized_peak": explanation.timeline(optimized=False).peak_bytes,
        "feasible": all(r.plan is None or r.plan.feasible for r in explanation.regions),
        "loss": loss.item(),
        "fallbacks": len(explanation.fallbacks),
    }
    return Workload(step=step, prepare=lambda: model.zero_grad(set_to_none=True), info=lambda: info)


def _measure(family: str, codegen: str, budget: float | None, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    kwargs = {
        "family": family, "codegen": codegen, "budget": budget, "batch": args.batch, "seq": args.seq, "size": args.size,
        "disable_passes": args.disable_passes,
    }
    result = measure_in_fresh_process(f"{__file__}:workload", kwargs=kwargs, warmup=3, repeat=args.repeat)
    trimmed = ", ".join(format_bytes(m.os_peak_growth_bytes or 0) for m in result.measurements)
    warm = ", ".join(format_bytes(m.os_warm_peak_growth_bytes or 0) for m in result.measurements)
    print(f"  {family} {codegen} budget={budget}: done (OS-view growth of the measured steps: trimmed {trimmed}; warm {warm})", file=sys.stderr, flush=True)
    warm_views = sorted(m.os_warm_peak_growth_bytes for m in result.measurements if m.os_warm_peak_growth_bytes is not None)
    info = {**result.info, "warm_growth": warm_views[(len(warm_views) - 1) // 2] if warm_views else None}
    return info, result.median


def budgets(args: argparse.Namespace) -> None:
    print(
        "| model | codegen | budget | requested | estimated peak | peak (allocator) | peak (OS, trimmed) | peak (OS, warm) "
        "| trimmed / requested | warm / requested | loss = unbudgeted |"
    )
    print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for family in args.families:
        for codegen in args.codegens:
            base, base_m = _measure(family, codegen, None, args)
            rows = [(None, base, base_m)] + [(b, *_measure(family, codegen, b, args)) for b in args.budgets]
            for b, info, m in rows:
                requested = None if b is None else b * base["estimated_peak"]
                peaks = [None if g is None else info["baseline"] + g for g in (m.os_peak_growth_bytes, info["warm_growth"])]
                ratios = ["-" if requested is None or p is None else f"{p / requested:.3f}" for p in peaks]
                if b is not None and not info["feasible"]:
                    ratios[0] += " (below the floor)"
                cells = " | ".join("-" if p is None else format_bytes(p) for p in peaks)
                print(
                    f"| {family} | {codegen} | {'none' if b is None else b} | "
                    f"{'-' if requested is None else format_bytes(int(requested))} | {format_bytes(info['estimated_peak'])} | "
                    f"{format_bytes(info['baseline'] + m.peak_growth_bytes)} | {cells} | {' | '.join(ratios)} | "
                    f"{'yes' if info['loss'] == base['loss'] else 'NO'} ({info['loss']:.6f}) |",
                    flush=True,
                )


def estimates(args: argparse.Namespace) -> None:
    print("| model | codegen | estimated growth | measured (allocator) | error | measured (OS, trimmed) | error | measured (OS, warm) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for family in args.families:
        for codegen in args.codegens:
            info, m = _measure(family, codegen, None, args)
            est, alloc, os_view = info["estimated_growth"], m.peak_growth_bytes, m.os_peak_growth_bytes
            os_cells = "- | -" if os_view is None else f"{format_bytes(os_view)} | {(est - os_view) / os_view:+.1%}"
            os_cells += " | " + ("-" if info["warm_growth"] is None else format_bytes(info["warm_growth"]))
            print(
                f"| {family} | {codegen} | {format_bytes(est)} | {format_bytes(alloc)} | {(est - alloc) / alloc:+.1%} | {os_cells} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["budgets", "estimates"])
    parser.add_argument("--families", nargs="*", default=None, choices=list(FAMILIES))
    parser.add_argument("--codegens", nargs="*", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.7, 0.5])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--repeat", type=int, default=3, help="measured steps per process; the row shows the median OS view")
    parser.add_argument("--disable-passes", nargs="*", default=[], help="memopt passes to turn off in every row")
    args = parser.parse_args()
    if args.what == "budgets":
        args.families = args.families or ["gpt2", "llama", "bert"]
        budgets(args)
    else:
        args.families = args.families or list(FAMILIES)
        estimates(args)


if __name__ == "__main__":
    main()
