"""Core I/O benchmark: ``VUA.put`` / ``VUA.get_closest`` against safetensors and a raw read, on the same bytes.

Every contender stores or loads the same KV cache as one file per group of ``split_factor``
tokens, in one process, alternating round by round so that drift on a shared machine hits all of
them alike:

* put: ``VUA.put`` (fsync on) vs ``safetensors.torch.save_file`` of the same per-group tensors
  followed by an fsync of each file, from tensors made contiguous beforehand (untimed, the
  strongest case for safetensors).
* get: ``VUA.get_closest(device="cpu")`` vs ``safetensors.torch.load_file`` of every fragment
  with every tensor materialised and reassembled into ``[1, heads, tokens, head_dim]`` per layer
  (what a caller needs), vs a raw ``readinto`` of the same files into one preallocated buffer (a
  ceiling: no parsing, no checks, no scatter). Reads run with a warm page cache.

Prints a Markdown table of GB/s of KV payload (median and best run) and the ratio of medians. Run::

    .venv/bin/python benchmarks/core_io.py [--tokens 4096 --layers 24 --kv-heads 8 --head-dim 128 --split-factor 256 --runs 7 --io-threads N --dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from vua import VUA, VUAConfig


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _time(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


class Workload:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.config = VUAConfig(split_factor=args.split_factor, identity="bench")
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, 32000, (args.tokens,), generator=generator)
        shape = (1, args.kv_heads, args.tokens, args.head_dim)
        self.kvcache = [
            (torch.randn(shape, generator=generator).half(), torch.randn(shape, generator=generator).half())
            for _ in range(args.layers)
        ]
        self.payload = sum(k.nbytes + v.nbytes for k, v in self.kvcache)
        self.groups = args.tokens // args.split_factor
        sf = args.split_factor
        self.group_tensors = [
            {
                name: tensor[0, :, g * sf : (g + 1) * sf].contiguous()
                for i, (k, v) in enumerate(self.kvcache)
                for name, tensor in ((f"layer.{i}.keys", k), (f"layer.{i}.values", v))
            }
            for g in range(self.groups)
        ]
        self.raw_buffer: torch.Tensor | None = None

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    # ---- put ----

    def put_vua(self) -> float:
        root = self.fresh_dir("vua")
        with VUA(self.config, root, backend="posix", io_threads=self.args.io_threads) as vua:
            return _time(lambda: vua.put(self.tokens, self.kvcache))

    def put_safetensors(self) -> float:
        root = self.fresh_dir("st")

        def save() -> None:
            for g, tensors in enumerate(self.group_tensors):
                path = root / f"{g}.safetensors"
                safetensors.torch.save_file(tensors, path)
                _fsync_path(path)
            _fsync_path(root)

        return _time(save)

    # ---- get ----

    def get_vua(self, vua: VUA) -> float:
        def get() -> None:
            hit = vua.get_closest(self.tokens, device="cpu")
            assert hit is not None and hit.data[0][0].shape[2] == self.args.tokens

        return _time(get)

    def get_safetensors(self) -> float:
        paths = [self.workdir / "st" / f"{g}.safetensors" for g in range(self.groups)]

        def load() -> None:
            loaded = [safetensors.torch.load_file(p) for p in paths]
            data = [
                tuple(torch.cat([group[f"layer.{i}.{kind}"] for group in loaded], dim=1).unsqueeze(0) for kind in ("keys", "values"))
                for i in range(self.args.layers)
            ]
            assert data[0][0].shape[2] == self.args.tokens

        return _time(load)

    def get_raw(self) -> float:
        paths = sorted((self.workdir / "vua").rglob("*.safetensors"))
        sizes = [p.stat().st_size for p in paths]
        if self.raw_buffer is None or len(self.raw_buffer) != sum(sizes):
            # Touched once here so that no page faults land inside the timed read.
            self.raw_buffer = torch.zeros(sum(sizes), dtype=torch.uint8)
        view = memoryview(self.raw_buffer.numpy())

        def read() -> None:
            offset = 0
            for path, size in zip(paths, sizes):
                with open(path, "rb", buffering=0) as f:
                    got = f.readinto(view[offset : offset + size])
                assert got == size
                offset += size

        return _time(read)


def _gbps(payload: int, seconds: float) -> float:
    return payload / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--split-factor", type=int, default=256)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--io-threads", type=int, default=None, help="default: VUA's own (one per CPU, at most 8)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a new one under $TMPDIR)")
    args = parser.parse_args()
    if args.tokens % args.split_factor:
        parser.error("--tokens must be a multiple of --split-factor")

    workdir = Path(tempfile.mkdtemp(prefix="vua-bench-", dir=args.dir))
    try:
        work = Workload(args, workdir)
        timings: dict[str, list[float]] = {k: [] for k in ("put_vua", "put_st", "get_vua", "get_st", "get_raw")}
        for _ in range(args.runs):
            timings["put_st"].append(work.put_safetensors())
            timings["put_vua"].append(work.put_vua())
        # Both stores now hold the same KV; warm the page cache once before timing the reads.
        with VUA(work.config, workdir / "vua", backend="posix", io_threads=args.io_threads) as vua:
            work.get_vua(vua), work.get_safetensors(), work.get_raw()
            for _ in range(args.runs):
                timings["get_st"].append(work.get_safetensors())
                timings["get_raw"].append(work.get_raw())
                timings["get_vua"].append(work.get_vua(vua))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rate = {name: _gbps(work.payload, statistics.median(t)) for name, t in timings.items()}
    best = {name: _gbps(work.payload, min(t)) for name, t in timings.items()}
    print(
        f"KV payload {work.payload / 1e6:.0f} MB: {args.layers} layers x 2 x [1, {args.kv_heads}, {args.tokens}, "
        f"{args.head_dim}] fp16, {work.groups} groups of {args.split_factor} tokens; {args.runs} runs; "
        f"io_threads={args.io_threads or 'default'}; {os.cpu_count()} CPUs; reads from a warm page cache\n"
    )
    rows = [
        ("put", "VUA.put (fsync)", "put_vua", "safetensors save_file + fsync", "put_st"),
        ("get", "VUA.get_closest", "get_vua", "safetensors load_file + materialise", "get_st"),
        ("get", "VUA.get_closest", "get_vua", "raw readinto, preallocated", "get_raw"),
    ]
    print("| op | VUA | GB/s median (best) | alternative | GB/s median (best) | ratio of medians |")
    print("|---|---|---:|---|---:|---:|")
    for op, ours, ours_key, other, other_key in rows:
        print(
            f"| {op} | {ours} | {rate[ours_key]:.2f} ({best[ours_key]:.2f}) | {other} | "
            f"{rate[other_key]:.2f} ({best[other_key]:.2f}) | {rate[ours_key] / rate[other_key]:.2f}x |"
        )


if __name__ == "__main__":
    main()
