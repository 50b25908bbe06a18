"""vLLM KV events for the shared store: ``BlockStored`` when VUA publishes a fragment, ``BlockRemoved``
when it is gone, so that a KV-aware router (llm-d, Dynamo) can send a prompt to an engine whose
store already holds its prefix.

Which hashes: vLLM's own block hashes of the request that saved the fragment (``request.block_hashes``,
one per KV block, chained over the prefix, salted like vLLM's prefix cache), not VUA's digests:
routers hash prompts the way vLLM does. A fragment of blocks ``[i, i+n)`` becomes one
``BlockStored`` with those n hashes, its parent ``block_hashes[i-1]``, its token ids and the
medium ``STORAGE`` (vLLM's constant for a filesystem tier) with ``ownership="vua"``.

When: the scheduler plans a save while it has the request (:meth:`StoreEvents.planned`); every
worker reports the fragments it published (:class:`vua.vllm._published.PublishedFragments`, at
the end of a step), and once all shards of one are on disk the scheduler queues its event for
vLLM's publisher (``take_events``). A save that is skipped or fails is never announced.

Retraction: only this engine knows the vLLM hashes of what it announced, so it retracts them
itself, whoever removed the file: at once for what its own background gc evicts
(:meth:`StoreEvents.evicted`), and by polling for everything else (``vua gc`` or ``vua verify
--fix`` from the command line, another engine's gc, an operator's ``rm``): every
``poll_interval_s`` a thread stats the fragments still announced and retracts those with a
missing shard. Announcements beyond ``max_announced`` retract the oldest: a router then misses a
hit, never routes to KV that may be gone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ._compat import block_removed_event, block_stored_event

if TYPE_CHECKING:
    from ..inventory import StoredFile
    from ..layout import StoreLayout
    from .metadata import FragmentRef

__all__ = ["StoreEvents"]

logger = logging.getLogger(__name__)


@dataclass
class _Fragment:
    event: Any  # the BlockStored
    paths: list[Path]  # one per shard
    published: set[str] = field(default_factory=set)


class StoreEvents:
    def __init__(
        self,
        namespace: str,
        shards: list[str],
        block_size: int,
        *,
        poll_interval_s: float = 60.0,
        max_announced: int = 100_000,
        max_planned: int = 10_000,
    ) -> None:
        self.namespace = namespace
        self.shards = list(shards)
        self.block_size = block_size
        self.poll_interval_s = poll_interval_s
        self.max_announced = max_announced
        self.max_planned = max_planned
        self._lock = threading.Lock()
        self._planned: OrderedDict[bytes, _Fragment] = OrderedDict()
        self._announced: OrderedDict[bytes, _Fragment] = OrderedDict()
        self._queue: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- scheduler thread ----

    def planned(self, request: Any, fragment: "FragmentRef", layout: "StoreLayout") -> None:
        """Remember the event of a save handed to the workers (``request`` still holds its hashes)."""
        event = block_stored_event(request, fragment.start // self.block_size, fragment.n_blocks, self.block_size)
        if event is None:
            return
        with self._lock:
            self._planned[fragment.digest] = _Fragment(event, [fragment.path(layout, s) for s in self.shards])
            # Saves skipped or refused are never published: forget the oldest plans.
            while len(self._planned) > self.max_planned:
                self._planned.popitem(last=False)

    def published(self, pairs: Iterable[tuple[bytes, str]]) -> None:
        """Fragments the workers wrote: announce each one whose every shard is now published."""
        with self._lock:
            for digest, shard in pairs:
                fragment = self._planned.get(digest)
                if fragment is None:
                    continue
                fragment.published.add(shard)
                if fragment.published.issuperset(self.shards):
                    del self._planned[digest]
                    self._announce(digest, fragment)

    def take(self) -> list[Any]:
        with self._lock:
            events, self._queue = self._queue, []
            return events

    # ---- any thread ----

    def evicted(self, files: "list[StoredFile]") -> None:
        """Retract what this engine announced among ``files`` (removed by its background gc)."""
        with self._lock:
            for stored in files:
                if stored.namespace == self.namespace and stored.key:
                    self._retract(bytes.fromhex(stored.key))

    def poll_once(self) -> int:
        """Retract every announced fragment with a shard missing; returns how many."""
        with self._lock:
            announced = list(self._announced.items())
        gone = [digest for digest, fragment in announced if not all(os.path.exists(p) for p in fragment.paths)]
        with self._lock:
            for digest in gone:
                self._retract(digest)
        return len(gone)

    def start(self) -> None:
        if self.poll_interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vua-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a polling bug must not take the scheduler down
                logger.exception("VUA: polling the store for removed fragments failed")

    # ---- under the lock ----

    def _announce(self, digest: bytes, fragment: _Fragment) -> None:
        self._announced[digest] = fragment
        self._announced.move_to_end(digest)
        self._queue.append(fragment.event)
        while len(self._announced) > self.max_announced:
            self._retract(next(iter(self._announced)))

    def _retract(self, digest: bytes) -> None:
        fragment = self._announced.pop(digest, None)
        if fragment is not None:
            self._queue.append(block_removed_event(fragment.event))
