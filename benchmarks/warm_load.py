"""Warm loads of one contender alone: save some prompts in one engine process, load each once in a fresh one.

The follow-up to ``vua bench`` in doc/benchmarks.md ("Why VUA loaded slower here"): no other
engine runs, and ``--evict`` drops the store's files from the page cache
(``posix_fadvise(DONTNEED)``, only these files) before each load, to compare loads from the page
cache with loads from the disk.

    python benchmarks/warm_load.py vua save && python benchmarks/warm_load.py vua load --evict
    python benchmarks/warm_load.py fs-tier save && python benchmarks/warm_load.py fs-tier load
    python benchmarks/warm_load.py vua load io_threads=16     # extra connector keys as key=value
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vua.tools.bench import BENCH_MODEL
from vua.tools.engine_runner import EngineProcess, Phase, cpu_engine_env, engine_options, random_prompts, resolve_model, vua_connector
from vua.tools.fs_tier_cpu import fs_tier_connector


def _evict(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=("vua", "fs-tier"))
    parser.add_argument("mode", choices=("save", "load"))
    parser.add_argument("settings", nargs="*", help="extra connector keys, key=value (integers)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--evict", action="store_true", help="drop the store's files from the page cache before each load")
    parser.add_argument("--root", default="/tmp/vua-warm-load")
    args = parser.parse_args(argv)
    extra = {key: int(value) for key, value in (item.split("=", 1) for item in args.settings)}
    model = resolve_model(None, BENCH_MODEL)
    options = engine_options(model, args.tokens, 4)
    root = Path(args.root, args.system)
    root.mkdir(parents=True, exist_ok=True)
    connector = vua_connector(root, 1024, **extra) if args.system == "vua" else fs_tier_connector(str(root), 2 << 30, **extra)
    prompts = random_prompts(model, args.prompts, args.tokens, seed=123)
    with EngineProcess(model, engine=options, kv_transfer_config=connector, env=cpu_engine_env()) as engine:
        if args.mode == "save":
            engine.run(Phase("save", prompts, 4))
            return 0
        engine.run(Phase("first", random_prompts(model, 1, 1024, seed=5), 4))  # a full prefill first
        for prompt in prompts:
            if args.evict:
                _evict(root)
            row = engine.run(Phase("load", [prompt], 4))[0]
            print(f"{args.system} {extra or ''} {'evicted' if args.evict else 'cached'}: "
                  f"TTFT {row['ttft_s'] * 1000:.0f} ms, {row['cached_tokens']} tokens reused", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
