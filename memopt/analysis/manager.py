"""Analyses and the `AnalysisManager` that caches them between passes.

An analysis is a pure function of a `StepGraphs` (and of other analyses, which it asks
the manager for). The manager computes each analysis on first request and caches the
result until a pass reports that it changed the graphs without preserving it, in the
manner of LLVM's new pass manager. Results never live in ``node.meta``, where they
would go stale silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from memopt.graph.step import StepGraphs

__all__ = ["Analysis", "AnalysisManager", "PreservedAnalyses"]

T = TypeVar("T")


class Analysis(Generic[T]):
    """Base class of analyses. Subclasses set a unique ``name`` and implement `compute`.

    ``compute`` must not mutate the graphs; it may request other analyses through
    ``manager.get``.
    """

    name: ClassVar[str] = ""

    def compute(self, step: StepGraphs, manager: AnalysisManager) -> T:
        raise NotImplementedError


@dataclass(frozen=True)
class PreservedAnalyses:
    """What a pass left valid: all analyses, or the named ones only."""

    names: frozenset[str] = frozenset()
    all: bool = False

    @classmethod
    def everything(cls) -> PreservedAnalyses:
        return cls(all=True)

    @classmethod
    def none(cls) -> PreservedAnalyses:
        return cls()

    @classmethod
    def only(cls, *names: str) -> PreservedAnalyses:
        return cls(names=frozenset(names))

    def preserves(self, name: str) -> bool:
        return self.all or name in self.names


class AnalysisManager:
    """Computes analyses lazily over one `StepGraphs` and caches them."""

    def __init__(self, step: StepGraphs) -> None:
        self.step = step
        self._cache: dict[str, Any] = {}
        self.compute_seconds: dict[str, float] = {}

    def get(self, analysis: type[Analysis[T]] | Analysis[T]) -> T:
        """The result of ``analysis`` on the current graphs, computed if not cached."""
        instance = analysis() if isinstance(analysis, type) else analysis
        name = instance.name or type(instance).__name__
        if name not in self._cache:
            start = time.perf_counter()
            self._cache[name] = instance.compute(self.step, self)
            self.compute_seconds[name] = (
                self.compute_seconds.get(name, 0.0) + time.perf_counter() - start
            )
        return self._cache[name]  # type: ignore[no-any-return]

    def cached(self, name: str) -> bool:
        return name in self._cache

    def invalidate(self, preserved: PreservedAnalyses) -> list[str]:
        """Drop every cached analysis ``preserved`` does not name; return the dropped."""
        dropped = [n for n in self._cache if not preserved.preserves(n)]
        for n in dropped:
            del self._cache[n]
        return dropped

    def reset(self, step: StepGraphs) -> None:
        """Point the manager at new graphs (after a fallback) and drop everything."""
        self.step = step
        self._cache.clear()
