"""Text lines for `Explanation.report` about the numerics-changing passes.

What the issue asks a report to say: which values were lowered or compressed, the
bytes saved, and the error measured on the example inputs. The passes put all of it
in their details (``to_dict()["regions"][i]["passes"]``); this renders the gist, one
or two lines per pass that changed something.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from memopt.passes.manager import PassRecord

__all__ = ["precision_lines"]


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _precision(details: Mapping[str, Any]) -> list[str]:
    ops = details.get("ops", {})
    counts = ", ".join(f"{sum(c.values())} {mode}" for mode, c in ops.items())
    lines = [
        f"precision {details['dtype']}: ops {counts}; {details['parameter_casts']} parameter casts "
        f"({_mib(details['parameter_cast_bytes'])}); values lowered {details['values_lowered']} "
        f"({_mib(details['value_bytes_before'])} -> {_mib(details['value_bytes_after'])})"
    ]
    error = details.get("error")
    if error and error.get("measured"):
        lines.append(
            f"  measured on the example inputs: output rel. error {error['output_rel_error']:.2e}, "
            f"gradient rel. error max {error['grad_rel_error_max']:.2e}"
        )
    elif error:
        lines.append(f"  error not measured: {error.get('why')}")
    return lines


def _compression(details: Mapping[str, Any]) -> list[str]:
    compressed = details.get("compressed", [])
    before, after = details["saved_bytes_before"], details["saved_bytes_after"]
    lines = [
        f"compress_activations {details['format']}: {len(compressed)} saved tensors compressed; saved "
        f"activations {_mib(before)} -> {_mib(after)} ({after / before:.0%})"
    ]
    errors = [c["rel_error"] for c in compressed if c.get("rel_error") is not None]
    if errors:
        lines.append(
            f"  round-trip rel. error on the example inputs: median {statistics.median(errors):.2e}, "
            f"max {max(errors):.2e}"
        )
    return lines


_RENDER = {"precision": _precision, "compress_activations": _compression}


def precision_lines(passes: list[PassRecord]) -> list[str]:
    """Report lines for the precision passes of one region that changed its graphs."""
    lines: list[str] = []
    for record in passes:
        render = _RENDER.get(record.name)
        if render is not None and record.modified:
            lines.extend(render(record.details))
    return lines
