"""Serving benchmark (issue #9 §4): ``vua-vllm serve`` across a server restart, and across two mounts.

For each storage (a local directory; optionally a GlusterFS volume with 1 ms of latency on every
brick operation, mounted twice as two "nodes") and each contender, two servers run one after the
other on the same store:

- **A** (*save* round): ``bin/vua-vllm serve`` with the contender's ``--kv-transfer-config``
  starts on an empty store, runs the workloads (the connectors compute and save), and stops.
- **B** (*restart* round): a new server on the same store (on GlusterFS through the *second*
  mount) runs the same workloads again: the connectors load what A saved.

Contenders: ``fresh`` (prefix caching, no connector), ``example`` (vLLM's ExampleConnector),
``fs-tier`` (vLLM's OffloadingConnector with its filesystem tier, on CPU through
``vua.tools.fs_tier_cpu``, with ``vua bench``'s CPU-tier size), ``vua`` (VUA, ``vua bench``'s
settings) and ``vua-async`` (VUA with ``async_load_min_tokens`` 0: every load through vLLM's
asynchronous load path; run only where the connector has that setting). Every server has prefix
caching on and the same engine settings as ``vua bench`` otherwise.

Workloads, in each server after one short warm-up request of fresh random tokens:

1. ``vua-vllm bench serve --dataset-name prefix_repetition`` (vLLM's own serving benchmark):
   a few long shared prefixes, short suffixes, fixed seed (so B sends exactly A's prompts),
   ``--max-concurrency`` requests at a time; its ``--save-result`` JSON gives mean and p99 TTFT,
   p99 inter-token latency and output throughput.
2. **chat**: a few conversations at once, each turn's prompt = the previous prompt + the previous
   answer + a new user message (token ids, ``/v1/completions``, streamed; TTFT and ITL measured
   here). In A the answers are the server's own; B replays A's prompts, as a client resuming
   its conversations after a restart would send the history it was shown.

Tokens reused come from the server's Prometheus ``/metrics`` (vLLM's prompt-token counters by
source: its own prefix cache, ``local_cache_hit``, and a connector, ``external_kv_transfer``;
VUA's ``vllm:vua_*`` counters), scraped before and after each workload.

    .venv/bin/python benchmarks/serve_bench.py --out serve-results               # local disk, 2 repetitions
    .venv/bin/python benchmarks/serve_bench.py --gluster --reps 0 --gluster-reps 1 --out serve-gluster
    .venv/bin/python benchmarks/serve_bench.py --report serve-results serve-gluster --out serve-all

Writes ``results.json`` (every round, appended as it goes), ``serve.md`` (tables, goals) and
``serve.png``; ``--report`` rebuilds the last two from earlier results directories. GlusterFS
needs root (it is installed from the distribution where missing, as the multi-node tests do);
the volume is this process's own (``vuatest-<pid>-bench``) and is destroyed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from vua.tools.bench import BENCH_MODEL, FS_TIER_CPU_BYTES, machine_description
from vua.tools.engine_runner import (
    cpu_engine_env,
    engine_options,
    example_connector,
    kv_bytes_per_token,
    random_prompts,
    resolve_model,
    vua_connector,
)

REPO = Path(__file__).resolve().parent.parent
VUA_VLLM = REPO / "bin" / "vua-vllm"
CONTENDERS = ("fresh", "example", "fs-tier", "vua", "vua-async")
LABELS = {
    "fresh": "fresh server, prefix caching, no connector",
    "example": "vLLM ExampleConnector",
    "fs-tier": "vLLM OffloadingConnector, fs tier",
    "vua": "VUA",
    "vua-async": "VUA, async_load_min_tokens 0",
}
ROUNDS = ("save", "restart")
WORKLOADS = ("prefix_repetition", "chat")
# VUA's chunk_size in every VUA contender: vua bench's default.
VUA_CHUNK = 1024
# GlusterFS: 1 ms on every brick operation (delay-gen on posix), client caches off and a mount
# that keeps no entries or attributes, so every operation of the second "node" reaches the brick.
GLUSTER_DELAY_US = 1000
GLUSTER_FOPS = "LOOKUP,STAT,FSTAT,OPEN,READ,READDIRP,READDIR,CREATE,WRITE,LINK,FSYNC,RENAME,MKDIR,UNLINK,FLUSH"
UNCACHED_MOUNT = "entry-timeout=0,attribute-timeout=0,negative-timeout=0"


def vua_has_async_loads() -> bool:
    """Whether this checkout's VUA connector knows ``async_load_min_tokens``."""
    settings = REPO / "src" / "vua" / "vllm" / "settings.py"
    try:
        return "async_load_min_tokens" in settings.read_text()
    except OSError:
        return False


