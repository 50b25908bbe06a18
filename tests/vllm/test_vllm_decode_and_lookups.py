"""Generated tokens stored for the next turn, and lookups whose cost does not grow with the store.

The connector halves on a real store in a tmp dir (tests/vllm/vllm_steps.py): blocks of 4 tokens,
chunks of 16.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.v1.request import Request

from vua.layout import MAX_TAILS_PER_HEAD
from vua.vllm.scheduler import TokenKeys, find_stored_prefix

from vllm_steps import count_metadata_calls, BLOCK, CHUNK, Engine, identity

rng = random.Random(11)
P = [rng.randrange(3, 5000) for _ in range(58)]  # 3 full chunks, 2 more whole blocks, 2 tokens past them
ANSWER = [rng.randrange(3, 5000) for _ in range(30)]
CB = CHUNK // BLOCK


def test_the_answer_is_stored_and_the_next_turn_reuses_it(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    turn = engine.chat("t1", P, ANSWER)
    # 88 tokens, 87 computed (the last one is sampled, never computed): 21 whole blocks.
    assert [(s.fragment.start, s.fragment.n_blocks, s.fragment.head is None) for s in turn["saves"]] == [
        (0, 4, True), (16, 4, True), (32, 4, True), (48, 2, False),  # the prompt, as before
        (48, 4, True), (64, 4, True)]  # chunks filled by decoding, saved as they filled
    # The request's last whole block is saved in the step after it finished, from blocks vLLM held.
    assert turn["held"] is True
    assert [(s.fragment.start, s.fragment.n_blocks) for s in turn["after"].saves] == [(80, 1)]
    assert turn["after"].saves[0].block_ids == [turn["block_ids"][20]]
    assert turn["after"].released == ["t1"] and turn["finished"] == {"t1"}
    assert engine.scheduler.take_stats().data["decode_saves"] == 3
    engine.close()

    reader = Engine(tmp_path)
    next_turn = P + ANSWER + [1, 2, 3, 4, 5, 6, 7, 8, 9]
    result = reader.run("t2", next_turn)
    assert result["hit"] == 84  # prompt and answer, every whole block of their computed KV
    from test_vllm_connector_halves import assert_loaded

    assert_loaded(reader, next_turn, result["block_ids"], 21)
    assert reader.errors == set()
    reader.close()


def test_save_decode_false_stores_the_prompt_only(tmp_path: Path) -> None:
    engine = Engine(tmp_path, save_decode="false")
    turn = engine.chat("t1", P, ANSWER)
    assert turn["held"] is False and turn["after"].saves == [] and turn["finished"] == set()
    assert [s.fragment.start for s in turn["saves"]] == [0, 16, 32, 48]
    engine.close()
    assert Engine(tmp_path).run("t2", P + ANSWER)["hit"] == 56


def test_an_answer_that_fills_no_new_block_holds_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    turn = engine.chat("t1", P, ANSWER[:2])  # 60 tokens, 59 computed: still P's 14 whole blocks
    assert turn["held"] is False and turn["after"].released == [] and turn["finished"] == set()
    engine.close()


def test_a_preempted_request_aborted_while_waiting_holds_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    request = Request("r", P, SamplingParams(max_tokens=4), None)
    engine.scheduler.get_num_new_matched_tokens(request, 0)
    request.append_output_token_ids(ANSWER[:10])
    request.num_computed_tokens = 0  # preempted: its blocks were freed
    assert engine.scheduler.request_finished(request, []) == (False, None)
    engine.close()


# ---- lookups ----


def _count_metadata_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return count_metadata_calls(monkeypatch)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


@pytest.mark.parametrize("stored_chunks", [0, 1, 17, 39, 40])
def test_a_lookup_costs_about_log2_of_the_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 stored_chunks: int) -> None:
    engine = Engine(tmp_path)
    store = engine.scheduler.store
    tokens = [rng.randrange(3, 5000) for _ in range(40 * CHUNK + 2 * BLOCK)]  # 40 chunks and 2 blocks
    keys = TokenKeys.of(tokens, BLOCK, store.namespace.seed)
    for chunk in range(stored_chunks):  # metadata is all a lookup reads: empty files will do
        _touch(store.layout.fragment_path(keys.digests[(chunk + 1) * CB - 1], "tp0"))
    calls = _count_metadata_calls(monkeypatch)
    found = find_stored_prefix(store, keys, CB, ["tp0"])
    assert len(found) == stored_chunks
    if stored_chunks == 0:
        assert calls == ["lstat", "listdir"]  # a miss: chunk 0, then the tails that share block 0
    elif stored_chunks == 40:
        assert calls == ["lstat", "lstat", "listdir"]  # chunk 0, chunk 39, then the tails after them
    else:
        assert calls.count("listdir") == 1
        assert calls.count("lstat") <= 2 + math.ceil(math.log2(40)), calls
    engine.close()


def test_a_gap_in_the_stored_chunks_costs_a_recompute_never_wrong_kv(tmp_path: Path) -> None:
    long = [rng.randrange(3, 5000) for _ in range(10 * CHUNK + 2)]
    Engine(tmp_path).run("p", long)
    chunk_2 = next(p for p in tmp_path.rglob("*.safetensors") if _start(p) == 2 * CHUNK)
    chunk_2.unlink()  # evicted from the middle
    engine = Engine(tmp_path)
    result = engine.run("again", long)
    # The binary search does not visit chunk 2; the claim runs past it, and the worker's open of it
    # fails before the forward pass: every block from it on is reported and recomputed.
    assert result["hit"] == 10 * CHUNK
    assert engine.errors == set(result["block_ids"][2 * CB : 10 * CB])
    assert engine.worker.totals.data["load_errors"] == 8  # chunk 2, and the 7 after it that it leaves unusable
    from test_vllm_connector_halves import assert_loaded

    assert_loaded(engine, long, result["block_ids"], 10 * CB)  # recomputed where not loaded
    # The recompute stored chunk 2 again: the next lookup has no gap.
    assert Engine(tmp_path).run("third", long)["hit"] == 10 * CHUNK


def _start(path: Path) -> int:
    from test_vllm_connector_halves import _start as start

    return start(path)


def test_a_slow_lookup_asks_vllm_again_later_instead_of_blocking(tmp_path: Path) -> None:
    Engine(tmp_path).run("p", P)
    engine = Engine(tmp_path, lookup_budget_ms=20)
    release = threading.Event()
    has_shards = engine.scheduler.store.has_shards
    engine.scheduler.store.has_shards = lambda *a: release.wait(5) and has_shards(*a)  # a stalled mount
    request = Request("slow", P, SamplingParams(max_tokens=1), None)
    started = time.monotonic()
    assert engine.scheduler.get_num_new_matched_tokens(request, 0) == (None, False)
    assert time.monotonic() - started < 1.0
    assert engine.scheduler.get_num_new_matched_tokens(request, 0) == (None, False)  # still running
    release.set()
    engine.scheduler._requests["slow"].lookup.result(5)
    assert engine.scheduler.get_num_new_matched_tokens(request, 0) == (56, False)  # the same lookup's answer
    taken = engine.scheduler.take_stats()
    stats = taken.data
    assert (stats["lookups"], stats["lookups_deferred"]) == (1, 2)
    assert len(stats["lookup_seconds"]) == 1 and stats["lookup_seconds"][0] > 0 and taken.lookups_within(1e-3) == 0
    engine.close()


def test_a_tail_lookup_costs_one_listing_however_many_short_prompts_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prompt shorter than a chunk is a tail; 100,000 of them, each filed under the prefix
    through its own first block, so a lookup lists a directory of its own tails only."""
    engine = Engine(tmp_path)
    store = engine.scheduler.store
    seed = store.namespace.seed

    def short_prompt(i: int) -> list[int]:
        return [i % 5000 + 3, i // 5000 + 3] + [(i * 7 + j) % 5000 + 3 for j in range(10)]  # 12 tokens, 3 blocks

    def lookup(tokens: list[int]) -> tuple[int, list[str]]:
        calls = _count_metadata_calls(monkeypatch)
        found = find_stored_prefix(store, TokenKeys.of(tokens, BLOCK, seed), CB, ["tp0"])
        monkeypatch.undo()
        return sum(len(f.tokens) for f in found), calls

    def store_tails(first: int, count: int) -> None:
        for i in range(first, first + count):
            keys = TokenKeys.of(short_prompt(i), BLOCK, seed)
            _touch(store.layout.tail_path(keys.head(0, CB), keys.digests[-1], "tp0"))

    store_tails(0, 10)
    few = lookup(short_prompt(3)), lookup(short_prompt(10**6))
    store_tails(10, 100_000 - 10)
    many = lookup(short_prompt(3)), lookup(short_prompt(10**6))
    assert few == many == ((12, ["listdir"]), (0, ["listdir"]))
    keys = TokenKeys.of(short_prompt(3), BLOCK, seed)
    assert len(os.listdir(store.layout.tails_dir(keys.head(0, CB)))) == 1
    engine.close()


def test_a_head_directory_stays_bounded(tmp_path: Path) -> None:
    """Prompts that share their first block (a short system prompt) share a tail directory; it
    stops growing at MAX_TAILS_PER_HEAD tails, so listing it stays one small read."""
    engine = Engine(tmp_path)
    system = [7, 8, 9, 10]
    for i in range(MAX_TAILS_PER_HEAD + 3):
        engine.run(f"q{i}", system + [i + 3] * 8)  # 3 whole blocks: a tail of 3 under the system block
    keys = TokenKeys.of(system, BLOCK, engine.scheduler.store.namespace.seed)
    assert len(os.listdir(engine.scheduler.store.layout.tails_dir(keys.head(0, CB)))) == MAX_TAILS_PER_HEAD
    assert engine.worker.totals.data["tails_skipped"] == 3  # counted by the writer, which lists the directory
    engine.close()


def test_tensor_parallel_tails_need_every_shard(tmp_path: Path) -> None:
    tp = identity(tp_size=2)
    Engine(tmp_path, tp, tp_rank=0).run("p", P[:12])
    assert Engine(tmp_path, tp).run("look", P[:13])["hit"] == 0
    Engine(tmp_path, tp, tp_rank=1).run("p", P[:12])
    assert Engine(tmp_path, tp).run("look2", P[:13])["hit"] == 12
