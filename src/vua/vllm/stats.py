"""Connector statistics, in the shape vLLM's stat loggers expect (``KVConnectorStats``).

Both halves count into the same fields (the scheduler: lookups and hits; the worker: bytes,
seconds and faults); vLLM aggregates them per step and the logger reduces an interval to rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._compat import KVConnectorStats

__all__ = ["VUAConnectorStats", "COUNTERS", "LOOKUP_BUCKETS"]

COUNTERS = (
    "requests",  # prompts looked up
    "prompt_tokens",  # their tokens
    "hit_tokens",  # tokens loaded instead of computed
    "loaded_fragments",
    "loaded_bytes",
    "load_seconds",  # wall time from the start of a step's loads to the last byte
    "load_errors",  # fragments that failed to load (their blocks are recomputed)
    "saved_fragments",
    "saved_bytes",
    "save_seconds",  # summed time of background writes
    "save_errors",  # writes the filesystem refused (full, read-only...)
    "saves_skipped",  # saves dropped because staging memory was full
    "saves_poisoned",  # saves dropped because they were computed over KV that failed to load
    "internal_errors",  # bugs caught in the worker (logged with a traceback): a recompute, not a crash
    "load_timeouts",  # steps whose loads storage did not finish within storage_timeout_s (recomputed)
    "decode_saves",  # fragments planned for saving that hold generated tokens (the answer, for the next turn)
    "tails_skipped",  # tails not stored because their head directory already holds MAX_TAILS_PER_HEAD
    "lookups",  # store lookups run (a prompt deferred and asked again is looked up once)
    "lookup_seconds",  # their summed wall time
    "lookups_deferred",  # answers "ask again later": the lookup ran past lookup_budget_ms
    # A histogram of lookup times, cumulative like Prometheus buckets: lookups that took at most...
    "lookups_le_1ms",
    "lookups_le_10ms",
    "lookups_le_100ms",
)

# (counter, upper bound in seconds) of the lookup-time histogram.
LOOKUP_BUCKETS = (("lookups_le_1ms", 1e-3), ("lookups_le_10ms", 1e-2), ("lookups_le_100ms", 1e-1))


@dataclass
class VUAConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            self.data[name] += value

    def add_lookup(self, seconds: float) -> None:
        self.data["lookups"] += 1
        self.data["lookup_seconds"] += seconds
        for name, bound in LOOKUP_BUCKETS:
            if seconds <= bound:
                self.data[name] += 1

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> "VUAConnectorStats":
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        return self

    def is_empty(self) -> bool:
        return not any(self.data[name] for name in COUNTERS)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        return {
            "Prompts looked up": d["requests"],
            "Hit tokens": d["hit_tokens"],
            "Hit rate (%)": round(100 * d["hit_tokens"] / d["prompt_tokens"], 1) if d["prompt_tokens"] else 0.0,
            "Loaded GB": round(d["loaded_bytes"] / 1e9, 3),
            "Load GB/s": _rate(d["loaded_bytes"], d["load_seconds"]),
            "Saved GB": round(d["saved_bytes"] / 1e9, 3),
            "Save GB/s": _rate(d["saved_bytes"], d["save_seconds"]),
            "Load errors": d["load_errors"],
            "Save errors": d["save_errors"],
            "Saves skipped": d["saves_skipped"],
            "Saves dropped after a failed load": d["saves_poisoned"],
            "Internal errors": d["internal_errors"],
            "Decode fragments planned": d["decode_saves"],
            "Lookup ms (mean)": round(1e3 * d["lookup_seconds"] / d["lookups"], 3) if d["lookups"] else 0.0,
            "Lookups deferred": d["lookups_deferred"],
        }

    def snapshot(self) -> dict[str, Any]:
        return dict(self.data)


def _rate(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0