def connector_config(contender: str, root: Path) -> dict[str, Any] | None:
    from vua.tools.fs_tier_cpu import fs_tier_connector  # imports vLLM

    if contender == "fresh":
        return None
    if contender == "example":
        return example_connector(root)
    if contender == "fs-tier":
        return fs_tier_connector(str(root), FS_TIER_CPU_BYTES)
    if contender == "vua":
        return vua_connector(root, VUA_CHUNK)
    if contender == "vua-async":
        return vua_connector(root, VUA_CHUNK, async_load_min_tokens=0)
    raise ValueError(contender)


def cli_flags(options: dict[str, Any]) -> list[str]:
    """``engine_options`` as ``vllm serve`` flags."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_shm() -> None:
    """Remove vLLM shared-memory files no live process holds (killed engines leak them)."""
    for path in list(Path("/dev/shm").glob("psm_*")) + list(Path("/dev/shm").glob("vllm*")):
        if subprocess.run(["fuser", "-s", str(path)], capture_output=True).returncode != 0:
            path.unlink(missing_ok=True)


class Server:
    """``bin/vua-vllm serve`` in a session of its own (so that stopping it reaches its engine processes)."""

    def __init__(self, model: str, options: dict[str, Any], kv: dict[str, Any] | None, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(VUA_VLLM), "serve", model, "--port", str(self.port), "--host", "127.0.0.1",
                   *cli_flags(options), "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
        if kv:
            command += ["--kv-transfer-config", json.dumps(kv)]
        env = cpu_engine_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
        self.command = command
        self._log = open(log, "a")
        self._log.write("$ " + " ".join(command) + "\n")
        self._log.flush()
        began = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = began + 600
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up; see {log}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after 600 s; see {log}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - began

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as answer:
            return parse_metrics(answer.read().decode())

    def stop(self, timeout_s: float = 120) -> float:
        """SIGINT (vLLM's graceful shutdown: connectors finish their saves), then SIGKILL the session."""
        began = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Engine processes of the session that outlived the API server.
        deadline = time.perf_counter() + 20
        while time.perf_counter() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()
        clean_shm()
        return time.perf_counter() - began


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} for vLLM's series (model_name and engine labels dropped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        kept = [part for part in labels.rstrip("}").split(",") if part and not part.startswith(("model_name=", "engine="))]
        key = name + ("{" + ",".join(kept) + "}" if kept else "")
        try:
            values[key] = values.get(key, 0.0) + float(value)
        except ValueError:
            pass
    return values


# Counters reported per workload (differences across it).
REUSE_SERIES = {
    "prompt_tokens": "vllm:prompt_tokens_total",
    "computed": 'vllm:prompt_tokens_by_source_total{source="local_compute"}',
    "prefix_cache": 'vllm:prompt_tokens_by_source_total{source="local_cache_hit"}',
    "connector": 'vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}',
    "vua_hit_tokens": "vllm:vua_hit_tokens_total",
    "vua_loaded_bytes": "vllm:vua_loaded_bytes_total",
    "vua_load_seconds": "vllm:vua_load_seconds_total",
    "vua_saved_bytes": "vllm:vua_saved_bytes_total",
    "vua_load_errors": 'vllm:vua_load_errors_total{kind="storage"}',
    "vua_load_internal_errors": 'vllm:vua_load_errors_total{kind="internal"}',
    "vua_save_errors": 'vllm:vua_save_errors_total{kind="storage"}',
    "vua_saves_skipped": "vllm:vua_saves_skipped_total",
    "vua_lookups_deferred": "vllm:vua_lookups_deferred_total",
    "vua_lookup_timeouts": "vllm:vua_lookup_timeouts_total",
    "vua_load_timeouts": "vllm:vua_load_timeouts_total",
}


def reuse_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after.get(series, 0.0) - before.get(series, 0.0) for key, series in REUSE_SERIES.items() if series in after}


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(list(values), q)) if values else float("nan")


# ---- workloads ----


