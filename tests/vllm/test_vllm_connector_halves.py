"""The scheduler half and the worker half together, on a real store in a tmp dir and CPU-layout KV tensors."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm.v1.request import Request

from vua.vllm.settings import DISABLE_GET, DISABLE_PUT

from vllm_steps import assert_loaded, count_metadata_calls, BLOCK, CHUNK, LAYERS, Engine, expected_block, identity

rng = random.Random(7)
P = [rng.randrange(3, 5000) for _ in range(58)]  # 3 full chunks, a tail of 2 blocks, 2 tokens past the last whole block


def fragments(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def _start(path: Path) -> int:
    from vua.serdes import decode_header, decode_header_length

    data = path.read_bytes()
    return int(decode_header(data[: 8 + decode_header_length(data, len(data))], len(data)).metadata["vua_start"])


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A root holding P, saved by an engine that prefilled it in steps of 20 tokens (chunked prefill)."""
    engine = Engine(tmp_path)
    result = engine.run("p", P, step_tokens=20)
    engine.close()
    assert result["hit"] == 0
    assert [(s.fragment.start, s.fragment.n_blocks, s.fragment.head is None) for s in result["saves"]] == [
        (0, 4, True), (16, 4, True), (32, 4, True), (48, 2, False)]
    assert engine.worker.totals.data["saved_fragments"] == 4
    return tmp_path


def test_second_engine_loads_the_whole_stored_prefix_exactly(stored: Path) -> None:
    engine = Engine(stored)
    result = engine.run("p2", P)
    assert result["hit"] == 56  # every whole block; the 2 tokens past them are computed
    assert_loaded(engine, P, result["block_ids"], 14)
    assert result["saves"] == []  # all stored already
    assert engine.errors == set()
    assert engine.worker.totals.data["loaded_fragments"] == 4


def test_only_whole_blocks_of_the_prompt_are_stored(tmp_path: Path) -> None:
    """Which bytes of a block belong to which token is the attention backend's business, so a
    block is stored only when every slot holds this prompt's KV: never another request's."""
    engine = Engine(tmp_path)
    for layer in LAYERS:  # every block starts out holding someone else's KV
        engine.kv[layer].fill_(7)
    engine.run("p", P)
    for path in fragments(tmp_path):
        tensors = load_file(path)
        assert len(tensors["tokens"]) % BLOCK == 0
        for layer in LAYERS:
            assert not torch.any(tensors[layer] == 7)


def test_claim_stays_below_the_prompt_length(stored: Path) -> None:
    engine = Engine(stored)
    result = engine.run("p56", P[:56])  # 14 full blocks stored, but the last token must be computed
    assert result["hit"] == 55
    load = result["loads"][0]
    assert load.block_ids[-1] == result["block_ids"][12:14]  # the last block is loaded whole, its last slot recomputed
    assert_loaded(engine, P[:56], result["block_ids"], 14)


def test_min_recompute_tokens_leaves_that_many_prompt_tokens_to_compute(stored: Path) -> None:
    engine = Engine(stored, min_recompute_tokens=5)
    result = engine.run("p", P)
    assert result["hit"] == 53  # ends inside block 13: vLLM computes its last 3 slots and the 2 tokens after it
    assert_loaded(engine, P, result["block_ids"], 15)


def test_whole_block_claims_end_on_a_block_boundary(stored: Path) -> None:
    assert Engine(stored).run("p55", P[:56])["hit"] == 55
    assert Engine(stored, claim_whole_blocks="true").run("p52", P[:56])["hit"] == 52


def test_a_prompt_ending_one_token_into_a_block_loads_only_whole_blocks(stored: Path) -> None:
    engine = Engine(stored)
    result = engine.run("p57", P[:57])
    assert result["hit"] == 56
    assert [f.n_blocks for f in result["loads"][0].fragments] == [4, 4, 4, 2]


