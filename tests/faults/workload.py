"""A deterministic workload shared by the fault tests and their worker processes.

KV values are a function of (token id, position, layer, head, dim) only, as real KV is a
function of the prefix: so the exact expected KV of any stored prefix is known without keeping
copies, and a fragment served for the wrong position or prompt shows up as a mismatch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vua import VUA, VUAConfig

SPLIT = 16
CONFIG = VUAConfig(split_factor=SPLIT, identity="vua-fault-tests")
LAYERS, HEADS, HEAD_DIM = 2, 2, 32
PROMPTS = 96
FAMILIES = 4  # prompts of one family share their first two groups, as chats share a system prompt
CRASH_UNIVERSE = 1 << 30  # prompt indexes the crash test's writers draw from: nearly every put is new


def soak(count: int) -> int:
    """``count`` times ``$VUA_SOAK`` (default 1): the soak run repeats every fault many more times."""
    return count * max(1, int(os.environ.get("VUA_SOAK", "1")))


def prompt(index: int) -> torch.Tensor:
    family = random.Random(f"family-{index % FAMILIES}")
    own = random.Random(f"prompt-{index}")
    shared = [family.randrange(1, 30000) for _ in range(2 * SPLIT)]
    rest = [own.randrange(1, 30000) for _ in range((index % 4 + 1) * SPLIT)]
    return torch.tensor(shared + rest, dtype=torch.int64)


def kv_for(tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    positions = torch.arange(len(tokens))
    base = (tokens * 31 + positions * 7).remainder(4096)[None, None, :, None]
    heads = torch.arange(HEADS)[None, :, None, None] * 3
    dims = torch.arange(HEAD_DIM)[None, None, None, :]
    layers = []
    for layer in range(LAYERS):
        keys = ((base + heads + dims + layer * 5).remainder(8192) / 8).to(torch.float32)
        layers.append((keys, -keys - 1))
    return layers


def open_store(root: str, **options) -> VUA:
    return VUA(CONFIG, root, backend="posix", io_threads=4, **options)


def check_prefix(vua: VUA, tokens: torch.Tensor) -> int:
    """Groups returned for ``tokens``; raises AssertionError unless the hit is an exact prefix (or a miss)."""
    hit = vua.get_closest(tokens)
    if hit is None:
        return 0
    count = len(hit.tokens)
    assert count % SPLIT == 0 and 0 < count <= len(tokens), f"hit of {count} tokens for a {len(tokens)}-token query"
    assert torch.equal(hit.tokens, tokens[:count]), "returned token ids are not a prefix of the query"
    expected = kv_for(tokens)
    assert len(hit.data) == LAYERS
    for (keys, values), (want_keys, want_values) in zip(hit.data, expected):
        assert torch.equal(keys, want_keys[:, :, :count]), f"wrong keys in a {count}-token hit"
        assert torch.equal(values, want_values[:, :, :count]), f"wrong values in a {count}-token hit"
    return count // SPLIT


WORKER = Path(__file__).with_name("worker.py")


def start_worker(mode: str, root: Path, seconds: float, seed: int, extra: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(root), str(seconds), str(seed), str(extra)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish_worker(process: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"worker {process.args[2]} did not finish in {timeout} s")
    assert process.returncode == 0, f"worker {process.args[2]} failed:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def worker_pool() -> Iterator[Callable[..., subprocess.Popen]]:
    """A pytest fixture body: yields ``start`` (same arguments as :func:`start_worker`); any worker
    still running at the end is killed."""
    started: list[subprocess.Popen] = []

    def start(*args: Any, **kwargs: Any) -> subprocess.Popen:
        process = start_worker(*args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
