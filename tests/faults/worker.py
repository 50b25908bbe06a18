"""A process of the fault tests: ``python worker.py MODE ROOT SECONDS SEED [ARG]``; prints one JSON line.

Modes:
    put    store random workload prompts until SECONDS pass
    get    look up random prompts, checking every hit exactly (exit 1 on the first wrong KV)
    gc     run eviction with a budget of ARG bytes in a loop
    crash  ARG rounds: fork a child that puts in a loop, SIGKILL it after a random delay
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import CRASH_UNIVERSE, PROMPTS, SPLIT, check_prefix, kv_for, open_store, prompt  # noqa: E402

from vua.errors import StoreWriteError  # noqa: E402
from vua.eviction import collect  # noqa: E402


def put_forever(root: str, rng: random.Random, deadline: float, universe: int = PROMPTS) -> dict:
    stored = refused = 0
    with open_store(root) as vua:
        while time.monotonic() < deadline:
            tokens = prompt(rng.randrange(universe))
            try:
                vua.put(tokens, kv_for(tokens))
                stored += 1
            except StoreWriteError:
                refused += 1  # gc removed the directory twice in a row: a skipped save
    return {"puts": stored, "refused": refused}


def get_forever(root: str, rng: random.Random, deadline: float) -> dict:
    whole = partial = misses = 0
    with open_store(root) as vua:
        while time.monotonic() < deadline:
            tokens = prompt(rng.randrange(PROMPTS))
            found = check_prefix(vua, tokens)
            whole += found == len(tokens) // SPLIT
            partial += 0 < found < len(tokens) // SPLIT
            misses += found == 0
    return {"whole": whole, "partial": partial, "misses": misses}


def gc_forever(root: str, deadline: float, budget: int) -> dict:
    passes = evicted = 0
    while time.monotonic() < deadline:
        evicted += collect(root, max_bytes=budget, temp_grace_s=600).evicted
        passes += 1
        time.sleep(0.05)
    return {"passes": passes, "evicted": evicted}


def crash(root: str, rng: random.Random, rounds: int) -> dict:
    """Each child puts prompts it has never seen (drawn from CRASH_UNIVERSE), so kills land in writes."""
    killed_alive = 0
    child_seeds = []
    for _ in range(rounds):
        child_seed = rng.randrange(1 << 30)
        child_seeds.append(child_seed)
        pid = os.fork()
        if pid == 0:
            try:
                put_forever(root, random.Random(child_seed), float("inf"), CRASH_UNIVERSE)
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed_alive += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"rounds": rounds, "killed": killed_alive, "child_seeds": child_seeds}


def main() -> None:
    mode, root, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    extra = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    if mode == "put":
        result = put_forever(root, rng, deadline)
    elif mode == "get":
        result = get_forever(root, rng, deadline)
    elif mode == "gc":
        result = gc_forever(root, deadline, extra)
    elif mode == "crash":
        result = crash(root, rng, extra)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
