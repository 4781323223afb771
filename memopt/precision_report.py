"""Text lines for `Explanation.report` about the numerics-changing passes.

What the issue asks a report to say: which values were lowered or compressed, the
bytes saved, and the error measured on the example inputs. Each pass states it in its
result's ``summary`` (`memopt.passes.base.PassResult`); this collects the lines of the
numerics-changing passes that changed something.
"""

from __future__ import annotations

from memopt.passes.manager import PassRecord
from memopt.passes.pipeline import numerics_changing

__all__ = ["precision_lines"]


def precision_lines(passes: list[PassRecord]) -> list[str]:
    """Report lines for the numerics-changing passes of one region that changed its
    graphs."""
    changing = numerics_changing()
    return [line for record in passes if record.modified and record.name in changing for line in record.summary]