def test_diverging_prompt_reuses_only_the_shared_full_chunks(stored: Path) -> None:
    engine = Engine(stored)
    q = P[:30] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    result = engine.run("q", q)
    assert result["hit"] == CHUNK  # blocks 0-6 are shared, but only chunk 0 ends inside the shared part
    assert_loaded(engine, q, result["block_ids"], 4)


def test_extended_prompt_reuses_the_stored_tail(stored: Path) -> None:
    engine = Engine(stored)
    extended = P + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # 70 tokens: chunk 3 is now full
    result = engine.run("ext", extended)
    assert result["hit"] == 56  # 3 full chunks + P's tail of 2 blocks
    assert_loaded(engine, extended, result["block_ids"], 14)
    # Chunk 3 is full now: stored as a full chunk, from loaded and computed blocks alike,
    # then its own tail (block 16).
    assert [(s.fragment.start, s.fragment.n_blocks) for s in result["saves"]] == [(48, 4), (64, 1)]
    again = Engine(stored).run("ext2", extended)
    assert again["hit"] == 68


def test_other_model_reuses_nothing(stored: Path) -> None:
    engine = Engine(stored, identity(model="other"))
    assert engine.run("p", P)["hit"] == 0


def test_cache_salt_keeps_prefixes_apart(stored: Path) -> None:
    engine = Engine(stored)
    assert engine.run("salted", P, salt="tenant-a")["hit"] == 0
    assert engine.run("salted2", P, salt="tenant-a")["hit"] == 56


def test_corrupt_fragment_is_reported_removed_and_stored_again_by_the_recompute(stored: Path) -> None:
    second = [p for p in fragments(stored) if "tails" not in p.parts][1]
    with open(second, "r+b") as handle:  # flip the last bytes: the data of the last layer
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)
    engine = Engine(stored)
    result = engine.run("p", P)
    loads = result["loads"][0]
    broken = [i for i, f in enumerate(loads.fragments) if f.path(engine.worker.store.layout, "tp0") == second]
    assert len(broken) == 1
    assert engine.errors == set(loads.block_ids[broken[0]])
    # The scheduler rewound what it thought stored: the recomputed chunk is saved again. (Planning
    # does no I/O, so later pieces the lookup did not vouch for are planned too; their writers find
    # them stored and skip them.)
    saved = [s.fragment.start for s in result["saves"]]
    assert saved[0] == broken[0] * CHUNK
    assert engine.worker.totals.data["saved_fragments"] == 1
    reader = Engine(stored)
    again = reader.run("p4", P)
    assert again["hit"] == 56 and reader.errors == set()
    assert_loaded(reader, P, again["block_ids"], 14)


def test_missing_fragment_between_lookup_and_load_reports_every_later_block(stored: Path) -> None:
    engine = Engine(stored)
    meta = engine.first_step("late", P, list(range(15)))
    meta.loads[0].fragments[1].path(engine.worker.store.layout, "tp0").unlink()  # gone before the worker reads it
    engine.worker.start_load(meta.loads)
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    assert engine.worker.take_load_errors() == set(range(4, 14))
    engine.close()


def test_runtime_switches(stored: Path) -> None:
    (stored / DISABLE_GET).touch()
    assert Engine(stored).run("p", P)["hit"] == 0
    (stored / DISABLE_GET).unlink()
    (stored / DISABLE_PUT).touch()
    engine = Engine(stored)
    q = [9] * 40
    assert engine.run("q", q)["saves"] == []
    (stored / DISABLE_PUT).unlink()
    assert len(Engine(stored).run("q2", q)["saves"]) == 3  # two full chunks and a tail of 2 blocks


def test_staging_bound_skips_saves_instead_of_blocking(tmp_path: Path) -> None:
    engine = Engine(tmp_path, max_staging_bytes="500")  # less than any fragment
    result = engine.run("p", P)
    assert len(result["saves"]) == 4
    assert engine.worker.totals.data["saves_skipped"] == 4
    assert fragments(tmp_path) == []


