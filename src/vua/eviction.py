"""Keeping a shared store within its disk budget: least-recently-used eviction, safe under live traffic.

Policy (:func:`collect`):

* Temporary files older than ``temp_grace_s`` are removed (a younger one may belong to a live
  writer). Fragments not used for ``max_age_s`` are evicted.
* Over ``max_bytes``, fragments are evicted oldest-use first until ``target_bytes`` remain.
  Recency is compared in steps of ``resolution_s`` (hits are recorded at most that often, see
  :class:`RecencyTouch`); among fragments equally old, tails go first, then fragments deeper in
  their chain (higher ``vua_start``), so that shared prefixes, which serve every longer prompt,
  stay reachable. Only the last, partly evicted step has its headers read.

Memory: the scan streams. Nothing is kept per fragment except a bounded heap of the
``max_candidates`` most evictable ones (about 400 bytes each), so a store of 10 million fragments
costs what one of 10 thousand does; when evicting a heap's worth is not enough, the store is
scanned again (each scan is a full walk, so such a pass costs more time, never more memory).

Safety with vLLM nodes reading and writing the same root: ``unlink`` of a published file is
atomic, so a reader opens either the whole fragment or nothing, and a reader that already has it
open keeps its bytes (on NFSv3 such a read may fail with ESTALE, which the store turns into a
miss). Readers verify tokens and checksums, so a missing middle fragment only shortens a hit.
Directories are removed with ``rmdir`` alone, which fails on a non-empty one; a writer that loses
the race between its ``mkdir`` and its create retries once (:mod:`vua.publish`). Several gc runs
on one root may overlap: every step tolerates a file already gone, and :class:`BackgroundGC`
takes a lease so that usually one node per root scans at a time.
"""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from .inventory import FULL, GC_LEASE_NAME, NAMESPACE_FILE, STRAY, TAIL, TEMP, StoredFile, fragment_start, namespaces, walk
from .layout import STORE_DIR, check_root

__all__ = [
    "GCReport", "collect", "DEFAULT_MAX_CANDIDATES", "RecencyTouch", "BackgroundGC", "DEFAULT_TEMP_GRACE_S",
    "DEFAULT_RESOLUTION_S", "Progress",
]

# ``progress(phase, done, total)``: phase "scan" (total None: unknown until the walk ends) or "evict".
# A pass that scans again starts a new "scan" phase, its count from 1.
Progress = Callable[[str, int, "int | None"], None]

logger = logging.getLogger(__name__)

DEFAULT_TEMP_GRACE_S = 600.0
DEFAULT_RESOLUTION_S = 600.0


@dataclass
class GCReport:
    """What one pass found and did (sizes are file sizes in bytes).

    ``bytes_before`` and ``bytes_after`` count every file gc finds under the root, kept ones too
    (namespace descriptors, strays, the switch files), as ``du -b`` summed over files would; the
    gc lease is not counted, it goes when the pass ends.
    """

    fragments: int = 0
    bytes_before: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    expired: int = 0
    temp_removed: int = 0
    dirs_removed: int = 0
    bytes_after: int = 0
    removed_bytes: int = 0  # temporary files and fragments removed (or that would be, in a dry run)
    scan_s: float = 0.0
    evict_s: float = 0.0
    dry_run: bool = False


# Eviction candidates one gc pass holds (about 400 bytes each): memory stays bounded whatever the
# store holds; a pass that needs more evicts these, then scans again.
DEFAULT_MAX_CANDIDATES = 65536
# Expired fragments are handed to ``on_removed`` in batches of this many (memory stays bounded).
_REMOVED_BATCH = 1024


