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
P = [_rng.randrange(3, 2000) for _ in range(600)]  # 4 chunks, a tail of 2 blocks, 24 tokens past them
P2 = [_rng.randrange(3, 2000) for _ in range(400)]  # 3 chunks, no tail, 16 tokens in a last block
Q = P[:300] + [_rng.randrange(3, 2000) for _ in range(150)]  # shares chunks 0 and 1 (and part of chunk 2)
P_EXT = P + [_rng.randrange(3, 2000) for _ in range(100)]  # the next turn: P's 4 chunks and its tail
P_BLOCKS = P[:576]  # ends on a block boundary: 4 chunks and a tail of 2 blocks, nothing past them
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


# Logprobs of two runs whose prompts were computed in differently shaped steps (a warm run
# computes the last 24 tokens of a 600-token prompt in one step where a cold one prefilled
# 256 + 256 + 88; TP=2 sums half-size matmuls; a batch of two is not one prompt alone). vLLM
# does not promise batch invariance: matmul kernels block and sum differently by shape, so
# results may differ in the last bits, which depend on the CPU kind. In float32 that drift is
# about 1e-6 on these logprobs; 1e-4 leaves room for other CPUs and still fails on any wrong
# KV (a wrong block moves logprobs by 1e-2 or more on this model).
STEP_SHAPE_TOLERANCE = 1e-4


def assert_same_output(got: dict, expected: dict, logprob_tolerance: float = 0.0) -> None:
    """Same greedy tokens; logprobs equal, or within ``logprob_tolerance`` where the runs computed
    in differently shaped steps (exact is right only for the same computation)."""
    assert got["tokens"] == expected["tokens"], (got["tokens"], expected["tokens"])
    assert len(got["logprobs"]) == len(expected["logprobs"]) > 0
    assert all(abs(a - b) <= logprob_tolerance for a, b in zip(got["logprobs"], expected["logprobs"])), (
        got["logprobs"], expected["logprobs"], logprob_tolerance)


def assert_close_output(got: dict, expected: dict) -> None:
    assert_same_output(got, expected, STEP_SHAPE_TOLERANCE)


def stored_fragments(root: Path) -> list[tuple[bool, int, int]]:
    """(is a tail, first token, tokens) of every fragment file under ``root``."""
    from vua.serdes import decode_header, decode_header_length

    found = []
    for path in sorted(Path(root).rglob("*.safetensors")):
        data = path.read_bytes()
        header = decode_header(data[: 8 + decode_header_length(data, len(data))], len(data))
        found.append(("tails" in path.parts, int(header.metadata["vua_start"]), int(header.metadata["vua_tokens"])))
    return found
