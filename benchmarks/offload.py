"""Issue 15's acceptance for offload on default-config Hugging Face models
(`memopt.testing.hf`, size "medium": 4 layers, hidden 256; batch 4 x 256).

    python benchmarks/offload.py floor [--families gpt2 llama] [--codegens eager inductor]
    python benchmarks/offload.py feasible [--families gpt2 llama] [--codegens ...]
    python benchmarks/offload.py mix [--families llama] [--bandwidth MiB/s ...]
    python benchmarks/offload.py all --fast          # small sizes: a smoke run

``floor`` (row 1): below the remat-only floor. Per model and codegen, one fresh process
each (`memopt.testing.measure.measure_in_fresh_process`: glibc's malloc thresholds
fixed, heap trimmed before each step, three warm-up steps, then three measured steps)
for

* the unbudgeted run;
* the remat-only floor: a tiny ``memory_budget`` without offload (memopt warns it is
  infeasible and runs its smallest-peak plan); the floor is the plans'
  ``min_feasible_peak`` (estimate);
* ``offload="disk"`` at ``budget = baseline + b * (floor - baseline)`` (``--below-floor
  b``, default 0.65: 35% below the floor's growth).

``offload_bandwidth`` is fixed for every process (``--offload-bandwidth``, MiB/s;
default 1024), so every process plans the same: memopt's own measurement (an fsync'd
write, a read after dropping the page cache) varies several-fold from run to run on a
shared disk. Growth is the peak resident-set growth during a step (OS view; median of
the measured steps) in two heap states (docs/memory.md, "The operating system's view"):
"trimmed" after ``malloc_trim(0)`` (every heap page the step touches counts: an upper
bound) and "warm" (the heap as the previous step left it: a training loop's steady
state). Each run's first step runs after ``torch.manual_seed(1)``
(dropout is on) and its loss and every gradient are compared with the unbudgeted
run's: bitwise under ``codegen="eager"``, ``torch.testing.assert_close`` under
Inductor. Step times come from one more fresh process that compiles the
configurations and runs their steps in turn (seven rounds): the median wall seconds,
the median of each round's ratio to the unbudgeted step, and the ratio of median CPU
seconds (every thread of the process). ``storage floor`` is a bound no storage plan
can beat: the unbudgeted plan's peak with every eligible saved value held elsewhere,
at no cost, from its last forward reader to its first backward reader
(`memopt.analysis.storage_cost` with unlimited bandwidth). ``modelled s`` is the
plan's modelled recomputation plus storage time, as the planner compares plans.
"allocator with copies inline" is one more step of the offload run, after the
measured ones, inside `memopt.runtime.synchronous_io` (the store's copies made on the
step's thread, so torch's profiler sees every allocation and free): the allocator's
peak growth of the plan, which the estimate should equal (it holds a value until its
modelled write ends, so pending writes can put the estimate above it).

``feasible``: at a budget rematerialization alone meets (``--feasible``: the budget's
growth is that fraction of the unbudgeted estimated growth), remat alone (no offload)
against the planner's plan with ``offload="disk"``, both measured as above.

``mix`` (row 2): the planner's modelled extra step time (over the unbudgeted plan:
torch's min-cut partition already recomputes cheap ops) at budgets between the remat
floor and the unoptimized peak, for rematerialization alone
(`memopt.plan.remat.plan_remat`), offload alone and compression alone
(`memopt.plan.storage.plan_storage` on the unbudgeted graphs) and the planner's
combined plan (`memopt.plan.planner.plan_region` with offload, and with offload and
compression), with the count of each decision in the combined plans, at each disk
bandwidth of ``--bandwidth``. Planned on the region with the largest unoptimized
peak, alone (a model with a graph break: its other regions are not in the peak).

Progress goes to stderr, Markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import memopt
from memopt.units import format_bytes
from memopt.testing.fresh_process import Workload
from memopt.testing.hf import FAMILIES, build
from memopt.testing.measure import measure_in_fresh_process, measure_peak
from memopt.testing.os_memory import MALLOC_ENV

MiB = 2**20
TINY_BUDGET = 0.01
"""Far below any model's floor: memopt runs its smallest-peak plan."""
BELOW_FLOOR = 0.65
"""The offload budget's growth, as a fraction of the remat-only floor's growth
(default of ``--below-floor``)."""


