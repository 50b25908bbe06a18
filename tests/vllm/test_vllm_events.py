"""KV events for the shared store, on a real store through vLLM's own request type and event classes:
BlockStored named by vLLM's block hashes once every shard is published, BlockRemoved when gc
evicts or when the file is found gone."""

from __future__ import annotations

from pathlib import Path

from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockRemoved, BlockStored
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash

from vua.eviction import collect
from vua.vllm.events import StoreEvents

from test_vllm_failed_loads import P
from vllm_steps import BLOCK, CHUNK, Engine


def _hasher():
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(BLOCK, hash_fn)


def _engine_with_events(root: Path, **extra) -> tuple[Engine, StoreEvents]:
    engine = Engine(root, **extra)
    events = StoreEvents(engine.identity.namespace().name, engine.identity.shards(), BLOCK, poll_interval_s=0)
    engine.scheduler.events = events
    engine.worker.published = []
    return engine, events


def test_each_published_fragment_is_announced_with_vllm_block_hashes(tmp_path: Path) -> None:
    engine, events = _engine_with_events(tmp_path)
    result = engine.run("p", P, block_hasher=_hasher())  # 58 tokens: 3 chunks and a 2-block tail
    assert events.take() == []  # planned, not yet reported written
    events.published(engine.worker.take_published())
    stored = events.take()
    assert all(isinstance(e, BlockStored) and e.medium == MEDIUM_STORAGE and e.ownership == "vua" for e in stored)
    # As vLLM's own events publish them (64-bit ints unless VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0).
    hashes = [maybe_convert_block_hash(h) for h in result["request"].block_hashes]
    stored.sort(key=lambda e: hashes.index(e.block_hashes[0]))  # writer threads publish in any order
    assert [e.block_hashes for e in stored] == [hashes[0:4], hashes[4:8], hashes[8:12], hashes[12:14]]
    assert [e.parent_block_hash for e in stored] == [None, hashes[3], hashes[7], hashes[11]]
    assert [e.token_ids for e in stored] == [P[0:16], P[16:32], P[32:48], P[48:56]]
    assert {e.block_size for e in stored} == {BLOCK} and CHUNK == 4 * BLOCK
    engine.close()


def test_a_salted_request_carries_its_salt_like_vllm_events(tmp_path: Path) -> None:
    engine, events = _engine_with_events(tmp_path)
    engine.run("p", P[:16], block_hasher=_hasher(), salt="tenant-a")
    events.published(engine.worker.take_published())
    (stored,) = events.take()
    assert stored.extra_keys == [("tenant-a",), None, None, None]  # vLLM salts the first block only
    engine.close()


def test_a_fragment_is_announced_once_every_shard_is_published(tmp_path: Path) -> None:
    engine, events = _engine_with_events(tmp_path)
    events.shards = ["tp0", "tp1"]  # as with TP=2: only this worker (tp0) has written
    engine.run("p", P[:16], block_hasher=_hasher())
    published = engine.worker.take_published()
    events.published(published)
    assert events.take() == []
    events.published([(digest, "tp1") for digest, _ in published])
    assert len(events.take()) == 1
    engine.close()


def test_gc_evictions_and_files_found_gone_are_retracted(tmp_path: Path) -> None:
    engine, events = _engine_with_events(tmp_path)
    engine.run("p", P, block_hasher=_hasher())
    events.published(engine.worker.take_published())
    stored = {tuple(e.block_hashes) for e in events.take()}
    # Someone else's rm (or `vua gc` from the command line): found by polling.
    tail = next(tmp_path.rglob("tails/**/*.safetensors"))
    tail.unlink()
    assert events.poll_once() == 1
    (removed,) = events.take()
    assert isinstance(removed, BlockRemoved) and removed.medium == MEDIUM_STORAGE
    assert tuple(removed.block_hashes) in stored
    assert events.poll_once() == 0  # retracted once
    # This engine's own background gc: told directly, no polling needed.
    report = collect(tmp_path, max_bytes=0, on_removed=events.evicted)
    assert report.evicted == 3
    removed_now = events.take()
    assert all(isinstance(e, BlockRemoved) for e in removed_now)
    assert {tuple(e.block_hashes) for e in removed_now} | {tuple(removed.block_hashes)} == stored
    engine.close()


def test_generated_tokens_saved_are_announced_once_written(tmp_path: Path) -> None:
    from test_vllm_decode_and_lookups import ANSWER, P as PROMPT

    engine, events = _engine_with_events(tmp_path)
    turn = engine.chat("t1", PROMPT, ANSWER, block_hasher=_hasher())  # 88 tokens, 87 computed: 21 whole blocks
    assert turn["held"] is True
    events.published(engine.worker.take_published())
    stored = events.take()
    assert all(isinstance(e, BlockStored) and e.medium == MEDIUM_STORAGE for e in stored)
    tokens = PROMPT + ANSWER
    hashes = [maybe_convert_block_hash(h) for h in turn["request"].block_hashes]
    spans = sorted((hashes.index(e.block_hashes[0]), len(e.block_hashes)) for e in stored)
    # The prompt's chunks and tail, the chunks decoding filled, and the last whole block, saved
    # in the step after the request finished from the blocks vLLM held.
    assert spans == [(0, 4), (4, 4), (8, 4), (12, 2), (12, 4), (16, 4), (20, 1)]
    for e in stored:
        first = hashes.index(e.block_hashes[0])
        assert e.block_hashes == hashes[first : first + len(e.block_hashes)]
        assert e.parent_block_hash == (hashes[first - 1] if first else None)
        assert e.token_ids == tokens[first * BLOCK : (first + len(e.block_hashes)) * BLOCK]
    engine.close()
