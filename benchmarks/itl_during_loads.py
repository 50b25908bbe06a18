"""Inter-token latency of decoding requests while other requests load long prefixes: sync vs async loads.

Issue #9 asks that a slow or cold store never stall the engine: a request that loads a long
prefix should not hold up the requests that are decoding. This runs one vLLM engine per mode,
each a fresh process on the same store:

* three *decoders* (128-token prompts, 400 generated tokens each) start first;
* at their 30th, 60th and 90th decode step a *loader* arrives: a prompt (8192 tokens, or
  ``--loader-tokens``) whose KV is
  stored (max_tokens 1), read from a cold page cache (every store file, and with ``--gluster``
  the brick's files too, are dropped from it with POSIX_FADV_DONTNEED before each run);
* the inter-token latency (ITL) of the decoders is taken over their decode steps 30..150.

Modes: ``none`` (no loaders: the decoders' own ITL), ``recompute`` (the loaders' prefixes are
not stored: vLLM computes them, in chunked prefill), ``sync`` (every claim loads in the step
that computes the rest, layer by layer) and ``async`` (every claim loads asynchronously; the
loader waits, the decoders run). Each mode runs ``--repeats`` times, interleaved; the report
gives medians over runs of each run's p50/p99/max ITL and the loaders' TTFT.

    python benchmarks/itl_during_loads.py --out itl-local            # store in a temp dir on local disk
    python benchmarks/itl_during_loads.py --gluster --out itl-gluster   # a GlusterFS volume, 1 ms per operation

Results and the commands that produced them are in doc/benchmarks.md ("Asynchronous loads").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vua.tools.bench import BENCH_MODEL
from vua.tools.engine_runner import cpu_engine_env, engine_options, random_prompts, resolve_model, vua_connector

MODES = ("none", "recompute", "sync", "async")
LOADER_TOKENS = 8192
DECODER_TOKENS = 128
DECODE_STEPS = 400
ARRIVALS = (30, 60, 90)  # decode steps of the first decoder at which a loader arrives
WINDOW = (30, 150)  # decode steps over which ITL is taken
CHUNK = 2048  # = max_num_batched_tokens: chunked prefill, as served
NEVER = 1 << 30  # async_load_min_tokens that no claim reaches


def drop_page_cache(*roots: Path) -> int:
    """Evict every file under ``roots`` from the page cache (clean pages only: the store is flushed)."""
    dropped = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    dropped += 1
                finally:
                    os.close(fd)
    return dropped


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(job), capture_output=True, text=True,
                          env=cpu_engine_env(), timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"engine run failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One engine: store the loaders' prompts (``job["store"]``), or run the decoders with loaders arriving."""
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.config import KVTransferConfig

    options = engine_options(job["model"], job["loader_tokens"], 1)
    options.update(max_num_batched_tokens=CHUNK, max_num_seqs=8, kv_cache_memory_bytes=2 << 30,
                   max_model_len=max(job["loader_tokens"], DECODER_TOKENS + DECODE_STEPS) + 128)
    extra = {"async_load_min_tokens": 0 if job["mode"] == "async" else NEVER}
    options["kv_transfer_config"] = KVTransferConfig(**vua_connector(job["root"], CHUNK, **extra))
    engine = LLMEngine.from_engine_args(EngineArgs(model=job["model"], **options))
    loaders, decoders = job["loaders"], job["decoders"]
    if job["store"]:
        for index, prompt in enumerate(loaders):
            engine.add_request(f"store-{index}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
            while engine.has_unfinished_requests():
                engine.step()
        engine.engine_core.shutdown()  # waits for the background writes
        return {}
    decode = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(decoders):
        engine.add_request(f"decoder-{index}", {"prompt_token_ids": prompt}, decode)
    token_times: dict[str, list[float]] = {f"decoder-{i}": [] for i in range(len(decoders))}
    added: dict[str, float] = {}
    first_token: dict[str, float] = {}
    cached: dict[str, int] = {}
    arrivals = [] if job["mode"] == "none" else list(ARRIVALS)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            rid = output.request_id
            if rid in token_times:
                while len(token_times[rid]) < len(output.outputs[0].token_ids):
                    token_times[rid].append(now)
            elif rid not in first_token and output.outputs[0].token_ids:
                first_token[rid] = now
                cached[rid] = output.num_cached_tokens or 0
        steps = len(token_times["decoder-0"]) - 1  # decode steps after the first token
        if arrivals and steps >= arrivals[0]:
            arrivals.pop(0)
            rid = f"loader-{len(added)}"
            added[rid] = time.perf_counter()
            engine.add_request(rid, {"prompt_token_ids": loaders[len(added) - 1]}, SamplingParams(max_tokens=1))
    engine.engine_core.shutdown()
    gaps = [b - a for times in token_times.values() for a, b in zip(times[WINDOW[0]:WINDOW[1]], times[WINDOW[0] + 1:WINDOW[1] + 1])]
    return {
        "itl_ms": [1e3 * g for g in gaps],
        "loader_ttft_ms": [1e3 * (first_token[rid] - added[rid]) for rid in added],
        "loader_cached": [cached[rid] for rid in added],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over runs of each run's ITL percentiles, mean loader TTFT and tokens reused."""
    rows = [
        {"p50": _percentile(r["itl_ms"], 0.5), "p99": _percentile(r["itl_ms"], 0.99), "max": max(r["itl_ms"]),
         "ttft": statistics.mean(r["loader_ttft_ms"]) if r["loader_ttft_ms"] else float("nan"),
         "cached": statistics.mean(r["loader_cached"]) if r["loader_cached"] else 0.0}
        for r in runs
    ]
    return {k: statistics.median(row[k] for row in rows) for k in ("p50", "p99", "max", "ttft", "cached")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required="--child" not in (argv or sys.argv))
    parser.add_argument("--root", type=Path, help="store directory (default: a temp dir on local disk)")
    parser.add_argument("--gluster", action="store_true", help="a GlusterFS volume with 1 ms per operation (root)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--loader-tokens", type=int, default=LOADER_TOKENS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.load(sys.stdin))), flush=True)
        return 0
    model = resolve_model(None, BENCH_MODEL)
    loaders = random_prompts(model, len(ARRIVALS), args.loader_tokens, seed=91)
    decoders = random_prompts(model, 3, DECODER_TOKENS, seed=92)
    volume = None
    with tempfile.TemporaryDirectory() as scratch:
        if args.gluster:
            sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "multinode"))
            import glusterfs

            glusterfs.ensure_installed()
            glusterfs.ensure_glusterd()
            options = {**glusterfs.NO_CLIENT_CACHE, "debug.delay-gen": "posix", "delay-gen.delay-percentage": "100",
                       "delay-gen.delay-duration": "1000",
                       "delay-gen.enable": "LOOKUP,STAT,FSTAT,OPEN,READ,READDIRP,READDIR,CREATE,WRITE,LINK"}
            volume = glusterfs.create("itl", 1, options)
            root, cold = volume.mounts[0], [volume.mounts[0], volume.brick]
        else:
            root = args.root or Path(scratch)
            cold = [root]
        try:
            base = {"model": model, "loaders": loaders, "decoders": decoders, "loader_tokens": args.loader_tokens}
            started = time.perf_counter()
            run_child({**base, "mode": "sync", "root": str(root), "store": True})
            print(f"stored {len(loaders)} x {args.loader_tokens} tokens in {time.perf_counter() - started:.0f} s", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes.split(",")}
            for repeat in range(args.repeats):
                for mode in runs:
                    dropped = drop_page_cache(*cold)
                    where = tempfile.mkdtemp(dir=scratch) if mode == "recompute" else root  # nothing stored
                    result = run_child({**base, "mode": mode, "root": str(where), "store": False})
                    runs[mode].append(result)
                    s = summarize([result])
                    print(f"run {repeat} {mode:9s}: ITL p50 {s['p50']:.1f} p99 {s['p99']:.1f} max {s['max']:.1f} ms; "
                          f"loader TTFT {s['ttft']:.0f} ms, reused {s['cached']:.0f} (dropped {dropped} files)", flush=True)
        finally:
            if volume is not None:
                glusterfs.destroy(volume.name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "itl.json").write_text(json.dumps(runs))
    summary = {mode: summarize(mode_runs) for mode, mode_runs in runs.items()}
    lines = ["| mode | decoders' ITL p50 (ms) | p99 (ms) | max (ms) | p99 / none | loaders' TTFT (ms) | tokens reused |",
             "|---|---|---|---|---|---|---|"]
    none_p99 = summary.get("none", {}).get("p99", float("nan"))
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['p50']:.1f} | {s['p99']:.1f} | {s['max']:.1f} | {s['p99'] / none_p99:.2f}x | "
                     f"{s['ttft']:.0f} | {s['cached']:.0f} |")
    table = "\n".join(lines)
    (args.out / "itl.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
