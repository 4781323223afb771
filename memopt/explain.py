"""`memopt.explain`: compile and run a function once, and say what memopt did.

The `Explanation` holds, per compiled region, the forward and backward graphs after
each pass (readable code), the passes with their timing and op-count changes, and the
fallbacks with their reasons. ``report()`` renders it as text; ``to_dict()`` as JSON.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from tabulate import tabulate

from memopt.backends.record import RegionRecord, recording
from memopt.config import MemoptConfig
from memopt.passes.instruments import op_counts
from memopt.passes.manager import Fallback
from memopt.precision_report import precision_lines

__all__ = ["explain", "record", "Explanation"]

SCHEMA_VERSION = 1


@dataclass
class Explanation:
    """What memopt did to every region compiled during one `explain` call."""

    regions: list[RegionRecord] = field(default_factory=list)
    config: MemoptConfig | None = None

    @property
    def ran_backward(self) -> bool:
        """Whether any region's backward graph was compiled (and so run)."""
        return any("backward" in r.compiled_graphs for r in self.regions)

    @property
    def codegen(self) -> str:
        return self._config().codegen

    def _config(self) -> MemoptConfig:
        if self.config is not None:
            return self.config
        return self.regions[0].config if self.regions else MemoptConfig()

    @property
    def fallbacks(self) -> list[Fallback]:
        return [fb for r in self.regions for fb in r.fallbacks]

    def region(self, index: int = 0) -> RegionRecord:
        if not self.regions:
            raise IndexError("no region was compiled (did the function run any tensor op?)")
        return self.regions[index]

    def graph_code(self, graph: str = "forward", *, region: int = 0, after: str | None = None) -> str:
        """Readable code of ``graph`` in region ``region`` after pass ``after``."""
        return self.region(region).graph_code(graph, after)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (schema in docs/usage.md)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self._config().to_dict(),
            "ran_backward": self.ran_backward,
            "regions": [_region_dict(r) for r in self.regions],
            "fallbacks": [fb.to_dict() for fb in self.fallbacks],
        }

    def report(self) -> str:
        """Human-readable summary: per region, the passes run and any fallback."""
        lines = [
            f"memopt explanation: {len(self.regions)} region(s), codegen={self.codegen}"
            + ("" if self.ran_backward else " (forward only)")
        ]
        for r in self.regions:
            lines.append("")
            lines.append(f"region {r.region} ({r.kind}): graphs {_graph_sizes(r)}")
            rows = [
                [p.name, p.status, "yes" if p.modified else "no", f"{p.seconds * 1e3:.1f}", _delta(p.op_delta)]
                for p in r.passes
            ]
            if rows:
                lines.append(
                    tabulate(rows, headers=["pass", "status", "changed", "ms", "op-count change"])
                )
            lines.extend(precision_lines(r.passes))  # numerics-changing passes (docs/precision.md)
            for fb in r.fallbacks:
                lines.append(f"FALLBACK: pass {fb.pass_name!r} failed: {fb.reason}; region ran unoptimized")
        return "\n".join(lines)


def _graph_sizes(r: RegionRecord) -> str:
    if r.step is None:
        return "(not compiled by memopt's pipeline)"
    parts = [f"{name} {sum(op_counts(gm).values())} ops" for name, gm in r.step.graphs()]
    return ", ".join(parts)


def _delta(delta: Mapping[str, int]) -> str:
    if not delta:
        return ""
    items = sorted(delta.items(), key=lambda kv: -abs(kv[1]))
    shown = ", ".join(f"{k} {v:+d}" for k, v in items[:4])
    return shown + (f", ... ({len(items) - 4} more)" if len(items) > 4 else "")


def _region_dict(r: RegionRecord) -> dict[str, Any]:
    return {
        "region": r.region,
        "kind": r.kind,
        "pipeline_seconds": round(r.pipeline_seconds, 6),
        "passes": [p.to_dict() for p in r.passes],
        "fallbacks": [fb.to_dict() for fb in r.fallbacks],
        "graphs": [s.to_dict() for s in r.snapshots],
        "op_counts": {}
        if r.step is None
        else {name: dict(op_counts(gm)) for name, gm in r.step.graphs()},
    }


def explain(
    fn: Callable[..., Any],
    *args: Any,
    options: Mapping[str, Any] | MemoptConfig | None = None,
    **kwargs: Any,
) -> Explanation:
    """Compile ``fn(*args, **kwargs)`` with memopt, run it once, and explain.

    If the output requires grad, the backward of the loss (the output if it is a
    scalar, else the sum of every output element) is run too, so both graphs exist.
    Gradients are computed with ``torch.autograd.grad``: ``.grad`` fields are left
    untouched. Side effects of running ``fn`` once (BatchNorm running statistics, RNG
    state) do happen.
    """
    from memopt.backends.dynamo import memopt_backend

    config = MemoptConfig.from_options(options)
    backend = functools.partial(memopt_backend, options=config)
    compiled = torch.compile(fn, backend=backend)
    with recording() as records:
        out = compiled(*args, **kwargs)
        loss = _loss_of(out)
        if loss is not None:
            leaves = list(_autograd_leaves(loss))
            if leaves:
                torch.autograd.grad(loss, leaves, allow_unused=True)
    return Explanation(list(records), config)


@contextlib.contextmanager
def record() -> Iterator[Explanation]:
    """Explain every region memopt compiles inside the context (for code that
    compiles and trains as usual)::

        with memopt.record() as explanation:
            loss = compiled_model(x); loss.backward()
        print(explanation.report())

    The explanation fills in as regions compile. While recording, compile caches
    are bypassed so that every region goes through memopt's pipeline.
    """
    with recording() as records:
        yield Explanation(records)


def _loss_of(out: Any) -> torch.Tensor | None:
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tensors:
        return None
    if len(tensors) == 1 and tensors[0].numel() == 1:
        return tensors[0].reshape(())
    return torch.stack([t.float().sum() for t in tensors]).sum()


def _autograd_leaves(loss: torch.Tensor) -> Iterable[torch.Tensor]:
    """Leaf tensors (parameters, inputs) the loss's autograd graph reaches."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    found: dict[int, torch.Tensor] = {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found.values()
