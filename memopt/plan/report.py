"""Text tables of the memory plan: summary, breakdown at the peak, saved values."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from tabulate import tabulate

from memopt.analysis.timeline import CATEGORIES, MemoryTimeline
from memopt.plan.advice import OptionSaving, ParameterShare
from memopt.plan.plan import TensorDecision
from memopt.units import format_bytes

__all__ = [
    "summary_table", "breakdown_table", "decisions_table", "lines_table", "tradeoff_table", "storage_table",
    "savings_table", "dominant_table", "WIDTH", "clip", "wrap",
]


def summary_table(
    before: MemoryTimeline,
    after: MemoryTimeline,
    budget_bytes: int | None = None,
    optimizer_state_bytes: int | None = None,
) -> str:
    """Estimated peak before and after memopt, savings, and the budget if set."""
    saved = before.peak_bytes - after.peak_bytes
    rows = [
        ["live at step start (params, buffers, inputs)", format_bytes(after.baseline_bytes)],
        ["estimated peak, unoptimized", format_bytes(before.peak_bytes)],
        ["estimated peak, with memopt", format_bytes(after.peak_bytes)],
        ["saved by memopt", f"{format_bytes(saved)} ({_pct(saved, before.peak_bytes)})"],
        ["peak growth over step start", format_bytes(after.peak_growth_bytes)],
    ]
    if budget_bytes is not None:
        verdict = "within" if after.peak_bytes <= budget_bytes else "OVER"
        rows.append(["memory budget", f"{format_bytes(budget_bytes)} ({verdict})"])
    if optimizer_state_bytes is not None:
        rows.append(["optimizer state (outside the step's graphs)", format_bytes(optimizer_state_bytes)])
        rows.append(["estimated peak + optimizer state", format_bytes(after.peak_bytes + optimizer_state_bytes)])
    return tabulate(rows, headers=["summary", ""], tablefmt="simple")


def breakdown_table(timeline: MemoryTimeline) -> str:
    """Live bytes by category at the estimated peak."""
    breakdown = timeline.peak_breakdown
    point = timeline.points[timeline.peak_index] if timeline.points else None
    where = f"{point.graph} {point.node}" + (f" of region {point.region}" if point.region else "") if point else "-"
    rows = [
        [category.replace("_", " "), format_bytes(breakdown[category]), _pct(breakdown[category], timeline.peak_bytes)]
        for category in CATEGORIES
        if breakdown[category]
    ]
    rows.append(["total", format_bytes(timeline.peak_bytes), "100%"])
    return tabulate(rows, headers=[f"at the peak (during {where})", "bytes", "share"])


WIDTH = 120
"""Columns the report's tables and notes fit in."""


