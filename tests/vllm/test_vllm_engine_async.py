"""Asynchronous loads inside real vLLM CPU engines (``async_load_min_tokens: 0``): the request waits
for its KV while the others run, and its output is a recompute's.

Same model and settings as tests/vllm/test_vllm_engine.py. A warm run computes fewer tokens, in
other step shapes, than the no-connector baseline: logprobs are compared within
``STEP_SHAPE_TOLERANCE`` (vllm_engine_run.py), greedy tokens exactly.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_engine_run import CHUNK, P, P2, assert_close_output, run_engine

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm

NEW = [random.Random(9).randrange(3, 2000) for _ in range(500)]  # never stored: computed while P2 loads
ASYNC = {"extra": {"chunk_size": CHUNK, "async_load_min_tokens": 0}}


def test_fresh_engines_load_asynchronously_and_answer_as_a_recompute(tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    store, damaged = tmp_path / "store", tmp_path / "damaged"
    store.mkdir()
    damaged.mkdir()
    with ThreadPoolExecutor(2) as pool:
        baseline = pool.submit(run_engine, model, None, [P, P2, NEW])
        run_engine(model, store, [P, P2])
        # The second chunk of P (tokens 128..255) damaged on disk after it was stored.
        run_engine(model, damaged, [P], between={"0": [["corrupt", str(damaged), CHUNK]]})
        expected = dict(zip(("P", "P2", "NEW"), baseline.result()["results"]))
    with ThreadPoolExecutor(2) as pool:
        # P alone, then a batch in which NEW is computed (and decodes) while P2's KV arrives.
        warm_job = pool.submit(run_engine, model, store, [P, [NEW, P2]], max_tokens=8, **ASYNC)
        failed = run_engine(model, damaged, [P], **ASYNC)
        warm = warm_job.result()
    p, new, p2 = warm["results"]
    assert (p["cached"], p2["cached"], new["cached"]) == (576, 384, 0)
    assert warm["scheduler"]["async_loads"] == 2
    assert warm["totals"]["loaded_fragments"] == 8 and warm["totals"]["load_errors"] == 0
    for got, name in ((p, "P"), (p2, "P2"), (new, "NEW")):
        assert_close_output({**got, "tokens": got["tokens"][:4], "logprobs": got["logprobs"][:4]}, expected[name])
    # A load that fails (chunk 1's checksum) is reported with its request; vLLM recomputes from the
    # first failed block and the answer is a recompute's.
    assert failed["totals"]["load_errors"] == 1
    assert failed["scheduler"]["async_loads"] == 1
    assert_close_output(failed["results"][0], expected["P"])
