"""Crash consistency: a writer SIGKILLed at random points never leaves wrong or partial KV behind."""

from __future__ import annotations

import random
from pathlib import Path

from workload import CRASH_UNIVERSE, SPLIT, check_prefix, finish_worker, kv_for, open_store, prompt, soak

from vua.cli import main
from vua.eviction import collect
from vua.inventory import FULL, TEMP, check_fragment, walk

# Each child puts a few prompts in the 0-80 ms before its kill; checking its first 48 covers them all.
ATTEMPTS_CHECKED = 48


def test_sigkilled_writer_leaves_only_whole_fragments(tmp_path: Path, workers) -> None:
    rounds = soak(40)
    result = finish_worker(workers("crash", tmp_path, 0, 1234, rounds), timeout=60 + rounds)
    assert (result["rounds"], result["killed"]) == (rounds, rounds)  # every child was still putting when killed

    stored = list(walk(tmp_path))
    fragments = [f for f in stored if f.kind == FULL]
    assert [f for f in stored if f.kind not in (FULL, TEMP)] == []
    assert [check_fragment(f) for f in fragments] == [None] * len(fragments)
    assert main(["verify", str(tmp_path), "--json"]) == 0  # leftover temp files are young, so not yet problems

    attempted = []
    for seed in result["child_seeds"]:
        draws = random.Random(seed)
        attempted.append([draws.randrange(CRASH_UNIVERSE) for _ in range(ATTEMPTS_CHECKED)])
    whole = partial = 0
    with open_store(str(tmp_path)) as vua:
        for indexes in attempted:
            for index in indexes:
                tokens = prompt(index)
                groups = check_prefix(vua, tokens)  # exact prefix or miss, else AssertionError
                whole += groups == len(tokens) // SPLIT
                partial += 0 < groups < len(tokens) // SPLIT
        assert whole > 0  # (partial hits: a shared family prefix, or a put cut short by its kill)
        for indexes in attempted:
            tokens = prompt(indexes[0])
            vua.put(tokens, kv_for(tokens))  # the store takes writes again, over whatever the kill left
            assert check_prefix(vua, tokens) == len(tokens) // SPLIT
    leftovers = [f for f in walk(tmp_path) if f.kind == TEMP]
    print(f"crash: {rounds} SIGKILLs, {len(fragments)} fragments verified, {len(leftovers)} temp files left, "
          f"{whole} whole and {partial} partial prompts among {rounds * ATTEMPTS_CHECKED} checked")
    report = collect(tmp_path, temp_grace_s=0)
    assert report.temp_removed == len(leftovers)
    assert [f for f in walk(tmp_path) if f.kind == TEMP] == []
