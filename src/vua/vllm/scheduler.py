"""The scheduler half: from token ids, decide which stored fragments to load and which computed chunks to save.

It touches the store only for lookups (a few stats and one listing, see :func:`find_stored_prefix`)
and never holds a tensor. See :mod:`vua.vllm.metadata` for how fragments are named.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..eviction import BackgroundGC
from ..keys import as_token_array, chained_digests, salted_seed
from ..store import FragmentStore
from ._compat import allocated_block_ids, known_token_ids, prompt_if_cacheable, scheduled_requests
from .events import StoreEvents
from .identity import StoreIdentity
from .metadata import SCRATCH, FragmentRef, LoadJob, SaveJob, VUAConnectorMetadata
from .settings import ConnectorSettings, RuntimeSwitches
from .stats import VUAConnectorStats

__all__ = ["SchedulerSide", "TokenKeys", "find_stored_prefix"]

logger = logging.getLogger(__name__)


@dataclass
class TokenKeys:
    """A request's known token ids (prompt, then generated tokens) and the chained digest of each
    of its full KV blocks.

    Only whole blocks are ever stored: which bytes of a block belong to which token is the
    attention backend's business (vLLM's CPU backend keeps a block's keys, then its values, and
    may pack them further), so nothing here slices a block by token.
    """

    tokens: np.ndarray
    digests: list[bytes]
    seed: bytes
    block_size: int

    @classmethod
    def of(cls, tokens: Any, block_size: int, seed: bytes, salt: str = "") -> "TokenKeys":
        seed = salted_seed(seed, salt)
        array = as_token_array(tokens)
        return cls(array, chained_digests(array, block_size, seed), seed, block_size)

    def extend(self, tokens: Sequence[int]) -> None:
        """Take in the tokens of ``tokens`` (the request's, which only grow) past those already known."""
        known = len(self.tokens)
        if len(tokens) <= known:
            return
        self.tokens = np.concatenate([self.tokens, as_token_array(list(tokens[known:]))])
        done = len(self.digests)
        parent = self.digests[-1] if done else self.seed
        self.digests += chained_digests(self.tokens[done * self.block_size :], self.block_size, parent)

    def snapshot(self) -> "TokenKeys":
        """A copy a lookup thread can read while this one grows."""
        return TokenKeys(self.tokens, list(self.digests), self.seed, self.block_size)

    def head(self, chunk: int, blocks_per_chunk: int) -> bytes:
        """The directory of the tails that start at ``chunk``: the digest through its first block."""
        return self.digests[chunk * blocks_per_chunk]


def find_stored_prefix(
    store: FragmentStore, keys: TokenKeys, blocks_per_chunk: int, shards: list[str]
) -> list[FragmentRef]:
    """The fragments of the longest stored prefix: full chunks, then the longest stored tail of full blocks.

    Cost, for a prompt of n full chunks: one stat of chunk 0 (a miss ends there), one of chunk n-1
    (a whole hit ends there), else a binary search for the first missing chunk (about log2(n)
    stats); then one listing of the tails after the last stored chunk. (One listing replaces
    each stat when there are several shards.)

    The binary search assumes the stored chunks of a prompt form a prefix, which holds unless a
    chunk in the middle was evicted or removed as corrupt. Such a gap is not checked here (that
    would cost a stat per chunk again): the claim then runs past it, the worker fails to open the
    missing fragment before the forward pass and reports its blocks and every later claimed
    block as load errors, and vLLM recomputes from there. A gap costs a recompute of the claim's
    rest, never wrong KV, and gaps are rare: gc evicts the deepest fragments of a prompt first,
    and a hit on a prefix records use on every fragment of it.
    """
    cb = blocks_per_chunk
    block = keys.block_size
    n_chunks = len(keys.digests) // cb

    def stored(chunk: int) -> bool:
        return store.has_shards(keys.digests[(chunk + 1) * cb - 1], shards)

    if n_chunks == 0 or not stored(0):
        boundary = 0
    elif n_chunks == 1 or stored(n_chunks - 1):
        boundary = n_chunks
    else:
        low, high = 1, n_chunks - 1  # chunk low - 1 is stored, chunk high is not
        while low < high:
            middle = (low + high) // 2
            if stored(middle):
                low = middle + 1
            else:
                high = middle
        boundary = low
    found = [
        FragmentRef(keys.digests[(c + 1) * cb - 1], None, c * cb * block, cb, keys.tokens[c * cb * block : (c + 1) * cb * block])
        for c in range(boundary)
    ]
    longest_tail = min(len(keys.digests) - boundary * cb, cb - 1)
    if longest_tail <= 0:
        return found
    head = keys.head(boundary, cb)
    listed = store.tails(head)
    start = boundary * cb * block
    for k in range(longest_tail, 0, -1):
        digest = keys.digests[boundary * cb + k - 1]
        if set(shards) <= listed.get(digest.hex(), set()):
            found.append(FragmentRef(digest, head, start, k, keys.tokens[start : start + k * block]))
            break
    return found


@dataclass
class _Request:
    request: Any  # vLLM's Request: its all_token_ids grow as tokens are generated
    keys: TokenKeys
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    next_chunk: int = 0  # chunks before it are stored or already handed to the worker
    stored_chunks: int = 0  # full chunks known to be stored (found by the last lookup)
    stored_tails: set[bytes] = field(default_factory=set)  # tails found by the last lookup or saved
    prompt_tail_done: bool = False  # the prompt's tail is stored or handed to the worker
    claim: list[FragmentRef] = field(default_factory=list)  # the last lookup's result
    claimed_from: int = 0  # the local hit that lookup was asked about
    claim_async: bool = False  # the claim is loaded asynchronously (long enough)
    loading_async: bool = False  # allocated for an asynchronous load the worker has not reported finished
    load_failed: bool = False  # a load of it failed: it is computed from then on, never looked up again
    lookup: Future | None = None  # a lookup still running, or done and not yet answered
    lookup_tokens: int = 0  # the token count it was started for
    lookup_started: float = 0.0  # when (time.monotonic) it was started
    hit_tokens: int = 0  # loaded at first admission, less what a failed load made vLLM recompute
    admitted: bool = False  # allocated once: a resumed request's second claim is not a new hit
    saves: int = 0

    def rewind(self, chunk: int) -> None:
        """Forget what was planned or found from ``chunk`` on: its KV is being recomputed."""
        self.next_chunk = min(self.next_chunk, chunk)
        self.stored_chunks = min(self.stored_chunks, chunk)
        self.stored_tails = set()
        self.prompt_tail_done = False

    def save_job(self, request_id: str, fragment: FragmentRef, block_size: int) -> SaveJob:
        first = fragment.start // block_size
        end = first + fragment.n_blocks
        return SaveJob(request_id, fragment, self.block_ids[first:end], self.block_ids[:end])


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings, identity: StoreIdentity, store: FragmentStore) -> None:
        self.settings = settings
        self.identity = identity
        self.store = store
        self.switches = RuntimeSwitches(settings.root)
        self.shards = identity.shards()
        self.block_size = identity.block_size
        self.cb = settings.blocks_per_chunk
        self._requests: dict[str, _Request] = {}
        self._loads: list[LoadJob] = []
        # Saves of finished requests whose blocks vLLM holds until the next step has copied them.
        self._finishing: list[SaveJob] = []
        self._released: list[str] = []
        self._stats = VUAConnectorStats()
        self.totals = VUAConnectorStats()  # since start-up, for tests and benchmarks
        self._failures_seen = 0
        # Lookups run here, so that one slower than lookup_budget_ms can be left running while
        # vLLM's scheduler gets on with the step; two threads: a stalled mount should not queue others.
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="vua-lookup")
        self._stalled_until = 0.0  # lookups skip the store until then: it stopped answering
        # Set by the connector when vLLM publishes KV events (vua.vllm.events).
        self.events: StoreEvents | None = None
        # One per engine (not per worker): keeps the shared root under max_store_size.
        self.gc = BackgroundGC(settings.root, settings.max_store_size) if settings.max_store_size else None
        if self.gc is not None:
            self.gc.start()

    def _tracked(self, request: Any) -> _Request | None:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            cacheable = prompt_if_cacheable(request)
            if cacheable is None:
                return None
            tokens, salt = cacheable
            keys = TokenKeys.of(tokens, self.block_size, self.store.namespace.seed, salt)
            tracked = self._requests[request.request_id] = _Request(request, keys, len(keys.tokens))
        return tracked

    # ---- lookups ----

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Stored tokens beyond ``num_computed_tokens``: completely written, and short of the whole request;
        None ("ask again later") while the lookup is still running after ``lookup_budget_ms``.

        At least ``min_recompute_tokens`` tokens are left to compute (vLLM needs the last one's
        logits), so a claim may end inside its last block: the worker then loads that block whole
        before the forward pass and vLLM overwrites the slots it computes. With
        ``claim_whole_blocks`` the claim ends on a KV-block boundary instead (bit-identical outputs).
        """
        tracked = self._tracked(request)
        now = time.monotonic()
        if tracked is None or tracked.load_failed or not self.switches.get_enabled or now < self._stalled_until:
            return 0, False
        # A request resumed after preemption has generated tokens too; they may be stored.
        tracked.keys.extend(known_token_ids(request))
        n_tokens = len(tracked.keys.tokens)
        if tracked.lookup is None or tracked.lookup_tokens != n_tokens:
            tracked.lookup = self._lookups.submit(self._timed_lookup, tracked.keys.snapshot())
            tracked.lookup_tokens, tracked.lookup_started = n_tokens, now
        try:
            found, seconds = tracked.lookup.result(timeout=self.settings.lookup_budget_ms / 1000)
        except FutureTimeout:
            if time.monotonic() - tracked.lookup_started < self.settings.storage_timeout_s:
                # vLLM keeps the request waiting and asks again at its next step; the lookup goes on.
                self._count(lookups_deferred=1)
                return None, False
            # Storage has stopped answering: a miss, and the store is left alone for a while, so
            # that requests are computed rather than kept waiting on a hung mount.
            tracked.lookup = None
            self._stalled_until = time.monotonic() + self.settings.storage_timeout_s
            self._count(lookup_timeouts=1)
            logger.warning("VUA: a lookup got no answer from storage in %.1f s; treating the store as "
                           "unavailable for %.1f s", self.settings.storage_timeout_s, self.settings.storage_timeout_s)
            return 0, False
        tracked.lookup = None
        self._count_lookup(seconds)
        tracked.claim, tracked.claimed_from = found, num_computed_tokens
        tracked.stored_chunks = sum(1 for f in found if f.head is None)
        tracked.stored_tails = {f.digest for f in found if f.head is not None}
        hit = min(sum(len(f.tokens) for f in found), n_tokens - self.settings.min_recompute_tokens)
        if self.settings.claim_whole_blocks:
            hit = hit // self.block_size * self.block_size
        new = max(0, hit - num_computed_tokens)
        tracked.claim_async = new > 0 and new >= self.settings.async_load_min_tokens
        return new, tracked.claim_async

    def _timed_lookup(self, keys: TokenKeys) -> tuple[list[FragmentRef], float]:
        started = time.perf_counter()
        found = find_stored_prefix(self.store, keys, self.cb, self.shards)
        return found, time.perf_counter() - started

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return
        if not tracked.admitted:
            # Counted when the request finishes, so that a failed load can still take its tokens back.
            tracked.admitted, tracked.hit_tokens = True, max(0, num_external_tokens)
        if num_external_tokens <= 0:
            return
        block_ids = allocated_block_ids(blocks)
        begin, end = tracked.claimed_from, tracked.claimed_from + num_external_tokens
        job = LoadJob(request.request_id, [], [], end, tracked.claim_async)
        if tracked.claim_async:
            # The request is not scheduled until its load has finished, so its blocks are known
            # from here only: a failed block must be found in them (update_connector_output).
            tracked.block_ids, tracked.loading_async = block_ids, True
            self._count(async_loads=1)
        for fragment in tracked.claim:
            first_block = fragment.start // self.block_size
            positions = range(first_block, first_block + fragment.n_blocks)
            ids = [block_ids[b] if begin <= b * self.block_size < end else SCRATCH for b in positions]
            if any(i != SCRATCH for i in ids):
                job.fragments.append(fragment)
                job.block_ids.append(ids)
        self._loads.append(job)
        logger.debug(
            "VUA: request %s: %d tokens, %d computed locally, loading %d from %d fragment(s)",
            request.request_id, len(tracked.keys.tokens), begin, num_external_tokens, len(job.fragments),
        )

    # ---- saves ----

    def build_connector_meta(self, scheduler_output: Any) -> VUAConnectorMetadata:
        meta = VUAConnectorMetadata(loads=self._loads, failures_seen=self._failures_seen,
                                    saves=self._finishing, released=self._released)
        self._loads, self._finishing, self._released = [], [], []
        saving = self.switches.put_enabled
        for step in scheduled_requests(scheduler_output):
            tracked = self._requests.get(step.request_id)
            if tracked is None:
                continue
            if step.replaces_blocks:
                tracked.block_ids = list(step.block_ids or [])
            elif step.block_ids:
                tracked.block_ids.extend(step.block_ids)
            if saving:
                # Tokens whose KV is in the cache once this step has run, and whose ids are known:
                # a token is computed in the step after it is sampled, and under async scheduling
                # or speculative decoding the scheduled tokens run ahead of the known ones.
                ready = min(step.computed_before + step.scheduled, len(known_token_ids(tracked.request)))
                meta.saves.extend(self._due_saves(step.request_id, tracked, ready))
        return meta

    def _saveable(self, tracked: _Request) -> int:
        """Tokens that may be saved: the prompt's, and the generated ones with ``save_decode``."""
        return len(known_token_ids(tracked.request)) if self.settings.save_decode else tracked.prompt_len

    def _due_saves(self, request_id: str, tracked: _Request, ready: int) -> list[SaveJob]:
        """Chunks (and the prompt's tail) whose every token is in the KV cache once this step has
        run (the first ``ready`` tokens), not yet stored."""
        cb, block = self.cb, self.block_size
        chunk_tokens = cb * block
        ready = min(ready, self._saveable(tracked))
        if (tracked.next_chunk + 1) * chunk_tokens <= ready:
            # Generated tokens join the keys only when a chunk of them is due (once per chunk).
            tracked.keys.extend(known_token_ids(tracked.request)[:ready])
        keys = tracked.keys
        saves = []
        while (tracked.next_chunk + 1) * chunk_tokens <= ready:
            chunk = tracked.next_chunk
            tracked.next_chunk += 1
            digest = keys.digests[(chunk + 1) * cb - 1]
            # Known stored (the lookup found it): skip. Otherwise the writer, off the scheduler's
            # path, skips it if another engine stored it meanwhile: planning does no I/O, so a
            # slow or hung mount cannot stall a step here.
            if chunk < tracked.stored_chunks:
                continue
            start = chunk * chunk_tokens
            fragment = FragmentRef(digest, None, start, cb, keys.tokens[start : start + chunk_tokens])
            saves.append(tracked.save_job(request_id, fragment, block))
        prompt_chunks = tracked.prompt_len // chunk_tokens
        if not tracked.prompt_tail_done and ready >= tracked.prompt_len and tracked.next_chunk == prompt_chunks:
            tracked.prompt_tail_done = True
            saves += self._tail_saves(request_id, tracked, prompt_chunks, tracked.prompt_len // block)
        self._count_saves(tracked, saves)
        return saves

    def _tail_saves(self, request_id: str, tracked: _Request, chunk: int, end_block: int) -> list[SaveJob]:
        """The full blocks from ``chunk``'s start to ``end_block`` as one tail, unless known stored.
        (The writer skips it if it is stored meanwhile, or if its head directory is full:
        :data:`~vua.layout.MAX_TAILS_PER_HEAD`.)"""
        keys, block = tracked.keys, self.block_size
        first = chunk * self.cb
        if end_block <= first:
            return []
        digest = keys.digests[end_block - 1]
        if digest in tracked.stored_tails:
            return []
        head = keys.head(chunk, self.cb)
        tracked.stored_tails.add(digest)
        start = first * block
        fragment = FragmentRef(digest, head, start, end_block - first, keys.tokens[start : end_block * block])
        return [tracked.save_job(request_id, fragment, block)]

    def _count_saves(self, tracked: _Request, saves: list[SaveJob]) -> None:
        """Count planned saves, and remember their KV events while the request still holds its
        block hashes (announced once every shard is written, see :mod:`vua.vllm.events`)."""
        tracked.saves += len(saves)
        decode = sum(1 for job in saves if job.fragment.start + len(job.fragment.tokens) > tracked.prompt_len)
        if decode:
            self._count(decode_saves=decode)
        if self.events is not None:
            for job in saves:
                self.events.planned(tracked.request, job.fragment, self.store.layout)

    def update_connector_output(self, invalid_block_ids: set[int], finished_loading: Iterable[str] = ()) -> None:
        """After a step: blocks that failed to load (on any worker) are recomputed by vLLM, so every
        request holding one saves again from the chunk it lies in. ``finished_loading`` are the
        requests whose asynchronous loads every worker has finished."""
        for request_id in finished_loading:
            tracked = self._requests.get(request_id)
            if tracked is not None:
                tracked.loading_async = False
        if not invalid_block_ids:
            return
        self._failures_seen += 1
        for request_id, tracked in self._requests.items():
            first = next((i for i, b in enumerate(tracked.block_ids) if b in invalid_block_ids), None)
            if first is not None:
                # vLLM recomputes from the failed block on: those claimed tokens were not a hit.
                tracked.hit_tokens = max(0, min(tracked.hit_tokens, first * self.block_size - tracked.claimed_from))
                tracked.rewind(first // self.cb)
                # vLLM asks again for a request whose asynchronous load failed from its first
                # block; storage that keeps failing it (a read that hangs) must not make it wait again.
                tracked.load_failed = True
                logger.info("VUA: request %s: KV from block %d on failed to load; it is recomputed and saved again",
                            request_id, first)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Plan the saves of a finished (or aborted) request's generated tokens; True holds its blocks.

        The KV of generated tokens is stored whole blocks at a time: full chunks while decoding,
        and here the full blocks past the last full chunk, as a tail. Its last token's KV is not
        computed (a token's KV is computed in the step after it is sampled), so only blocks of
        ``num_computed_tokens`` are stored. vLLM frees the blocks right after this call unless it
        returns True, and the worker copies them out only in the next step's ``wait_for_save``, so
        the blocks are held until the worker reports the request as finished sending (that same
        step). Planning the tail earlier instead, in each decode step, would rewrite a growing
        tail at every new block, since a step does not know it is a request's last.
        """
        tracked = self._requests.pop(request.request_id, None)
        if tracked is None:
            return False, None
        if tracked.admitted:
            # Once, at the end: a resumed request is one request, and a failed load has taken back its tokens.
            self._count(requests=1, prompt_tokens=tracked.prompt_len, hit_tokens=tracked.hit_tokens)
        saves: list[SaveJob] = []
        # While an asynchronous load is still running, the request's blocks hold nothing to save yet.
        if self.settings.save_decode and self.switches.put_enabled and not tracked.loading_async:
            # ``block_ids`` are the blocks of the computed tokens now (fewer after a preemption).
            tracked.block_ids = list(block_ids)
            ready = min(request.num_computed_tokens, len(known_token_ids(request)), len(block_ids) * self.block_size)
            saves = self._due_saves(request.request_id, tracked, ready)
            tracked.keys.extend(known_token_ids(request)[:ready])
            if tracked.next_chunk == ready // (self.cb * self.block_size):
                end_block = ready // self.block_size
                if end_block > tracked.prompt_len // self.block_size:  # longer than the prompt's own tail
                    tail = self._tail_saves(request.request_id, tracked, tracked.next_chunk, end_block)
                    self._count_saves(tracked, tail)
                    saves += tail
        logger.debug(
            "VUA: request %s finished: %d prompt tokens, %d generated, %d loaded, %d fragment(s) saved",
            request.request_id, tracked.prompt_len, len(known_token_ids(request)) - tracked.prompt_len,
            tracked.hit_tokens, tracked.saves,
        )
        if not saves:
            return False, None
        self._finishing += saves
        self._released.append(request.request_id)
        return True, None

    def _count(self, **counts: float) -> None:
        self._stats.add(**counts)
        self.totals.add(**counts)

    def _count_lookup(self, seconds: float) -> None:
        self._stats.add_lookup(seconds)
        self.totals.add_lookup(seconds)

    def take_stats(self) -> VUAConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, VUAConnectorStats()
        return stats

    def shutdown(self) -> None:
        self._requests.clear()
        self.switches.stop()
        self._lookups.shutdown(wait=False, cancel_futures=True)
        if self.gc is not None:
            self.gc.stop()
        if self.events is not None:
            self.events.stop()