def decisions_table(decisions: Sequence[TensorDecision], limit: int = 10) -> str:
    """The largest values backward needs, with memopt's decision, its reason (a note
    under the table, numbered: many values share one) and the user line that produced
    it (``file:line``, the module's path and as much of the code as fits in `WIDTH`
    columns; the whole line is the decision's ``source``). ``limit`` 0: only how many
    there are."""
    ranked = sorted(decisions, key=lambda d: -d.bytes)[:limit]
    if not ranked:
        return f"{len(decisions)} value(s) backward needs; report(top=N) or --top N lists the N largest"
    reasons = list(dict.fromkeys(d.reason for d in ranked))
    rows = [
        [
            d.node_name,
            "x".join(str(s) for s in d.shape) or "scalar",
            d.dtype,
            format_bytes(d.bytes),
            f"{d.policy} [{reasons.index(d.reason) + 1}]",
        ]
        for d in ranked
    ]
    headers = ["forward value", "shape", "dtype", "bytes", "decision"]
    room = max(WIDTH - len(tabulate(rows, headers=headers).splitlines()[1]) - 2, 24)
    for row, d in zip(rows, ranked):
        row.append(_source_cell(d, room))
    more = len(decisions) - len(ranked)
    lines = [tabulate(rows, headers=[*headers, "produced by"])]
    if more > 0:
        lines.append(f"... and {more} smaller value(s)")
    lines += [wrap(f"[{i}] {reason}", indent="    ") for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


def _source_cell(d: TensorDecision, room: int) -> str:
    if d.source_file is None:  # a model of torch's modules only (nn.Sequential): its module locates it
        return clip(f"{d.source or '(no source line)'}" + (f"  {d.module}" if d.module else ""), room)
    where = f"{_line(d)}" + (f"  {d.module}" if d.module else "")
    return clip(f"{where}  {_code(d)}".rstrip(), room)


def _line(d: TensorDecision) -> str:
    """``file.py:123`` of the decision's source, or "(no source line)"."""
    return "(no source line)" if d.source_file is None else f"{d.source_file.rsplit('/', 1)[-1]}:{d.source_line}"


def _code(d: TensorDecision) -> str:
    """The code of the decision's source line ("" when none was recorded)."""
    return (d.source or "").split(": ", 1)[1] if d.source_file is not None and ": " in (d.source or "") else ""


def lines_table(decisions: Sequence[TensorDecision], limit: int = 10) -> str:
    """The values backward needs grouped by the source line that made them, the lines
    holding the most bytes first: a layer's line run by every layer of a deep model is
    one row. Per line: the bytes and number of its values, their decisions, the
    modules that ran it (layer indices that differ written ``*``: ``h.*.mlp.c_fc``)
    and, on the row's next line, the code. The bytes of all rows (and of the lines
    left out, counted in the last line) add up to the values' bytes."""
    groups: dict[tuple[str | None, int | None], list[TensorDecision]] = {}
    for d in decisions:
        groups.setdefault((d.source_file, d.source_line), []).append(d)
    ranked = sorted(groups.values(), key=lambda g: (-sum(d.bytes for d in g), _line(g[0])))
    shown = ranked[:limit]
    rows = [
        [format_bytes(sum(d.bytes for d in g)), len(g), _policies(g), _line(g[0]), _modules(g)]
        for g in shown
    ]  # fmt: skip
    table = tabulate(rows, headers=["bytes", "values", "decisions", "source line", "modules"],
                     colalign=("right", "right", "left", "left", "left"), disable_numparse=True).splitlines()  # fmt: skip
    out = table[:2]
    for row, g in zip(table[2:], shown):
        out.append(row.rstrip())
        if _code(g[0]):
            out.append(clip("    " + _code(g[0]), WIDTH))
    rest = ranked[limit:]
    if rest:
        out.append(f"... and {len(rest)} more line(s): {format_bytes(sum(d.bytes for g in rest for d in g))} "
                   f"in {sum(len(g) for g in rest)} value(s)")  # fmt: skip
    return "\n".join(out)


def _policies(group: Sequence[TensorDecision]) -> str:
    counts: dict[str, int] = {}
    for d in group:
        counts[d.policy] = counts.get(d.policy, 0) + 1
    return ", ".join(f"{policy} {n}" for policy, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _modules(group: Sequence[TensorDecision]) -> str:
    """The modules of a line's values: one path, with each layer index that differs
    among them written ``*``; where the values come from different modules (a line
    calling two), their common dotted prefix and how many (without one, the first and
    how many more: an encoder's and a decoder's attention); "-" when none is recorded."""
    paths = sorted({d.module for d in group if d.module})
    if len(paths) <= 1:
        return paths[0] if paths else "-"
    split = [p.split(".") for p in paths]
    varying = {
        i for i in range(max(map(len, split)))
        if len({parts[i] for parts in split if i < len(parts) and parts[i].isdigit()}) > 1
    }  # fmt: skip
    patterns = sorted({".".join("*" if i in varying and part.isdigit() else part for i, part in enumerate(parts))
                       for parts in split})  # fmt: skip
    if len(patterns) == 1:
        return patterns[0]
    common: list[str] = []
    for parts in zip(*(p.split(".") for p in patterns)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return f"{'.'.join(common)} ({len(patterns)} modules)" if common else f"{patterns[0]} (+{len(patterns) - 1} more)"


def clip(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters, ending in "..." when cut."""
    return text if len(text) <= room else text[: room - 3].rstrip() + "..."


def wrap(text: str, indent: str = "  ", first: str = "") -> str:
    """``text`` wrapped to `WIDTH` columns, the first line indented by ``first``, the
    others by ``indent``."""
    return textwrap.fill(
        text, WIDTH, initial_indent=first, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def tradeoff_table(tradeoff: Sequence[dict[str, float]], chosen_peak: int | None = None) -> str:
    """The planner's peak/recompute trade-off curve, one row per distinct plan. The
    row of the plan the planner chose says "<- chosen". The curve is a sketch (quick
    solves at a few budgets), so the chosen plan may not be on it: then the row whose
    modelled peak is nearest ``chosen_peak``, if within 2%, says "<- nearest"."""
    marks = ["<- chosen" if point.get("chosen") else "" for point in tradeoff]
    if not any(marks) and tradeoff and chosen_peak is not None:
        nearest = min(range(len(tradeoff)), key=lambda i: abs(tradeoff[i]["predicted_peak_bytes"] - chosen_peak))
        if abs(tradeoff[nearest]["predicted_peak_bytes"] - chosen_peak) <= 0.02 * chosen_peak:
            marks[nearest] = "<- nearest"
    rows = []
    for point, mark in zip(tradeoff, marks):
        peak = point["predicted_peak_bytes"]
        rows.append([
            format_bytes(peak),
            f"{point.get('recompute_flops', 0.0) / 1e9:.3f}",
            f"{point['recompute_seconds'] * 1e3:.3f}",
            int(point["segments_recomputed"]),
            mark,
        ])  # fmt: skip
    headers = ["modelled peak", "recompute GFLOP", "recompute ms (model)", "segments recomputing", "plan"]
    # Numbers stay as formatted ("0.000", not tabulate's reparsed "0"), right-aligned.
    return tabulate(rows, headers=headers, disable_numparse=True, colalign=("right",) * 4 + ("left",))


def storage_table(decisions: Sequence[TensorDecision], recompute_seconds: float = 0.0) -> str:
    """Where saved values wait for backward, per technique: how many, the bytes held
    elsewhere (the host or disk footprint for offload), the modelled step time added
    and, for offload, the share of the transfers hidden under compute. Empty when
    every value is saved or recomputed."""
    rows = []
    total_seconds = recompute_seconds
    recomputed = [d for d in decisions if d.policy == "recompute"]
    if recomputed:
        rows.append(["recompute", len(recomputed), format_bytes(sum(d.bytes for d in recomputed)), "-",
                     f"{recompute_seconds * 1e3:.3f}", "-"])  # fmt: skip
    for kind in ("compress", "offload"):
        chosen = [d for d in decisions if d.policy == kind]
        if not chosen:
            continue
        seconds = sum(d.details.get("modelled_seconds", 0.0) for d in chosen)
        total_seconds += seconds
        transfer = sum(d.details.get("transfer_seconds", 0.0) for d in chosen)
        hidden = sum(d.details.get("hidden_seconds", 0.0) for d in chosen)
        kept = sum(d.details.get("stored_bytes", 0) for d in chosen)
        where = sorted({getattr(d.action, "target", getattr(d.action, "format", "")) for d in chosen})
        rows.append([
            f"{kind} ({', '.join(where)})", len(chosen), format_bytes(sum(d.bytes for d in chosen) - kept),
            format_bytes(sum(d.bytes for d in chosen)) if kind == "offload" else "-",
            f"{seconds * 1e3:.3f}", f"{hidden / transfer:.0%}" if kind == "offload" and transfer else "-",
        ])  # fmt: skip
    if not rows or len(rows) == 1 and recomputed:
        return ""
    rows.append(["total", sum(r[1] for r in rows), "", "", f"{total_seconds * 1e3:.3f}", ""])
    headers = ["technique", "values", "bytes off the device", "host/disk footprint", "added ms (model)", "transfer hidden"]
    return tabulate(rows, headers=headers)


def savings_table(savings: Sequence[OptionSaving]) -> str:
    """Each technique: whether the step uses it, the bytes it takes (or would take)
    off an estimated peak, that share of the peak (`OptionSaving.peak_bytes`: the peak
    now, or for an option in use the peak it came off, marked "before"), and how it
    was modelled. An option set that the plan chose for no value is "no (option on)"."""

    def share(s: OptionSaving) -> str:
        if s.saved_bytes is None:
            return "-"
        return _pct(s.saved_bytes, s.peak_bytes) + (" (before)" if s.in_use else "")

    rows = [
        [s.technique, s.option, "yes" if s.in_use else "no (option on)" if s.option_on else "no",
         "-" if s.saved_bytes is None else format_bytes(s.saved_bytes), share(s)]
        for s in savings
    ]  # fmt: skip
    table = tabulate(rows, headers=["technique", "option", "in use", "saves (now / would)", "of the peak"])
    notes = [wrap(f"{s.technique}: {s.basis}", indent="    ", first="  ") for s in savings]
    return "\n".join([table, "modelled as:", *notes])


def dominant_table(shares: Sequence[ParameterShare], peak_bytes: int) -> str:
    """Parameters that dominate the step: weight, gradient at the peak, optimizer
    state, and their share of the estimated peak."""
    rows = [
        [s.name, "x".join(str(d) for d in s.shape), format_bytes(s.weight_bytes), format_bytes(s.gradient_bytes),
         format_bytes(s.state_bytes), _pct(s.total_bytes, peak_bytes)]
        for s in shares
    ]  # fmt: skip
    return tabulate(rows, headers=["parameter", "shape", "weight", "gradient at peak", "optimizer state", "of the peak"])
