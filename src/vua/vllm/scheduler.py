"""The scheduler half: from token ids, decide which stored fragments to load and which computed chunks to save.

It touches the store only for lookups (one stat per chunk, one listing for a tail) and never
holds a tensor. See :mod:`vua.vllm.metadata` for how fragments are named.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..eviction import BackgroundGC
from ..keys import as_token_array, chained_digests, salted_seed
from ..store import FragmentStore
from ._compat import allocated_block_ids, prompt_if_cacheable, scheduled_requests
from .identity import StoreIdentity
from .metadata import SCRATCH, FragmentRef, LoadJob, SaveJob, VUAConnectorMetadata
from .settings import ConnectorSettings, RuntimeSwitches
from .events import StoreEvents
from .stats import VUAConnectorStats

__all__ = ["SchedulerSide", "PromptKeys", "find_stored_prefix"]

logger = logging.getLogger(__name__)


@dataclass
class PromptKeys:
    """A prompt's token ids and the chained digest of each of its full KV blocks.

    Only whole blocks are ever stored: which bytes of a block belong to which token is the
    attention backend's business (vLLM's CPU backend keeps a block's keys, then its values, and
    may pack them further), so nothing here slices a block by token.
    """

    tokens: np.ndarray
    digests: list[bytes]
    seed: bytes

    def anchor(self, chunk: int, blocks_per_chunk: int) -> bytes:
        """The digest of the prefix before ``chunk``: the directory its tails are listed in."""
        return self.digests[chunk * blocks_per_chunk - 1] if chunk else self.seed


def prompt_keys(tokens: Any, block_size: int, seed: bytes, salt: str = "") -> PromptKeys:
    seed = salted_seed(seed, salt)
    array = as_token_array(tokens)
    return PromptKeys(array, chained_digests(array, block_size, seed), seed)


def find_stored_prefix(
    store: FragmentStore, keys: PromptKeys, block_size: int, blocks_per_chunk: int, shards: list[str]
) -> list[FragmentRef]:
    """The fragments of the longest stored prefix: full chunks until the first miss, then the
    longest stored tail of full blocks.

    One stat (or listing, for several shards) per full chunk and one listing for the rest.
    """
    cb = blocks_per_chunk
    chunk_tokens = cb * block_size
    n_blocks = len(keys.digests)
    found: list[FragmentRef] = []
    chunk = 0
    while (chunk + 1) * cb <= n_blocks and store.has_shards(keys.digests[(chunk + 1) * cb - 1], shards):
        start = chunk * chunk_tokens
        found.append(FragmentRef(keys.digests[(chunk + 1) * cb - 1], None, start, cb, keys.tokens[start : start + chunk_tokens]))
        chunk += 1
    longest_tail = min(n_blocks - chunk * cb, cb - 1)
    if longest_tail <= 0:
        return found
    anchor = keys.anchor(chunk, cb)
    stored = store.tails(anchor)
    for k in range(longest_tail, 0, -1):
        digest = keys.digests[chunk * cb + k - 1]
        if set(shards) <= stored.get(digest.hex(), set()):
            start = chunk * chunk_tokens
            found.append(FragmentRef(digest, anchor, start, k, keys.tokens[start : start + k * block_size]))
            break
    return found


@dataclass
class _Request:
    keys: PromptKeys
    block_ids: list[int] = field(default_factory=list)
    next_chunk: int = 0  # chunks before it are stored or already handed to the worker
    stored_chunks: int = 0  # full chunks known to be stored (found by the last lookup)
    stored_tails: set[bytes] = field(default_factory=set)  # tails found by the last lookup
    tail_done: bool = False  # the prompt's tails are stored or handed to the worker
    claim: list[FragmentRef] = field(default_factory=list)  # the last lookup's result
    claimed_from: int = 0  # the local hit that lookup was asked about
    hit_tokens: int = 0  # loaded at first admission, less what a failed load made vLLM recompute
    admitted: bool = False  # allocated once: a resumed request's second claim is not a new hit
    saves: int = 0
    request: Any = None  # vLLM's Request: its block hashes name the KV events of this request's saves

    def rewind(self, chunk: int) -> None:
        """Forget what was planned or found from ``chunk`` on: its KV is being recomputed."""
        self.next_chunk = min(self.next_chunk, chunk)
        self.stored_chunks = min(self.stored_chunks, chunk)
        self.stored_tails = set()
        self.tail_done = False

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
        self._stats = VUAConnectorStats()
        self._failures_seen = 0
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
            keys = prompt_keys(tokens, self.block_size, self.store.namespace.seed, salt)
            tracked = self._requests[request.request_id] = _Request(keys, request=request)
        return tracked

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Stored tokens beyond ``num_computed_tokens``: fully persisted, and short of the whole prompt.

        At least ``min_recompute_tokens`` prompt tokens are left to compute (vLLM needs the last
        one's logits), so a claim may end inside its last block: the worker then loads that block
        whole before the forward pass and vLLM overwrites the slots it computes. With
        ``claim_whole_blocks`` the claim ends on a KV-block boundary instead (bit-identical outputs).
        """
        tracked = self._tracked(request)
        if tracked is None or not self.switches.get_enabled:
            return 0, False
        started = time.perf_counter()
        found = find_stored_prefix(self.store, tracked.keys, self.block_size, self.cb, self.shards)
        self._stats.add(lookups=1)
        self._stats.observe("lookup_seconds", time.perf_counter() - started)
        tracked.claim, tracked.claimed_from = found, num_computed_tokens
        tracked.stored_chunks = sum(1 for f in found if f.anchor is None)
        tracked.stored_tails = {f.digest for f in found if f.anchor is not None}
        hit = min(sum(len(f.tokens) for f in found), len(tracked.keys.tokens) - self.settings.min_recompute_tokens)
        if self.settings.claim_whole_blocks:
            hit = hit // self.block_size * self.block_size
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return
        prompt_len = len(tracked.keys.tokens)
        if not tracked.admitted:
            # Counted when the request finishes, so that a failed load can still take its tokens back.
            tracked.admitted, tracked.hit_tokens = True, max(0, num_external_tokens)
        if num_external_tokens <= 0:
            return
        block_ids = allocated_block_ids(blocks)
        begin, end = tracked.claimed_from, tracked.claimed_from + num_external_tokens
        job = LoadJob(request.request_id, [], [], end)
        for fragment in tracked.claim:
            first_block = fragment.start // self.block_size
            positions = range(first_block, first_block + fragment.n_blocks)
            ids = [block_ids[b] if begin <= b * self.block_size < end else SCRATCH for b in positions]
            if any(i != SCRATCH for i in ids):
                job.fragments.append(fragment)
                job.block_ids.append(ids)
        self._loads.append(job)
        logger.debug(
            "VUA: request %s: %d prompt tokens, %d computed locally, loading %d from %d fragment(s)",
            request.request_id, prompt_len, begin, num_external_tokens, len(job.fragments),
        )

    def build_connector_meta(self, scheduler_output: Any) -> VUAConnectorMetadata:
        meta = VUAConnectorMetadata(loads=self._loads, failures_seen=self._failures_seen)
        self._loads = []
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
                due = self._due_saves(step.request_id, tracked, step.computed_before + step.scheduled)
                meta.saves.extend(due)
                if self.events is not None:
                    for job in due:
                        self.events.planned(tracked.request, job.fragment, self.store.layout)
        return meta

    def _due_saves(self, request_id: str, tracked: _Request, computed: int) -> list[SaveJob]:
        """Chunks (and the tail) whose every token is in the KV cache once this step has run, not yet stored."""
        keys, cb, block = tracked.keys, self.cb, self.block_size
        n_blocks = len(keys.digests)
        saves = []
        while tracked.next_chunk < n_blocks // cb and (tracked.next_chunk + 1) * cb * block <= computed:
            chunk = tracked.next_chunk
            tracked.next_chunk += 1
            digest = keys.digests[(chunk + 1) * cb - 1]
            if chunk < tracked.stored_chunks or self.store.has_shards(digest, self.shards):
                continue
            start = chunk * cb * block
            fragment = FragmentRef(digest, None, start, cb, keys.tokens[start : start + cb * block])
            saves.append(tracked.save_job(request_id, fragment, block))
        chunk = n_blocks // cb
        if tracked.next_chunk == chunk and not tracked.tail_done and computed >= len(keys.tokens):
            tracked.tail_done = True
            saves += self._tail_saves(request_id, tracked, chunk)
        tracked.saves += len(saves)
        return saves

    def _tail_saves(self, request_id: str, tracked: _Request, chunk: int) -> list[SaveJob]:
        """The prompt's end past its last full chunk: its full blocks as one tail and, when the prompt
        ends inside a block, that block alone (keyed by the whole prompt), unless already stored."""
        keys, block = tracked.keys, self.block_size
        n_blocks = len(keys.digests)
        anchor = keys.anchor(chunk, self.cb)
        start = chunk * self.cb * block
        pieces = []
        if n_blocks > chunk * self.cb:
            pieces.append(FragmentRef(keys.digests[-1], anchor, start, n_blocks - chunk * self.cb, keys.tokens[start : n_blocks * block]))
        pieces = [p for p in pieces if p.digest not in tracked.stored_tails]
        listed = self.store.tails(anchor) if pieces else {}
        return [
            tracked.save_job(request_id, p, block)
            for p in pieces
            if not set(self.shards) <= listed.get(p.digest.hex(), set())
        ]

    def update_connector_output(self, invalid_block_ids: set[int]) -> None:
        """After a step: blocks that failed to load (on any worker) are recomputed by vLLM, so every
        request holding one saves again from the chunk it lies in."""
        if not invalid_block_ids:
            return
        self._failures_seen += 1
        for request_id, tracked in self._requests.items():
            first = next((i for i, b in enumerate(tracked.block_ids) if b in invalid_block_ids), None)
            if first is not None:
                # vLLM recomputes from the failed block on: those claimed tokens were not a hit.
                tracked.hit_tokens = max(0, min(tracked.hit_tokens, first * self.block_size - tracked.claimed_from))
                tracked.rewind(first // self.cb)
                logger.info("VUA: request %s: KV from block %d on failed to load; it is recomputed and saved again",
                            request_id, first)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        tracked = self._requests.pop(request.request_id, None)
        if tracked is not None:
            self._stats.add(requests=1, prompt_tokens=len(tracked.keys.tokens), hit_tokens=tracked.hit_tokens)
            logger.debug(
                "VUA: request %s finished: %d prompt tokens, %d loaded, %d fragment(s) saved",
                request.request_id, len(tracked.keys.tokens), tracked.hit_tokens, tracked.saves,
            )
        return False, None

    def take_stats(self) -> VUAConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, VUAConnectorStats()
        return stats

    def shutdown(self) -> None:
        self._requests.clear()
        if self.gc is not None:
            self.gc.stop()
        if self.events is not None:
            self.events.stop()