def run_prefix_repetition(server: Server, model: str, args: argparse.Namespace, out: Path, tag: str) -> dict[str, Any]:
    command = [
        sys.executable, str(VUA_VLLM), "bench", "serve", "--backend", "vllm", "--base-url", server.base,
        "--model", model, "--tokenizer", model, "--dataset-name", "prefix_repetition",
        "--prefix-repetition-prefix-len", str(args.prefix_len), "--prefix-repetition-suffix-len", str(args.suffix_len),
        "--prefix-repetition-num-prefixes", str(args.num_prefixes), "--prefix-repetition-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--seed", "0", "--num-warmups", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out), "--result-filename", f"{tag}.json",
    ]
    env = cpu_engine_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    with open(out / f"{tag}.log", "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (rc {done.returncode}); see {out / f'{tag}.log'}")
    result = json.loads((out / f"{tag}.json").read_text())
    return {
        "requests": result["completed"],
        "failed": result["failed"],
        "duration_s": result["duration"],
        "mean_ttft_ms": result["mean_ttft_ms"],
        "p99_ttft_ms": result["p99_ttft_ms"],
        "mean_itl_ms": result["mean_itl_ms"],
        "p99_itl_ms": result["p99_itl_ms"],
        "output_tok_s": result["output_throughput"],
        "input_tokens": result["total_input_tokens"],
        "output_tokens": result["total_output_tokens"],
        "command": command,
    }


