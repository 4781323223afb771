"""Every pass in the default pipeline states its contract in its docstring."""

from __future__ import annotations

import pytest

from memopt.config import MemoptConfig
from memopt.passes.pipeline import default_pipeline, pre_autograd_pipeline

PASSES = pre_autograd_pipeline(MemoptConfig()) + default_pipeline(MemoptConfig())


@pytest.mark.parametrize("p", PASSES, ids=lambda p: p.name)
def test_pass_docstring_states_contract(p):
    doc = type(p).__doc__ or ""
    for section in ("Purpose", "Preconditions", "Guarantees", "Ordering"):
        assert f"{section}:" in doc, f"pass {p.name!r} docstring lacks '{section}:'"
