#!/usr/bin/env python3
"""Draw static/architecture.png (the diagram in doc/design.md) with matplotlib.

    python doc/make_figures.py            # writes static/architecture.png

The benchmark plot, static/bench-ttft.png, is written by ``vua bench`` (bench.png in its --out
directory) and copied there; static/serve-bench.png is written by benchmarks/serve_bench.py
(serve.png in its --out directory) and copied there.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "static" / "architecture.png"

ENGINE, CORE, STORE, DISK = "#dbe9f6", "#e5f5e0", "#fdebd0", "#eeeeee"


def box(ax, x, y, w, h, title, lines=(), color="#ffffff", size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color, ec="#444444", lw=1))
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=size + 1, weight="bold")
    for i, line in enumerate(lines):
        ax.text(x + 0.15, y + h - 0.62 - i * 0.3, line, ha="left", va="top", fontsize=size - 1, family="monospace")


def arrow(ax, start, end, label="", offset=(0.08, 0.0), both=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=12, lw=1.2, color="#333333"))
    if label:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, label, fontsize=7.5, ha="left", va="center", style="italic")


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 7.6), dpi=130)
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.35, 7.6)
    ax.axis("off")

    # vLLM engine: scheduler process and worker process(es).
    ax.add_patch(FancyBboxPatch((0.2, 4.3), 7.7, 3.1, boxstyle="round,pad=0.02", fc="#f7fbff", ec="#6a8caf", lw=1, ls="--"))
    ax.text(0.4, 7.25, "vLLM V1 engine (kv_connector = VUAStorageConnector_V1)", fontsize=10, weight="bold", va="top")
    box(ax, 0.4, 4.5, 3.6, 2.5, "scheduler half", [
        "token ids -> chained digests",
        "  (one per KV block)",
        "lookup: 1 stat per chunk,",
        "  1 listdir for the tail",
        "plan LoadJob / SaveJob",
        "  (fragment -> block ids)",
    ], ENGINE)
    box(ax, 4.2, 4.5, 3.5, 2.5, "worker half (per rank)", [
        "load: preadv straight into",
        "  paged KV blocks, per layer",
        "save: copy blocks out, write",
        "  in background (bounded)",
        "failed load -> recompute",
    ], ENGINE)
    arrow(ax, (4.0, 5.75), (4.2, 5.75))
    ax.text(4.1, 5.95, "jobs", fontsize=7.5, style="italic", ha="center")

    # transformers API.
    box(ax, 8.3, 4.5, 3.5, 2.5, "core API (transformers)", [
        "VUA.put(tokens, kvcache)",
        "VUA.get_closest(tokens)",
        "  -> ClosestKV(tokens, data)",
        "one fragment per",
        "  split_factor tokens",
    ], CORE)

    # Storage engine.
    box(ax, 0.4, 1.9, 11.4, 2.0, "storage engine: FragmentStore", [
        "keys.py    xxh3-128 chain over int64 token ids, seeded by the namespace (model, dtype, KV layout, chunk size)",
        "layout.py  <root>/vua-v1/<ns>/<aa>/<bb>/<digest>/<shard>.safetensors, tails/<head>/<digest>.<shard>.safetensors",
        "serdes.py + integrity.py  safetensors file: tokens tensor + data tensors, per-tensor xxh3 checksums in metadata",
        "publish.py  temp file -> fsync -> link (first writer wins): readers never see half a file",
    ], STORE, size=9)
    arrow(ax, (2.2, 4.5), (2.2, 3.9), "exists / listdir")
    arrow(ax, (5.9, 4.5), (5.9, 3.9), "read / write", both=True)
    arrow(ax, (10.0, 4.5), (10.0, 3.9), "put / get", both=True)

    # Backends and filesystem.
    box(ax, 0.4, 0.2, 5.4, 1.4, "I/O backends", ["POSIX: preadv / pwritev into caller buffers", "GDS: kvikio reads into CUDA tensors"], DISK)
    box(ax, 6.4, 0.2, 5.4, 1.4, "shared filesystem", ["NFS, Lustre, local NVMe; many engines,", "many nodes, one root"], DISK)
    arrow(ax, (3.1, 1.9), (3.1, 1.6), both=True)
    arrow(ax, (5.8, 0.9), (6.4, 0.9), both=True)

    ax.text(6.0, -0.15, "every storage fault (ENOSPC, EIO, EACCES, corrupt or foreign file) is a miss or a skipped save plus one log line",
            fontsize=8.5, ha="center", va="center", color="#a33")
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
