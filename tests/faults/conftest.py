"""Fault tests: real processes, real SIGKILLs, real tmpfs mounts. ``VUA_SOAK=N`` repeats each fault N times more."""

from __future__ import annotations

import subprocess

import pytest
from workload import start_worker


@pytest.fixture
def workers():
    started: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        process = start_worker(*args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