@dataclass(frozen=True)
class Sizes:
    batch: int = 4
    seq: int = 256
    size: str = "medium"
    warmup: int = 3
    repeat: int = 3
    timed: int = 7
    offload_min_bytes: int | None = None
    """None: memopt's default (1 MiB)."""

    @classmethod
    def fast(cls) -> Sizes:
        return cls(batch=2, seq=32, size="small", warmup=1, repeat=1, timed=3, offload_min_bytes=4096)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _options(codegen: str, kind: str, budget: int | None = None, sizes: Sizes | None = None, bandwidth: float | None = None) -> dict[str, Any]:
    """memopt options of one configuration: ``none``, ``floor`` (a tiny budget),
    ``remat`` (``budget``, no offload) or ``offload`` (``budget`` with ``offload="disk"``
    at ``bandwidth`` bytes/s; None: measured by memopt in each process)."""
    options: dict[str, Any] = {"codegen": codegen}
    if kind == "floor":
        options["memory_budget"] = TINY_BUDGET
    elif kind in ("remat", "offload"):
        options["memory_budget"] = budget
    if kind == "offload":
        options["offload"] = "disk"
        if bandwidth is not None:
            options["offload_bandwidth"] = bandwidth
        if sizes is not None and sizes.offload_min_bytes is not None:
            options["offload_min_bytes"] = sizes.offload_min_bytes
    return options


def _compiled(family: str, options: dict[str, Any], sizes: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    model, inputs = build(family, batch=sizes["batch"], seq=sizes["seq"], size=sizes["size"])
    return model, torch.compile(model, backend="memopt", options=options), inputs


# -- row 1: fresh-process workloads ----------------------------------------------------


def workload(family: str, options: dict[str, Any], sizes: dict[str, Any], dump: str) -> Workload:
    """Fresh-process factory: ``family`` compiled with ``options``; its first step's loss
    and gradients (seed 1) saved to ``dump``; the plans' figures as info."""
    model, compiled, inputs = _compiled(family, options, sizes)

    def step() -> None:
        out = compiled(**inputs)
        out.loss.backward()  # out, with any key/value cache, is alive through backward

    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)  # budgets below the floor land on it
        torch.manual_seed(1)
        loss = compiled(**inputs).loss
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, dump)
        for _ in range(2):  # whole-step planning settles by the third call (docs/remat.md)
            model.zero_grad(set_to_none=True)
            step()
    info = _plan_info(explanation)
    if options.get("memory_budget") is None:
        info["storage_floor"] = _storage_floor(explanation)
    if options.get("offload"):
        from memopt.runtime import bandwidth, get_store, register_store

        store = get_store(register_store("disk"))
        store.reset_peaks()
        given = options.get("offload_bandwidth")
        info["bandwidth"] = list(bandwidth("disk", "cpu", given=given))

        def stats() -> dict[str, Any]:
            s = store.stats()
            return {
                **info,
                "store": {"offloads": s.offloads, "bytes_written": s.bytes_written, "peak_pending": s.peak_pending_bytes, "files": s.files},
                "alloc_sync_growth": _allocator_growth_with_inline_copies(model, step),
            }

        return Workload(step=step, prepare=lambda: model.zero_grad(set_to_none=True), info=stats)
    return Workload(step=step, prepare=lambda: model.zero_grad(set_to_none=True), info=lambda: info)


def _allocator_growth_with_inline_copies(model: Any, step: Callable[[], None]) -> int:
    """One more step (after the measured ones), the store's copies made on the step's
    thread (`memopt.runtime.synchronous_io`): the allocator's view of the plan, which
    the estimate should equal (module docstring)."""
    from memopt.runtime import synchronous_io

    model.zero_grad(set_to_none=True)
    with synchronous_io():
        return measure_peak(step).peak_growth_bytes