def collect(
    root: str | os.PathLike[str],
    *,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
    target_bytes: int | None = None,
    temp_grace_s: float = DEFAULT_TEMP_GRACE_S,
    resolution_s: float = DEFAULT_RESOLUTION_S,
    dry_run: bool = False,
    now: float | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    progress: Progress | None = None,
    on_removed: Callable[[list[StoredFile]], None] | None = None,
) -> GCReport:
    """One gc pass over every namespace under ``root`` (see the module doc for the policy).

    ``target_bytes`` (default ``max_bytes``) is where eviction stops once the budget is exceeded;
    a lower value leaves headroom so that the next pass has less to do. Every file gc keeps counts
    against the budget, namespace descriptors, strays and switch files too (:func:`_kept_bytes`).
    ``progress`` is told how far the scan and the eviction are; ``on_removed`` gets the fragments
    evicted (expired ones too), in batches as they go, never in a dry run.

    The scan streams: stale temporary files and expired fragments are removed as they are found,
    and only the ``max_candidates`` least recently used fragments are kept (a bounded heap), so
    memory does not grow with the number of fragments. When evicting those is not enough, the
    store is scanned again for the next ones; a dry run reports the first scan's choice only.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if resolution_s <= 0:
        raise ValueError(f"resolution_s must be > 0, got {resolution_s}")
    if max_candidates <= 0:
        raise ValueError(f"max_candidates must be > 0, got {max_candidates}")
    now = time.time() if now is None else now
    report = GCReport(dry_run=dry_run)
    store = str(check_root(root) / STORE_DIR)
    expired: list[StoredFile] = []  # removed, not yet told to on_removed

    def tell(removed: list[StoredFile]) -> None:
        if on_removed is not None and removed and not dry_run:
            on_removed(removed)

    first_scan = True
    while True:
        started = time.perf_counter()
        kept = _kept_bytes(root)
        usage = kept
        if first_scan:
            report.bytes_before += kept
        heap: list[tuple[int, int, int, StoredFile]] = []  # the most evictable, as a max-heap of keys
        overflowed = False
        for seq, stored in enumerate(walk(root)):
            if progress is not None:
                progress("scan", seq + 1, None)
            if first_scan:
                report.bytes_before += stored.size
                report.fragments += stored.kind in (FULL, TAIL)
            if stored.kind == STRAY:
                usage += stored.size  # never removed, but it takes room all the same
                continue
            if stored.kind == TEMP:
                if now - stored.mtime > temp_grace_s and _remove(stored, dry_run, store, report):
                    report.temp_removed += 1
                    continue
            elif max_age_s is not None and now - stored.last_used > max_age_s:
                if _remove(stored, dry_run, store, report):
                    report.expired += 1  # expired fragments count as evicted too
                    report.evicted += 1
                    report.evicted_bytes += stored.size
                    expired.append(stored)
                    if len(expired) >= _REMOVED_BATCH:
                        tell(expired)
                        expired = []
                    continue
            usage += stored.size
            if max_bytes is None or stored.kind == TEMP:
                continue
            # Negated (recency step, tails first): heap[0] is the least evictable candidate held.
            key = (-int(stored.last_used // resolution_s), -(stored.kind != TAIL), seq, stored)
            if len(heap) < max_candidates:
                heapq.heappush(heap, key)
            else:
                overflowed = True
                if key[:3] > heap[0][:3]:
                    heapq.heapreplace(heap, key)
        report.scan_s += time.perf_counter() - started
        tell(expired)
        expired = []
        started = time.perf_counter()
        first_scan = False
        excess = 0
        if max_bytes is not None and usage > max_bytes:
            target = max_bytes if target_bytes is None else min(target_bytes, max_bytes)
            excess = usage - target
            candidates = [entry[3] for entry in sorted(heap, reverse=True)]
            victims = _least_recently_used(candidates, excess, resolution_s)
            evicted: list[StoredFile] = []
            for done, victim in enumerate(victims, 1):
                if progress is not None:
                    progress("evict", done, len(victims))
                if _remove(victim, dry_run, store, report):
                    report.evicted += 1
                    report.evicted_bytes += victim.size
                    excess -= victim.size
                    evicted.append(victim)
            tell(evicted)  # at most max_candidates
        report.evict_s += time.perf_counter() - started
        if excess <= 0 or not overflowed or dry_run:
            break
    report.bytes_after = report.bytes_before - report.removed_bytes
    return report


def _least_recently_used(fragments: list[StoredFile], excess: int, resolution_s: float) -> list[StoredFile]:
    """Fragments to evict, oldest use first, adding up to at least ``excess`` bytes."""
    steps: dict[int, list[StoredFile]] = defaultdict(list)
    for fragment in fragments:
        steps[int(fragment.last_used // resolution_s)].append(fragment)
    chosen: list[StoredFile] = []
    for step in sorted(steps):
        group = steps[step]
        size = sum(f.size for f in group)
        if size <= excess:
            # The whole step goes; no need to read headers, but deep pieces go first all the same.
            chosen += sorted(group, key=lambda f: f.kind != TAIL)
            excess -= size
            if excess <= 0:
                break
            continue
        for fragment in sorted(group, key=_depth_first):
            chosen.append(fragment)
            excess -= fragment.size
            if excess <= 0:
                break
        break
    return chosen


def _depth_first(fragment: StoredFile) -> tuple[int, int]:
    """Sort key: tails, then unreadable fragments, then the deepest (largest ``vua_start``) first."""
    if fragment.kind == TAIL:
        return (0, 0)
    start = fragment_start(fragment.location)
    return (1, 0) if start is None else (2, -start)


def _kept_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes gc never removes that the walk does not list but that still count against the budget:
    namespace descriptors and the files at the top of the root and of the store directory (the
    disable-* switches). Strays are listed by the walk. The gc lease is not counted: it goes when
    the pass ends."""
    top = check_root(root)
    paths = [str(space.path / NAMESPACE_FILE) for space in namespaces(top)]
    for directory in (top, top / STORE_DIR):
        try:
            with os.scandir(directory) as entries:
                paths += [e.path for e in entries if e.is_file(follow_symlinks=False) and e.name != GC_LEASE_NAME]
        except FileNotFoundError:
            pass  # nothing stored yet
    total = 0
    for path in paths:
        try:
            total += os.stat(path, follow_symlinks=False).st_size
        except FileNotFoundError:
            pass  # a namespace without a descriptor, or a file removed meanwhile
    return total


