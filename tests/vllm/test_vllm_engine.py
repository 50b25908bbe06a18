"""The connector inside real vLLM CPU engines: each engine is its own process (tests/vllm/driver.py).

Model: the tiny random-weight Llama (4 layers, head dim 64) run in float32; KV block 32 tokens,
--max-num-batched-tokens 256 (so a 600-token prompt is prefilled in three steps), chunks of
128 tokens, prefix caching off, greedy decoding with logprobs.

Outputs are compared exactly only where the two runs did the same computation (same batch,
same steps: a cold run with the connector against the same prompts without it). A warm run
computes fewer tokens in other step shapes, so its logprobs are compared within
``STEP_SHAPE_TOLERANCE`` (see vllm_engine_run.py); its greedy tokens must be equal.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_engine_run import (
    CHUNK, P, P2, P_BLOCKS, P_EXT, Q, assert_close_output, assert_same_output, run_engine, stored_fragments,
)

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

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
    # Room for two of P's five fragments (512 KiB per 128-token chunk in float32), not all five.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(small)]).returncode == 0
    with ThreadPoolExecutor(2) as pool:
        # The batch [P, P2] first, as the first connector run sends it; then each prompt alone.
        baseline = pool.submit(run_engine, model, None, [[P, P2], P, P2, Q, P_EXT, P_BLOCKS])
        first = pool.submit(run_engine, model, root, [[P, P2]])  # one batch of two prompts
        out = {"baseline": baseline.result(), "first": first.result(), "root": root}
        second = pool.submit(run_engine, model, root, [P, P2, Q, P_EXT, P, P, P],
                             between={"3": [["corrupt", str(root), CHUNK]]})
        other = pool.submit(run_engine, other_model, root, [P])
        full = pool.submit(run_engine, model, small, [P, P]) if mounted else None
        out.update(second=second.result(), other=other.result(), full=full.result() if full else None)
    if mounted:
        out["full_stored"] = stored_fragments(small)
        subprocess.run(["umount", str(small)])
    return out


def baseline(runs: dict, name: str) -> dict:
    """The no-connector result of one prompt sent alone (index 0 and 1 are the batch [P, P2])."""
    results = runs["baseline"]["results"]
    return results[{"P": 2, "P2": 3, "Q": 4, "P_EXT": 5, "P_BLOCKS": 6}[name]]


def test_first_run_saves_every_chunk_of_a_batched_chunked_prefill(runs: dict) -> None:
    first = runs["first"]
    # The same batch as the baseline's first generate call, so the same computation: equal.
    for got, expected in zip(first["results"], runs["baseline"]["results"][:2], strict=True):
        assert got["cached"] == 0
        assert_same_output(got, expected)
    # P: 4 chunks and a tail of 2 blocks; P2: 3 chunks. Saved over several prefill steps, in one batch.
    assert first["totals"]["saved_fragments"] == 8
    assert first["totals"]["save_errors"] == first["totals"]["saves_skipped"] == 0


def test_second_process_loads_the_stored_prefix(runs: dict) -> None:
    p, p2 = runs["second"]["results"][:2]
    assert p["cached"] == 576  # every whole block before the last prompt token (chunks and tail)
    assert p2["cached"] == 384
    assert_close_output(p, baseline(runs, "P"))
    assert_close_output(p2, baseline(runs, "P2"))


def test_partly_shared_prompt_reuses_only_shared_full_chunks(runs: dict) -> None:
    q = runs["second"]["results"][2]
    assert q["cached"] == 2 * CHUNK
    assert_close_output(q, baseline(runs, "Q"))


def test_extended_prompt_reuses_the_stored_tail(runs: dict) -> None:
    extended = runs["second"]["results"][3]
    assert extended["cached"] == 576  # P's chunks and full-block tail; P's 24 tokens past them are P's alone
    assert_close_output(extended, baseline(runs, "P_EXT"))


def test_corrupt_fragment_is_recomputed_and_stored_again(runs: dict) -> None:
    after, retry, healed = runs["second"]["results"][4:7]
    for got in (after, retry, healed):
        assert_close_output(got, baseline(runs, "P"))
    assert runs["second"]["totals"]["load_errors"] == 1
    # The corrupt chunk was removed, and the request that found it stored its recompute in its place.
    assert retry["cached"] == healed["cached"] == 576


def test_other_model_on_the_same_root_reuses_nothing(runs: dict) -> None:
    assert runs["other"]["results"][0]["cached"] == 0
    assert runs["other"]["totals"]["loaded_fragments"] == 0


def test_full_store_keeps_serving(runs: dict) -> None:
    if runs["full"] is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    cold, warm = runs["full"]["results"]
    assert_same_output(cold, baseline(runs, "P"))  # the same computation: saving changes nothing
    assert_close_output(warm, baseline(runs, "P"))
    totals = runs["full"]["totals"]
    stored = runs["full_stored"]
    # Some of P's five fragments fitted, not all; what failed was counted, what fitted is whole.
    assert 1 <= totals["saved_fragments"] == len(stored) < 5, stored
    assert totals["save_errors"] >= 5 - totals["saved_fragments"]  # the warm run may try the rest again
    # The warm run reuses exactly the stored chunks that form a prefix (and the tail if all do).
    chunks = {start for tail, start, _ in stored if not tail}
    prefix = next(index for index in range(5) if index * CHUNK not in chunks)
    has_tail = any(tail for tail, _, _ in stored)
    assert warm["cached"] == (576 if prefix == 4 and has_tail else prefix * CHUNK)
    assert totals["load_errors"] == 0


def test_tensor_parallel_ranks_store_and_load_their_own_shards(runs: dict, models: tuple[Path, Path], tmp_path: Path) -> None:
    # Two CPU workers on a 2-core machine: one core each, none held back for the KV transfer.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    tp = run_engine(models[0], tmp_path, [P, P], tp=2, env=env)
    first, second = tp["results"]
    assert (first["cached"], second["cached"]) == (0, 576)
    # TP=2 sums half-size matmuls across ranks, and the warm run computes other steps: close.
    assert_close_output(first, baseline(runs, "P"))
    assert_close_output(second, first)
    # Read in each worker process: the saves were waited for before the second prompt.
    totals = tp["totals"]
    assert totals["ranks"] == 2
    assert (totals["saved_fragments"], totals["loaded_fragments"]) == (10, 10)
    assert totals["save_errors"] == totals["load_errors"] == 0
    shards = sorted(p.name.rsplit(".", 2)[-2] if "tails" in p.parts else p.stem for p in tmp_path.rglob("*.safetensors"))
    assert shards == ["tp0"] * 5 + ["tp1"] * 5  # 4 chunks and a tail, per rank


def test_a_prompt_on_a_block_boundary_computes_only_its_last_token(
    runs: dict, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """The default claim reaches the last prompt token: the prompt's last block is loaded whole
    (before the forward pass) and vLLM recomputes only its last slot, as vLLM's own offloading tier
    does. The warm run computes one token where the cold run computed 64 in its last step: other
    shapes, logprobs close."""
    first, second = run_engine(models[0], tmp_path, [P_BLOCKS, P_BLOCKS])["results"]
    assert (first["cached"], second["cached"]) == (0, len(P_BLOCKS) - 1)
    assert_same_output(first, baseline(runs, "P_BLOCKS"))  # the same computation as the baseline's
    assert_close_output(second, baseline(runs, "P_BLOCKS"))
    drift = max(abs(a - b) for a, b in zip(second["logprobs"], baseline(runs, "P_BLOCKS")["logprobs"]))
    print(f"one-token recompute: max logprob difference from a full prefill {drift:.2e}")
