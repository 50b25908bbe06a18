"""Shared by the engine tests: the prompts, and one vLLM engine run in its own process (driver.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("driver.py")
_rng = random.Random(3)
P = [_rng.randrange(3, 2000) for _ in range(600)]  # 4 chunks, a tail of 2 blocks, 24 tokens in a last block
P2 = [_rng.randrange(3, 2000) for _ in range(400)]  # 3 chunks, no tail, 16 tokens in a last block
Q = P[:300] + [_rng.randrange(3, 2000) for _ in range(150)]  # shares chunks 0 and 1 (and part of chunk 2)
P_EXT = P + [_rng.randrange(3, 2000) for _ in range(100)]  # the next turn: P's 4 chunks and its tail
CHUNK = 128


def run_engine(model: Path, root: Path | None, prompts: list, timeout: float = 600, env: dict | None = None,
               **job) -> dict:
    job = {"model": str(model), "root": str(root) if root else None, "prompts": prompts, "max_tokens": 4,
           "block_size": 32, "max_num_batched_tokens": 256, "extra": {"chunk_size": CHUNK}, **job}
    done = subprocess.run([sys.executable, str(DRIVER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[2], env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"engine failed (rc {done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_output(got: dict, expected: dict, logprob_tolerance: float = 0.0) -> None:
    assert got["tokens"] == expected["tokens"]
    # Loaded KV is bit-identical to computed KV, and with whole-block claims the rest of the
    # prompt starts on a block boundary, as in a full prefill: logprobs are equal.
    assert all(abs(a - b) <= logprob_tolerance for a, b in zip(got["logprobs"], expected["logprobs"])), (
        got["logprobs"], expected["logprobs"])
