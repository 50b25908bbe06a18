"""Asynchronous loads (vLLM's ``load_kv_async``), through the connector halves on a real store.

vLLM admits the request, allocates its blocks and leaves it waiting; each engine step runs the
other requests and asks the worker which loads have finished. These tests play those steps with
vLLM's own request and scheduler-output types (tests/vllm/vllm_steps.py); the engine test of the
same path is tests/vllm/test_vllm_engine_async.py.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request

from vllm_steps import BLOCK, LAYERS, Engine, assert_loaded, scheduled_step
from test_vllm_failed_loads import chunk_file, corrupt_last_layer

rng = random.Random(12)
P = [rng.randrange(3, 5000) for _ in range(58)]  # 3 full chunks, a tail of 2 blocks, 2 tokens past them
CLAIMED = 56  # the claim: every stored block (3 chunks and the tail)
CLAIMED_BLOCKS = CLAIMED // BLOCK


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    writer = Engine(tmp_path)
    assert writer.run("p", P)["hit"] == 0
    writer.close()
    return tmp_path


def admit(engine: Engine, request_id: str = "p") -> tuple[Request, list[int], list]:
    """vLLM's admission of a request whose claim loads asynchronously: look up, allocate, and the
    step's metadata (the request is not scheduled in it)."""
    request = Request(request_id, list(P), SamplingParams(max_tokens=1), None)
    hit = engine.lookup(request, expect_async=True)
    assert hit == CLAIMED
    block_ids = list(range(20, 35))
    engine.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in block_ids],)), hit)
    meta = engine.scheduler.build_connector_meta(SchedulerOutput.make_empty())
    assert [job.asynchronous for job in meta.loads] == [True]
    return request, block_ids, meta


def other_requests_step(engine: Engine, meta) -> tuple[set[str], set[int]]:
    """One engine step of the other requests, as the model runner drives the worker: it never waits
    on the asynchronous load. Returns (finished receiving, load errors) as reported in that step."""
    engine.worker.start_load(meta.loads)
    for layer in LAYERS:
        engine.worker.wait_for_layer_load(layer)
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    finished = engine.worker.take_finished_loads()
    errors = engine.worker.take_load_errors()
    engine.scheduler.update_connector_output(errors, finished)
    return finished, errors


