"""`memopt.testing.capture`: the graphs memopt's passes see, for pass-level tests."""

from __future__ import annotations

import pytest
import torch

from memopt.testing.capture import capture_step, capture_steps
from memopt.testing.zoo import zoo_case


def test_capture_step_on_a_graph_break_names_capture_steps() -> None:
    """A function with a graph break compiles to two regions: `capture_step` said
    "expected one compiled region, got 2 (graph breaks?)" without the fix. It names
    Dynamo's reason and `capture_steps`, which returns both."""
    torch._dynamo.reset()
    case = zoo_case("graph_break")
    model, inputs = case.build(), case.inputs(8)
    with pytest.raises(RuntimeError) as raised:
        capture_step(model, *inputs)
    message = str(raised.value)
    assert "fn compiled to 2 (" in message and "torch._dynamo.graph_break()" in message, message
    assert "Use capture_steps(fn, *args)" in message, message
    torch._dynamo.reset()
    assert len(capture_steps(model, *inputs)) == 2
