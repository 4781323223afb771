"""Fixtures for the offload runtime: a private offload_dir and a disk store in it."""

from __future__ import annotations

import gc
import os

import pytest

import memopt.codegen.offload  # noqa: F401  - registers torch.ops.memopt.offload & co
from memopt.runtime import get_store, register_store


@pytest.fixture
def offload_dir(tmp_path):
    path = tmp_path / "offload"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def store_id(offload_dir):
    sid = register_store("disk", offload_dir)
    yield sid
    get_store(sid).close()


def _leftover_files(store) -> list[str]:
    gc.collect()
    store.flush()
    return sorted(name for name in os.listdir(store.directory) if name != ".lock")


@pytest.fixture
def leftovers():
    """``leftovers(store)``: the files in a disk store's directory besides its lock,
    once garbage is collected and the store's pending work is done."""
    return _leftover_files
