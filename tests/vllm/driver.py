"""Run one vLLM engine (CPU build) over a list of prompts and print the results as JSON.

Used by the engine tests as a separate process per engine, so every run
starts from a cold vLLM (and the store is the only thing two runs share). Reads a JSON job
from stdin:

    {"model": dir, "root": dir or null (no connector), "prompts": [...],
     "max_tokens": 4, "ignore_eos": false, "block_size": 32, "max_num_batched_tokens": 256, "extra": {...},
     "dtype": "float32", "policy": "recompute", "tp": 1, "prefix_caching": false,
     "async_scheduling": null, "force_async_scheduling": false, "speculative_config": null,
     "enable_lora": false, "enable_prompt_embeds": false,
     "between": {"<prompt index>": [["corrupt", root, start], ["signal", pid, "STOP"], ["sleep", 2.5]]}}

``between`` runs actions after a prompt: damage a stored chunk (see ``_act``), freeze (``STOP``)
or thaw (``CONT``) a process such as a storage server (while frozen, the driver does not wait
for saves, which wait on that storage), or sleep.

A prompt is a list of token ids, a list of prompts (sent as one batch, one ``generate`` call) or
a dict ``{"ids": [...], "salt": str, "lora": adapter dir, "embeds": true}``: ``salt`` is the
request's ``cache_salt``, ``lora`` runs it with that LoRA adapter, ``embeds`` sends the ids as
``prompt_embeds`` (rows of the model's embedding table) instead of ids.

Prints one line ``RESULT <json>``: per prompt the generated ids, their logprobs, the number
of cached prompt tokens and the time to the first token; the worker connector's totals
(summed over ranks, read in the workers); the settings the engine really used; and vLLM's
speculative decoding counters.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # collective_rpc sends a function to the workers; through a separate engine-core process
    # (VLLM_ENABLE_V1_MULTIPROCESSING=1) vLLM pickles it only when allowed to.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from vua.tools.engine_runner import vua_connector

    if job.get("force_async_scheduling"):
        _keep_async_scheduling()
    kv_transfer = None
    if job.get("root"):
        extra = dict(job.get("extra", {}))
        config = vua_connector(job["root"], extra.pop("chunk_size"), **extra)
        if job.get("policy"):  # unset: vLLM's default, which the connector turns into "recompute"
            config["kv_load_failure_policy"] = job["policy"]
        kv_transfer = KVTransferConfig(**config)
    options = {}
    for key in ("async_scheduling", "speculative_config"):
        if job.get(key) is not None:
            options[key] = job[key]
    if job.get("enable_lora"):
        options.update(enable_lora=True, max_lora_rank=job.get("max_lora_rank", 8), max_loras=1)
    if job.get("enable_prompt_embeds"):
        options["enable_prompt_embeds"] = True
    dtype = job.get("dtype", "float32")
    llm = LLM(
        model=job["model"],
        # float32 by default: bf16 is slow on CPUs without native bf16 and rounds differently
        # from one CPU kind to another.
        dtype=dtype,
        block_size=job.get("block_size", 32),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 256),
        max_model_len=job.get("max_model_len", 4096),
        enable_prefix_caching=job.get("prefix_caching", False),
        enforce_eager=True,
        tensor_parallel_size=job.get("tp", 1),
        kv_transfer_config=kv_transfer,
        disable_log_stats=False,
        seed=0,
        **options,
    )
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 4), logprobs=1,
                            ignore_eos=job.get("ignore_eos", False))
    actions = {int(k): v for k, v in job.get("between", {}).items()}
    frozen = False
    embedding = _embedding_table(job["model"], dtype) if job.get("enable_prompt_embeds") else None
    results = []
    for index, prompt in enumerate(job["prompts"]):
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        inputs, loras = zip(*(_request(p, embedding) for p in batch))
        started = time.perf_counter()
        outputs = llm.generate(list(inputs), params, use_tqdm=False,
                               lora_request=list(loras) if any(loras) else None)
        elapsed = time.perf_counter() - started
        for output in outputs:
            completion = output.outputs[0]
            results.append(
                {
                    "tokens": list(completion.token_ids),
                    "logprobs": [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)],
                    "cached": output.num_cached_tokens,
                    "seconds": elapsed,
                }
            )
        if not frozen:  # saves wait in the background while storage is frozen: nothing to wait for
            _flush_saves(llm)
        for action in actions.get(index, []):
            if action[0] == "signal":  # ["signal", pid, "STOP" | "CONT"]: freeze or thaw a process (a server)
                os.kill(int(action[1]), getattr(signal, f"SIG{action[2]}"))
                frozen = action[2] == "STOP"
            elif action[0] == "sleep":
                time.sleep(float(action[1]))
            else:
                _act(action)
    config = llm.llm_engine.vllm_config
    used = {
        "dtype": str(config.model_config.dtype).removeprefix("torch."),
        "async_scheduling": bool(config.scheduler_config.async_scheduling),
        "prefix_caching": bool(config.cache_config.enable_prefix_caching),
        "speculative": config.speculative_config.method if config.speculative_config else None,
        "platform_chose": _PLATFORM_SET,
    }
    print("RESULT " + json.dumps({"results": results, "totals": _totals(llm), "used": used,
                                  "spec": _spec_counters(llm),
                                  "scheduler": _scheduler_totals(llm)}), flush=True)


def _request(prompt, embedding):
    """(vLLM prompt, LoRARequest or None) for one prompt of the job."""
    if not isinstance(prompt, dict):
        return {"prompt_token_ids": prompt}, None
    if prompt.get("embeds"):
        import torch

        request = {"prompt_embeds": embedding[torch.tensor(prompt["ids"])]}
    else:
        request = {"prompt_token_ids": prompt["ids"]}
    if prompt.get("salt") is not None:
        request["cache_salt"] = prompt["salt"]
    lora = None
    if prompt.get("lora"):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, prompt["lora"])
    return request, lora


def _embedding_table(model: str, dtype: str):
    import torch
    from safetensors.torch import load_file

    weights = load_file(os.path.join(model, "model.safetensors"))
    return weights["model.embed_tokens.weight"].to(getattr(torch, dtype))


_PLATFORM_SET: dict = {}  # what the platform chose where the driver overrode it


def _keep_async_scheduling() -> None:
    """Undo vllm-cpu's silent ``async_scheduling = False`` (platforms/cpu.py: "not required on CPU")."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    original = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        asked = vllm_config.scheduler_config.async_scheduling
        original(cls, vllm_config)
        _PLATFORM_SET["async_scheduling"] = vllm_config.scheduler_config.async_scheduling
        vllm_config.scheduler_config.async_scheduling = asked

    platform.check_and_update_config = classmethod(check_and_update_config)