def _remove(stored: StoredFile, dry_run: bool, store: str, report: GCReport) -> bool:
    """Unlink one file, then ``rmdir`` the directories that leaves empty, up to (not including) its
    namespace directory; True if it was removed (or would be, in a dry run)."""
    if dry_run:
        report.removed_bytes += stored.size
        return True
    try:
        os.unlink(stored.location)
    except FileNotFoundError:
        return False  # another gc, or a reader discarding a bad fragment, got there first
    except OSError as exc:
        logger.warning("VUA gc: cannot remove %s: %s", stored.location, exc)
        return False
    report.removed_bytes += stored.size
    directory = os.path.dirname(stored.location)
    while os.path.dirname(directory) != store and directory.startswith(store + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            break  # not empty (a writer is publishing into it, or other files live there), or gone
        report.dirs_removed += 1
        directory = os.path.dirname(directory)
    return True


class RecencyTouch:
    """A :data:`vua.store.HitHook` that records a hit by moving the fragment's atime to now.

    At most once per ``interval_s`` per fragment across all nodes: the store already fstat()s the
    file it opens, so a hit on a fragment used within the interval costs nothing more, and the
    rare touch is one ``futimens`` (one SETATTR round trip on NFS). The kernel's own atime is not
    relied on: NFS and ``noatime`` mounts do not keep it and ``relatime`` updates it once a day.
    mtime is left alone, so it still says when the fragment was written.
    """

    def __init__(self, interval_s: float = DEFAULT_RESOLUTION_S) -> None:
        self.interval_ns = int(interval_s * 1e9)
        self.touches = 0
        self._refused = False

    def __call__(self, fd: int, info: os.stat_result) -> None:
        now = time.time_ns()
        if now - max(info.st_atime_ns, info.st_mtime_ns) < self.interval_ns or self._refused:
            return
        try:
            os.utime(fd, ns=(now, info.st_mtime_ns))
            self.touches += 1
        except OSError as exc:
            # Setting explicit times needs ownership; files written by another user stay untouched.
            self._refused = True
            logger.warning("VUA: cannot record fragment use for gc (%s); eviction falls back to write time", exc)


class BackgroundGC:
    """Run :func:`collect` every ``interval_s`` in a daemon thread so that ``root`` stays under ``max_bytes``.

    Each pass evicts down to ``low_water * max_bytes``. Nodes sharing a root may each run one: a
    lease file (``<root>/vua-v1/.gc-lease``, taken by exclusive create, stale after ``lease_s``)
    lets one node scan at a time; if two ever overlap, eviction is still safe, only redundant.
    Errors are logged, never raised into the caller.

    Example::

        gc = BackgroundGC("/mnt/kv", max_bytes=200 << 30, interval_s=60)
        gc.start()
        ...
        gc.stop()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        interval_s: float = 60.0,
        *,
        max_age_s: float | None = None,
        low_water: float = 0.9,
        temp_grace_s: float = DEFAULT_TEMP_GRACE_S,
        lease_s: float | None = None,
    ) -> None:
        if not 0 < low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {low_water}")
        if max_bytes < 0 or interval_s <= 0:
            raise ValueError(f"need max_bytes >= 0 and interval_s > 0, got {max_bytes} and {interval_s}")
        self.root = check_root(root)
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.low_water = low_water
        self.temp_grace_s = temp_grace_s
        self.lease_s = lease_s if lease_s is not None else max(600.0, 10 * interval_s)
        self.last_report: GCReport | None = None
        # Told which fragments each pass evicted (the connector retracts their KV events).
        self.on_evicted: Callable[[list[StoredFile]], None] | None = None
        self._lease = self.root / STORE_DIR / GC_LEASE_NAME
        self._token = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}".encode()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vua-gc", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_once(self) -> GCReport | None:
        """One pass now; None when another node holds the lease (or the store is not there yet)."""
        if not self._take_lease():
            return None
        try:
            report = collect(
                self.root,
                max_bytes=self.max_bytes,
                max_age_s=self.max_age_s,
                target_bytes=int(self.max_bytes * self.low_water),
                temp_grace_s=self.temp_grace_s,
                on_removed=self.on_evicted,
            )
        finally:
            self._release_lease()
        self.last_report = report
        if report.evicted or report.temp_removed:
            logger.info(
                "VUA gc: evicted %d fragments (%d bytes), removed %d temp files; %d bytes stored",
                report.evicted, report.evicted_bytes, report.temp_removed, report.bytes_after,
            )
        return report

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a gc failure must never take the serving process down
                logger.exception("VUA gc pass failed")
            self._stop.wait(self.interval_s)

    def _take_lease(self) -> bool:
        for _ in range(2):
            try:
                fd = os.open(self._lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            except FileExistsError:
                try:
                    age = time.time() - os.stat(self._lease).st_mtime
                except FileNotFoundError:
                    continue
                if age < self.lease_s:
                    return False
                logger.info("VUA gc: breaking a lease held for %.0f s", age)
                try:
                    os.unlink(self._lease)
                except FileNotFoundError:
                    pass
                continue
            except FileNotFoundError:
                return False  # nothing stored yet: no vua-v1 directory
            try:
                os.write(fd, self._token)
            finally:
                os.close(fd)
            return True
        return False

    def _release_lease(self) -> None:
        try:
            with open(self._lease, "rb") as handle:
                if handle.read() != self._token:
                    return  # broken as stale and taken by another node meanwhile
            os.unlink(self._lease)
        except FileNotFoundError:
            pass
