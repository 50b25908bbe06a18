"""Corruption: every stored file in turn bit-flipped, truncated, emptied or replaced: never wrong KV, never an exception."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from workload import SPLIT, check_prefix, kv_for, open_store, prompt, soak

from vua.inventory import FULL, walk
from vua.keys import as_token_array, chained_digests
from vua.store import read_header

PROMPT_INDEXES = (0, 4, 8, 1)  # 0, 4 and 8 share their first two groups


def _flip(rng: random.Random, region: str):
    def mutate(path: Path, original: bytes, other: bytes) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            data_start = read_header(fd, len(original)).data_start
        finally:
            os.close(fd)
        low, high = (0, data_start) if region == "header" else (data_start, len(original))
        data = bytearray(original)
        data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))

    return mutate


def _truncate(fraction: float):
    return lambda path, original, other: path.write_bytes(original[: int(len(original) * fraction)])


MUTATIONS = {
    "flip-header": lambda rng: _flip(rng, "header"),
    "flip-data": lambda rng: _flip(rng, "data"),
    "truncate-8": lambda rng: _truncate(8 / 20000),
    "truncate-half": lambda rng: _truncate(0.5),
    "truncate-last-byte": lambda rng: (lambda path, original, other: path.write_bytes(original[:-1])),
    "empty": lambda rng: _truncate(0.0),
    "replace-with-other-fragment": lambda rng: (lambda path, original, other: path.write_bytes(other)),
}
# Only a flip inside the header may leave a file that still verifies (a digit of vua_start, say);
# everything else must end the prefix exactly at the damaged group.
MUST_END_PREFIX = set(MUTATIONS) - {"flip-header"}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_damaged_fragment_is_a_miss_and_longer_prefixes_stay_exact(tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    prompts = {i: prompt(i) for i in PROMPT_INDEXES}
    with open_store(str(tmp_path)) as vua:
        for tokens in prompts.values():
            vua.put(tokens, kv_for(tokens))
        files = sorted(f.path for f in walk(tmp_path) if f.kind == FULL)
        originals = {path: path.read_bytes() for path in files}
        seed = vua.store.namespace.seed
        chains = {i: [d.hex() for d in chained_digests(as_token_array(t), SPLIT, seed)] for i, t in prompts.items()}
        checked = 0
        for _ in range(soak(1)):
            for path in files:
                other = originals[files[(files.index(path) + 1) % len(files)]]
                MUTATIONS[name](rng)(path, originals[path], other)
                for index, tokens in prompts.items():
                    groups = check_prefix(vua, tokens)  # raises on any wrong KV
                    chain = chains[index]
                    if path.parent.name in chain:
                        damaged_at = chain.index(path.parent.name)
                        assert groups <= damaged_at or name not in MUST_END_PREFIX
                        if name in MUST_END_PREFIX:
                            assert groups == damaged_at
                    else:
                        assert groups == len(tokens) // SPLIT
                    checked += 1
                path.write_bytes(originals[path])  # the store may have discarded it; restore for the next round
        assert checked == soak(1) * len(files) * len(prompts)
        print(f"corruption {name}: {soak(1) * len(files)} damaged files, {checked} lookups, all exact or shorter")
