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
from pathlib import Path

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


def test_repeated_completion_reports_cached_tokens(tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    port = free_port()
    config = {"kv_connector": "VUAStorageConnector_V1", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(root), "chunk_size": CHUNK}}
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"}  # the wrapper sets it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "bin" / "vua-vllm"), "serve", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--kv-transfer-config", json.dumps(config), "--enable-prompt-tokens-details",
             "--max-num-batched-tokens", "256", "--block-size", "32", "--max-model-len", "4096",
             "--no-enable-prefix-caching", "--enforce-eager", "--dtype", "float32"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )
    try:
        wait_healthy(port, server, log)
        body = {"model": str(model), "prompt": P, "max_tokens": 3, "temperature": 0.0, "logprobs": 1}
        first = post(port, body)
        assert first["usage"]["prompt_tokens"] == len(P)
        assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
        # Saves are written in the background; a chunk is claimed only once it is published.
        deadline = time.monotonic() + 60
        while len(list(root.rglob("*.safetensors"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        second = post(port, body)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 576
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert "fails its request" not in log.read_text()  # the wrapper chose the recompute policy
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
