"""Run one vLLM engine (CPU build) over a list of prompts and print the results as JSON.

Used by the engine tests as a separate process per engine, so every run
starts from a cold vLLM (and the store is the only thing two runs share). Reads a JSON job
from stdin:

    {"model": dir, "root": dir or null (no connector), "prompts": [[ids...], ...],
     "max_tokens": 4, "block_size": 32, "max_num_batched_tokens": 256, "extra": {...},
     "policy": "recompute", "tp": 1, "between": {"<prompt index>": [["corrupt", root, start]]}}

and prints one line ``RESULT <json>``: per prompt the generated ids, their logprobs, the number
of cached prompt tokens and the time to the first token; and the worker connector's totals.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # In-process engine: the worker connector's counters are then reachable from here.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from vua._engine_runner import vua_connector

    kv_transfer = None
    if job.get("root"):
        extra = dict(job.get("extra", {}))
        config = vua_connector(job["root"], extra.pop("chunk_size"), **extra)
        if job.get("policy"):  # unset: vLLM's default, which the connector turns into "recompute"
            config["kv_load_failure_policy"] = job["policy"]
        kv_transfer = KVTransferConfig(**config)
    llm = LLM(
        model=job["model"],
        dtype="bfloat16",
        block_size=job.get("block_size", 32),
        max_num_batched_tokens=job.get("max_num_batched_tokens", 256),
        max_model_len=job.get("max_model_len", 4096),
        enable_prefix_caching=False,
        enforce_eager=True,
        tensor_parallel_size=job.get("tp", 1),
        kv_transfer_config=kv_transfer,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 4), logprobs=1)
    actions = {int(k): v for k, v in job.get("between", {}).items()}
    results = []
    for index, prompt in enumerate(job["prompts"]):
        batch = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
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
        _flush_saves()
        for action in actions.get(index, []):
            _act(action)
    print("RESULT " + json.dumps({"results": results, "totals": _totals()}), flush=True)


def _worker():
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group()._worker if has_kv_transfer_group() else None


def _flush_saves() -> None:
    worker = _worker()
    if worker is not None:
        worker.flush()


def _totals() -> dict:
    worker = _worker()
    return worker.totals.snapshot() if worker is not None else {}


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
