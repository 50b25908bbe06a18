"""Two vLLM engines on two "nodes": engine A saves through one GlusterFS mount, a fresh engine B
loads through another mount of the same volume (its own FUSE client, its own caches).

Same model, prompt and settings as tests/vllm/test_vllm_engine.py (float32 tiny Llama, KV block
32, chunks of 128, P = 600 tokens: four chunks and a two-block tail are stored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from vllm_engine_run import P, assert_close_output, assert_same_output, run_engine, stored_fragments

from vua.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = [pytest.mark.multinode, pytest.mark.vllm]


def test_engine_on_another_node_reuses_what_one_node_stored(volume) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    node_a, node_b, node_c = volume.root("engines")
    # Really three clients: each mount is its own filesystem instance.
    assert len({os.stat(n).st_dev for n in (node_a, node_b, node_c)}) == 3
    with ThreadPoolExecutor(2) as pool:
        baseline = pool.submit(run_engine, model, None, [P])
        stored = pool.submit(run_engine, model, node_a, [P])
        baseline_run, a = baseline.result(), stored.result()
    b = run_engine(model, node_b, [P])
    expected, on_a, on_b = baseline_run["results"][0], a["results"][0], b["results"][0]

    # A computed everything (nothing stored yet) in the same steps as the baseline: bit-identical.
    assert on_a["cached"] == 0
    assert_same_output(on_a, expected)
    assert a["totals"]["saved_fragments"] == 5 and a["totals"]["save_errors"] == 0
    # B found A's four chunks and tail through the other mount: every whole block before the last
    # prompt token, as on a local root; it computed 24 tokens instead of 600, so its logprobs
    # are compared within the step-shape tolerance.
    assert on_b["cached"] == 576
    assert_close_output(on_b, expected)
    assert b["totals"]["loaded_fragments"] == 5 and b["totals"]["load_errors"] == 0
    print(f"node A (cold) {on_a['seconds'] * 1e3:.0f} ms, node B (loads 576 tokens) {on_b['seconds'] * 1e3:.0f} ms")

    # A third node sees five intact fragments.
    assert sorted(stored_fragments(node_c)) == [(False, 0, 128), (False, 128, 128), (False, 256, 128),
                                                 (False, 384, 128), (True, 512, 64)]
    verify = subprocess.run([sys.executable, "-m", "vua", "verify", str(node_c), "--json"],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(verify.stdout)
    assert verify.returncode == 0 and report["problems"] == [] and report["fragments"] == 5, verify.stdout + verify.stderr