def test_full_filesystem_is_a_skipped_save(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        engine = Engine(mount)
        result = engine.run("p", P)
        assert len(result["saves"]) == 4
        assert engine.worker.totals.data["save_errors"] >= 1
        stored = engine.worker.totals.data["saved_fragments"]
        assert stored + engine.worker.totals.data["save_errors"] == 4
        assert not [p for p in mount.rglob("*") if ".tmp-" in p.name]  # nothing half written left behind
        # What did get stored is still served, exactly.
        reader = Engine(mount)
        again = reader.run("p2", P)
        # Exactly the stored fragments that form a prefix of P: chunks from 0, then the tail.
        starts = {_start(path) for path in fragments(mount)}
        expected = 0
        for start, end in ((0, 16), (16, 32), (32, 48), (48, 56)):
            if start not in starts:
                break
            expected = end
        assert stored >= 1 and again["hit"] == expected, (sorted(starts), again["hit"])
        assert_loaded(reader, P, again["block_ids"], -(-again["hit"] // BLOCK))
        assert reader.errors == set()
        engine.close()
    finally:
        subprocess.run(["umount", str(mount)])


def test_tensor_parallel_ranks_store_their_own_shards(tmp_path: Path) -> None:
    tp = identity(tp_size=2)
    rank0, rank1 = Engine(tmp_path, tp, tp_rank=0), Engine(tmp_path, tp, tp_rank=1)
    rank0.run("p", P)
    assert Engine(tmp_path, tp).run("look", P)["hit"] == 0  # rank 1's shards are missing
    rank1.run("p", P)
    names = sorted({p.name.split(".")[-2] if "tails" in p.parts else p.stem for p in fragments(tmp_path)})
    assert names == ["tp0", "tp1"]
    reader = Engine(tmp_path, tp, tp_rank=1)
    result = reader.run("p2", P)
    assert result["hit"] == 56
    assert_loaded(reader, P, result["block_ids"], 14)


def test_mla_one_rank_writes_every_rank_reads(tmp_path: Path) -> None:
    mla = identity(tp_size=2, mla=True)
    assert mla.shards() == ["tp0"]
    Engine(tmp_path, mla, tp_rank=1).run("p", P)
    assert fragments(tmp_path) == []  # rank 1 never writes
    Engine(tmp_path, mla, tp_rank=0).run("p", P)
    reader = Engine(tmp_path, mla, tp_rank=1)
    result = reader.run("p2", P)
    assert result["hit"] == 56
    assert_loaded(reader, P, result["block_ids"], 14)


def test_incompatible_kv_layout_turns_the_worker_off(stored: Path) -> None:
    engine = Engine(stored)
    engine.worker.register_kv_caches({name: torch.zeros((8, 4, 2, 16), dtype=torch.bfloat16) for name in LAYERS})
    result = engine.run("p", P)
    assert result["hit"] == 56
    assert engine.errors == set(result["block_ids"][:14])  # everything claimed is recomputed, nothing read


def test_a_whole_hit_costs_two_stats_and_a_listing(stored: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_metadata_calls(monkeypatch)
    engine = Engine(stored)
    from vllm import SamplingParams

    calls.clear()
    assert engine.scheduler.get_num_new_matched_tokens(Request("c", P, SamplingParams(), None), 0)[0] == 56
    assert calls == ["lstat", "lstat", "listdir"]  # chunk 0, chunk 2 (the last), one listing for the tail


def test_loading_before_the_forward_pass(stored: Path) -> None:
    engine = Engine(stored, layerwise_load="false")
    block_ids = list(range(20, 35))
    engine.worker.start_load(engine.first_step("early", P, block_ids).loads)
    assert_loaded(engine, P, block_ids, 14)  # no wait_for_layer_load needed
    assert engine.worker.take_load_errors() == set()
    engine.close()


def test_request_resumed_after_preemption_saves_the_rest_from_its_new_blocks(tmp_path: Path) -> None:
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    engine = Engine(tmp_path)
    first_blocks = list(range(15))
    meta = engine.first_step("r", P, first_blocks, scheduled=20)  # 20 tokens computed, then preempted
    assert [s.block_ids for s in meta.saves] == [first_blocks[0:4]]
    for layer in LAYERS:
        engine.compute(P, first_blocks, 0, 20, layer)
    engine.worker.wait_for_save(meta.saves, meta.failures_seen)
    engine.worker.flush()
    # Resumed: vLLM looks the prompt up again and hands out new blocks.
    request = Request("r", P, SamplingParams(max_tokens=1), None)
    hit, _ = engine.scheduler.get_num_new_matched_tokens(request, 0)
    assert hit == CHUNK
    new_blocks = list(range(30, 45))
    engine.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in new_blocks],)), hit)
    output = SchedulerOutput.make_empty()
    output.scheduled_cached_reqs = CachedRequestData(
        req_ids=["r"], resumed_req_ids={"r"}, new_token_ids=[], all_token_ids={}, new_block_ids=[(new_blocks,)],
        num_computed_tokens=[hit], num_output_tokens=[0])
    output.num_scheduled_tokens = {"r": len(P) - hit}
    meta = engine.scheduler.build_connector_meta(output)
    assert meta.loads[0].block_ids == [new_blocks[0:4]]
    assert [s.block_ids for s in meta.saves] == [new_blocks[4:8], new_blocks[8:12], new_blocks[12:14]]
    engine.close()