def _plan_info(explanation: Any) -> dict[str, Any]:
    plans = [r.plan for r in explanation.step_regions() if r.plan is not None]
    counts: Counter[str] = Counter(d.policy for p in plans for d in p.decisions)
    offloaded = [d for p in plans for d in p.decisions if d.policy == "offload"]
    floors = [p.min_feasible_peak for p in plans if p.min_feasible_peak is not None]
    return {
        "estimated_peak": explanation.estimated_peak_bytes,
        "baseline": explanation.baseline_bytes,
        "unoptimized_peak": explanation.timeline(optimized=False).peak_bytes,
        "floor": max(floors) if floors else None,
        "feasible": all(p.feasible for p in plans),
        "counts": dict(counts),
        "offloaded_bytes": sum(d.bytes for d in offloaded),
        "fallbacks": len(explanation.fallbacks),
        "modelled_seconds": _modelled_seconds(explanation),
    }


def _modelled_seconds(explanation: Any) -> float | None:
    """The plans' modelled time, recomputation plus storage, as the planner compares
    plans (it includes the recomputation torch's min-cut partition already does); None
    when no region was planned under a budget."""
    solvers = [r.plan.solver for r in explanation.step_regions() if r.plan is not None]
    planned = [s for s in solvers if "recompute_seconds_model" in s]
    if not planned:
        return None
    return sum(s["recompute_seconds_model"] + s.get("storage_seconds_model", 0.0) for s in planned)


def _storage_floor(explanation: Any) -> int:
    """The unbudgeted plan's step peak with every eligible saved storage away, free,
    from its last forward reader to its first backward reader (module docstring)."""
    from memopt.analysis.compose import compose_timelines
    from memopt.analysis.memory import build_timeline
    from memopt.analysis.storage_cost import Bandwidth, storage_candidates, with_stored

    parts, kept = [], []
    for r in explanation.step_regions():
        timeline = build_timeline(r.step)
        unlimited = Bandwidth(1e18, 1e18)
        candidates, _ = storage_candidates(r.step, timeline, offload="disk", bandwidth=unlimited, min_offload_bytes=0)
        parts.append((r.step, with_stored(timeline, candidates)))
        kept.append(r.kept_outputs)
    return compose_timelines(parts, kept).peak_bytes


def _measure(family: str, options: dict[str, Any], sizes: Sizes, tmp: str, label: str) -> dict[str, Any]:
    dump = str(Path(tmp, f"{family}-{label}.pt"))
    kwargs = {"family": family, "options": options, "sizes": sizes.__dict__, "dump": dump}
    start = time.perf_counter()
    result = measure_in_fresh_process(f"{__file__}:workload", kwargs=kwargs, warmup=sizes.warmup, repeat=sizes.repeat, timeout=3600)
    growth = [m.os_peak_growth_bytes for m in result.measurements]
    info = dict(result.info, dump=dump, os_growth=int(statistics.median(growth)), os_growths=growth)
    info["os_warm_growth"] = int(statistics.median(m.os_warm_peak_growth_bytes for m in result.measurements))
    info["alloc_growth"] = int(statistics.median(m.peak_growth_bytes for m in result.measurements))
    _log(f"  {family} {options}: OS growth {[format_bytes(g) for g in growth]} ({time.perf_counter() - start:.0f} s)")
    return info


# -- row 1: step times, alternating in one fresh process ---------------------------------


