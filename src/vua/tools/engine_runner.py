"""vLLM engines in child processes, driven request by request, reporting timings and outputs.

The demo and ``vua bench`` run each configuration (no connector, VUA, vLLM's ExampleConnector)
in its own engine process, so that nothing is shared between them except what a connector puts
on storage. The parent sends phases (lists of prompts) on the child's stdin as JSON lines; the
child runs each prompt as one request through ``LLMEngine.step`` and writes a result file per
phase, one row per prompt::

    {"ttft_s": 2.3, "seconds": 2.4, "cached_tokens": 2944, "prompt_tokens": 3072,
     "output_ids": [...], "logprobs": [...], "connector_stats": [{...}, ...]}

``ttft_s`` runs from adding the request to the first step output that holds a token;
``logprobs`` is the logprob of each generated token; ``cached_tokens`` is vLLM's ``num_cached_tokens`` (tokens not computed: prefix-cache or
connector hits) and ``connector_stats`` are the KV connector stats vLLM reported while the
request ran. The child's own output (vLLM logs) goes to a log file; its progress lines and
events come back on a pipe of their own.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "EngineRunError",
    "Phase",
    "run_engine",
    "EngineProcess",
    "cpu_engine_env",
    "engine_options",
    "vua_connector",
    "example_connector",
    "resolve_model",
    "random_prompts",
    "kv_bytes_per_token",
    "cpu_dtype",
    "summed_stat",
]



class EngineRunError(RuntimeError):
    """The engine child process failed; the message carries the tail of its log."""


@dataclass
class Phase:
    """A list of prompts sent one request at a time, in order."""

    name: str
    prompts: Sequence[Sequence[int]]
    max_tokens: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prompts": [list(map(int, p)) for p in self.prompts], "max_tokens": self.max_tokens}


def cpu_engine_env(reserved_cpus: int = 1) -> dict[str, str]:
    """Environment for a CPU engine whose core layout does not depend on whether a connector is set.

    vLLM reserves one more core for the engine when a KV connector is configured; on a small
    machine that halves the cores left for the model, so runs with and without a connector would
    not compare like with like. Pinning the reservation makes every run use the same layout.
    """
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved_cpus))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def engine_options(model: str, max_prompt_tokens: int, max_tokens: int, block_size: int = 128) -> dict[str, Any]:
    """Engine settings shared by every run, so that only the connector differs.

    Prefix caching is off (only the connector may reuse KV) and one step holds a whole prompt:
    vLLM's ExampleConnector saves only the first chunk of a chunked prefill yet later claims the
    whole prompt, so it needs ``max_num_batched_tokens`` at least the prompt length. The KV
    cache gets an explicit size: vLLM's CPU default reserves 92% of a memory node and refuses to
    start when other processes hold some of it.
    """
    max_len = -(-(max_prompt_tokens + max_tokens + 1) // block_size) * block_size
    import torch

    dtype = "auto" if torch.cuda.is_available() else cpu_dtype()
    return {
        "dtype": dtype,
        "kv_cache_memory_bytes": max(1 << 30, 4 * max_len * kv_bytes_per_token(model, dtype)),
        "block_size": block_size,
        "max_model_len": max_len,
        "max_num_batched_tokens": max_len,
        "max_num_seqs": 4,
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }


def vua_connector(root: str | os.PathLike[str], chunk_size: int, **settings: Any) -> dict[str, Any]:
    """``KVTransferConfig`` keywords for VUA's V1 connector on ``root`` (``settings``: more connector keys)."""
    return {
        "kv_connector": "VUAStorageConnector_V1",
        "kv_connector_module_path": "vua.vllm.kv_connector_v1",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(root), "chunk_size": chunk_size, **settings},
    }


