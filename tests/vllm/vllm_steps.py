"""Drive the two connector halves through vLLM's own request and scheduler-output types, without an engine.

The "forward pass" writes, into every computed block, bytes that depend only on the token
prefix the block ends (like real KV does), so a load can be checked exactly against what a
compute would have produced.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from vua.store import FragmentStore
from vua.vllm.identity import StoreIdentity
from vua.vllm.scheduler import SchedulerSide
from vua.vllm.settings import ConnectorSettings
from vua.vllm.worker import WorkerSide

BLOCK = 4
CHUNK = 16  # 4 blocks
BLOCK_SHAPE = (2, BLOCK, 16)  # [kv_heads, block, head_size + head_size_v]
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
NUM_BLOCKS = 64


def identity(model: str = "tiny", **changes) -> StoreIdentity:
    fields = dict(model=model, kv_dtype="BF16", block_shape=BLOCK_SHAPE, block_size=BLOCK, chunk_size=CHUNK)
    fields.update(changes)
    return StoreIdentity(**fields)


def settings(root: Path, **extra) -> ConnectorSettings:
    # Claims reach the last prompt token (recomputing only it when the prompt ends on a block boundary).
    # Loads are in the step (vLLM's synchronous path) on any filesystem, GlusterFS included, unless a
    # test asks for asynchronous ones (tests/vllm/test_vllm_async_loads.py).
    config = {"shared_storage_path": str(root), "chunk_size": CHUNK, "durable": False, "io_threads": 2,
              "claim_whole_blocks": False, "min_recompute_tokens": 1, "async_load_min_tokens": 1 << 30, **extra}
    kv_bytes_per_token = 2 * len(LAYERS) * BLOCK_SHAPE[0] * BLOCK_SHAPE[2]  # bf16
    return ConnectorSettings.from_extra_config(config, block_size=BLOCK, max_num_batched_tokens=64,
                                               kv_bytes_per_token=kv_bytes_per_token)


def expected_block(tokens: list[int], block_index: int) -> torch.Tensor:
    """The KV a compute would leave in the block ``block_index`` of ``tokens`` (a function of its prefix,
    which is shorter than the block for the prompt's last, partial block)."""
    prefix = np.asarray(tokens[: (block_index + 1) * BLOCK], dtype=np.int64).tobytes()
    seed = int.from_bytes(hashlib.blake2b(prefix, digest_size=8).digest(), "little") % (2**63)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCK_SHAPE, generator=generator).to(torch.bfloat16)


