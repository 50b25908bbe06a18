"""``bin/vua-vllm serve``: the OpenAI server with the connector resolved by name (the plugin entry point)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

from vllm_engine_run import CHUNK, P

pytestmark = pytest.mark.vllm

REPO = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def wait_healthy(port: int, server: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited with {server.returncode}:\n{log.read_text()[-6000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"server not healthy after {timeout} s:\n{log.read_text()[-6000:]}")


SERVE_ARGS = ["--host", "127.0.0.1", "--enable-prompt-tokens-details", "--max-num-batched-tokens", "256",
              "--block-size", "32", "--max-model-len", "4096", "--no-enable-prefix-caching", "--enforce-eager",
              "--dtype", "float32"]


@contextmanager
def vua_server(command: list[str], model: Path, root: Path, workdir: Path, *extra: str,
               env: dict[str, str] | None = None) -> Iterator[tuple[int, Path]]:
    """``command serve model`` with VUA on ``root`` (found by name: the plugin entry point), healthy;
    yields (port, log) and stops the server's whole process group at the end."""
    port = free_port()
    config = {"kv_connector": "VUAStorageConnector_V1", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(root), "chunk_size": CHUNK}}
    log = workdir / "server.log"
    env = dict(env if env is not None else {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"})
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "serve", str(model), "--port", str(port), "--kv-transfer-config", json.dumps(config),
             *SERVE_ARGS, *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
    try:
        wait_healthy(port, server, log)
        yield port, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_for_fragments(root: Path, count: int, timeout: float = 60) -> None:
    """Saves are written in the background; a chunk is claimed only once it is published."""
    deadline = time.monotonic() + timeout
    while len(list(root.rglob("*.safetensors"))) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def test_repeated_completion_reports_cached_tokens(tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    with vua_server([sys.executable, str(REPO / "bin" / "vua-vllm")], model, root, tmp_path) as (port, log):
        body = {"model": str(model), "prompt": P, "max_tokens": 3, "temperature": 0.0, "logprobs": 1}
        first = post(port, body)
        assert first["usage"]["prompt_tokens"] == len(P)
        assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
        wait_for_fragments(root, 5)
        second = post(port, body)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 576
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert "'recompute'" in log.read_text()  # the connector chose vLLM's recompute policy


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}, VUA's samples only."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("vllm:vua_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def vua_sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The one sample of ``name`` (whatever its model_name and engine labels) with ``labels``."""
    found = [v for k, v in samples.items() if k.split("{")[0] == name and all(f'{l}="{v}"' in k for l, v in labels.items())]
    assert len(found) == 1, (name, labels, sorted(samples))
    return found[0]


def test_metrics_and_kv_events_of_a_served_engine(tmp_path: Path) -> None:
    """One request twice on a real server: /metrics has VUA's counters with what happened, and vLLM's
    ZMQ publisher sends BlockStored events, medium STORAGE, for the blocks VUA stored."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    port = free_port()
    # vLLM's publisher binds wildcard tcp and ipc endpoints (and connects to any other): a local
    # socket keeps the test off the network. Events sent before a subscriber connects are lost
    # (PUB/SUB), so the subscriber connects now; zmq retries until the engine has bound it.
    endpoint = f"ipc://{tmp_path}/kv-events"
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.connect(endpoint)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"kv")
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": "kv"}
    command = [sys.executable, str(REPO / "bin" / "vua-vllm")]
    try:
        with vua_server(command, model, root, tmp_path, "--kv-events-config", json.dumps(kv_events)) as (port, _):
            body = {"model": str(model), "prompt": P, "max_tokens": 3, "temperature": 0.0}
            post(port, body)
            wait_for_fragments(root, 5)
            cached = post(port, body)["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == 576  # 4 chunks of 128 and a tail of 2 blocks

            # Stats reach the front end with the engine's outputs; the second request is counted as it finishes.
            deadline = time.monotonic() + 30
            samples = scrape(port)
            while vua_sample(samples, "vllm:vua_requests_total") < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
                samples = scrape(port)
            assert vua_sample(samples, "vllm:vua_requests_total") == 2
            assert vua_sample(samples, "vllm:vua_query_tokens_total") == 2 * len(P)
            assert vua_sample(samples, "vllm:vua_hit_tokens_total") == cached
            assert vua_sample(samples, "vllm:vua_hit_rate") == cached / (2 * len(P))
            assert vua_sample(samples, "vllm:vua_saved_fragments_total") == 5 == len(list(root.rglob("*.safetensors")))
            assert vua_sample(samples, "vllm:vua_loaded_fragments_total") == 5
            kv_bytes = vua_sample(samples, "vllm:vua_saved_bytes_total")
            assert kv_bytes > 0 and vua_sample(samples, "vllm:vua_loaded_bytes_total") == kv_bytes  # the same 18 blocks
            assert vua_sample(samples, "vllm:vua_load_throughput_gb_per_second") > 0
            lookups = vua_sample(samples, "vllm:vua_lookups_total")
            assert lookups >= 2 and vua_sample(samples, "vllm:vua_lookup_time_seconds_count") == lookups
            for kind in ("storage", "internal"):
                assert vua_sample(samples, "vllm:vua_load_errors_total", kind=kind) == 0
                assert vua_sample(samples, "vllm:vua_save_errors_total", kind=kind) == 0
            assert vua_sample(samples, "vllm:vua_saves_skipped_total") == 0
            assert vua_sample(samples, "vllm:vua_saves_poisoned_total") == 0

            # Events: the writes were reported by the steps after them (the second request's at the latest).
            decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
            stored = []
            deadline = time.monotonic() + 30
            while sum(len(e.block_hashes) for e in stored) < 18 and time.monotonic() < deadline:
                if subscriber.poll(1000):
                    topic, _seq, payload = subscriber.recv_multipart()
                    assert topic == b"kv"
                    stored += [e for e in decoder.decode(payload).events if getattr(e, "medium", None) == "STORAGE"]
            by_parent = {e.parent_block_hash: e for e in stored}
            chain, parent = [], None
            while parent in by_parent:  # follow the prefix from its first block, as a router would
                chain.append(by_parent[parent])
                parent = chain[-1].block_hashes[-1]
            assert len(chain) == len(stored) == 5
            assert [len(e.block_hashes) for e in chain] == [4, 4, 4, 4, 2]
            assert [t for e in chain for t in e.token_ids] == P[:576]
            assert {(e.block_size, e.ownership, type(e).__name__) for e in chain} == {(32, "vua", "BlockStored")}
            print("\n".join(f"{k} {v:g}" for k, v in sorted(samples.items())))  # for the docs' excerpt
            print("\n".join(repr(e)[:400] for e in chain))
    finally:
        subscriber.close(linger=0)
        context.term()
