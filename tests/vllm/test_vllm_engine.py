"""The connector inside real vLLM CPU engines: each engine is its own process (tests/vllm/driver.py).

Model: the tiny random-weight Llama (4 layers, head dim 64, bf16); KV block 32 tokens,
--max-num-batched-tokens 256 (so a 600-token prompt is prefilled in three steps), chunks of
128 tokens, prefix caching off, greedy decoding with logprobs.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_engine_run import CHUNK, P, P2, P_EXT, Q, assert_same_output, run_engine

from vua.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_llama(TinyLlamaSpec()), build_tiny_llama(TinyLlamaSpec(seed=1))


@pytest.fixture(scope="module")
def runs(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every engine run of this module, two at a time."""
    model, other_model = models
    root = tmp_path_factory.mktemp("store")
    small = tmp_path_factory.mktemp("small")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(small)]).returncode == 0
    with ThreadPoolExecutor(2) as pool:
        baseline = pool.submit(run_engine, model, None, [P, P2, Q, P_EXT])
        first = pool.submit(run_engine, model, root, [[P, P2]])  # one batch of two prompts
        out = {"baseline": baseline.result(), "first": first.result(), "root": root}
        second = pool.submit(run_engine, model, root, [P, P2, Q, P_EXT, P, P, P],
                             between={"3": [["corrupt", str(root), CHUNK]]})
        other = pool.submit(run_engine, other_model, root, [P])
        full = pool.submit(run_engine, model, small, [P, P]) if mounted else None
        out.update(second=second.result(), other=other.result(), full=full.result() if full else None)
    if mounted:
        subprocess.run(["umount", str(small)])
    return out


def test_first_run_saves_every_chunk_of_a_batched_chunked_prefill(runs: dict) -> None:
    first = runs["first"]
    for got, expected in zip(first["results"], runs["baseline"]["results"][:2]):
        assert got["cached"] == 0
        assert_same_output(got, expected)
    # P: 4 chunks and a tail of 2 blocks; P2: 3 chunks. Saved over several prefill steps, in one batch.
    assert first["totals"]["saved_fragments"] == 8
    assert first["totals"]["save_errors"] == first["totals"]["saves_skipped"] == 0


def test_second_process_loads_the_stored_prefix(runs: dict) -> None:
    p, p2 = runs["second"]["results"][:2]
    assert p["cached"] == 576  # every whole block before the last prompt token (chunks and tail)
    assert p2["cached"] == 384
    assert_same_output(p, runs["baseline"]["results"][0])
    assert_same_output(p2, runs["baseline"]["results"][1])


def test_partly_shared_prompt_reuses_only_shared_full_chunks(runs: dict) -> None:
    q = runs["second"]["results"][2]
    assert q["cached"] == 2 * CHUNK
    assert_same_output(q, runs["baseline"]["results"][2])


def test_extended_prompt_reuses_the_stored_tail(runs: dict) -> None:
    extended = runs["second"]["results"][3]
    assert extended["cached"] == 576  # P's chunks and full-block tail; P's partial last block is P's alone
    assert_same_output(extended, runs["baseline"]["results"][3])


def test_corrupt_fragment_is_recomputed_and_stored_again(runs: dict) -> None:
    after, retry, healed = runs["second"]["results"][4:7]
    for got in (after, retry, healed):
        assert_same_output(got, runs["baseline"]["results"][0])
    assert runs["second"]["totals"]["load_errors"] == 1
    assert retry["cached"] == CHUNK  # the corrupt chunk was removed: only chunk 0 precedes it
    assert healed["cached"] == 576  # ... and the retry stored it again


def test_other_model_on_the_same_root_reuses_nothing(runs: dict) -> None:
    assert runs["other"]["results"][0]["cached"] == 0
    assert runs["other"]["totals"]["loaded_fragments"] == 0


def test_full_store_keeps_serving(runs: dict) -> None:
    if runs["full"] is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    for got in runs["full"]["results"]:
        assert_same_output(got, runs["baseline"]["results"][0])
    totals = runs["full"]["totals"]
    assert totals["save_errors"] >= 1
    cached = runs["full"]["results"][1]["cached"]  # whatever fitted, as a contiguous prefix
    assert cached % CHUNK == 0 or cached == 576
    assert totals["load_errors"] == 0


def test_tensor_parallel_ranks_store_and_load_their_own_shards(runs: dict, models: tuple[Path, Path], tmp_path: Path) -> None:
    # Two CPU workers on a 2-core machine: one core each, none held back for the KV transfer.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    tp = run_engine(models[0], tmp_path, [P, P], tp=2, env=env)
    first, second = tp["results"]
    assert (first["cached"], second["cached"]) == (0, 576)
    assert second["tokens"] == first["tokens"] == runs["baseline"]["results"][0]["tokens"]
    assert_same_output(second, first)
    shards = sorted(p.name.rsplit(".", 2)[-2] if "tails" in p.parts else p.stem for p in tmp_path.rglob("*.safetensors"))
    assert shards == ["tp0"] * 5 + ["tp1"] * 5  # 4 chunks and a tail, per rank


def test_claims_into_the_last_partial_block(runs: dict, models: tuple[Path, Path], tmp_path: Path) -> None:
    """claim_whole_blocks false: all but the last prompt token is loaded. The tokens computed from
    inside a block round differently (measured: logprobs within 0.03), greedy tokens are equal."""
    extra = {"chunk_size": CHUNK, "claim_whole_blocks": False, "min_recompute_tokens": 1}
    first, second = run_engine(models[0], tmp_path, [P, P], extra=extra)["results"]
    assert (first["cached"], second["cached"]) == (0, 599)
    assert_same_output(first, runs["baseline"]["results"][0])
    assert_same_output(second, runs["baseline"]["results"][0], logprob_tolerance=0.05)