async def _stream_completion(session: Any, base: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    arrivals: list[float] = []
    tokens: list[int] = []
    cached = None
    async with session.post(base + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"completion failed: {response.status} {await response.text()}")
        buffer = b""
        async for data in response.content:
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                chunk = json.loads(payload)
                now = time.perf_counter()
                for choice in chunk.get("choices", ()):
                    ids = choice.get("token_ids") or []
                    if ids:
                        arrivals.append(now)
                        tokens.extend(ids)
                usage = chunk.get("usage")
                if usage:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if not arrivals:
        raise RuntimeError("completion returned no tokens")
    return {
        "ttft_s": arrivals[0] - began,
        "itl_s": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "output_ids": tokens,
        "prompt_tokens": len(prompt),
        "cached_tokens": cached,
    }


def chat_script(model: str, args: argparse.Namespace) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per conversation: its opening context and one user message per turn (fixed seeds)."""
    contexts = random_prompts(model, args.conversations, args.context_len, seed=1000)
    users = [random_prompts(model, args.turns, args.user_len, seed=2000 + index) for index in range(args.conversations)]
    return contexts, users


async def _chat(base: str, model: str, args: argparse.Namespace, replay: list[list[list[int]]] | None) -> dict[str, Any]:
    import aiohttp

    contexts, users = chat_script(model, args)
    prompts: list[list[list[int]]] = [[] for _ in contexts]
    rows: list[dict[str, Any]] = []

    async def conversation(index: int, session: Any) -> None:
        await asyncio.sleep(index * args.stagger_s)  # conversations start apart: loads overlap others' decoding
        history = list(contexts[index])
        for turn in range(args.turns):
            if replay is not None:
                prompt = replay[index][turn]
            else:
                prompt = history + users[index][turn]
            prompts[index].append(prompt)
            row = await _stream_completion(session, base, model, prompt, args.answer_len)
            row.update(conversation=index, turn=turn)
            rows.append(row)
            history = prompt + row["output_ids"]

    began = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(conversation(index, session) for index in range(len(contexts))))
    duration = time.perf_counter() - began
    ttfts = [row["ttft_s"] * 1000 for row in rows]
    itls = [gap * 1000 for row in rows for gap in row["itl_s"]]
    outputs = sum(len(row["output_ids"]) for row in rows)
    return {
        "requests": len(rows),
        "failed": 0,
        "duration_s": duration,
        "mean_ttft_ms": statistics.mean(ttfts),
        "p99_ttft_ms": percentile(ttfts, 99),
        "mean_itl_ms": statistics.mean(itls) if itls else float("nan"),
        "p99_itl_ms": percentile(itls, 99),
        "output_tok_s": outputs / duration,
        "input_tokens": sum(row["prompt_tokens"] for row in rows),
        "output_tokens": outputs,
        "cached_tokens_usage": sum(row["cached_tokens"] or 0 for row in rows),
        "turn_ttft_ms": {str(turn): statistics.median(row["ttft_s"] * 1000 for row in rows if row["turn"] == turn)
                         for turn in range(args.turns)},
        "prompts": prompts,
    }


def warm_up(server: Server, model: str) -> None:
    """One short request of fresh random tokens: the process's first forward pass is then never a load."""
    prompt = random_prompts(model, 1, 256, seed=random.randrange(1 << 30))[0]
    asyncio.run(_warm_up(server.base, model, prompt))


async def _warm_up(base: str, model: str, prompt: list[int]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await _stream_completion(session, base, model, prompt, 2)


# ---- one contender on one storage ----


def store_size(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def run_contender(contender: str, storage: str, rep: int, roots: tuple[Path, Path], model: str, options: dict[str, Any],
                  args: argparse.Namespace, out: Path, results_path: Path) -> list[dict[str, Any]]:
    """Server A on ``roots[0]`` then server B on ``roots[1]`` (the same store; on GlusterFS another mount)."""
    records = []
    transcript: list[list[list[int]]] | None = None
    for round_name, root in zip(ROUNDS, roots):
        tag = f"{storage}-r{rep}-{contender}-{round_name}"
        kv = connector_config(contender, root)
        load_before = os.getloadavg()[0]
        print(f"[{time.strftime('%H:%M:%S')}] {tag}: starting server (load {load_before:.1f})", flush=True)
        server = Server(model, options, kv, out / f"server-{tag}.log")
        try:
            warm_up(server, model)
            for workload in WORKLOADS:
                before = server.metrics()
                if workload == "prefix_repetition":
                    result = run_prefix_repetition(server, model, args, out, f"pr-{tag}")
                else:
                    result = asyncio.run(_chat(server.base, model, args, transcript if round_name == "restart" else None))
                    if round_name == "save":
                        transcript = result["prompts"]
                    result.pop("prompts")
                result["reuse"] = reuse_delta(before, server.metrics())
                record = {
                    "storage": storage, "rep": rep, "contender": contender, "round": round_name, "workload": workload,
                    "startup_s": server.startup_s, "load_before": load_before, "load_after": os.getloadavg()[0],
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result,
                }
                records.append(record)
                with open(results_path, "a") as sink:
                    sink.write(json.dumps(record) + "\n")
                reuse = record["reuse"]
                print(
                    f"   {workload:<17} mean TTFT {record['mean_ttft_ms']:7.0f} ms  p99 TTFT {record['p99_ttft_ms']:7.0f} ms  "
                    f"p99 ITL {record['p99_itl_ms']:6.0f} ms  {record['output_tok_s']:6.1f} tok/s  "
                    f"reused {reuse.get('prefix_cache', 0):.0f} prefix cache + {reuse.get('connector', 0):.0f} connector "
                    f"of {reuse.get('prompt_tokens', 0):.0f}",
                    flush=True,
                )
        finally:
            stopped = server.stop()
            print(f"   stopped in {stopped:.0f} s; store {store_size(root)}", flush=True)
    return records


def gluster_volume() -> Any:
    """This process's own GlusterFS volume, with 1 ms of latency on brick operations, mounted twice."""
    sys.path.insert(0, str(REPO / "tests" / "multinode"))
    import glusterfs

    glusterfs.ensure_installed()
    started = glusterfs.ensure_glusterd()  # our pid to stop at the end, or None if one was running
    options = {**glusterfs.NO_CLIENT_CACHE, "debug.delay-gen": "posix", "delay-gen.delay-percentage": "100",
               "delay-gen.delay-duration": str(GLUSTER_DELAY_US), "delay-gen.enable": GLUSTER_FOPS}
    return glusterfs, started, glusterfs.create("bench", 2, options, mount_options=UNCACHED_MOUNT)


# ---- report ----


def load_records(directories: Sequence[Path]) -> list[dict[str, Any]]:
    records = []
    for directory in directories:
        path = Path(directory) / "results.json"
        if path.exists():
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Medians over repetitions per (storage, workload, contender, round)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["storage"], record["workload"], record["contender"], record["round"]), []).append(record)
    cells = {}
    for key, rows in groups.items():
        cell = {metric: _median([row[metric] for row in rows])
                for metric in ("mean_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "output_tok_s", "duration_s", "startup_s")}
        for field in ("prompt_tokens", "prefix_cache", "connector"):
            cell[field] = _median([row["reuse"].get(field, 0.0) for row in rows])
        cell["reps"] = len(rows)
        cell["rows"] = rows
        cells[key] = cell
    return cells


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f} ms"


def markdown(records: list[dict[str, Any]]) -> str:
    cells = aggregate(records)
    storages = [s for s in ("local", "gluster") if any(k[0] == s for k in cells)]
    lines = []
    for storage in storages:
        for workload in WORKLOADS:
            keys = [k for k in cells if k[0] == storage and k[1] == workload]
            if not keys:
                continue
            reps = max(cells[k]["reps"] for k in keys)
            lines += [
                f"**{'local disk' if storage == 'local' else 'GlusterFS, 1 ms per brick operation, B on the second mount'}, "
                f"{workload}** (medians of {reps} repetition{'s' if reps > 1 else ''}):",
                "",
                "| contender | round | mean TTFT | p99 TTFT | p99 ITL | output tok/s | tokens reused (prefix cache + connector) of prompt tokens "
                "| mean TTFT of each run | load average |",
                "|---|---|---:|---:|---:|---:|---|---|---|",
            ]
            for contender in CONTENDERS:
                for round_name in ROUNDS:
                    cell = cells.get((storage, workload, contender, round_name))
                    if not cell:
                        continue
                    reused = cell["prefix_cache"] + cell["connector"]
                    share = f" ({reused / cell['prompt_tokens']:.0%})" if cell["prompt_tokens"] else ""
                    lines.append(
                        f"| {LABELS[contender]} | {'A: save' if round_name == 'save' else 'B: after restart'} | "
                        f"{_ms(cell['mean_ttft_ms'])} | {_ms(cell['p99_ttft_ms'])} | {_ms(cell['p99_itl_ms'])} | "
                        f"{cell['output_tok_s']:.1f} | {reused:.0f} = {cell['prefix_cache']:.0f} + {cell['connector']:.0f} "
                        f"of {cell['prompt_tokens']:.0f}{share} | "
                        + ", ".join(f"{row['mean_ttft_ms']:.0f}" for row in cell["rows"]) + " | "
                        + ", ".join(f"{row['load_before']:.1f}" for row in cell["rows"]) + " |"
                    )
            lines.append("")
    lines += goals(cells)
    return "\n".join(lines)


def goals(cells: dict[tuple[str, str, str, str], dict[str, Any]]) -> list[str]:
    """Issue #9 §4's goals, for each VUA contender, storage and workload, from the medians."""
    lines = ["| goal | storage | workload | contender | ratio | met? |", "|---|---|---|---|---:|:---:|"]

    def get(storage: str, workload: str, contender: str, round_name: str, metric: str) -> float | None:
        if contender == "fresh":
            # Both rounds of the fresh server do the same work (nothing survives its restart):
            # its baseline is the median of all its runs, as vua bench's recompute baseline.
            rows = [row for r in ROUNDS for row in cells.get((storage, workload, "fresh", r), {}).get("rows", [])]
            return _median([row[metric] for row in rows]) if rows else None
        cell = cells.get((storage, workload, contender, round_name))
        return None if cell is None else cell[metric]

    for contender in ("vua", "vua-async", "fs-tier", "example"):
        for storage in ("local", "gluster"):
            for workload in WORKLOADS:
                checks = []
                ours = get(storage, workload, contender, "restart", "mean_ttft_ms")
                fresh = get(storage, workload, "fresh", "restart", "mean_ttft_ms")
                fs = get(storage, workload, "fs-tier", "restart", "mean_ttft_ms")
                if ours is not None and fresh:
                    checks.append(("restart mean TTFT / fresh server's (all its runs) <= 0.5", ours / fresh, 0.5))
                if ours is not None and fs and contender.startswith("vua"):
                    checks.append(("restart mean TTFT / fs tier's <= 0.9", ours / fs, 0.9))
                saving = get(storage, workload, contender, "save", "mean_ttft_ms")
                fresh_cold = get(storage, workload, "fresh", "save", "mean_ttft_ms")
                if saving is not None and fresh_cold:
                    checks.append(("save round mean TTFT / fresh server's (all its runs) <= 1.05", saving / fresh_cold, 1.05))
                if storage == "gluster":
                    slow = get("gluster", workload, contender, "restart", "p99_itl_ms")
                    fast = get("local", workload, contender, "restart", "p99_itl_ms")
                    if slow is not None and fast:
                        checks.append(("restart p99 ITL, GlusterFS / local disk <= 1.10", slow / fast, 1.10))
                for text, ratio, limit in checks:
                    lines.append(f"| {text} | {storage} | {workload} | {LABELS[contender]} | {ratio:.2f}x | "
                                 f"{'met' if ratio <= limit else 'MISSED'} |")
    return lines


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = aggregate(records)
    panels = [(s, w) for s in ("local", "gluster") for w in WORKLOADS if any(k[0] == s and k[1] == w for k in cells)]
    contenders = [c for c in CONTENDERS if any(k[2] == c for k in cells)]
    colors = {"fresh": "#888888", "example": "#d95f02", "fs-tier": "#7570b3", "vua": "#1b9e77", "vua-async": "#66a61e"}
    figure, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.4), dpi=110, squeeze=False)
    for column, (storage, workload) in enumerate(panels):
        for row, (metric, label) in enumerate((("mean_ttft_ms", "mean TTFT (ms)"), ("p99_itl_ms", "p99 inter-token latency (ms)"))):
            ax = axes[row][column]
            for index, contender in enumerate(contenders):
                for offset, round_name in ((-0.2, "save"), (0.2, "restart")):
                    cell = cells.get((storage, workload, contender, round_name))
                    if not cell:
                        continue
                    ax.bar(index + offset, cell[metric], width=0.38, color=colors[contender],
                           alpha=0.45 if round_name == "save" else 1.0, hatch="//" if round_name == "save" else None,
                           edgecolor="black", linewidth=0.4)
                    for rep_row in cell["rows"]:  # each repetition as a dot
                        ax.plot(index + offset, rep_row[metric], "k.", markersize=3)
            ax.set_xticks(range(len(contenders)), contenders, rotation=30, fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(True, axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(f"{'local disk' if storage == 'local' else 'GlusterFS +1 ms'}\n{workload}", fontsize=9)
    from matplotlib.patches import Patch

    figure.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="//", label="A: save (first server)"),
                           Patch(facecolor="#555555", label="B: after restart (second server)")],
                  loc="upper right", fontsize=8)
    figure.suptitle(title, fontsize=10, x=0.02, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path)
    plt.close(figure)