def example_connector(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``KVTransferConfig`` keywords for vLLM's own ExampleConnector (one file per layer and prompt) on ``root``."""
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": str(root)}}


def resolve_model(model: str | None, spec: Any = None) -> str:
    """``model`` as given (a local path or hub name), or the built-in random-weight Llama for ``spec``."""
    if model:
        return model
    from .tinymodel import TinyLlamaSpec, build_tiny_llama

    return str(build_tiny_llama(spec or TinyLlamaSpec()))


def _model_config(model: str) -> dict[str, Any]:
    """The model's config (its text part for multimodal models); ValueError if it lacks what is needed here."""
    local = Path(model, "config.json")
    if local.exists():
        config = json.loads(local.read_text())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model).to_dict()
    config = config.get("text_config", config)
    missing = [key for key in ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size") if key not in config]
    if missing:
        raise ValueError(f"model {model}: its config has no {', '.join(missing)}; is it a decoder-only language model?")
    return config


def random_prompts(model: str, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids drawn from the model's vocabulary, reproducibly.

    Random ids share no prefix with each other, so a hit can only come from the same prompt.
    """
    import random

    vocab = int(_model_config(model)["vocab_size"])
    rng = random.Random(seed)
    # Low ids are special tokens (padding, BOS, EOS) in most vocabularies; leave them out.
    low = min(16, vocab // 2)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


def cpu_dtype() -> str:
    """The dtype vLLM's CPU build runs fast here: bfloat16 where the CPU computes it natively
    (AVX512-BF16 or AMX), else float32. Without native bf16 every bf16 matmul is emulated: the
    built-in model's 4096-token prefill took 27.6 s on a 2-core AVX2-only EPYC, several times
    its float32 time."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def kv_bytes_per_token(model: str, dtype: str | None = None) -> int:
    """Bytes of K and V per token across all layers, in ``dtype`` (default: the model's)."""
    config = _model_config(model)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    if dtype in (None, "auto"):
        dtype = str(config.get("torch_dtype") or config.get("dtype"))
    itemsize = 4 if dtype == "float32" else 2
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * itemsize


def summed_stat(rows: Sequence[dict[str, Any]], key: str) -> float:
    """``key`` summed over the connector stats of result ``rows`` (0 where the connector reports none)."""
    return sum(float(s.get(key, 0) or 0) for row in rows for s in row.get("connector_stats", ()) if isinstance(s, dict))


class EngineProcess:
    """One vLLM engine in a child process, kept running between phases.

    Several can be open at once, so that a benchmark alternates its contenders request by
    request: load from other processes on the machine then hits them all alike. An idle engine
    waits on its input and costs no CPU.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        engine: dict[str, Any] | None = None,
        kv_transfer_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="vua-engine-")
        job_path = Path(self._scratch.name, "job.json")
        job_path.write_text(json.dumps({"model": str(model), "engine": engine or {}, "kv_transfer_config": kv_transfer_config}))
        self._log_path = Path(log_path) if log_path else Path(self._scratch.name, "engine.log")
        self._log = open(self._log_path, "a")
        self._on_progress = on_progress
        self._events: queue.Queue[str | None] = queue.Queue()
        self._requests = 0
        self.startup_s: float | None = None
        # Progress and events come on a pipe of their own: vLLM's processes share stdout and
        # their writes can land in the middle of a line.
        events_read, events_write = os.pipe()
        # A session of its own, so that a kill reaches vLLM's engine-core and worker processes too.
        self._child = subprocess.Popen(
            [sys.executable, "-m", "vua.tools.engine_runner", str(job_path), str(events_write)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, text=True,
            env=env or cpu_engine_env(), start_new_session=True, pass_fds=(events_write,),
        )
        os.close(events_write)
        self._reader = threading.Thread(target=self._read_events, args=(events_read,), daemon=True)
        self._reader.start()

    def _read_events(self, fd: int) -> None:
        with open(fd) as events:
            for line in events:
                kind, _, text = line.rstrip("\n").partition(" ")
                if kind == "progress":
                    if self._on_progress:
                        self._on_progress(text)
                else:
                    self._events.put(line.strip())
        self._events.put(None)  # the child is gone

    def _wait_for(self, event: str, timeout_s: float) -> None:
        try:
            got = self._events.get(timeout=timeout_s)
        except queue.Empty:
            got = None
        if got != event:
            self.close(kill=True, keep_log=True)
            tail = "".join(self._log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
            self._scratch.cleanup()
            raise EngineRunError(f"vLLM engine failed (waiting for {event!r}); last lines of its log:\n{tail}")

    def wait_ready(self, timeout_s: float = 900) -> float:
        """Block until the engine has loaded the model; returns its start-up time in seconds."""
        if self.startup_s is None:
            self._wait_for("ready", timeout_s)
            self.startup_s = float(json.loads(Path(self._scratch.name, "ready.json").read_text())["startup_s"])
        return self.startup_s

    def run(self, phase: Phase, timeout_s: float = 1800) -> list[dict[str, Any]]:
        """Send ``phase``'s prompts one request at a time; one result dict per prompt."""
        self.wait_ready()
        self._requests += 1
        result_path = Path(self._scratch.name, f"result-{self._requests}.json")
        command = dict(phase.to_json(), result_path=str(result_path), id=str(self._requests))
        assert self._child.stdin is not None
        self._child.stdin.write(json.dumps(command) + "\n")
        self._child.stdin.flush()
        self._wait_for(f"done {self._requests}", timeout_s)
        return json.loads(result_path.read_text())

    def close(self, kill: bool = False, timeout_s: float = 120, keep_log: bool = False) -> None:
        """Shut the engine down (gracefully, so that background saves finish) and remove its scratch files."""
        if self._child.poll() is None:
            try:
                if not kill and self._child.stdin:
                    self._child.stdin.close()  # end of input: the child shuts its engine down
                self._child.wait(timeout=0 if kill else timeout_s)
            except (subprocess.TimeoutExpired, OSError):
                pass
            if self._child.poll() is None:
                os.killpg(self._child.pid, signal.SIGKILL)
                self._child.wait()
        self._reader.join(timeout=10)
        self._log.close()
        if not keep_log:
            self._scratch.cleanup()

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(kill=exc[0] is not None)


def run_engine(model: str | os.PathLike[str], phases: Sequence[Phase], **options: Any) -> dict[str, Any]:
    """Start one engine, run ``phases`` in order, shut it down; ``{"startup_s", "phases": {name: rows}}``.

    Keywords are those of :class:`EngineProcess`. Raises :class:`EngineRunError` if the engine fails.
    """
    with EngineProcess(model, **options) as engine:
        startup = engine.wait_ready()
        return {"startup_s": startup, "phases": {phase.name: engine.run(phase) for phase in phases}}


def _child(job_path: str, events_fd: int) -> None:
    events = open(events_fd, "w", buffering=1)

    def _progress(message: str) -> None:
        events.write(f"progress {message}\n")

    job = json.loads(Path(job_path).read_text())
    began = time.perf_counter()
    _progress("starting vLLM engine (loading the model; this takes a while on CPU)")
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.v1.metrics.loggers import StatLoggerBase

    connector_stats: list[dict[str, Any]] = []

    class ConnectorStatsRecorder(StatLoggerBase):
        """Keeps the KV connector stats vLLM hands its stat loggers (one dict per engine step)."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            stats = getattr(scheduler_stats, "kv_connector_stats", None)
            if stats:
                connector_stats.append(stats)

        def log_engine_initialized(self) -> None:
            pass

    options = dict(job["engine"], disable_log_stats=False)
    if job["kv_transfer_config"]:
        options["kv_transfer_config"] = KVTransferConfig(**job["kv_transfer_config"])
    engine = LLMEngine.from_engine_args(EngineArgs(model=job["model"], **options), stat_loggers=[ConnectorStatsRecorder])
    startup = time.perf_counter() - began
    Path(job_path).with_name("ready.json").write_text(json.dumps({"startup_s": startup}))
    _progress(f"engine ready in {startup:.0f} s")
    events.write("ready\n")
    for line in sys.stdin:
        command = json.loads(line)
        # logprobs=1: the logprob of each generated token, to measure how far a connector's
        # outputs are from a recompute's, not only whether the greedy tokens match.
        params = SamplingParams(max_tokens=command["max_tokens"], temperature=0.0, ignore_eos=True, logprobs=1)
        rows = []
        for index, prompt in enumerate(command["prompts"]):
            row = _one_request(engine, f"{command['name']}-{command['id']}-{index}", prompt, params, connector_stats)
            rows.append(row)
            _progress(
                f"{command['name']}: {len(prompt)} tokens, first token after {row['ttft_s']:.2f} s, "
                f"{row['cached_tokens']} reused"
            )
        Path(command["result_path"]).write_text(json.dumps(_json_safe(rows), default=str))
        events.write(f"done {command['id']}\n")
    # A graceful shutdown lets the connector finish background saves before its process goes.
    engine.engine_core.shutdown()


def _json_safe(value: Any) -> Any:
    """``value`` with every dict key a string (some connectors' stats are keyed by tuples)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _one_request(engine: Any, request_id: str, prompt: Sequence[int], params: Any, connector_stats: list) -> dict[str, Any]:
    """Run one request alone; time to first token is measured here, at the first output holding a token."""
    connector_stats.clear()
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
    first_token_at = None
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if first_token_at is None and output.outputs and output.outputs[0].token_ids:
                first_token_at = time.perf_counter()
            if output.finished:
                final = output
    end = time.perf_counter()
    assert final is not None, f"request {request_id} did not finish"
    completion = final.outputs[0]
    logprobs = [
        float(step[token].logprob) if step and token in step else None
        for token, step in zip(completion.token_ids, completion.logprobs or [])
    ]
    return {
        "ttft_s": (first_token_at or end) - start,
        "seconds": end - start,
        "cached_tokens": final.num_cached_tokens or 0,
        "prompt_tokens": len(prompt),
        "output_ids": list(completion.token_ids),
        "logprobs": logprobs,
        "connector_stats": list(connector_stats),
    }


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
