"""``vua bench``: time to first token with vLLM, side by side: recompute, vLLM's ExampleConnector, VUA.

One engine process per system, all running at once, with the same model, engine settings, core
layout and prompts; every request goes to each system in turn (rotating who goes first). For
each prompt length: one warm-up prompt, then ``--requests`` prompts the engines have not seen
(*cold*: the connectors compute and save them), then the same prompts again (*warm*: the
connectors load them). Prefix caching is off, so only a connector can skip work. Ratios are
to the median of all recompute requests (its cold and warm requests do the same work). Reports
medians, ratios to recompute, the tokens reused, load GB/s (VUA's connector stats) and whether
every output matches recompute; writes ``bench.md``, ``bench.json`` and ``bench.png``.

    python -m vua.tools.bench --lengths 1024,2048,4096,8192 --requests 3 --out bench-results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .engine_runner import (
    EngineProcess,
    Phase,
    cpu_engine_env,
    engine_options,
    example_connector,
    kv_bytes_per_token,
    random_prompts,
    resolve_model,
    summed_stat,
    vua_connector,
)
from .tinymodel import TinyLlamaSpec

__all__ = ["main", "add_arguments", "run", "BENCH_MODEL", "SYSTEMS"]

# 8 layers of width 512: a 3K-token prefill costs about a second on two cores.
BENCH_MODEL = TinyLlamaSpec(layers=8, hidden=512, heads=8, kv_heads=8, intermediate=1536)
SYSTEMS = ("recompute", "example", "vua")
_LABELS = {"recompute": "recompute (no connector)", "example": "vLLM ExampleConnector", "vua": "VUA"}
_MAX_TOKENS = 4
# vLLM's processes busy-poll their shared-memory queues for 1 s after the last message before
# they sleep; on a small machine that would steal the cores of the next engine's request.
_SETTLE_S = 1.5


@dataclass
class Cell:
    """One system at one prompt length (times in seconds, medians over the requests)."""

    system: str
    prompt_tokens: int
    cold_ttft_s: float
    warm_ttft_s: float
    all_ttft_s: float  # cold and warm requests together: for recompute they are the same work
    reused_tokens: int
    load_gb_s: float | None
    identical: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local path or hub name (default: built-in random-weight Llama, 8 layers x 512)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--requests", type=int, default=3, help="cold and warm requests per length (medians are reported)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="VUA chunk_size (a multiple of the KV block size, 128)")
    parser.add_argument(
        "--whole-block-claims", action="store_true",
        help="VUA with claim_whole_blocks true: claims end on a KV-block boundary (bit-identical, slower at block-aligned lengths)",
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"which of {','.join(SYSTEMS)} to run")
    parser.add_argument("--root", help="storage root (default: a temporary directory, removed after)")
    parser.add_argument("--out", default="vua-bench", help="directory for bench.md, bench.json, bench.png")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _system_cell(system: str, length: int, result: dict[str, Any], baseline_outputs: list[list[int]] | None) -> Cell:
    phases = result["phases"]
    cold, warm = phases[f"cold-{length}"], phases[f"warm-{length}"]
    loaded, seconds = summed_stat(warm, "loaded_bytes"), summed_stat(warm, "load_seconds")
    outputs = [row["output_ids"] for row in cold + warm]
    expected = baseline_outputs if baseline_outputs is not None else [row["output_ids"] for row in cold]
    return Cell(
        system=system,
        prompt_tokens=length,
        cold_ttft_s=_median([row["ttft_s"] for row in cold]),
        warm_ttft_s=_median([row["ttft_s"] for row in warm]),
        all_ttft_s=_median([row["ttft_s"] for row in cold + warm]),
        reused_tokens=int(_median([row["cached_tokens"] for row in warm])),
        load_gb_s=loaded / seconds / 1e9 if loaded and seconds else None,
        identical=outputs == expected + expected,
    )


def _markdown(cells: list[Cell], lengths: Sequence[int]) -> str:
    by_key = {(c.system, c.prompt_tokens): c for c in cells}
    lines = [
        "| prompt tokens | system | cold TTFT | warm TTFT | warm / recompute | cold / recompute | tokens reused | load GB/s | outputs = recompute |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for length in lengths:
        baseline = by_key.get(("recompute", length))
        for system in SYSTEMS:
            cell = by_key.get((system, length))
            if cell is None:
                continue
            warm_ratio = f"{cell.warm_ttft_s / baseline.all_ttft_s:.2f}x" if baseline else "-"
            cold_ratio = f"{cell.cold_ttft_s / baseline.all_ttft_s:.2f}x" if baseline else "-"
            rate = f"{cell.load_gb_s:.2f}" if cell.load_gb_s else "-"
            lines.append(
                f"| {length} | {_LABELS[system]} | {cell.cold_ttft_s * 1000:.0f} ms | {cell.warm_ttft_s * 1000:.0f} ms | "
                f"{warm_ratio} | {cold_ratio} | {cell.reused_tokens} | {rate} | {'yes' if cell.identical else 'NO'} |"
            )
    return "\n".join(lines)


def _goals(cells: list[Cell], lengths: Sequence[int]) -> list[str]:
    """VUA against the targets: warm <= 0.9x the best alternative and <= 0.10x recompute, cold <= 1.10x recompute."""
    by_key = {(c.system, c.prompt_tokens): c for c in cells}
    lines = []
    for length in lengths:
        vua, recompute = by_key.get(("vua", length)), by_key.get(("recompute", length))
        if not vua or not recompute:
            continue
        alternatives = [recompute.all_ttft_s] + [c.warm_ttft_s for c in cells if c.system == "example" and c.prompt_tokens == length]
        best = min(alternatives)
        checks = [
            (f"warm {vua.warm_ttft_s / best:.2f}x best alternative (goal <= 0.90x)", vua.warm_ttft_s <= 0.9 * best),
            (f"warm {vua.warm_ttft_s / recompute.all_ttft_s:.2f}x recompute (goal <= 0.10x)", vua.warm_ttft_s <= 0.1 * recompute.all_ttft_s),
            (f"cold {vua.cold_ttft_s / recompute.all_ttft_s:.2f}x recompute (goal <= 1.10x)", vua.cold_ttft_s <= 1.1 * recompute.all_ttft_s),
            ("outputs identical" if vua.identical else "outputs DIFFER", vua.identical),
        ]
        lines.append(f"{length} tokens: " + "; ".join(f"{text} {'ok' if ok else 'MISSED'}" for text, ok in checks))
    return lines


def _plot(cells: list[Cell], lengths: Sequence[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    styles = {"recompute": ("#888888", "o"), "example": ("#d95f02", "s"), "vua": ("#1b9e77", "D")}
    for system in SYSTEMS:
        series = sorted((c for c in cells if c.system == system), key=lambda c: c.prompt_tokens)
        if not series:
            continue
        color, marker = styles[system]
        x = [c.prompt_tokens for c in series]
        if system == "recompute":
            axes.plot(x, [c.all_ttft_s for c in series], color=color, marker=marker, label=_LABELS[system])
            continue
        axes.plot(x, [c.warm_ttft_s for c in series], color=color, marker=marker, label=f"{_LABELS[system]}, warm (load)")
        axes.plot(x, [c.cold_ttft_s for c in series], color=color, marker=marker, linestyle="--", alpha=0.6, label=f"{_LABELS[system]}, cold (save)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(list(lengths), [str(n) for n in lengths])
    seconds = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(seconds)
    axes.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
    axes.yaxis.set_minor_formatter(seconds)
    axes.tick_params(axis="y", which="minor", labelsize=7)
    axes.set_xlabel("prompt length (tokens)")
    axes.set_ylabel("time to first token (s, median)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _run_interleaved(
    model: str,
    systems: list[str],
    lengths: list[int],
    requests: int,
    options: dict[str, Any],
    connectors: dict[str, dict[str, Any] | None],
    env: dict[str, str],
    root: Path,
    out: Path,
) -> dict[str, Any]:
    """All engines open at once; each request goes to every system in turn, in a rotating order.

    Other work on the machine then slows every system alike instead of whichever ran at the
    time, and no system always goes first.
    """
    engines: dict[str, EngineProcess] = {}
    results: dict[str, Any] = {system: {"phases": {}} for system in systems}

    def send(system: str, name: str, prompt: list[int]) -> None:
        time.sleep(_SETTLE_S)
        rows = engines[system].run(Phase(name, [prompt], _MAX_TOKENS))
        results[system]["phases"].setdefault(name, []).extend(rows)
        print(f"   {_LABELS[system]:<26} {rows[0]['ttft_s'] * 1000:8.0f} ms  {rows[0]['cached_tokens']:>5} reused  ({name})", flush=True)

    try:
        for system in systems:
            if connectors[system]:
                (root / system).mkdir(parents=True, exist_ok=True)
            engines[system] = EngineProcess(
                model, engine=options, kv_transfer_config=connectors[system], env=env, log_path=out / f"engine-{system}.log"
            )
        print(f"starting {len(systems)} engines (one process each; a minute or more on CPU)", flush=True)
        for system in systems:
            results[system]["startup_s"] = engines[system].wait_ready()
            print(f"   {_LABELS[system]} ready in {results[system]['startup_s']:.0f} s", flush=True)
        turn = 0
        for length in lengths:
            warmup, *prompts = random_prompts(model, requests + 1, length, seed=length)
            print(f"== {length}-token prompts", flush=True)
            for name, batch in ((f"warmup-{length}", [warmup]), (f"cold-{length}", prompts), (f"warm-{length}", prompts)):
                for prompt in batch:
                    for system in systems[turn % len(systems) :] + systems[: turn % len(systems)]:
                        send(system, name, prompt)
                    turn += 1
    finally:
        for engine in engines.values():
            engine.close()
    return results


def run(args: argparse.Namespace) -> int:
    lengths = [int(n) for n in str(args.lengths).split(",") if n.strip()]
    systems = [s.strip() for s in str(args.systems).split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not lengths or args.requests < 1:
        print(f"vua bench: bad arguments (unknown systems {unknown}, lengths {lengths}, requests {args.requests})", file=sys.stderr)
        return 2
    systems = [s for s in SYSTEMS if s in systems]  # recompute first: it is the reference for outputs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, BENCH_MODEL)
    options = engine_options(model, max(lengths), _MAX_TOKENS)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="vua-bench-store-"))
    connectors = {
        "recompute": None,
        "example": example_connector(root / "example"),
        "vua": vua_connector(
            root / "vua", args.chunk_size, **({"claim_whole_blocks": True} if args.whole_block_claims else {})
        ),
    }
    env = cpu_engine_env()
    print(f"vua bench: model {model}; lengths {lengths}; {args.requests} requests each; systems {systems}", flush=True)
    print(f"engine {options}; VLLM_CPU_NUM_OF_RESERVED_CPU={env['VLLM_CPU_NUM_OF_RESERVED_CPU']} for every run", flush=True)
    began = time.perf_counter()
    try:
        results = _run_interleaved(model, systems, lengths, args.requests, options, connectors, env, root, out)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    cells = []
    for length in lengths:
        baseline = None
        if "recompute" in results:
            baseline = [row["output_ids"] for row in results["recompute"]["phases"][f"cold-{length}"]]
        cells += [_system_cell(system, length, results[system], baseline) for system in systems]
    bytes_per_token = kv_bytes_per_token(model, options["dtype"])
    header = (
        f"Model {Path(model).name} ({bytes_per_token // 1024} KiB of KV per token); {_machine()}; "
        f"{args.requests} requests per length, medians; VUA chunk_size {args.chunk_size}"
        f"{', whole-block claims' if args.whole_block_claims else ', claims up to the last prompt token'}; "
        f"total {time.perf_counter() - began:.0f} s."
    )
    table = _markdown(cells, lengths)
    goals = _goals(cells, lengths)
    (out / "bench.md").write_text(header + "\n\n" + table + "\n\n" + "\n".join(f"- {g}" for g in goals) + "\n")
    (out / "bench.json").write_text(json.dumps({"model": model, "options": options, "cells": [asdict(c) for c in cells], "raw": results}, default=str))
    written = [out / "bench.md", out / "bench.json"]
    try:
        _plot(cells, lengths, out / "bench.png", f"vLLM (CPU) TTFT, {Path(model).name}")
        written.append(out / "bench.png")
    except ImportError:
        print("vua bench: no plot (matplotlib is not installed: pip install 'vua[bench]')", file=sys.stderr)
    print("\n" + header + "\n\n" + table + "\n\n" + "\n".join(goals))
    print("\nwrote " + ", ".join(str(p) for p in written))
    identical = all(c.identical for c in cells)
    return 0 if identical else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vua bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