def test_max_store_size_runs_background_gc_on_the_scheduler_side(tmp_path: Path) -> None:
    engine = Engine(tmp_path, max_store_size="16K")
    assert Engine(tmp_path).scheduler.gc is None  # no budget, no gc thread
    engine.run("p", P)
    stored = sum(p.stat().st_size for p in fragments(tmp_path))
    assert stored > 16 * 1024
    report = engine.scheduler.gc.run_once()
    assert report is not None and report.bytes_after <= 16 * 1024 * 0.9
    # Every byte left under the root (namespace.json included) is in the report.
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) == report.bytes_after
    # What is left is still a correct prefix (shared prefixes are evicted last).
    reader = Engine(tmp_path)
    result = reader.run("p2", P)
    assert_loaded(reader, P, result["block_ids"], -(-result["hit"] // BLOCK))
    assert reader.errors == set()
    engine.scheduler.shutdown()
    assert engine.scheduler.gc._thread is None
    engine.close()


def test_the_block_a_claim_ends_inside_is_loaded_before_the_forward_pass(stored: Path) -> None:
    """vLLM writes the new tokens' KV (its kv-cache-update op) before an attention layer waits for
    that layer's load. The block a claim ends inside is loaded whole, so it must be in place when
    start_load returns (it runs before the forward pass): vLLM's writes then land last."""
    engine = Engine(stored, min_recompute_tokens=5)  # claim 53: 1 slot of block 13 claimed
    block_ids = list(range(20, 35))
    meta = engine.first_step("cut", P, block_ids, scheduled=5)
    for layer in LAYERS:  # whatever the blocks held before
        engine.kv[layer][block_ids[13]].fill_(3)
        engine.kv[layer][block_ids[14]].fill_(3)
    engine.worker.start_load(meta.loads)
    for offset, layer in enumerate(LAYERS):  # before any wait_for_layer_load
        assert torch.equal(engine.block(layer, block_ids[13]), expected_block(P, 13) + offset)
        assert torch.all(engine.block(layer, block_ids[14]) == 3)  # past the claim: untouched
    for layer in LAYERS:  # the forward pass: vLLM's KV write for positions 53..58, then attention
        engine.kv[layer][block_ids[13]][:, 1:] = 5
        engine.worker.wait_for_layer_load(layer)
    assert engine.worker.take_load_errors() == set()
    assert_loaded(engine, P, block_ids, 13)
    for offset, layer in enumerate(LAYERS):
        cut = engine.block(layer, block_ids[13])
        assert torch.equal(cut[:, :1], (expected_block(P, 13) + offset)[:, :1])  # the claimed slot
        assert torch.all(cut[:, 1:] == 5)  # vLLM's writes survive
    engine.close()
