"""Keeping a shared store within its disk budget: least-recently-used eviction, safe under live traffic.

Policy (:func:`collect`):

* Temporary files older than ``temp_grace_s`` are removed (a younger one may belong to a live
  writer). Fragments not used for ``max_age_s`` are evicted.
* Over ``max_bytes``, fragments are evicted oldest-use first until ``target_bytes`` remain.
  Recency is compared in steps of ``resolution_s`` (hits are recorded at most that often, see
  :class:`RecencyTouch`); among fragments equally old, tails go first, then fragments deeper in
  their chain (higher ``vua_start``), so that shared prefixes, which serve every longer prompt,
  stay reachable. Only the last, partly evicted step has its headers read.

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

import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .inventory import FULL, GC_LEASE_NAME, NAMESPACE_FILE, STRAY, TAIL, TEMP, StoredFile, fragment_start, namespaces, walk
from .layout import STORE_DIR, check_root

__all__ = ["GCReport", "collect", "RecencyTouch", "BackgroundGC", "DEFAULT_TEMP_GRACE_S", "DEFAULT_RESOLUTION_S", "Progress"]

# ``progress(phase, done, total)``: phase "scan" (total None: unknown until the walk ends) or "evict".
Progress = Callable[[str, int, "int | None"], None]

logger = logging.getLogger(__name__)

DEFAULT_TEMP_GRACE_S = 600.0
DEFAULT_RESOLUTION_S = 600.0


@dataclass
class GCReport:
    """What one pass found and did (sizes are file sizes in bytes).

    ``bytes_before`` and ``bytes_after`` count every file gc finds under the root, kept ones too
    (namespace descriptors, strays, the lease and switch files), as ``du -b`` summed over files would.
    """

    fragments: int = 0
    bytes_before: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    expired: int = 0
    temp_removed: int = 0
    dirs_removed: int = 0
    bytes_after: int = 0
    scan_s: float = 0.0
    evict_s: float = 0.0
    dry_run: bool = False


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
    progress: Progress | None = None,
    on_removed: Callable[[list[StoredFile]], None] | None = None,
) -> GCReport:
    """One gc pass over every namespace under ``root`` (see the module doc for the policy).

    ``target_bytes`` (default ``max_bytes``) is where eviction stops once the budget is exceeded;
    a lower value leaves headroom so that the next pass has less to do. ``progress`` is told how
    far the scan and the eviction are; ``on_removed`` gets the fragments evicted.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if resolution_s <= 0:
        raise ValueError(f"resolution_s must be > 0, got {resolution_s}")
    now = time.time() if now is None else now
    report = GCReport(dry_run=dry_run)
    started = time.perf_counter()
    files = []
    for found in walk(root):
        files.append(found)
        if progress is not None:
            progress("scan", len(files), None)
    report.scan_s = time.perf_counter() - started
    fragments = [f for f in files if f.kind in (FULL, TAIL)]
    temps = [f for f in files if f.kind == TEMP]
    report.fragments = len(fragments)
    report.bytes_before = sum(f.size for f in fragments) + sum(f.size for f in temps) + _kept_bytes(root, files)
    started = time.perf_counter()
    removed: list[StoredFile] = []

    stale = [t for t in temps if now - t.mtime > temp_grace_s]
    removed += _remove(stale, dry_run)
    report.temp_removed = len(removed)
    usage = report.bytes_before - sum(t.size for t in removed)

    victims: list[StoredFile] = []
    kept: list[StoredFile] = []
    for fragment in fragments:
        expired = max_age_s is not None and now - fragment.last_used > max_age_s
        (victims if expired else kept).append(fragment)
    report.expired = len(victims)
    usage -= sum(f.size for f in victims)
    if max_bytes is not None and usage > max_bytes:
        target = max_bytes if target_bytes is None else min(target_bytes, max_bytes)
        victims += _least_recently_used(kept, usage - target, resolution_s)
    evicted = _remove(victims, dry_run, progress)
    removed += evicted
    if on_removed is not None and evicted and not dry_run:
        on_removed(evicted)
    report.evicted = len(evicted)
    report.evicted_bytes = sum(f.size for f in evicted)
    report.bytes_after = report.bytes_before - sum(f.size for f in removed)
    if not dry_run:
        report.dirs_removed = _remove_empty_dirs(check_root(root), removed)
    report.evict_s = time.perf_counter() - started
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


def _kept_bytes(root: str | os.PathLike[str], files: list[StoredFile]) -> int:
    """Bytes gc never removes that still count against the budget: strays, namespace descriptors,
    and the files at the top of the root and of the store directory (the disable-* switches). The
    gc lease is not counted: it goes when the pass ends."""
    total = sum(f.size for f in files if f.kind == STRAY)
    top = check_root(root)
    paths = [str(space.path / NAMESPACE_FILE) for space in namespaces(top)]
    for directory in (top, top / STORE_DIR):
        try:
            with os.scandir(directory) as entries:
                paths += [e.path for e in entries if e.is_file(follow_symlinks=False) and e.name != GC_LEASE_NAME]
        except FileNotFoundError:
            pass  # nothing stored yet
    for path in paths:
        try:
            total += os.stat(path, follow_symlinks=False).st_size
        except FileNotFoundError:
            pass  # a namespace without a descriptor, or a lease released meanwhile
    return total


def _remove(files: list[StoredFile], dry_run: bool, progress: Progress | None = None) -> list[StoredFile]:
    if dry_run:
        return list(files)
    removed = []
    for done, stored in enumerate(files, 1):
        if progress is not None:
            progress("evict", done, len(files))
        try:
            os.unlink(stored.location)
            removed.append(stored)
        except FileNotFoundError:
            pass  # another gc, or a reader discarding a bad fragment, got there first
        except OSError as exc:
            logger.warning("VUA gc: cannot remove %s: %s", stored.location, exc)
    return removed


def _remove_empty_dirs(root: Path, removed: list[StoredFile]) -> int:
    """``rmdir`` the directories emptied by ``removed``, up to (not including) each namespace directory."""
    store = str(root / STORE_DIR)
    candidates: set[str] = set()
    for stored in removed:
        directory = os.path.dirname(stored.location)
        while os.path.dirname(directory) != store and directory.startswith(store + os.sep):
            candidates.add(directory)
            directory = os.path.dirname(directory)
    count = 0
    for directory in sorted(candidates, key=lambda d: d.count(os.sep), reverse=True):
        try:
            os.rmdir(directory)
            count += 1
        except OSError:
            pass  # not empty (a writer is publishing into it), or already gone
    return count


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
