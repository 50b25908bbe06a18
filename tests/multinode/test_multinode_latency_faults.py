"""GlusterFS with its debug translators: latency on every operation (delay-gen) and read errors
(error-gen), injected in the brick, under real FUSE clients.

Timings are printed for doc/reliability.md, never asserted (they depend on the machine and its
load); correctness is asserted. Client caches are off on these volumes and the mounts keep no
entries or attributes, so every lookup, open and read reaches the brick: the cold-client case
(another node's first access).
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
import vllm_steps
from vllm import SamplingParams
from vllm.v1.request import Request
from vllm_steps import assert_loaded, Engine
from workload import SPLIT, check_prefix, kv_for, open_store

import glusterfs

pytestmark = pytest.mark.multinode

DELAY_US = 1000
CHUNKS = 32
UNCACHED_MOUNT = "entry-timeout=0,attribute-timeout=0,negative-timeout=0"


@pytest.fixture(scope="module")
def slow(gluster) -> Iterator[glusterfs.Volume]:
    options = {**glusterfs.NO_CLIENT_CACHE, "debug.delay-gen": "posix", "delay-gen.delay-percentage": "100",
               "delay-gen.delay-duration": str(DELAY_US),
               "delay-gen.enable": "LOOKUP,STAT,FSTAT,OPEN,READ,READDIRP,READDIR,CREATE,WRITE,LINK"}
    made = gluster.create("slow", 1, options, mount_options=UNCACHED_MOUNT)
    yield made
    gluster.destroy(made.name)


@pytest.fixture(scope="module")
def faulty(gluster) -> Iterator[glusterfs.Volume]:
    # error-gen enters the brick graph only at start; it injects nothing until error-failure is raised.
    # (delay-gen and error-gen cannot both sit on posix: glusterd then writes a brick volfile that
    # defines the error-gen volume twice and the brick does not start.)
    options = {**glusterfs.NO_CLIENT_CACHE, "debug.error-gen": "posix", "debug.error-fops": "READ",
               "debug.error-number": "EIO", "debug.error-failure": "0"}
    made = gluster.create("faulty", 2, options, mount_options=UNCACHED_MOUNT)
    yield made
    gluster.destroy(made.name)


def tokens_of(seed: int, count: int) -> torch.Tensor:
    return torch.randint(1, 30000, (count,), generator=torch.Generator().manual_seed(seed))


def median_ms(call: Callable[[], object], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def connector_lookup(engine: Engine, tokens: list[int], name: str) -> int:
    """The connector's answer, asked again as vLLM does while a lookup over its time budget
    (``lookup_budget_ms``) says "not yet" (None) and goes on in the background."""
    request = Request(name, list(tokens), SamplingParams(max_tokens=1), None)
    deadline = time.monotonic() + 60
    while (hit := engine.scheduler.get_num_new_matched_tokens(request, 0)[0]) is None:
        assert time.monotonic() < deadline, "a deferred lookup never finished"
        time.sleep(0.001)
    return hit


def measure(root: Path) -> dict[str, float]:
    """Milliseconds (median of 5) of a missed and a hit ``get_closest`` of 32 groups and of a
    connector lookup (32 chunks) that misses and hits, on ``root``."""
    stored, unknown = tokens_of(1, CHUNKS * SPLIT), tokens_of(2, CHUNKS * SPLIT)
    figures = {}
    with open_store(str(root)) as vua:
        vua.put(stored, kv_for(stored))
        assert vua.get_closest(unknown) is None
        assert check_prefix(vua, stored) == CHUNKS
        figures["get_closest miss"] = median_ms(lambda: vua.get_closest(unknown))
        figures["get_closest hit"] = median_ms(lambda: vua.get_closest(stored))
    prompt, other = [(5 * i + 1) % 4999 for i in range(CHUNKS * 16 + 8)], [(3 * i + 2) % 4999 for i in range(CHUNKS * 16 + 8)]
    engine = Engine(root)
    try:
        engine.run("store", prompt)
        assert connector_lookup(engine, other, "miss") == 0
        assert connector_lookup(engine, prompt, "hit") == len(prompt) - 1
        figures["connector lookup miss"] = median_ms(lambda: connector_lookup(engine, other, "miss"))
        figures["connector lookup hit"] = median_ms(lambda: connector_lookup(engine, prompt, "hit"))
    finally:
        engine.close()
    return figures


def test_latency_of_lookups_and_loads(slow, volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_steps, "NUM_BLOCKS", 192)  # room for a 32-chunk prompt (130 blocks)
    rows = {"local disk": measure(tmp_path), "GlusterFS": measure(volume.root("latency")[0]),
            f"GlusterFS + {DELAY_US} us per operation": measure(slow.root("latency")[0])}
    print(f"\n{'ms (median of 5)':<36}" + "".join(f"{k:>24}" for k in next(iter(rows.values()))))
    for name, figures in rows.items():
        print(f"{name:<36}" + "".join(f"{v:>24.2f}" for v in figures.values()))


def brick_log(volume: glusterfs.Volume) -> Path:
    return Path("/var/log/glusterfs/bricks") / (str(volume.brick).strip("/").replace("/", "-") + ".log")


def injected(volume: glusterfs.Volume) -> list[str]:
    """The errors error-gen returned so far (one "unwind" line each in the brick log)."""
    path = brick_log(volume)
    text = path.read_text(errors="replace") if path.exists() else ""
    return re.findall(r"error_gen_\w+\] \S+: unwind\(-1, ([^)]*)\)", text)


def test_read_errors_are_misses_and_recomputes(faulty, caplog) -> None:
    writer_root, reader_root = faulty.root("eio")
    tokens = tokens_of(3, 8 * SPLIT)
    prompt = [(13 * i + 7) % 4999 for i in range(16 * 8 + 8)]
    with open_store(str(writer_root)) as vua:
        vua.put(tokens, kv_for(tokens))
    writer = Engine(writer_root)
    writer.run("store", prompt)
    writer.close()
    before = len(injected(faulty))
    faulty.set("debug.error-failure", "100")  # every READ on the brick fails from now on
    try:
        time.sleep(1)  # the brick reconfigures asynchronously
        with caplog.at_level(logging.WARNING, logger="vua"), open_store(str(reader_root)) as vua:
            assert check_prefix(vua, tokens) == 0  # no exception, no KV: a miss
            reader = Engine(reader_root)
            try:
                run = reader.run("load", prompt)
                # The lookup (metadata only) claimed the stored prefix, every load failed, and those
                # blocks were reported and recomputed: exact KV all the same.
                assert run["hit"] > 0 and reader.errors
                assert_loaded(reader, prompt, run["block_ids"])
                failed = reader.worker.totals.data["load_errors"]
            finally:
                reader.close()
        errnos = injected(faulty)[before:]
        warnings = [r.getMessage() for r in caplog.records if "as a miss" in r.getMessage()]
        print(f"\nerror-gen failed {len(errnos)} reads on the brick (errnos {sorted(set(errnos))}); "
              f"{len(warnings)} 'treated as a miss' log lines; connector: {failed} fragments failed, "
              f"{len(reader.errors)} blocks recomputed")
        assert errnos, "error-gen injected nothing: the reads never reached the brick"
        assert warnings
    finally:
        faulty.set("debug.error-failure", "0")
    time.sleep(1)
    # Faults over: the fragments were not discarded for an I/O error, so they are whole hits again.
    with open_store(str(reader_root)) as vua:
        assert check_prefix(vua, tokens) == len(tokens) // SPLIT
