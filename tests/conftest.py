"""Shared fixtures: every test starts with fresh Dynamo caches and a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
        for item in items:
            if item.get_closest_marker("gpu") is not None:  # not keywords: they hold folder names too
                item.add_marker(skip)
