"""Shared fixtures for the library unit tests (kept small)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread (restored afterwards). On the 2-core test machine,
    which other jobs share, two torch threads per process contend badly and are ~5x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
