"""gc throughput on a store of many small fragments, and the cost of recording hits.

    python benchmarks/gc_throughput.py [--fragments 100000] [--root DIR] [--runs 3]

1. Builds ``--fragments`` valid fragments (FragmentStore.write, durable=False) with last-use
   times spread over a week, under one namespace.
2. Scan: the walk gc does (one lstat per file), median of ``--runs``, next to GNU ``find -printf``
   over the same tree (a C walker doing the same lstat calls) as the reference.
3. Planning (``collect(dry_run=True)`` at half the size) and real passes: evict to 50 %, then to 25 %
   (unlink + rmdir of emptied directories), fragments evicted per second.
4. Hit recording: ``FragmentStore.open`` per call without a hook, with :class:`RecencyTouch` when
   nothing is due (the common case) and when every hit touches (one futimens each).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from vua.eviction import RecencyTouch, collect
from vua.inventory import walk
from vua.keys import Namespace
from vua.store import FragmentStore, TensorSource

WEEK = 7 * 86400


def build(root: Path, count: int, seed: int = 0) -> tuple[FragmentStore, list[tuple[Path, bytes]]]:
    store = FragmentStore(root, Namespace(granularity=16, identity="gc-bench"), backend="posix", durable=False)
    rng = random.Random(seed)
    tokens = np.arange(16, dtype="<i8")
    payload = np.frombuffer(rng.randbytes(512), dtype=np.uint8)
    now = time.time()
    written = []
    for index in range(count):
        digest = rng.randbytes(16)
        path = store.layout.fragment_path(digest, "kv")
        store.write(path, digest, tokens, [TensorSource("kv", "U8", (512,), [payload])], start=16 * (index % 8))
        when = now - rng.uniform(0, WEEK)
        os.utime(path, (when, when))
        written.append((path, digest))
    return store, written


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median_time(call, runs: int) -> float:
    return statistics.median(timed(call) for _ in range(runs))


def find_scan(root: Path) -> None:
    subprocess.run(["find", str(root), "-type", "f", "-printf", "%A@ %T@ %s %p\n"], check=True, stdout=subprocess.DEVNULL)


def open_costs(store: FragmentStore, written: list[tuple[Path, bytes]], calls: int, rounds: int = 5) -> dict[str, float]:
    """Microseconds per open+close for each hook setting, rounds interleaved, median of the rounds."""
    sample = written[:calls]
    hooks = {
        "no_hook": None,
        "touch_hook_nothing_due": RecencyTouch(interval_s=WEEK),  # the common case: used recently
        "touch_hook_every_hit": RecencyTouch(interval_s=0),  # the worst case: one futimens per open
    }
    times: dict[str, list[float]] = {name: [] for name in hooks}
    for _ in range(rounds):
        for name, hook in hooks.items():
            store.on_hit = hook
            started = time.perf_counter()
            for path, digest in sample:
                store.open(path, digest).close()
            times[name].append((time.perf_counter() - started) / len(sample) * 1e6)
    store.on_hit = None
    fd = os.open(sample[0][0], os.O_RDONLY)
    started = time.perf_counter()
    for _ in range(calls):
        os.readlink(f"/proc/self/fd/{fd}")
    os.close(fd)
    costs = {name: statistics.median(values) for name, values in times.items()}
    costs["of_which_inside_store_check"] = (time.perf_counter() - started) / calls * 1e6
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragments", type=int, default=100_000)
    parser.add_argument("--root", type=Path, default=None, help="a directory on the filesystem to measure (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vua-gc-bench-", dir=args.root))
    try:
        result: dict = {"fragments": args.fragments, "root": str(root)}
        started = time.perf_counter()
        store, written = build(root, args.fragments)
        result["build_s"] = time.perf_counter() - started
        files = list(walk(root))
        total = sum(f.size for f in files)
        result["bytes"] = total
        result["scan_s"] = median_time(lambda: list(walk(root)), args.runs)
        result["find_scan_s"] = median_time(lambda: find_scan(root), args.runs)
        result["scan_vs_find"] = result["scan_s"] / result["find_scan_s"]
        result["plan_half_s"] = median_time(lambda: collect(root, max_bytes=total // 2, dry_run=True), args.runs)

        result["open_us"] = open_costs(store, written, min(5000, len(written)))

        for label, fraction in (("evict_to_50pct", 0.5), ("evict_to_25pct", 0.25)):
            report = collect(root, max_bytes=int(total * fraction))
            result[label] = {
                "evicted": report.evicted,
                "scan_s": report.scan_s,
                "evict_s": report.evict_s,
                "evicted_per_s": report.evicted / report.evict_s if report.evict_s else None,
                "dirs_removed": report.dirs_removed,
            }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