class Engine:
    """One scheduler half and one worker half over a shared root, with a KV cache of plain tensors."""

    def __init__(self, root: Path, ident: StoreIdentity | None = None, tp_rank: int = 0, **extra) -> None:
        self.identity = ident or identity()
        self.settings = settings(root, **extra)
        namespace = self.identity.namespace()
        self.scheduler = SchedulerSide(self.settings, self.identity, FragmentStore(root, namespace, durable=False))
        self.worker = WorkerSide(self.settings, self.identity,
                                 FragmentStore(root, namespace, backend="posix", durable=False), tp_rank)
        self.kv = {name: torch.zeros((NUM_BLOCKS, *BLOCK_SHAPE), dtype=torch.bfloat16) for name in LAYERS}
        self.worker.register_kv_caches(self.kv)
        self._free = list(range(NUM_BLOCKS))
        self.errors: set[int] = set()

    def lookup(self, request: Request, local_hit: int = 0, expect_async: bool = False) -> int:
        """The connector's claim, asked again while it answers "not yet" (None), as vLLM's scheduler does."""
        deadline = time.monotonic() + 60
        while True:
            hit, is_async = self.scheduler.get_num_new_matched_tokens(request, local_hit)
            if hit is not None:
                assert is_async is expect_async
                return hit
            assert time.monotonic() < deadline, "a deferred lookup never finished"
            time.sleep(0.001)

    def run(self, request_id: str, tokens: list[int], step_tokens: int = 64, salt: str | None = None,
            block_hasher: Callable[[Request], list] | None = None) -> dict:
        """Prefill ``tokens`` in steps of ``step_tokens``; returns what the connector claimed and loaded
        (and the request, whose ``block_hashes`` are vLLM's when a ``block_hasher`` is given)."""
        request = Request(request_id, list(tokens), SamplingParams(max_tokens=1), None, cache_salt=salt,
                          block_hasher=block_hasher)
        hit = self.lookup(request)
        n_blocks = -(-len(tokens) // BLOCK)
        block_ids = [self._free.pop(0) for _ in range(n_blocks)]
        self.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), hit)
        computed, first, jobs = hit, True, {"loads": [], "saves": []}
        while computed < len(tokens):
            scheduled = min(step_tokens, len(tokens) - computed)
            meta = self.scheduler.build_connector_meta(scheduled_step(request, block_ids, computed, scheduled, first))
            jobs["loads"] += meta.loads
            jobs["saves"] += meta.saves
            self.worker.start_load(meta.loads)
            for layer in LAYERS:
                self.worker.wait_for_layer_load(layer)
                self.compute(tokens, block_ids, computed, computed + scheduled, layer)
            self.worker.wait_for_save(meta.saves, meta.failures_seen)
            invalid = self.worker.take_load_errors()
            self.scheduler.update_connector_output(invalid)
            self.errors |= invalid
            if invalid:  # vLLM's recompute policy: back to the first failed block
                failed_at = min(block_ids.index(b) for b in invalid)
                computed = min(computed, failed_at * BLOCK)
                first = False
                continue
            computed += scheduled
            first = False
        self.worker.flush()
        self.scheduler.request_finished(request, block_ids)
        self._free.extend(block_ids)
        return {"hit": hit, "block_ids": block_ids, "request": request, **jobs}

    def chat(self, request_id: str, prompt: list[int], answer: list[int], step_tokens: int = 64,
             block_hasher: Callable[[Request], list] | None = None) -> dict:
        """Prefill ``prompt``, then generate ``answer`` one token a step (the tokens are given, not
        sampled), finish, and run the step after it; returns the saves planned and the step after
        (and the request, whose ``block_hashes`` are vLLM's when a ``block_hasher`` is given)."""
        request = Request(request_id, list(prompt), SamplingParams(max_tokens=len(answer)), None,
                          block_hasher=block_hasher)
        hit = self.lookup(request)
        tokens = list(prompt) + list(answer)
        block_ids = [self._free.pop(0) for _ in range(-(-len(tokens) // BLOCK))]
        self.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), hit)
        saves, computed, first = [], hit, True
        while computed < len(tokens) - 1:  # the last token is sampled, never computed
            scheduled = min(step_tokens, len(prompt) - computed) if computed < len(prompt) else 1
            meta = self.scheduler.build_connector_meta(scheduled_step(request, block_ids, computed, scheduled, first))
            saves += meta.saves
            self.worker.start_load(meta.loads)
            for layer in LAYERS:
                self.worker.wait_for_layer_load(layer)
                self.compute(tokens, block_ids, computed, computed + scheduled, layer)
            self.worker.wait_for_save(meta.saves, meta.failures_seen, meta.released)
            computed += scheduled
            first = False
            if computed >= len(prompt):  # this step sampled a token
                request.append_output_token_ids(tokens[len(request.all_token_ids)])
        request.num_computed_tokens = computed
        held, _ = self.scheduler.request_finished(request, block_ids[: -(-computed // BLOCK)])
        after = self.scheduler.build_connector_meta(SchedulerOutput.make_empty())
        self.worker.wait_for_save(after.saves, after.failures_seen, after.released)
        finished = self.worker.take_finished()
        self.worker.flush()
        self._free.extend(block_ids)
        return {"hit": hit, "saves": saves, "held": held, "after": after, "finished": finished, "block_ids": block_ids,
                "request": request}

    def first_step(self, request_id: str, tokens: list[int], block_ids: list[int], scheduled: int = 2):
        """Look up, allocate and schedule a new request for one step; the connector metadata of that step."""
        request = Request(request_id, list(tokens), SamplingParams(max_tokens=1), None)
        hit = self.lookup(request)
        self.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), hit)
        output = SchedulerOutput.make_empty()
        output.scheduled_new_reqs = [NewRequestData.from_request(request, (block_ids,))]
        output.scheduled_new_reqs[0].num_computed_tokens = hit
        output.num_scheduled_tokens = {request_id: scheduled}
        return self.scheduler.build_connector_meta(output)

    def next_step(self, request_id: str, computed: int, scheduled: int):
        """Schedule a running request for one more step; the connector metadata of that step."""
        output = SchedulerOutput.make_empty()
        output.num_scheduled_tokens = {request_id: scheduled}
        output.scheduled_cached_reqs = CachedRequestData(
            req_ids=[request_id], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
            new_block_ids=[None], num_computed_tokens=[computed], num_output_tokens=[0])
        return self.scheduler.build_connector_meta(output)

    def compute(self, tokens: list[int], block_ids: list[int], begin: int, end: int, layer: str) -> None:
        """Write the KV of positions [begin, end) only, as a forward pass does (token slots are dim 1)."""
        for index in range(begin // BLOCK, -(-end // BLOCK)):
            first, last = max(begin, index * BLOCK) - index * BLOCK, min(end, (index + 1) * BLOCK) - index * BLOCK
            value = expected_block(tokens, index) + LAYERS.index(layer)
            self.kv[layer][block_ids[index]][:, first:last] = value[:, first:last]

    def block(self, layer: str, block_id: int) -> torch.Tensor:
        return self.kv[layer][block_id]

    def close(self) -> None:
        self.worker.shutdown()


def count_metadata_calls(monkeypatch) -> list[str]:
    """Record the metadata operations (stat, listdir...) made from now on, by the lookup: the
    runtime-switch watcher's once-a-second stats are not the lookup's."""
    import os
    import threading

    calls: list[str] = []
    for name in ("lstat", "stat", "listdir", "scandir"):
        original = getattr(os, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            if threading.current_thread().name != "vua-switches":
                calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    return calls


def scheduled_step(request: Request, block_ids: list[int], computed: int, scheduled: int, new: bool) -> SchedulerOutput:
    """vLLM's scheduler output for one step of one request: ``scheduled`` tokens after ``computed``;
    ``new`` the first time the request is scheduled, with all its blocks."""
    output = SchedulerOutput.make_empty()
    output.num_scheduled_tokens = {request.request_id: scheduled}
    if new:
        output.scheduled_new_reqs = [NewRequestData.from_request(request, (block_ids,))]
        output.scheduled_new_reqs[0].num_computed_tokens = computed
    else:
        output.scheduled_cached_reqs = CachedRequestData(
            req_ids=[request.request_id], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
            new_block_ids=[None], num_computed_tokens=[computed], num_output_tokens=[0])
    return output


def assert_loaded(engine: "Engine", tokens: list[int], block_ids: list[int], n_blocks: int | None = None) -> None:
    """The first ``n_blocks`` blocks (default: all of the prompt's) hold the KV a compute of
    ``tokens`` gives, loaded or computed (the slots a prompt's last block has)."""
    for index in range(-(-len(tokens) // BLOCK) if n_blocks is None else n_blocks):
        valid = min(BLOCK, len(tokens) - index * BLOCK)
        for offset, layer in enumerate(LAYERS):
            expected = expected_block(tokens, index) + offset
            assert torch.equal(engine.block(layer, block_ids[index])[:, :valid], expected[:, :valid]), index
