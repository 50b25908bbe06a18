"""A load that fails poisons nothing: the connector halves on a real store, through vLLM's own types.

The step harness's "forward pass" writes correct KV whatever was loaded, so these tests prove what
the connector *decides* (which saves it drops, which blocks it reports, what the failed blocks hold
while attention could read them). The engine test of the same scenario
(tests/vllm/test_vllm_engine.py::test_a_failed_load_poisons_nothing) proves the outputs.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from vua.store import read_header
from vllm_steps import BLOCK, CHUNK, LAYERS, Engine, expected_block

rng = random.Random(11)
P = [rng.randrange(3, 5000) for _ in range(58)]  # 3 full chunks, a tail of 2 blocks, 2 tokens past them
SHORT = P[:20]  # chunk 0 and a one-block tail


def chunk_file(root: Path, start: int) -> Path:
    """The full-chunk fragment under ``root`` whose first token is ``start``."""
    for path in sorted(root.rglob("*.safetensors")):
        if "tails" not in path.parts:
            with open(path, "rb") as handle:
                if read_header(handle.fileno(), os.fstat(handle.fileno()).st_size).metadata["vua_start"] == str(start):
                    return path
    raise AssertionError(f"no chunk starting at {start}")


def corrupt_last_layer(path: Path) -> None:
    """Damage the KV bytes (the last layer's data) and keep the header and token ids intact."""
    with open(path, "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A root where SHORT is stored (chunk 0 and a tail) and chunk 0's KV is damaged."""
    writer = Engine(tmp_path)
    assert writer.run("short", SHORT)["hit"] == 0
    writer.close()
    corrupt_last_layer(chunk_file(tmp_path, 0))
    return tmp_path


def test_saves_of_the_step_whose_load_failed_are_dropped_then_made_from_the_recompute(damaged: Path) -> None:
    engine = Engine(damaged)
    result = engine.run("p", P)  # one step: load chunk 0 and the tail, compute 20..58
    assert result["hit"] == 20
    assert engine.errors == set(result["block_ids"][:4])  # chunk 0's blocks
    # Chunks 1, 2 and the tail were computed over chunk 0: none may be stored.
    assert engine.worker.totals.data["saves_poisoned"] == 3
    assert engine.worker.totals.data["load_errors"] == 1
    # After the rewind, the recompute saved chunk 0 again and everything after it.
    assert [s.fragment.start for s in result["saves"][3:]] == [0, 16, 32, 48]
    reader = Engine(damaged)
    again = reader.run("p2", P)
    assert again["hit"] == 56 and reader.errors == set()
    for index in range(14):
        for offset, layer in enumerate(LAYERS):
            valid = min(BLOCK, len(P) - index * BLOCK)
            block = reader.block(layer, again["block_ids"][index])[:, :valid]
            assert torch.equal(block, (expected_block(P, index) + offset)[:, :valid]), index


def run_worker_step(engine: Engine, meta, tokens: list[int], block_ids: list[int], begin: int, end: int,
                    errors_first: bool = False) -> set[int]:
    """The worker's side of one step; ``errors_first`` asks for load errors before wait_for_save,
    the order vLLM uses when a drafter runs after the target model (speculative decoding)."""
    engine.worker.start_load(meta.loads)
    for layer in LAYERS:
        engine.worker.wait_for_layer_load(layer)
        engine.compute(tokens, block_ids, begin, end, layer)
    if errors_first:
        errors = engine.worker.take_load_errors()
        engine.worker.wait_for_save(meta.saves, meta.failures_seen)
        return errors
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    return engine.worker.take_load_errors()


def test_a_step_planned_before_the_scheduler_saw_the_failure_saves_nothing_over_it(damaged: Path) -> None:
    """Async scheduling: step 2 is planned while step 1 (whose load fails) still runs."""
    engine = Engine(damaged)
    block_ids = list(range(15))
    step1 = engine.first_step("p", P, block_ids, scheduled=12)  # loads 0..20, computes 20..32
    assert [s.fragment.start for s in step1.saves] == [16]
    step2 = engine.next_step("p", computed=32, scheduled=16)  # computes 32..48, planned without news of step 1
    assert [s.fragment.start for s in step2.saves] == [32]
    failed = run_worker_step(engine, step1, P, block_ids, 20, 32, errors_first=True)
    assert failed == {0, 1, 2, 3}
    assert run_worker_step(engine, step2, P, block_ids, 32, 48) == set()
    engine.worker.flush()
    assert engine.worker.totals.data["saves_poisoned"] == 2
    assert engine.worker.totals.data["saved_fragments"] == 0
    # The scheduler learns of the failure; vLLM rewinds the request to block 0.
    engine.scheduler.update_connector_output(failed)
    engine.scheduler.update_connector_output(set())
    step3 = engine.next_step("p", computed=0, scheduled=58)
    assert step3.failures_seen == 1
    assert [s.fragment.start for s in step3.saves] == [0, 16, 32, 48]
    run_worker_step(engine, step3, P, block_ids, 0, 58)
    engine.worker.flush()
    assert engine.worker.totals.data["saved_fragments"] == 4


def test_another_request_computed_over_a_failed_block_saves_nothing_over_it(damaged: Path) -> None:
    """Request b shares request a's first chunk through vLLM's prefix cache, in the step where a's
    load of that chunk fails: b's chunk computed over it must not be stored."""
    engine = Engine(damaged)
    a_blocks, b_own = list(range(15)), list(range(20, 25))
    b_tokens = P[:16] + [rng.randrange(3, 5000) for _ in range(20)]
    a = Request("a", P, SamplingParams(max_tokens=1), None)
    b = Request("b", b_tokens, SamplingParams(max_tokens=1), None)
    hit_a, _ = engine.scheduler.get_num_new_matched_tokens(a, 0)
    hit_b, _ = engine.scheduler.get_num_new_matched_tokens(b, CHUNK)  # a local hit on a's chunk 0
    assert (hit_a, hit_b) == (20, 0)
    engine.scheduler.update_state_after_alloc(a, KVCacheBlocks(([KVCacheBlock(i) for i in a_blocks],)), hit_a)
    engine.scheduler.update_state_after_alloc(b, KVCacheBlocks(([KVCacheBlock(i) for i in a_blocks[:4] + b_own],)), 0)
    output = SchedulerOutput.make_empty()
    output.scheduled_new_reqs = [NewRequestData.from_request(a, (a_blocks,)),
                                 NewRequestData.from_request(b, (a_blocks[:4] + b_own,))]
    output.scheduled_new_reqs[0].num_computed_tokens, output.scheduled_new_reqs[1].num_computed_tokens = 20, CHUNK
    output.num_scheduled_tokens = {"a": 38, "b": 20}
    meta = engine.scheduler.build_connector_meta(output)
    b_saves = [s for s in meta.saves if s.request_id == "b"]
    assert b_saves and all(0 in s.depends_on for s in b_saves)
    engine.worker.start_load(meta.loads)
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    assert engine.worker.take_load_errors() == {0, 1, 2, 3}
    engine.worker.flush()
    assert engine.worker.totals.data["saves_poisoned"] == len(meta.saves)
    assert engine.worker.totals.data["saved_fragments"] == 0


def test_bytes_that_failed_verification_never_reach_attention(damaged: Path) -> None:
    engine = Engine(damaged)
    for layer in LAYERS:  # whatever the blocks held before
        engine.kv[layer].fill_(7)
    block_ids = list(range(15))
    meta = engine.first_step("p", P, block_ids, scheduled=2)
    engine.worker.start_load(meta.loads)
    for layer in LAYERS:
        engine.worker.wait_for_layer_load(layer)
    good, bad = LAYERS  # the damage is in the last layer's bytes
    for block in block_ids[:4]:
        assert torch.equal(engine.block(good, block), expected_block(P, block) + 0)  # verified: kept
        assert torch.count_nonzero(engine.block(bad, block)) == 0  # failed: zeroed before the layer ran
    assert torch.equal(engine.block(bad, 4), expected_block(P, 4) + 1)  # the tail loaded fine
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    assert engine.worker.take_load_errors() == {0, 1, 2, 3}


def test_a_bug_in_the_worker_is_logged_with_its_traceback_and_counted_apart(
    damaged: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(damaged)

    def broken_read(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.worker.store, "read", broken_read)
    with caplog.at_level(logging.ERROR, logger="vua"):
        result = engine.run("p", P)
    assert engine.errors >= set(result["block_ids"][:5])  # recomputed, never served
    totals = engine.worker.totals.data
    assert totals["load_internal_errors"] >= 1 and totals["load_errors"] == 0
    records = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert records and records[0].exc_info is not None and "a bug" in str(records[0].exc_info[1])


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    writer = Engine(tmp_path)
    writer.run("p", P)
    writer.close()
    return tmp_path


def test_detached_loads_give_the_same_kv(stored: Path) -> None:
    """On a filesystem that may hang, loads go through staging memory (forced here on a local disk;
    tests/multinode runs them on GlusterFS, where they are chosen by themselves)."""
    engine = Engine(stored)
    engine.worker.detached = True
    result = engine.run("p2", P)
    assert result["hit"] == 56 and engine.errors == set()
    for index in range(14):
        for offset, layer in enumerate(LAYERS):
            assert torch.equal(engine.block(layer, result["block_ids"][index]), expected_block(P, index) + offset)


def test_storage_that_hangs_costs_a_recompute_and_its_late_reads_touch_nothing(
    stored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    engine = Engine(stored, storage_timeout_s="0.5")
    engine.worker.detached = True
    answer = threading.Event()
    read = engine.worker.store.read
    late: list[bool] = []

    def hung_read(*args, **kwargs):
        answer.wait(60)  # the server is gone ... then comes back
        result = read(*args, **kwargs)
        late.append(result)
        return result

    monkeypatch.setattr(engine.worker.store, "read", hung_read)
    for layer in LAYERS:
        engine.kv[layer].fill_(7)  # what the blocks hold; a late read must not change it
    block_ids = list(range(14))
    meta = engine.first_step("p", P, block_ids, scheduled=2)
    started = time.monotonic()
    engine.worker.start_load(meta.loads)
    for layer in LAYERS:
        engine.worker.wait_for_layer_load(layer)
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    assert engine.worker.take_load_errors() == set(block_ids)
    assert time.monotonic() - started < 30  # it gave up after storage_timeout_s instead of waiting on
    assert engine.worker.totals.data["load_timeouts"] == 1
    answer.set()  # storage answers now: the reads in flight finish, verified, and are dropped
    engine.close()  # waits for every reader
    assert late and all(late)  # good bytes, only late; fragments not started yet were not even read
    for layer in LAYERS:
        assert torch.all(engine.kv[layer] == 7)
