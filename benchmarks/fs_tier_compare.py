"""VUA against vLLM's filesystem KV tier on what is not speed: a corrupt file, store growth, durability.

Each contender (vLLM's OffloadingConnector with its fs tier, run on CPU through our shim
``vua.tools.fs_tier_cpu``, and VUA) saves one prompt in one engine process; then one of its
files is overwritten with zeros (same size, so it still looks complete); then a fresh engine
process on the same store runs the same prompt. Reported per contender: the tokens it reused,
whether the output equals recompute's (greedy tokens and max logprob difference), and the log
lines of the second process that mention the bad file or a failed load. Then the store's size,
whether anything bounds it, and whether writes are fsynced (read from the code: see the doc).

    python benchmarks/fs_tier_compare.py              # built-in tiny model, about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vua.tools.engine_runner import Phase, cpu_engine_env, engine_options, random_prompts, resolve_model, run_engine, vua_connector
from vua.tools.fs_tier_cpu import fs_tier_connector
from vua.tools.tinymodel import TinyLlamaSpec

# Log lines that say something went wrong with a load (any connector's wording).
_PROBLEM = re.compile(r"corrupt|checksum|mismatch|fail|invalid|short read|error|warning", re.IGNORECASE)


def _max_diff(row: dict, ref: dict) -> float:
    worst = 0.0
    for token, ref_token, a, b in zip(row["output_ids"], ref["output_ids"], row["logprobs"], ref["logprobs"]):
        worst = max(worst, abs(a - b))
        if token != ref_token:
            break
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--keep", help="keep stores and logs in this directory")
    args = parser.parse_args(argv)
    model = resolve_model(None, TinyLlamaSpec())
    options = engine_options(model, args.tokens, 4)
    env = cpu_engine_env()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vua-fs-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    prompt, first = random_prompts(model, 2, args.tokens, seed=11)
    reference = run_engine(model, [Phase("p", [prompt], 4)], engine=options, env=env)["phases"]["p"][0]
    contenders = {
        "fs-tier": fs_tier_connector(str(work / "fs-tier")),
        "vua": vua_connector(work / "vua", 256),
    }
    report = {}
    try:
        for name, connector in contenders.items():
            store = work / name
            store.mkdir(parents=True, exist_ok=True)
            run_engine(model, [Phase("save", [prompt], 4)], engine=options, kv_transfer_config=connector, env=env,
                       log_path=work / f"{name}-save.log")
            files = sorted(p for p in store.rglob("*") if p.is_file() and p.suffix != ".json")
            size = sum(p.stat().st_size for p in files)
            victim = files[len(files) // 2]
            victim.write_bytes(bytes(victim.stat().st_size))  # zeros, same size
            log = work / f"{name}-load.log"
            rows = run_engine(model, [Phase("first", [first], 4), Phase("load", [prompt], 4)], engine=options,
                              kv_transfer_config=connector, env=env, log_path=log)["phases"]["load"]
            row = rows[0]
            time.sleep(2)  # vLLM's worker processes may still be flushing their last lines
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
            mentions = [
                line for line in lines
                if victim.name in line or (_PROBLEM.search(line) and re.search(r"VUA|offload|KV load", line, re.IGNORECASE))
            ]
            report[name] = {
                "files": len(files),
                "store_bytes": size,
                "zeroed_file": str(victim.relative_to(store)),
                "reused_tokens": row["cached_tokens"],
                "greedy_tokens_equal": row["output_ids"] == reference["output_ids"],
                "max_logprob_diff": _max_diff(row, reference),
                "log_lines": [line[-240:] for line in mentions[:5]],
            }
            print(json.dumps({name: report[name]}, indent=1), flush=True)
        # Store growth: VUA's store can be bounded while engines run (max_store_size) or by `vua gc`;
        # the fs tier has nothing that removes a block file (only a short read deletes one).
        done = subprocess.run([sys.executable, "-m", "vua", "gc", "--max-size", "1", "--temp-grace", "0s", "--json", str(work / "vua")],
                              capture_output=True, text=True)
        report["vua_gc"] = {"returncode": done.returncode, "output": done.stdout.strip()[-600:] or done.stderr.strip()[-600:],
                            "store_bytes_after": sum(p.stat().st_size for p in (work / "vua").rglob("*") if p.is_file())}
        print(json.dumps({"vua_gc": report["vua_gc"]}, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
