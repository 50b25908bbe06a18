"""The next chat turn reuses the previous answer, in real vLLM CPU engines (tests/vllm/driver.py).

Turn 1: a 600-token prompt answered with 160 generated tokens. Turn 2, in a fresh engine: the
prompt, the answer and 100 new tokens. Block 32, chunks of 128 (4 blocks), float32.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_engine_run import CHUNK, P, assert_close_output, run_engine, stored_fragments

from vua.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm

ANSWER_TOKENS = 160
NEW_TOKENS = [(7 * i) % 1997 + 3 for i in range(100)]


def test_the_next_turn_reuses_prompt_and_answer(tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    first = run_engine(model, root, [P], max_tokens=ANSWER_TOKENS, ignore_eos=True)
    answer = first["results"][0]["tokens"]
    assert len(answer) == ANSWER_TOKENS
    # 760 tokens, 759 computed when the request finished (the last one is sampled, never
    # computed): 23 whole blocks of 32 = 736 tokens, stored as 5 chunks and a tail of 3 blocks.
    expected = (len(P) + ANSWER_TOKENS - 1) // 32 * 32
    assert expected == 736
    stored = sorted(stored_fragments(root))
    assert stored == sorted([(False, c * CHUNK, CHUNK) for c in range(5)] + [(True, 512, 64), (True, 640, 96)])
    assert first["totals"]["saved_fragments"] == 7  # P's 4 chunks and tail, a chunk filled by decoding, the last tail
    turn_2 = P + answer + NEW_TOKENS
    with ThreadPoolExecutor(2) as pool:
        warm = pool.submit(run_engine, model, root, [turn_2])
        cold = pool.submit(run_engine, model, None, [turn_2])
        warm, cold = warm.result(), cold.result()
    got = warm["results"][0]
    assert got["cached"] == expected
    assert warm["totals"]["load_errors"] == 0
    assert_close_output(got, cold["results"][0])