def time_steps(family: str, configs: dict[str, dict[str, Any]], sizes: dict[str, Any], timed: int) -> dict[str, list[float]]:
    """Compile ``family`` once per configuration, warm each up, then run their steps in
    turn ``timed`` times; wall seconds per step, per configuration, and the process's
    CPU seconds (every thread: the store's I/O thread too) under ``"<label> cpu"``."""
    steps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        for label, options in configs.items():
            model, compiled, inputs = _compiled(family, options, sizes)

            def step(model: Any = model, compiled: Any = compiled, inputs: Any = inputs) -> None:
                compiled(**inputs).loss.backward()
                model.zero_grad(set_to_none=True)

            for _ in range(3):  # the third call compiles the whole-step plan (docs/remat.md)
                step()
            steps[label] = step
    seconds: dict[str, list[float]] = {f"{label}{clock}": [] for label in steps for clock in ("", " cpu")}
    for _ in range(timed):
        for label, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            step()
            seconds[label].append(time.perf_counter() - start)
            seconds[f"{label} cpu"].append(time.process_time() - cpu)
    return seconds


def _time_in_fresh_process(family: str, configs: dict[str, dict[str, Any]], sizes: Sizes) -> dict[str, list[float]]:
    spec = json.dumps({"family": family, "configs": configs, "sizes": sizes.__dict__, "timed": sizes.timed})
    proc = subprocess.run(
        [sys.executable, __file__, "_time", spec], env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"timing {family} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- row 1: the table ---------------------------------------------------------------------


def _same(dump: str, reference: str, exact: bool) -> str:
    a, b = torch.load(dump), torch.load(reference)
    pairs = [(a["loss"], b["loss"])] + [(a["grads"][k], b["grads"][k]) for k in b["grads"]]
    if exact:
        differ = sum(not (x is None and y is None) and (x is None or y is None or not torch.equal(x, y)) for x, y in pairs)
        return "bitwise" if not differ else f"NO ({differ}/{len(pairs)} differ)"
    try:
        for x, y in pairs:
            if x is not None or y is not None:
                torch.testing.assert_close(x, y)
    except AssertionError as e:
        return f"NO ({str(e).splitlines()[0]})"
    return "assert_close"


def floor_rows(args: argparse.Namespace, sizes: Sizes) -> None:
    """Row 1: below the remat-only floor (module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="memopt-offbench-") as tmp:
        for family in args.families:
            for codegen in args.codegens:
                _log(f"{family} {codegen}: below the floor")
                base = _measure(family, _options(codegen, "none"), sizes, tmp, f"{codegen}-none")
                floor = _measure(family, _options(codegen, "floor"), sizes, tmp, f"{codegen}-floor")
                budget = int(base["baseline"] + args.below_floor * (floor["floor"] - base["baseline"]))
                configs = _configs(codegen, ("none", "floor", "offload"), budget, sizes, args)
                off = _measure(family, configs["offload"], sizes, tmp, f"{codegen}-offload")
                seconds = _timed(family, configs, sizes)
                same = _same(off["dump"], base["dump"], exact=codegen == "eager")
                rows.append((family, codegen, base, floor, off, budget, seconds, same))
    _memory_table(rows)
    _time_table(rows)


def feasible_rows(args: argparse.Namespace, sizes: Sizes) -> None:
    """At a budget rematerialization alone can meet: remat alone against the
    planner's plan with offload, measured (module docstring)."""
    print(
        "| model | codegen | budget | remat alone (est / OS) | OS peak / budget | modelled s "
        "| with offload: plan | est / OS | OS peak / budget | modelled s | loss, grads "
        "| step wall s: unbudgeted / remat / with offload | paired wall ratio | CPU s ratio |"
    )
    print("|---|---|--:|--:|--:|--:|---|--:|--:|--:|---|--:|--:|--:|")
    with tempfile.TemporaryDirectory(prefix="memopt-offbench-") as tmp:
        for family in args.families:
            for codegen in args.codegens:
                _log(f"{family} {codegen}: a feasible budget")
                base = _measure(family, _options(codegen, "none"), sizes, tmp, f"{codegen}-none")
                baseline = base["baseline"]
                budget = int(baseline + args.feasible * (base["estimated_peak"] - baseline))
                configs = _configs(codegen, ("none", "remat", "offload"), budget, sizes, args)
                remat = _measure(family, configs["remat"], sizes, tmp, f"{codegen}-remat")
                off = _measure(family, configs["offload"], sizes, tmp, f"{codegen}-offload")
                seconds = _timed(family, configs, sizes)
                same = _same(off["dump"], base["dump"], exact=codegen == "eager")
                print(_feasible_row(family, codegen, base, remat, off, budget, seconds, same), flush=True)


def _configs(codegen: str, kinds: tuple[str, ...], budget: int, sizes: Sizes, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    bandwidth = None if not args.offload_bandwidth else args.offload_bandwidth * MiB
    return {k: _options(codegen, k, budget, sizes, bandwidth) for k in kinds}


def _timed(family: str, configs: dict[str, dict[str, Any]], sizes: Sizes) -> dict[str, list[float]]:
    seconds = _time_in_fresh_process(family, configs, sizes)
    _log(f"  step seconds: { {k: [round(s, 2) for s in v] for k, v in seconds.items()} }")
    return seconds


def _ratios(seconds: dict[str, list[float]], kinds: tuple[str, str]) -> tuple[str, str, str]:
    """Median wall seconds of none and ``kinds``; the medians of the per-round wall
    ratios to none; the ratios of median CPU seconds to none's."""
    med = {k: statistics.median(v) for k, v in seconds.items()}
    walls = " / ".join(f"{med[k]:.2f}" for k in ("none", *kinds))
    paired = " / ".join(f"{statistics.median(a / b for a, b in zip(seconds[k], seconds['none'])):.2f}x" for k in kinds)
    cpu = " / ".join(f"{med[f'{k} cpu'] / med['none cpu']:.2f}x" for k in kinds)
    return walls, paired, cpu


def _feasible_row(family: str, codegen: str, base: dict, remat: dict, off: dict, budget: int, seconds: dict, same: str) -> str:
    fb = format_bytes
    baseline = base["baseline"]

    def ms(info: dict) -> str:
        x = info["modelled_seconds"]
        return "-" if x is None else f"{x * 1e3:.2f} ms"

    plan = ", ".join(f"{k} {v}" for k, v in sorted(off["counts"].items()) if k != "save") or "nothing"
    walls, paired, cpu = _ratios(seconds, ("remat", "offload"))
    return (
        f"| {family} | {codegen} | {fb(budget - baseline)} "
        f"| {fb(remat['estimated_peak'] - baseline)} / {fb(remat['os_growth'])} | {(baseline + remat['os_growth']) / budget:.3f} | {ms(remat)} "
        f"| {plan} | {fb(off['estimated_peak'] - baseline)} / {fb(off['os_growth'])} | {(baseline + off['os_growth']) / budget:.3f} | {ms(off)} "
        f"| {same} | {walls} | {paired} | {cpu} |"
    )


def _memory_table(rows: list[tuple]) -> None:
    """Row 1's memory table: estimates, and the OS view trimmed / warm."""
    fb = format_bytes

    def views(info: dict[str, Any], estimated: int | None = None) -> str:
        measured = f"{fb(info['os_growth'])} / {fb(info['os_warm_growth'])}"
        return measured if estimated is None else f"{fb(estimated)} / {measured}"

    print(
        "| model | codegen | unbudgeted (est / trimmed / warm) | remat floor (est / trimmed / warm) | storage floor (est) "
        "| budget | offload (est / trimmed / warm) | offload, allocator with copies inline (vs est) "
        "| offload vs remat floor (est / trimmed / warm) | offload peak / budget (trimmed / warm) | offloaded | recomputed |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for family, codegen, base, floor, off, budget, _, _ in rows:
        baseline = base["baseline"]
        floor_growth, off_growth = floor["floor"] - baseline, off["estimated_peak"] - baseline
        vs_floor = " / ".join(
            f"{a / b - 1:+.1%}" if b else "-"  # a small step's warm view can read 0
            for a, b in ((off_growth, floor_growth), (off["os_growth"], floor["os_growth"]), (off["os_warm_growth"], floor["os_warm_growth"]))
        )  # fmt: skip
        ratio = " / ".join(f"{(baseline + off[k]) / budget:.3f}" for k in ("os_growth", "os_warm_growth"))
        ratio += "" if off["feasible"] else " (infeasible)"
        print(
            f"| {family} | {codegen} | {views(base, base['estimated_peak'] - baseline)} | {views(floor, floor_growth)} "
            f"| {fb(base['storage_floor'] - baseline)} | {fb(budget - baseline)} | {views(off, off_growth)} "
            f"| {fb(off['alloc_sync_growth'])} ({off['alloc_sync_growth'] / off_growth - 1:+.1%}) | {vs_floor} | {ratio} | {off['counts'].get('offload', 0)} ({fb(off['offloaded_bytes'])}) "
            f"| {off['counts'].get('recompute', 0)} |",
            flush=True,
        )


def _time_table(rows: list[tuple]) -> None:
    print()
    print(
        "| model | codegen | offload: loss, grads | modelled s: floor / offload | step wall s: unbudgeted / remat floor / offload "
        "| paired wall ratio: floor / offload | CPU s ratio: floor / offload |"
    )
    print("|---|---|---|--:|--:|--:|--:|")
    for family, codegen, _, floor, off, _, seconds, same in rows:
        walls, paired, cpu = _ratios(seconds, ("floor", "offload"))
        modelled = " / ".join("-" if i["modelled_seconds"] is None else f"{i['modelled_seconds'] * 1e3:.1f} ms" for i in (floor, off))
        print(f"| {family} | {codegen} | {same} | {modelled} | {walls} | {paired} | {cpu} |", flush=True)


# -- row 2: modelled time of each technique alone and combined ----------------------------


def mix_rows(args: argparse.Namespace, sizes: Sizes) -> None:
    from memopt.runtime import bandwidth

    print(
        "| model (region) | bandwidth | budget | remat alone | offload alone | compress alone (fp8) "
        "| remat + offload | remat + offload + fp8 |"
    )
    print("|---|--:|--:|---|---|---|---|---|")
    for family in args.families:
        _log(f"{family}: capturing the step")
        step, timeline, region = _captured(family, sizes)
        for given in args.bandwidth:
            bw = bandwidth("disk", "cpu") if given == 0 else (given * MiB, given * MiB)
            for budget in _mix_budgets(step, timeline, args.mix_points):
                _log(f"  {family} bandwidth {bw[0] / MiB:.0f}/{bw[1] / MiB:.0f} MiB/s budget {format_bytes(budget)}")
                cells = _mix_cells(step, timeline, budget, bw, sizes)
                label = "measured " if given == 0 else ""
                print(
                    f"| {family} ({region}) | {label}{bw[0] / MiB:.0f} / {bw[1] / MiB:.0f} MiB/s | {format_bytes(budget)} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )


def _captured(family: str, sizes: Sizes) -> tuple[Any, Any, str]:
    """The region with the largest unoptimized peak as it enters memopt's pipeline, and
    its timeline."""
    from memopt.passes.pipeline import pass_names

    options = {"codegen": "eager", "disable_passes": tuple(pass_names())}
    _, compiled, inputs = _compiled(family, options, sizes.__dict__)
    with memopt.record() as explanation:
        torch.manual_seed(1)
        compiled(**inputs).loss.backward()
    record = max(explanation.step_regions(), key=lambda r: r.timeline_before.peak_bytes)
    return record.step, record.timeline_before, record.region


def _mix_budgets(step: Any, timeline: Any, points: list[float]) -> list[int]:
    """Budgets at ``points`` of the way from the remat floor (0) to the unoptimized peak (1)."""
    from memopt.plan.remat import plan_remat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        floor = plan_remat(step, 1).evaluation.timeline.peak_bytes
    return [int(floor + p * (timeline.peak_bytes - floor)) for p in points]


def _mix_cells(step: Any, timeline: Any, budget: int, bw: tuple[float, float], sizes: Sizes) -> list[str]:
    from memopt.analysis.storage_cost import bandwidth_for
    from memopt.config import MemoptConfig
    from memopt.graph.partition import saved_names
    from memopt.plan.planner import plan_region
    from memopt.plan.remat import plan_remat
    from memopt.plan.remat_problem import evaluate
    from memopt.plan.storage import StorageOptions, plan_storage

    reference = evaluate(step, frozenset(saved_names(step))).seconds  # the min-cut partition's own recompute
    band = bandwidth_for(torch.device("cpu"), *bw)

    def cell(peak: int, seconds: float, extra: str = "") -> str:
        fits = "" if peak <= budget else f"**infeasible** (peak {format_bytes(peak)})"
        return fits or f"{seconds * 1e3:.2f} ms{extra}"

    remat = plan_remat(step, budget).evaluation
    cells = [cell(remat.timeline.peak_bytes, remat.seconds - reference)]
    min_bytes = {} if sizes.offload_min_bytes is None else {"offload_min_bytes": sizes.offload_min_bytes}
    offload_alone = StorageOptions(offload="disk", bandwidth=band, min_offload_bytes=sizes.offload_min_bytes or 1 << 20)
    for options in (offload_alone, StorageOptions(compress="fp8")):
        alone = plan_storage(step, timeline, options, budget)
        assert alone.timeline is not None
        cells.append(cell(alone.timeline.peak_bytes, alone.seconds, f" ({len(alone.chosen)} values)"))
    for extra in ({}, {"compress_activations": "fp8"}):
        config = MemoptConfig.from_options({"memory_budget": budget, "offload": "disk", **min_bytes, **extra})
        options = StorageOptions(extra.get("compress_activations"), "disk", band, config.offload_min_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", memopt.MemoptWarning)
            plan = plan_region(step, timeline, config, options)
        seconds = plan.solver.get("recompute_seconds_model", reference) + plan.solver.get("storage_seconds_model", 0.0)
        counts = Counter(d.policy for d in plan.decisions if d.policy != "save")
        listed = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        mixed = " **mixed**" if len(counts) > 1 else ""
        cells.append(cell(plan.estimated_peak_after, seconds - reference, f" ({listed or 'nothing'}){mixed}"))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["floor", "feasible", "mix", "all", "_time"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="*", default=None, choices=list(FAMILIES))
    parser.add_argument("--codegens", nargs="*", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument(
        "--offload-bandwidth", type=float, default=1024,
        help="floor: offload_bandwidth in MiB/s for every process (0: memopt measures it in each process)",
    )  # fmt: skip
    parser.add_argument("--bandwidth", nargs="*", type=float, default=[1024, 300, 100], help="mix: disk MiB/s to plan with (0: measured)")
    parser.add_argument("--mix-points", nargs="*", type=float, default=[0.5, 0.25, 0.1, 0.03, 0.0])
    parser.add_argument(
        "--feasible", type=float, default=0.5,
        help="feasible: the budget's growth as a fraction of the unbudgeted estimated growth",
    )  # fmt: skip
    parser.add_argument(
        "--below-floor", type=float, default=BELOW_FLOOR,
        help="floor: the offload budget's growth as a fraction of the remat-only floor's growth",
    )  # fmt: skip
    parser.add_argument("--fast", action="store_true", help="small sizes and few steps: a smoke run")
    args = parser.parse_args()
    if args.what == "_time":
        spec = json.loads(args.spec)
        print(json.dumps(time_steps(spec["family"], spec["configs"], spec["sizes"], spec["timed"])))
        return
    sizes = Sizes.fast() if args.fast else Sizes()
    families = args.families
    if args.what in ("floor", "all"):
        args.families = families or ["gpt2", "llama"]
        floor_rows(args, sizes)
    if args.what in ("feasible", "all"):
        args.families = families or ["gpt2", "llama"]
        feasible_rows(args, sizes)
    if args.what in ("mix", "all"):
        args.families = families or ["llama"]
        mix_rows(args, sizes)


if __name__ == "__main__":
    main()