def steps_until_finished(engine: Engine, request_id: str, timeout: float = 30) -> set[int]:
    """Empty engine steps until the worker reports ``request_id`` finished; the load errors of that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, errors = other_requests_step(engine, engine.scheduler.build_connector_meta(SchedulerOutput.make_empty()))
        if request_id in finished:
            return errors
        assert not errors
        time.sleep(0.005)
    raise AssertionError(f"{request_id} was never reported finished receiving")


def test_an_asynchronous_load_fills_the_blocks_while_the_other_requests_steps_run(
    stored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(stored, async_load_min_tokens=0)
    storage_answers = threading.Event()
    read = engine.worker.store.read

    def slow_read(*args, **kwargs):
        storage_answers.wait(60)
        return read(*args, **kwargs)

    monkeypatch.setattr(engine.worker.store, "read", slow_read)
    request, block_ids, meta = admit(engine)
    # Steps of the other requests go on while storage has not answered a single read.
    step = threading.Thread(target=lambda: [other_requests_step(engine, meta), other_requests_step(
        engine, engine.scheduler.build_connector_meta(SchedulerOutput.make_empty()))])
    step.start()
    step.join(20)
    assert not step.is_alive(), "an engine step waited for an asynchronous load"
    storage_answers.set()
    assert steps_until_finished(engine, "p") == set()
    assert_loaded(engine, P, block_ids, n_blocks=CLAIMED_BLOCKS)
    # vLLM now schedules the request from its 56 loaded tokens: only the last two are computed,
    # and nothing already stored is planned for saving again.
    after = engine.scheduler.build_connector_meta(scheduled_step(request, block_ids, CLAIMED, 2, True))
    assert after.loads == [] and after.saves == []
    request.num_computed_tokens = len(P)
    engine.scheduler.request_finished(request, block_ids)
    stats = engine.scheduler.take_stats().data
    assert (stats["async_loads"], stats["hit_tokens"]) == (1, CLAIMED)
    assert engine.worker.totals.data["loaded_fragments"] == 4
    engine.close()


def test_a_failed_asynchronous_load_is_reported_with_its_request_and_recomputed(stored: Path) -> None:
    corrupt_last_layer(chunk_file(stored, 0))
    engine = Engine(stored, async_load_min_tokens=0)
    request, block_ids, meta = admit(engine)
    finished, errors = other_requests_step(engine, meta)
    if "p" not in finished:
        errors = steps_until_finished(engine, "p")
    # Chunk 0's blocks fail; vLLM recomputes from block 0, so the later chunks, loaded fine, are
    # recomputed too: only the first failed block decides, and it is reported in the same step.
    assert errors == set(block_ids[:4])
    # vLLM rewinds the request to its first failed block; the scheduler half saves again from there.
    first = engine.scheduler.build_connector_meta(scheduled_step(request, block_ids, 0, len(P), True))
    assert [job.fragment.start for job in first.saves] == [0, 16, 32, 48]
    request.num_computed_tokens = len(P)
    engine.scheduler.request_finished(request, block_ids)
    assert engine.scheduler.take_stats().data["hit_tokens"] == 0
    assert engine.worker.totals.data["load_errors"] == 1
    engine.close()


def test_storage_that_hangs_ends_an_asynchronous_load_and_its_late_reads_touch_nothing(
    stored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(stored, async_load_min_tokens=0, storage_timeout_s="0.5")
    engine.worker.detached = True  # forced here on a local disk; chosen by itself on GlusterFS
    storage_answers = threading.Event()
    read = engine.worker.store.read
    late: list[bool] = []

    def hung_read(*args, **kwargs):
        storage_answers.wait(60)  # the server is gone ... then comes back
        late.append(read(*args, **kwargs))
        return late[-1]

    monkeypatch.setattr(engine.worker.store, "read", hung_read)
    for layer in LAYERS:
        engine.kv[layer].fill_(7)  # what the blocks hold; a late read must not change it
    request, block_ids, meta = admit(engine)
    started = time.monotonic()
    assert other_requests_step(engine, meta) == (set(), set())
    errors = steps_until_finished(engine, "p")
    assert 0.5 <= time.monotonic() - started < 20
    assert errors == set(block_ids[:CLAIMED_BLOCKS])
    assert engine.worker.totals.data["load_timeouts"] == 1
    # vLLM asks again for a request rewound to token 0. Its fragments are still there, but it is
    # computed now, not sent to wait on the same storage again.
    assert engine.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    storage_answers.set()  # the reads in flight finish, verified, and are dropped
    engine.close()  # waits for every reader
    assert late and all(late)
    for layer in LAYERS:
        assert torch.all(engine.kv[layer] == 7)


def test_a_request_that_ends_while_its_load_runs_saves_nothing(stored: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An abort while the KV is still arriving: the blocks hold nothing worth saving yet, and vLLM
    keeps them until the worker reports the load finished."""
    engine = Engine(stored, async_load_min_tokens=0)
    storage_answers = threading.Event()
    read = engine.worker.store.read
    monkeypatch.setattr(engine.worker.store, "read", lambda *a, **k: storage_answers.wait(60) and read(*a, **k))
    request, block_ids, meta = admit(engine)
    engine.worker.start_load(meta.loads)
    request.num_computed_tokens = CLAIMED  # what vLLM sets at an asynchronous admission
    assert engine.scheduler.request_finished(request, block_ids) == (False, None)
    storage_answers.set()
    assert steps_until_finished(engine, "p") == set()
    engine.close()


def test_a_short_claim_loads_in_the_step_and_a_long_one_asynchronously(stored: Path) -> None:
    engine = Engine(stored, async_load_min_tokens=CLAIMED + 1)
    assert engine.lookup(Request("p", list(P), SamplingParams(max_tokens=1), None)) == CLAIMED
    engine.close()
    engine = Engine(stored, async_load_min_tokens=CLAIMED)
    assert engine.lookup(Request("p", list(P), SamplingParams(max_tokens=1), None), expect_async=True) == CLAIMED
    engine.close()
