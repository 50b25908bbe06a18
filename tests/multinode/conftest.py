"""Multi-node tests: one GlusterFS volume mounted once per "node" (see glusterfs.py).

The volumes are set up here, per module, and torn down afterwards, so ``make test`` (plain
``pytest tests``) runs these tests on a bare machine: GlusterFS is installed on first use. They
skip, with the reason in the summary, only where GlusterFS cannot run at all: not root, no
/dev/fuse, or no reachable apt mirror to install it from. ``VUA_REQUIRE_MULTINODE=1`` turns even
those skips into failures, for a machine that is meant to run them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The engine driver (tests/vllm) and the deterministic workload and its worker processes
# (tests/faults) are shared with those suites, not copied.
for shared in (HERE, HERE.parent / "vllm", HERE.parent / "faults"):
    if str(shared) not in sys.path:
        sys.path.insert(0, str(shared))

import glusterfs  # noqa: E402


@pytest.fixture(scope="session")
def gluster() -> Iterator[type]:
    """The glusterfs module, with packages installed, glusterd answering and old leftovers swept."""
    try:
        glusterfs.ensure_installed()
    except glusterfs.Unavailable as reason:
        if os.environ.get("VUA_REQUIRE_MULTINODE") == "1":
            pytest.fail(f"GlusterFS unavailable but VUA_REQUIRE_MULTINODE=1: {reason}")
        pytest.skip(f"GlusterFS unavailable: {reason}")
    started = glusterfs.ensure_glusterd()
    swept = glusterfs.sweep_leftovers()
    if swept:
        print(f"swept GlusterFS leftovers of earlier runs: {swept}")
    yield glusterfs
    if started is not None:
        glusterfs.stop_glusterd(started)
    shutil.rmtree(glusterfs.BASE / f"vua-gluster-{os.getpid()}", ignore_errors=True)  # emptied by destroy()


@pytest.fixture(scope="module")
def volume(gluster) -> Iterator["glusterfs.Volume"]:
    """One volume with the default client settings (caches on, as deployed), mounted three times."""
    made = gluster.create("shared", 3)
    yield made
    gluster.destroy(made.name)



@pytest.fixture
def workers() -> Iterator:
    """Start tests/faults/worker.py processes (one per "engine"); any still running at the end is killed."""
    from workload import worker_pool

    yield from worker_pool()

