"""``make demo``: vLLM with the VUA connector, cold store then warm store, in a few minutes on a laptop CPU.

Three fresh engine processes run the same long prompt: without a connector (the baseline),
with VUA on an empty store (it computes the prompt and saves its KV) and with VUA again (a new
process, so the only way to skip the prefill is to load what the previous one saved). It prints
time to first token, tokens reused, bytes and GB/s loaded, and whether all three produced the
same tokens. The store is a temporary directory, removed at the end.

    python -m vua.tools.demo                 # built-in random-weight Llama, 4096-token prompt
    MODEL=/models/llama python -m vua.tools.demo --prompt-tokens 8000
    VUA_DEMO_QUICK=1 python -m vua.tools.demo   # tiny model and prompt (what the test suite runs)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .engine_runner import (
    EngineRunError,
    Phase,
    engine_options,
    kv_bytes_per_token,
    random_prompts,
    resolve_model,
    run_engine,
    summed_stat,
    vua_connector,
)
from .tinymodel import TinyLlamaSpec

__all__ = ["main", "DemoResult"]

# Big enough that a prefill takes visible time on two cores, small enough to build in seconds.
DEMO_MODEL = TinyLlamaSpec(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1536)
QUICK_MODEL = TinyLlamaSpec()


@dataclass
class DemoRow:
    label: str
    ttft_s: float
    reused_tokens: int
    loaded_bytes: int | None = None
    load_seconds: float | None = None


@dataclass
class DemoResult:
    rows: list[DemoRow]
    identical: bool
    output_tokens: int

    def table(self) -> str:
        baseline = self.rows[0].ttft_s
        lines = [
            f"{'run':<34} {'TTFT':>9} {'vs none':>8} {'reused tokens':>14} {'loaded':>10} {'load GB/s':>10}",
        ]
        for row in self.rows:
            loaded = f"{row.loaded_bytes / 1e6:.1f} MB" if row.loaded_bytes else "-"
            rate = f"{row.loaded_bytes / row.load_seconds / 1e9:.2f}" if row.loaded_bytes and row.load_seconds else "-"
            lines.append(
                f"{row.label:<34} {row.ttft_s * 1000:>6.0f} ms {row.ttft_s / baseline:>7.2f}x "
                f"{row.reused_tokens:>14} {loaded:>10} {rate:>10}"
            )
        verdict = "yes" if self.identical else "NO"
        lines.append(f"outputs identical: {verdict} ({self.output_tokens} generated tokens compared across the three runs)")
        return "\n".join(lines)


def _row(label: str, result: dict[str, Any], bytes_per_token: int) -> tuple[DemoRow, list[int]]:
    (request,) = result["phases"]["request"]
    reused = int(request["cached_tokens"])
    # The connector's own byte count when it reports one; else what the reused tokens' KV weighs.
    loaded = int(summed_stat([request], "loaded_bytes")) or (reused * bytes_per_token if reused else None)
    seconds = summed_stat([request], "load_seconds") or None
    return DemoRow(label, request["ttft_s"], reused, loaded, seconds), request["output_ids"]


def run_demo(model: str, prompt_tokens: int, max_tokens: int, chunk_size: int, store_root: Path) -> DemoResult:
    prompt, warmup = random_prompts(model, 2, prompt_tokens, seed=1234)
    # The warm-up prompt (same length, different tokens) takes the first-request costs out of the timing.
    phases = [Phase("warmup", [warmup], max_tokens=1), Phase("request", [prompt], max_tokens=max_tokens)]
    options = engine_options(model, prompt_tokens, max_tokens)
    bytes_per_token = kv_bytes_per_token(model, options["dtype"])
    runs = [
        ("vLLM, no connector (recompute)", None),
        ("vLLM + VUA, cold store (save)", vua_connector(store_root, chunk_size)),
        ("vLLM + VUA, warm store (load)", vua_connector(store_root, chunk_size)),
    ]
    rows, outputs = [], []
    for step, (label, connector) in enumerate(runs, start=1):
        print(f"[{step}/{len(runs)}] {label}: fresh engine process", flush=True)
        began = time.perf_counter()
        result = run_engine(
            model, phases, engine=options, kv_transfer_config=connector, on_progress=lambda m: print("      " + m, flush=True)
        )
        row, output = _row(label, result, bytes_per_token)
        rows.append(row)
        outputs.append(output)
        print(f"      done in {time.perf_counter() - began:.0f} s", flush=True)
    return DemoResult(rows, identical=all(o == outputs[0] for o in outputs), output_tokens=len(outputs[0]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vua.tools.demo", description=__doc__.split("\n\n")[0])
    quick = os.environ.get("VUA_DEMO_QUICK", "") not in ("", "0")
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="local path or hub name (default: built-in random-weight Llama)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length (default 4096; 512 with --quick)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated and compared (default 16; 8 with --quick)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="VUA chunk_size (a multiple of the KV block size, 128)")
    parser.add_argument("--quick", action="store_true", default=quick, help="tiny model and short prompt (also VUA_DEMO_QUICK=1)")
    parser.add_argument("--store", help="store root to use and keep (default: a temporary directory, removed after)")
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or (512 if args.quick else 4096)
    args.max_tokens = args.max_tokens or (8 if args.quick else 16)

    print("VUA demo: building the built-in model" if not args.model else f"VUA demo: model {args.model}", flush=True)
    model = resolve_model(args.model, QUICK_MODEL if args.quick else DEMO_MODEL)
    store_root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="vua-demo-store-"))
    store_root.mkdir(parents=True, exist_ok=True)
    print(f"model {model}\nprompt {args.prompt_tokens} tokens, store {store_root}", flush=True)
    try:
        result = run_demo(model, args.prompt_tokens, args.max_tokens, args.chunk_size, store_root)
    except (EngineRunError, ValueError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.store:
            shutil.rmtree(store_root, ignore_errors=True)
    print()
    print(result.table())
    if not result.identical or result.rows[-1].reused_tokens == 0:
        print("demo FAILED: the warm run must reuse stored tokens and produce the same output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
