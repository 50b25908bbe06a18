"""Concurrency: writers, readers and gc (two of them) in separate processes on one root; every hit exact."""

from __future__ import annotations

from pathlib import Path

from workload import finish_worker, PROMPTS, check_prefix, kv_for, open_store, prompt, soak

from vua.cli import main
from vua.inventory import FULL, walk


def test_put_get_and_gc_at_once(tmp_path: Path, workers) -> None:
    with open_store(str(tmp_path)) as vua:
        for index in range(PROMPTS):
            tokens = prompt(index)
            vua.put(tokens, kv_for(tokens))
    full = sum(f.size for f in walk(tmp_path) if f.kind == FULL)
    seconds = 4.0 * soak(1)
    processes = {
        "put-a": workers("put", tmp_path, seconds, 1),
        "put-b": workers("put", tmp_path, seconds, 2),
        "get-a": workers("get", tmp_path, seconds, 3),
        "get-b": workers("get", tmp_path, seconds, 4),
        "gc-a": workers("gc", tmp_path, seconds, 5, full // 3),
        "gc-b": workers("gc", tmp_path, seconds, 6, full // 3),
    }
    results = {name: finish_worker(p, timeout=seconds + 90) for name, p in processes.items()}
    # The getters raised on any wrong KV (they exit non-zero); here: the run did exercise every path.
    lookups = {k: results["get-a"][k] + results["get-b"][k] for k in ("whole", "partial", "misses")}
    assert lookups["whole"] > 0 and lookups["partial"] + lookups["misses"] > 0
    assert results["gc-a"]["evicted"] + results["gc-b"]["evicted"] > 0
    assert results["put-a"]["puts"] + results["put-b"]["puts"] > 0
    print(results)
    assert main(["verify", str(tmp_path)]) == 0
    with open_store(str(tmp_path)) as vua:
        for index in range(PROMPTS):
            check_prefix(vua, prompt(index))
