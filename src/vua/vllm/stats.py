"""Connector statistics, in the shape vLLM's stat loggers expect (``KVConnectorStats``).

Both halves count into the same fields (the scheduler: lookups and hits; the worker: bytes,
seconds and faults); vLLM aggregates them per step, the periodic log reduces an interval to
rates, and ``/metrics`` accumulates them as Prometheus counters (:mod:`vua.vllm.prometheus`).

Lookup times are kept once, as observations (``lookup_seconds``, one value per lookup): the
periodic log reduces them to a mean, :meth:`VUAConnectorStats.lookups_within` reads the
cumulative histogram over :data:`LOOKUP_BUCKETS` from them, and Prometheus observes each one
into ``vllm:vua_lookup_time_seconds`` with the same buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._compat import KVConnectorStats

__all__ = ["VUAConnectorStats", "COUNTERS", "OBSERVATIONS", "LOOKUP_BUCKETS"]

COUNTERS = (
    "requests",  # requests finished, each counted once (a resumed request is not counted again)
    "prompt_tokens",  # their prompt tokens
    "hit_tokens",  # their tokens loaded at first admission, less those recomputed after a failed load
    "lookups",  # store lookups run (a prompt deferred and asked again is looked up once)
    "lookups_deferred",  # answers "ask again later": the lookup ran past lookup_budget_ms
    "lookup_timeouts",  # lookups storage did not answer within storage_timeout_s (misses; the store rests)
    "async_loads",  # requests admitted with an asynchronous load (they waited for it while others ran)
    "loaded_fragments",
    "loaded_bytes",
    "load_seconds",  # wall time from the start of a step's loads to the last byte
    "load_errors",  # fragments that failed to load because of storage (their blocks are recomputed)
    "load_internal_errors",  # fragments that failed to load because of a bug (logged with a traceback)
    "saved_fragments",
    "saved_bytes",
    "save_seconds",  # summed time of background writes
    "save_errors",  # writes the filesystem refused (full, read-only...)
    "save_internal_errors",  # writes that failed because of a bug (logged with a traceback)
    "saves_skipped",  # saves dropped because staging memory was full
    "saves_poisoned",  # saves dropped because they were computed over KV that failed to load
    "load_timeouts",  # steps whose loads storage did not finish within storage_timeout_s (recomputed)
    "decode_saves",  # fragments planned for saving that hold generated tokens (the answer, for the next turn)
    "tails_skipped",  # tails not stored because their head directory already holds MAX_TAILS_PER_HEAD
)
# Per-event values kept as lists so that Prometheus can histogram them; a step's lists are short.
OBSERVATIONS = ("lookup_seconds",)  # the wall time of each lookup counted in ``lookups``

# Upper bounds (seconds) of the lookup-time histogram. A lookup is a few stats and one listing:
# tens of microseconds on a local disk, milliseconds over NFS, more when the server struggles.
LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class VUAConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)
        for name in OBSERVATIONS:
            self.data.setdefault(name, [])

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            self.data[name] += value

    def observe(self, name: str, value: float) -> None:
        self.data[name].append(value)

    def add_lookup(self, seconds: float) -> None:
        """One lookup that ran for ``seconds``: counted, and its time observed."""
        self.data["lookups"] += 1
        self.observe("lookup_seconds", seconds)

    def lookups_within(self, seconds: float) -> int:
        """Lookups that took at most ``seconds`` (a cumulative histogram bucket, as Prometheus reads it)."""
        return sum(1 for s in self.data["lookup_seconds"] if s <= seconds)

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS} | {name: [] for name in OBSERVATIONS}

    def aggregate(self, other: KVConnectorStats) -> "VUAConnectorStats":
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        for name in OBSERVATIONS:
            self.data[name] = self.data[name] + list(other.data.get(name, ()))
        return self

    def is_empty(self) -> bool:
        return not any(self.data[name] for name in COUNTERS + OBSERVATIONS)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        times = d["lookup_seconds"]
        return {
            "Requests": d["requests"],
            "Hit tokens": d["hit_tokens"],
            "Hit rate (%)": round(100 * d["hit_tokens"] / d["prompt_tokens"], 1) if d["prompt_tokens"] else 0.0,
            "Lookups": d["lookups"],
            "Loaded GB": round(d["loaded_bytes"] / 1e9, 3),
            "Load GB/s": _rate(d["loaded_bytes"], d["load_seconds"]),
            "Saved GB": round(d["saved_bytes"] / 1e9, 3),
            "Save GB/s": _rate(d["saved_bytes"], d["save_seconds"]),
            "Load errors": d["load_errors"],
            "Save errors": d["save_errors"],
            "Saves skipped": d["saves_skipped"],
            "Saves dropped after a failed load": d["saves_poisoned"],
            "Internal errors": d["load_internal_errors"] + d["save_internal_errors"],
            "Decode fragments planned": d["decode_saves"],
            "Lookup ms (mean)": round(1e3 * sum(times) / len(times), 3) if times else 0.0,
            "Lookups deferred": d["lookups_deferred"],
        }

    def snapshot(self) -> dict[str, Any]:
        return dict(self.data)


def _rate(nbytes: float, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0
