"""The memory timeline as a picture: live bytes across the step, stacked by category.

Needs matplotlib (``pip install memopt[plot]``); everything else in memopt works
without it.
"""

from __future__ import annotations

from types import ModuleType

from memopt.analysis.timeline import CATEGORIES, MemoryTimeline
from memopt.units import format_bytes

__all__ = ["plot_timeline", "plot_tradeoff", "region_spans", "pyplot"]

MISSING = "memopt's plots need matplotlib: pip install 'memopt[plot]' (or matplotlib)"
"""How to get what a plot needs, in the `ImportError` it raises without matplotlib."""


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend. Raises `ImportError`
    naming why and `MISSING` (how to install it) when matplotlib cannot be imported:
    callers that plot after long work (``memopt report --plot``) call this first."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"{MISSING} ({type(exc).__name__}: {exc})") from exc
    return plt

_COLORS = {
    "parameters": "#4C72B0",
    "buffers": "#64B5CD",
    "inputs": "#8172B2",
    "gathered_parameters": "#8C8C8C",
    "saved_activations": "#DD8452",
    "gradients": "#55A868",
    "optimizer_state": "#DA8BC3",
    "outputs": "#937860",
    "temporaries": "#C44E52",
}


def _series(timeline: MemoryTimeline) -> dict[str, list[float]]:
    n = len(timeline.points)
    series = {c: [0.0] * n for c in CATEGORIES}
    for iv in timeline.intervals:
        start = max(iv.start, 0)
        end = n - 1 if iv.end is None else min(iv.end, n - 1)
        for i in range(start, end + 1):
            series[iv.category][i] += iv.nbytes
    return series


def region_spans(timeline: MemoryTimeline) -> list[tuple[int, str, str]]:
    """Where each graph of each region starts in ``timeline``: (first point, region,
    graph), in order. A step split by graph breaks runs the regions' forwards in
    order and their backwards in reverse; the plot marks and labels each span."""
    spans: list[tuple[int, str, str]] = []
    for i, p in enumerate(timeline.points):
        if not spans or spans[-1][1:] != (p.region, p.graph):
            spans.append((i, p.region, p.graph))
    return spans


def plot_timeline(
    timeline: MemoryTimeline,
    path: str,
    *,
    title: str | None = None,
    budget_bytes: int | None = None,
) -> str:
    """Write a stacked-area plot of ``timeline`` to ``path`` (format from the
    extension: .png, .svg, .pdf); returns ``path``. Needs matplotlib (`pyplot`)."""
    plt = pyplot()
    series = _series(timeline)
    scale, unit = _unit(timeline.peak_bytes)
    x = list(range(len(timeline.points)))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    used = [c for c in CATEGORIES if any(series[c])]
    ax.stackplot(x, *[[v / scale for v in series[c]] for c in used],
                 labels=[c.replace("_", " ") for c in used], colors=[_COLORS[c] for c in used], alpha=0.9)
    top = max(timeline.peak_bytes, budget_bytes or 0) / scale * 1.12
    spans = region_spans(timeline)
    if len({region for _, region, _ in spans}) > 1:  # a step of several regions: mark and label each graph
        for start, region, graph in spans:
            if start:
                ax.axvline(start, color="black", linestyle=":", linewidth=1)
            ax.text(start, 0, f"{region} {graph}", va="bottom", ha="left", fontsize=7, rotation=90,
                    bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
    else:
        boundary = next((i for i, p in enumerate(timeline.points) if p.graph == "backward"), None)
        if boundary is not None:
            ax.axvline(boundary, color="black", linestyle=":", linewidth=1)
            ax.text(boundary, 0, " backward", va="bottom", fontsize=8)
    ax.plot([timeline.peak_index], [timeline.peak_bytes / scale], marker="v", color="black")
    ax.annotate(f"peak {format_bytes(timeline.peak_bytes)}", (timeline.peak_index, timeline.peak_bytes / scale),
                textcoords="offset points", xytext=(5, 5), fontsize=8)
    if budget_bytes is not None:
        ax.axhline(budget_bytes / scale, color="red", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("op in the step (forward, then backward)")
    ax.set_ylabel(f"live memory ({unit})")
    ax.set_title(title or "memopt: estimated memory timeline of one step")
    ax.set_ylim(0, top)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tradeoff(
    tradeoff: list[dict[str, float]], path: str, *, chosen_peak: int | None = None, budget_bytes: int | None = None
) -> str:
    """Modelled peak against recompute time for the plans the planner considered.
    Needs matplotlib (`pyplot`)."""
    plt = pyplot()
    peaks = [p["predicted_peak_bytes"] for p in tradeoff]
    scale, unit = _unit(int(max(peaks)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p / scale for p in peaks], [p["recompute_seconds"] * 1e3 for p in tradeoff], marker="o")
    if chosen_peak is not None:
        ax.axvline(chosen_peak / scale, color="green", linestyle=":", label="chosen plan (exact)")
    if budget_bytes is not None:
        ax.axvline(budget_bytes / scale, color="red", linestyle="--", label="budget")
    ax.set_xlabel(f"modelled peak ({unit})")
    ax.set_ylabel("recompute time, ms (roofline model)")
    ax.set_title("memopt: peak vs recompute trade-off")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _unit(peak: int) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if peak >= scale:
            return float(scale), unit
    return 1.0, "B"
