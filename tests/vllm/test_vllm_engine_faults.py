"""A fragment that fails to load, inside real vLLM CPU engines: a cache miss, never a failed request or wrong KV.

The scenario of issue #8, with three fresh engines on one root (chunks of 256 tokens, a 700-token
prompt prefilled in one step):
1. a 300-token prompt stores chunk 0;
2. chunk 0's KV bytes are damaged on disk (its first layer, which every later layer's KV is
   computed from; header and token ids intact: only the checksum sees it);
3. a fresh engine, with vLLM's default ``kv_load_failure_policy`` left unset, sends the 700-token
   prompt: it claims chunk 0, the load fails while vLLM computes tokens 256..699 over it;
4. a fresh engine sends the 300-token prompt again, and another one the 700-token prompt, reusing
   what the others stored.
Before the fix, step 3 published chunk 1 and the tail computed over the damaged KV, so once chunk 0
was stored again, step 4 loaded them and returned wrong tokens.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_engine_run import assert_same_output, run_engine

from vua.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm

_rng = random.Random(8)
LONG = [_rng.randrange(3, 2000) for _ in range(700)]
SHORT = LONG[:300]
ONE_STEP = {"max_num_batched_tokens": 1024, "extra": {"chunk_size": 256}}


def test_a_failed_load_poisons_nothing(tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    with ThreadPoolExecutor(2) as pool:
        baseline = pool.submit(run_engine, model, None, [LONG], **ONE_STEP)
        run_engine(model, root, [SHORT], between={"0": [["damage_kv", str(root), 0]]}, policy=None, **ONE_STEP)
        baseline = baseline.result()["results"][0]
    damaged = run_engine(model, root, [LONG], policy=None, **ONE_STEP)
    got = damaged["results"][0]
    assert damaged["totals"]["load_errors"] == 1
    # The request is answered (vLLM's default policy would have failed it), from a full recompute:
    # the same 700-token single-step prefill as the baseline, so the output is the same bit for bit.
    # (vLLM's num_cached_tokens still counts the 288 tokens claimed before the load failed.)
    assert_same_output(got, baseline)
    # Nothing computed over the damaged chunk was stored; the recompute stored every chunk anew.
    assert damaged["totals"]["saves_poisoned"] >= 2  # chunk 1 and the tail, at least
    # Whoever stores chunk 0 next (here a fresh engine sending the short prompt again) must not
    # complete a chain that leads to KV computed over the damaged bytes.
    run_engine(model, root, [SHORT], policy=None, **ONE_STEP)
    healed = run_engine(model, root, [LONG], policy=None, **ONE_STEP)
    again = healed["results"][0]
    assert healed["totals"]["load_errors"] == 0
    assert again["cached"] == 672  # two chunks and a tail of five blocks: every whole block before the last token
    assert all(math.isfinite(lp) for lp in again["logprobs"])
    assert again["tokens"] == baseline["tokens"]
    # The warm run computes 28 tokens in one step where the baseline computed 700: vLLM's CPU
    # attention sums in another order, so logprobs may move in the last bits (never by 1e-3).
    assert_same_output(again, baseline, logprob_tolerance=1e-3)


def test_a_fresh_engine_whose_first_forward_pass_computes_one_token_survives(tmp_path: Path) -> None:
    """bf16 on a CPU with AMX: vLLM's CPU attention runs AMX tile instructions without asking Linux
    for the tile state; a prefill of many tokens asks first (through oneDNN), but a fresh engine
    whose first forward pass computes one token (the rest loaded by VUA) died of SIGILL until the
    connector asked for it. Elsewhere (no AMX) this runs the same path, without the hazard."""
    model = build_tiny_llama(TinyLlamaSpec())
    prompt = LONG[:576]  # ends on a block boundary: everything but the last token is loaded
    job = {"dtype": "bfloat16", "extra": {"chunk_size": 128}}
    run_engine(model, tmp_path, [prompt], **job)
    warm = run_engine(model, tmp_path, [prompt], **job)["results"][0]
    assert warm["cached"] == len(prompt) - 1
    assert all(math.isfinite(lp) for lp in warm["logprobs"]) and len(warm["tokens"]) == 4