# ---- run in every worker through LLM.collective_rpc, so that it also reaches worker processes ----


def _connector_worker():
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return getattr(get_kv_transfer_group(), "_worker", None) if has_kv_transfer_group() else None


def _rpc_flush(_worker) -> bool:
    side = _connector_worker()
    if side is None:
        return False
    side.flush()
    return True


def _rpc_totals(_worker) -> dict | None:
    side = _connector_worker()
    return side.totals.snapshot() if side is not None else None


def _flush_saves(llm) -> None:
    """Wait until every rank's connector has written what it queued.

    A finished request's last whole blocks are saved in the engine step after it finished
    (vLLM holds its blocks until then). A serving engine core runs that step at once; the
    in-process engine of ``LLM`` (VLLM_ENABLE_V1_MULTIPROCESSING=0) steps only inside
    ``generate``, so it is stepped here as the next ``generate`` would, with nothing to run."""
    from vllm.v1.engine.core_client import InprocClient

    if isinstance(llm.llm_engine.engine_core, InprocClient):
        llm.llm_engine.engine_core.get_output()
    llm.collective_rpc(_rpc_flush)


def _totals(llm) -> dict:
    per_rank = [t for t in llm.collective_rpc(_rpc_totals) if t is not None]
    # Counters add up over ranks; observations (lists, such as lookup_seconds) are joined.
    totals = {key: sum((t[key] for t in per_rank), [] if isinstance(per_rank[0][key], list) else 0)
              for key in per_rank[0]} if per_rank else {}
    if per_rank:
        totals["ranks"] = len(per_rank)
    return totals


def _scheduler_totals(llm) -> dict | None:
    """The scheduler half's counts since start-up (lookups, hits, asynchronous loads), where the
    engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the driver's default)."""
    from vllm.v1.engine.core_client import InprocClient

    client = llm.llm_engine.engine_core
    if not isinstance(client, InprocClient):
        return None
    connector = client.engine_core.scheduler.connector
    side = getattr(connector, "_scheduler", None)
    return side.totals.snapshot() if side is not None else None


def _spec_counters(llm) -> dict:
    counters = {}
    try:
        metrics = llm.get_metrics()
    except Exception as error:  # stats off, or an older vLLM
        return {"error": repr(error)}
    for metric in metrics:
        if metric.name.startswith("vllm:spec_decode") and hasattr(metric, "value"):
            counters[metric.name] = counters.get(metric.name, 0) + metric.value
    return counters


def _act(action: list) -> None:
    """Test hooks run between prompts, on every full-chunk fragment under ``root`` whose first token
    is ``start``. ["corrupt", root, start]: flip the last bytes (the data of the last layer).
    ["damage_kv", root, start]: flip every byte of the first layer's KV, which every later layer's
    KV (and every later chunk's) is computed from; header and token ids stay intact."""
    from pathlib import Path

    from vua.serdes import decode_header, decode_header_length

    kind, root, start = action
    if kind not in ("corrupt", "damage_kv"):
        raise ValueError(f"unknown action {kind!r}")
    for path in sorted(Path(root).rglob("*.safetensors")):
        if "tails" in path.parts:
            continue
        data = path.read_bytes()
        header = decode_header(data[: 8 + decode_header_length(data, len(data))], len(data))
        if header.metadata.get("vua_start") != str(start):
            continue
        if kind == "corrupt":
            begin, end = len(data) - 64, len(data)
        else:
            first_layer = next(e for e in header.entries if e.name != "tokens")
            begin, end = header.data_start + first_layer.begin, header.data_start + first_layer.end
        with open(path, "r+b") as handle:
            handle.seek(begin)
            handle.write(bytes(b ^ 0xFF for b in data[begin:end]))
        print(f"{kind}: {path}", file=sys.stderr)

if __name__ == "__main__":
    main()
