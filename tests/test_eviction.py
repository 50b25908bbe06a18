"""Eviction on real files: LRU order, deep-first among equals, age limit, temp files, hit recording, background gc."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "faults"))

from workload import SPLIT, check_prefix, kv_for, open_store, prompt  # noqa: E402

from vua.eviction import BackgroundGC, RecencyTouch, collect  # noqa: E402
from vua.inventory import FULL, TAIL, TEMP, check_fragment, walk  # noqa: E402
from vua.keys import Namespace  # noqa: E402
from vua.layout import STORE_DIR  # noqa: E402
from vua.store import FragmentStore, TensorSource  # noqa: E402


def _fragments(root: Path) -> list:
    return [f for f in walk(root) if f.kind == FULL]


def _age_everything(root: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    for stored in walk(root):
        os.utime(stored.path, (when, when))


def _descriptors(root: Path) -> int:
    """Bytes of the namespace descriptors, which gc keeps and counts against the budget."""
    return sum(p.stat().st_size for p in (root / STORE_DIR).glob("*/namespace.json"))


def _stored_groups(vua, tokens) -> int:
    return check_prefix(vua, tokens)


def test_least_recently_used_prompt_goes_first(tmp_path: Path) -> None:
    old, new = prompt(1), prompt(2)  # different families: no shared fragments
    with open_store(str(tmp_path)) as vua:
        vua.put(old, kv_for(old))
        _age_everything(tmp_path, 3600)
        vua.put(new, kv_for(new))
        new_bytes = sum(f.size for f in _fragments(tmp_path)) - sum(
            f.size for f in _fragments(tmp_path) if f.mtime < time.time() - 1800
        )
        report = collect(tmp_path, max_bytes=new_bytes + _descriptors(tmp_path))
        assert report.bytes_after <= new_bytes + _descriptors(tmp_path)
        assert _stored_groups(vua, old) == 0
        assert _stored_groups(vua, new) == len(new) // SPLIT


def test_equally_old_chain_loses_its_deepest_fragments_first(tmp_path: Path) -> None:
    tokens = prompt(3)  # 6 groups
    groups = len(tokens) // SPLIT
    with open_store(str(tmp_path)) as vua:
        vua.put(tokens, kv_for(tokens))
        _age_everything(tmp_path, 60)
        sizes = [f.size for f in _fragments(tmp_path)]
        report = collect(tmp_path, max_bytes=sum(sizes) - 2 * max(sizes) + _descriptors(tmp_path))
        assert report.evicted == 2
        assert _stored_groups(vua, tokens) == groups - 2  # the prefix survives, whole


def test_max_age_evicts_unused_fragments_only(tmp_path: Path) -> None:
    stale, fresh = prompt(5), prompt(6)
    with open_store(str(tmp_path)) as vua:
        vua.put(stale, kv_for(stale))
        _age_everything(tmp_path, 8 * 86400)
        vua.put(fresh, kv_for(fresh))
        report = collect(tmp_path, max_age_s=7 * 86400)
        assert report.expired == report.evicted == len(stale) // SPLIT
        assert _stored_groups(vua, stale) == 0
        assert _stored_groups(vua, fresh) == len(fresh) // SPLIT


def test_dry_run_removes_nothing(tmp_path: Path) -> None:
    tokens = prompt(7)
    with open_store(str(tmp_path)) as vua:
        vua.put(tokens, kv_for(tokens))
        report = collect(tmp_path, max_bytes=0, dry_run=True)
        assert report.evicted == len(tokens) // SPLIT and report.bytes_after == _descriptors(tmp_path)
        assert _stored_groups(vua, tokens) == len(tokens) // SPLIT


def test_temp_files_are_kept_during_the_grace_period(tmp_path: Path) -> None:
    tokens = prompt(8)
    with open_store(str(tmp_path)) as vua:
        vua.put(tokens, kv_for(tokens))
    leaf = _fragments(tmp_path)[0].path.parent
    fresh, old = leaf / ".kv.safetensors.tmp-1-aaaa", leaf / ".kv.safetensors.tmp-2-bbbb"
    fresh.write_bytes(b"x" * 100)
    old.write_bytes(b"y" * 100)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    report = collect(tmp_path, max_age_s=86400, temp_grace_s=600)
    assert report.temp_removed == 1
    assert fresh.exists() and not old.exists()
    assert [f.path for f in walk(tmp_path) if f.kind == TEMP] == [fresh]


def test_emptied_directories_go_and_the_store_stays_writable(tmp_path: Path) -> None:
    tokens = prompt(9)
    with open_store(str(tmp_path)) as vua:
        vua.put(tokens, kv_for(tokens))
        namespace_dir = vua.store.layout.namespace_dir
        report = collect(tmp_path, max_bytes=0)
        assert report.evicted == len(tokens) // SPLIT and report.dirs_removed > 0
        assert sorted(p.name for p in namespace_dir.iterdir()) == ["namespace.json"]
        vua.put(tokens, kv_for(tokens))
        assert _stored_groups(vua, tokens) == len(tokens) // SPLIT


def test_recency_touch_records_a_hit_at_most_once_per_interval(tmp_path: Path) -> None:
    tokens = prompt(10)
    touch = RecencyTouch(interval_s=600)
    with open_store(str(tmp_path), on_hit=touch) as vua:
        vua.put(tokens, kv_for(tokens))
        _age_everything(tmp_path, 3600)
        written = {f.path: f.mtime for f in _fragments(tmp_path)}
        assert _stored_groups(vua, tokens) == len(written)
        assert touch.touches == len(written)
        after = {f.path: f for f in _fragments(tmp_path)}
        assert all(time.time() - f.last_used < 60 for f in after.values())
        assert all(after[p].mtime == m for p, m in written.items())  # mtime still says when it was written
        assert _stored_groups(vua, tokens) == len(written)
        assert touch.touches == len(written)  # within the interval: no more writes


def test_a_recent_hit_protects_a_prompt_from_eviction(tmp_path: Path) -> None:
    used, unused = prompt(11), prompt(12)
    with open_store(str(tmp_path), on_hit=RecencyTouch(interval_s=60)) as vua:
        vua.put(used, kv_for(used))
        vua.put(unused, kv_for(unused))
        _age_everything(tmp_path, 3600)
        assert _stored_groups(vua, used) == len(used) // SPLIT
        used_bytes = sum(f.size for f in _fragments(tmp_path) if time.time() - f.last_used < 60)
        collect(tmp_path, max_bytes=used_bytes + _descriptors(tmp_path))
        assert _stored_groups(vua, unused) == 0
        assert _stored_groups(vua, used) == len(used) // SPLIT


def test_background_gc_keeps_the_budget_and_shares_the_root(tmp_path: Path) -> None:
    with open_store(str(tmp_path)) as vua:
        for index in range(8):
            tokens = prompt(index)
            vua.put(tokens, kv_for(tokens))
    total = sum(f.size for f in _fragments(tmp_path))
    budget = total // 3
    other = BackgroundGC(tmp_path, budget, interval_s=0.05)
    assert other._take_lease()
    gc = BackgroundGC(tmp_path, budget, interval_s=0.05, low_water=0.8)
    assert gc.run_once() is None  # another node holds the lease
    other._release_lease()
    gc.start()
    try:
        deadline = time.monotonic() + 10
        while gc.last_report is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gc.stop()
    assert gc.last_report is not None and gc.last_report.evicted > 0
    assert sum(f.size for f in _fragments(tmp_path)) <= budget * 0.8
    assert not (tmp_path / STORE_DIR / ".gc-lease").exists()


def test_a_stale_lease_is_broken(tmp_path: Path) -> None:
    with open_store(str(tmp_path)) as vua:
        vua.put(prompt(0), kv_for(prompt(0)))
    lease = tmp_path / STORE_DIR / ".gc-lease"
    lease.write_bytes(b"crashed-node 1 0")
    os.utime(lease, (time.time() - 7200, time.time() - 7200))
    report = BackgroundGC(tmp_path, 0, interval_s=1, lease_s=600).run_once()
    assert report is not None and report.evicted == len(prompt(0)) // SPLIT
    assert not lease.exists()


def test_bad_budgets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        collect(tmp_path, max_bytes=-1)
    with pytest.raises(ValueError, match="low_water"):
        BackgroundGC(tmp_path, 100, low_water=0)


def test_tails_are_listed_checked_and_evicted_before_full_fragments(tmp_path: Path) -> None:
    store = FragmentStore(tmp_path, Namespace(granularity=4, identity="tails"), backend="posix")
    payload = np.arange(64, dtype=np.uint8)
    anchor, tail = bytes(range(16)), bytes(range(16, 32))
    full_path = store.layout.fragment_path(anchor, "tp0")
    tail_path = store.layout.tail_path(anchor, tail, "tp0")
    for path, key, start in ((full_path, anchor, 0), (tail_path, tail, 4)):
        store.write(path, key, np.arange(4), [TensorSource("kv", "U8", (64,), [payload])], start=start)
    os.utime(full_path, (time.time() - 60, time.time() - 60))
    os.utime(tail_path, (time.time() - 60, time.time() - 60))
    found = {f.kind: f for f in walk(tmp_path)}
    assert sorted(found) == [FULL, TAIL] and found[TAIL].key == tail.hex() and found[FULL].key == anchor.hex()
    assert check_fragment(found[TAIL]) is None and check_fragment(found[FULL]) is None
    report = collect(tmp_path, max_bytes=found[FULL].size + _descriptors(tmp_path))
    assert report.evicted == 1 and not tail_path.exists() and full_path.exists()
    assert not store.layout.tails_dir(anchor).exists()


def _many_fragments(root: Path, count: int, per_dir: int = 16) -> None:
    """``count`` one-byte files where full fragments live (sixteen shards a directory): a scan
    reads names and stats only, so this is a store of ``count`` fragments to it."""
    namespace = root / STORE_DIR / "0123456789abcdef"
    for leaf in range(0, count, per_dir):
        digest = f"{leaf:032x}"[::-1]
        directory = namespace / digest[:2] / digest[2:4] / digest
        directory.mkdir(parents=True)
        for shard in range(min(per_dir, count - leaf)):
            fd = os.open(directory / f"tp{shard}.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)


def test_gc_memory_does_not_grow_with_the_number_of_fragments(tmp_path: Path) -> None:
    import tracemalloc

    peaks = {}
    for count in (20_000, 200_000):
        root = tmp_path / str(count)
        _many_fragments(root, count)
        tracemalloc.start()
        report = collect(root, max_bytes=0, dry_run=True, max_candidates=1000)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report.fragments == count and report.evicted == 1000
    print(f"gc peak memory: {peaks[20_000] / 1e6:.2f} MB at 20k fragments, {peaks[200_000] / 1e6:.2f} MB at 200k")
    # Holding every fragment would cost ~300 bytes each: 54 MB more at 200k than at 20k.
    assert peaks[200_000] < peaks[20_000] + 2_000_000, peaks


def test_a_bounded_candidate_heap_still_evicts_down_to_the_target(tmp_path: Path) -> None:
    old, new = prompt(1), prompt(2)
    with open_store(str(tmp_path)) as vua:
        vua.put(old, kv_for(old))
        _age_everything(tmp_path, 3600)
        vua.put(new, kv_for(new))
        new_bytes = sum(f.size for f in _fragments(tmp_path) if f.mtime > time.time() - 1800)
        budget = new_bytes + _descriptors(tmp_path)  # gc counts the namespace descriptor it keeps
        report = collect(tmp_path, max_bytes=budget, max_candidates=2)  # several scans, two victims each
        assert report.evicted == len(old) // SPLIT and report.bytes_after <= budget
        assert _stored_groups(vua, old) == 0
        assert _stored_groups(vua, new) == len(new) // SPLIT


def test_every_evicted_fragment_is_told_and_progress_is_reported_across_rescans(tmp_path: Path) -> None:
    expired, old, new = prompt(3), prompt(1), prompt(2)
    with open_store(str(tmp_path)) as vua:
        vua.put(expired, kv_for(expired))
        _age_everything(tmp_path, 10 * 86400)
        vua.put(old, kv_for(old))
        for stored in _fragments(tmp_path):
            if time.time() - stored.last_used < 3600:
                os.utime(stored.path, (time.time() - 3600, time.time() - 3600))
        vua.put(new, kv_for(new))
        new_bytes = sum(f.size for f in _fragments(tmp_path) if f.mtime > time.time() - 1800)
        before = {f.location for f in _fragments(tmp_path)}
        told: list = []
        phases: list = []
        report = collect(tmp_path, max_bytes=new_bytes + _descriptors(tmp_path), max_age_s=86400, max_candidates=2,
                         on_removed=told.extend, progress=lambda phase, done, total: phases.append((phase, done, total)))
        after = {f.location for f in _fragments(tmp_path)}
        assert report.expired == len(expired) // SPLIT
        assert report.evicted == (len(expired) + len(old)) // SPLIT  # expired ones count as evicted too
        assert sorted(f.location for f in told) == sorted(before - after)  # each one once
        scans = [done for phase, done, _ in phases if phase == "scan" and done == 1]
        assert len(scans) >= 2  # a rescan starts counting again
        evicts = [(done, total) for phase, done, total in phases if phase == "evict"]
        assert evicts and all(done <= total <= 2 for done, total in evicts)
        # A dry run removes nothing and so tells nothing.
        told.clear()
        collect(tmp_path, max_bytes=0, dry_run=True, on_removed=told.extend)
        assert told == []
