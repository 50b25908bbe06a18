"""Fault tests: real processes, real SIGKILLs, real tmpfs mounts. ``VUA_SOAK=N`` repeats each fault N times more."""

from __future__ import annotations


import pytest
from workload import worker_pool


@pytest.fixture
def workers():
    yield from worker_pool()