def write_report(records: list[dict[str, Any]], out: Path, header: str) -> None:
    text = header + "\n\n" + markdown(records) + "\n"
    (out / "serve.md").write_text(text)
    try:
        plot(records, out / "serve.png", "vua-vllm serve on CPU: save round (hatched) and after restart; dots: repetitions")
    except ImportError:
        print("no plot: matplotlib is not installed", file=sys.stderr)
    print("\n" + text, flush=True)


# ---- main ----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--root", help="local store directory (default: a temporary directory under /var/tmp, removed after)")
    parser.add_argument("--gluster", action="store_true", help="also run on a GlusterFS volume with 1 ms per brick operation")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the whole comparison on local disk")
    parser.add_argument("--gluster-reps", type=int, default=1, help="repetitions on GlusterFS (with --gluster)")
    parser.add_argument("--rotate", type=int, default=0, help="start the rotation of contenders at this offset (for later runs)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS))
    parser.add_argument("--model", help="model path (default: vua bench's built-in random-weight Llama)")
    parser.add_argument("--dtype", help="model dtype (default: bfloat16 where the CPU computes it natively, else float32)")
    parser.add_argument("--report", nargs="+", metavar="DIR", help="only rebuild serve.md and serve.png from these results directories")
    workload = parser.add_argument_group("workloads")
    workload.add_argument("--prefix-len", type=int, default=3072)
    workload.add_argument("--suffix-len", type=int, default=128)
    workload.add_argument("--num-prefixes", type=int, default=4)
    workload.add_argument("--num-prompts", type=int, default=16)
    workload.add_argument("--output-len", type=int, default=32)
    workload.add_argument("--concurrency", type=int, default=4, help="requests at a time (prefix_repetition)")
    workload.add_argument("--conversations", type=int, default=4)
    workload.add_argument("--turns", type=int, default=4)
    workload.add_argument("--context-len", type=int, default=2048, help="each conversation's opening context, tokens")
    workload.add_argument("--user-len", type=int, default=64, help="tokens per user message")
    workload.add_argument("--answer-len", type=int, default=32, help="tokens per answer")
    workload.add_argument("--stagger-s", type=float, default=0.5, help="delay between the starts of conversations")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        records = load_records([Path(d) for d in args.report])
        write_report(records, out, f"Rebuilt from {', '.join(args.report)}: {len(records)} workload runs.")
        return 0

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if "vua-async" in contenders and not vua_has_async_loads():
        print("vua-async left out: this checkout's VUA has no async_load_min_tokens setting", flush=True)
        contenders.remove("vua-async")
    model = resolve_model(args.model, BENCH_MODEL)
    max_prompt = max(args.prefix_len + args.suffix_len, args.context_len + args.turns * (args.user_len + args.answer_len))
    # 1.3x: vLLM's front end refuses a text prompt longer than 5 characters per token of
    # max_model_len before tokenizing it, and the built-in tokenizer's words ("w1234") take about
    # 5.5 characters each (vllm bench serve sends text).
    options = engine_options(model, int(max_prompt * 1.3), max(args.output_len, args.answer_len))
    options["enable_prefix_caching"] = True  # every server: the contenders complement vLLM's prefix cache
    # A step's budget holds every running prompt whole: vLLM's ExampleConnector saves a chunked
    # prompt's first chunk under the whole prompt's name, and a later load of it kills the engine
    # ("shape mismatch" in inject_kv_into_layer), which concurrent requests otherwise trigger.
    options["max_num_batched_tokens"] = options["max_num_seqs"] * options["max_model_len"]
    if args.dtype:
        options["dtype"] = args.dtype
    results_path = out / "results.json"
    env = cpu_engine_env()
    header = (
        f"Model {Path(model).name}, {options['dtype']} ({kv_bytes_per_token(model, options['dtype']) // 1024} KiB of KV per token); "
        f"{machine_description()}; engine {options}; VLLM_CPU_NUM_OF_RESERVED_CPU={env['VLLM_CPU_NUM_OF_RESERVED_CPU']}; "
        f"contenders {contenders}; prefix_repetition: prefix {args.prefix_len}, suffix {args.suffix_len}, "
        f"{args.num_prefixes} prefixes, {args.num_prompts} prompts, {args.output_len} output tokens, concurrency {args.concurrency}; "
        f"chat: {args.conversations} conversations x {args.turns} turns, context {args.context_len}, user {args.user_len}, "
        f"answer {args.answer_len} tokens, starts {args.stagger_s} s apart; load average at start {os.getloadavg()[0]:.1f}."
    )
    print(header, flush=True)
    (out / "config.txt").write_text(header + "\n")
    clean_shm()
    began = time.perf_counter()
    local_root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="vua-serve-bench-", dir="/var/tmp"))
    try:
        for rep in range(args.reps):
            # Rotate the order, so that no contender always runs first.
            order = contenders[(rep + args.rotate) % len(contenders):] + contenders[: (rep + args.rotate) % len(contenders)]
            for contender in order:
                root = local_root / f"r{rep}" / contender
                root.mkdir(parents=True, exist_ok=True)
                run_contender(contender, "local", rep, (root, root), model, options, args, out, results_path)
                shutil.rmtree(root, ignore_errors=True)
        if args.gluster and args.gluster_reps > 0:
            glusterfs, glusterd_pid, volume = gluster_volume()
            print(f"GlusterFS volume {volume.name} mounted at {volume.mounts}", flush=True)
            try:
                for rep in range(args.gluster_reps):
                    order = contenders[(rep + args.rotate) % len(contenders):] + contenders[: (rep + args.rotate) % len(contenders)]
                    for contender in order:
                        first, second = volume.root(f"r{rep}-{contender}")
                        run_contender(contender, "gluster", rep, (first, second), model, options, args, out, results_path)
                        shutil.rmtree(first, ignore_errors=True)
            finally:
                glusterfs.destroy(volume.name)  # this process's volume only
                if glusterd_pid is not None:
                    glusterfs.stop_glusterd(glusterd_pid)  # only if no volume of anyone is left on it
    finally:
        if not args.root:
            shutil.rmtree(local_root, ignore_errors=True)
        clean_shm()
    records = load_records([out])
    write_report(records, out, header + f" Total {time.perf_counter() - began:.0f} s; load average at end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
