"""Measure a step in a fresh Python process started with glibc's malloc thresholds fixed.

    from memopt.testing.measure import measure_in_fresh_process
    r = measure_in_fresh_process("benchmarks/estimate_accuracy.py:workload",
                                 kwargs={"name": "hf_vit"}, warmup=3)
    r.last.os_peak_growth_bytes, r.last.peak_growth_bytes, r.info

The factory, named ``"package.module:function"`` or ``"path/to/file.py:function"``, is
called in the new process with ``kwargs`` (JSON values) and returns the step to run: a
callable of no arguments, or a `Workload` that adds an unmeasured ``prepare`` before
every step and an ``info`` whose JSON-able dict comes back with the measurements.
Nothing is pickled: the child builds its own model. The first ``warmup`` steps run
unmeasured, then each of the ``repeat`` measurements runs the step three times, each
after the workload's ``prepare`` and a ``gc.collect()``:

1. after ``malloc_trim(0)`` (`memopt.testing.os_memory.trim_heap`), under
   `memopt.testing.measure.measure_peak`: the allocator view;
2. after ``malloc_trim(0)``, with no profiler (`memopt.testing.measure.
   measure_os_growth`): the OS view, ``os_peak_growth_bytes``. Trimming first makes it
   independent of what earlier code left free in the heap, and charges the step with
   every heap page its small allocations touch;
3. right after step 2, with no trim and no profiler: the warm-heap OS view,
   ``os_warm_peak_growth_bytes`` (a training loop's steady state: heap pages the
   previous step touched are still resident and reused).

The profiler's own event records are resident memory too; measuring the OS views in
steps it does not run keeps them out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memopt._factory import load_factory, split_spec
from memopt.testing.os_memory import MALLOC_ENV, trim_heap

if TYPE_CHECKING:
    from memopt.testing.measure import PeakMeasurement

__all__ = ["FreshProcessResult", "Workload", "measure_in_fresh_process"]


@dataclass(frozen=True)
class Workload:
    """A step to measure, as a factory for `measure_in_fresh_process` returns it."""

    step: Callable[[], Any]
    prepare: Callable[[], Any] | None = None
    """Runs before every step, warm-up or measured, outside the measurement (e.g.
    ``model.zero_grad(set_to_none=True)``)."""
    info: Callable[[], dict[str, Any]] | None = None
    """Called after the measured steps; its JSON-able dict is returned as
    `FreshProcessResult.info` (e.g. memopt's estimate for the same step)."""


@dataclass(frozen=True)
class FreshProcessResult:
    """The measured steps of one fresh process, in order, and the workload's info."""

    measurements: tuple[PeakMeasurement, ...]
    info: dict[str, Any]
    env: dict[str, str]
    """The malloc variables the process started with."""

    @property
    def last(self) -> PeakMeasurement:
        return self.measurements[-1]

    @property
    def median(self) -> PeakMeasurement:
        """The measured step whose OS-view peak growth is the median (the allocator view
        of a settled step repeats exactly; the resident set varies by a few MiB from step
        to step with what glibc's heap reuses). Without an OS view: the last step."""
        with_os = [m for m in self.measurements if m.os_peak_growth_bytes is not None]
        if not with_os:
            return self.last
        ranked = sorted(with_os, key=lambda m: m.os_peak_growth_bytes)  # type: ignore[arg-type, return-value]
        return ranked[(len(ranked) - 1) // 2]


_BOOT = (
    "import json, sys; spec = json.load(open(sys.argv[1])); sys.path[:0] = spec['sys_path']; "
    "from memopt.testing.fresh_process import _child_main; _child_main(spec)"
)


def measure_in_fresh_process(
    factory: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    warmup: int = 3,
    repeat: int = 1,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 900,
) -> FreshProcessResult:
    """Build ``factory(**kwargs)`` in a new interpreter whose environment has
    `memopt.testing.os_memory.MALLOC_ENV` (overridden by ``env``), run ``warmup``
    unmeasured steps, then measure ``repeat`` steps. Raises ``RuntimeError`` with the
    child's stderr if it fails."""
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got warmup={warmup}, repeat={repeat}")
    split_spec(factory)  # a malformed name fails here, not in the child
    child_env = {**os.environ, **MALLOC_ENV, **(env or {})}
    with tempfile.TemporaryDirectory(prefix="memopt-measure-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec = {
            "factory": factory, "kwargs": dict(kwargs or {}), "warmup": warmup, "repeat": repeat,
            "result": str(result_path), "sys_path": [p or os.getcwd() for p in sys.path],
        }
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-c", _BOOT, str(spec_path)],
            env=child_env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"measuring {factory} in a fresh process failed (exit code {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        result = json.loads(result_path.read_text())
    from memopt.testing.measure import PeakMeasurement

    malloc = {k: v for k, v in child_env.items() if k.startswith("MALLOC_")}
    measurements = tuple(PeakMeasurement(**m) for m in result["measurements"])
    return FreshProcessResult(measurements, result["info"], malloc)


def _child_main(spec: dict[str, Any]) -> None:
    """The fresh process's side: build, warm up, measure, write the result as JSON."""
    import gc

    from dataclasses import replace

    from memopt.testing.measure import measure_os_growth, measure_peak

    built = load_factory(spec["factory"])(**spec["kwargs"])
    workload = built if isinstance(built, Workload) else Workload(step=built)
    measure_peak(lambda: None)  # start the profiler once, so its set-up is in no measured step

    def ready(trim: bool) -> None:
        if workload.prepare is not None:
            workload.prepare()
        gc.collect()
        if trim:
            trim_heap()

    def measure() -> PeakMeasurement:
        ready(trim=True)
        allocator = measure_peak(workload.step)
        ready(trim=True)
        cold_peak, cold_end, note = measure_os_growth(workload.step)
        ready(trim=False)
        warm_peak, _, _ = measure_os_growth(workload.step)
        return replace(
            allocator, os_peak_growth_bytes=cold_peak, os_end_growth_bytes=cold_end, os_note=note,
            os_warm_peak_growth_bytes=warm_peak,
        )

    for _ in range(spec["warmup"]):
        ready(trim=True)
        workload.step()
    measurements = [asdict(measure()) for _ in range(spec["repeat"])]
    info = workload.info() if workload.info is not None else {}
    Path(spec["result"]).write_text(json.dumps({"measurements": measurements, "info": info}))
