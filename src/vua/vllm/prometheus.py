"""The connector's counters on ``vllm serve``'s ``/metrics``, through vLLM's connector metrics hooks.

vLLM calls ``VUAStorageConnector_V1.build_prom_metrics`` in its front end and feeds every
:class:`~vua.vllm.stats.VUAConnectorStats` the engines report (both connector halves, every
worker, summed per step) to :meth:`VUAPromMetrics.observe`. Names follow vLLM's: a ``vllm:``
prefix, counters exposed with ``_total``, seconds and bytes in base units, one ``engine`` label
(plus ``model_name``) as vLLM's own metrics have. Rates are for PromQL
(``rate(vllm:vua_hit_tokens_total[5m]) / rate(vllm:vua_query_tokens_total[5m])``); the gauges give
the same ratios since the server started, for a quick look without a query.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
from vllm.v1.metrics.utils import create_metric_per_engine

from .stats import COUNTERS, LOOKUP_BUCKETS, VUAConnectorStats

__all__ = ["VUAPromMetrics", "LOOKUP_BUCKETS"]

# Plain counters: (stats field, metric name, documentation).
_COUNTERS = (
    ("requests", "vllm:vua_requests", "Finished requests VUA looked up, each counted once (a resumed request is not counted again)."),
    ("prompt_tokens", "vllm:vua_query_tokens", "Prompt tokens of vllm:vua_requests."),
    ("hit_tokens", "vllm:vua_hit_tokens", "Prompt tokens of vllm:vua_requests loaded from the VUA store at admission, "
     "less those recomputed because their load failed."),
    ("lookups", "vllm:vua_lookups", "Lookups of a prompt's longest stored prefix in the VUA store."),
    ("lookups_deferred", "vllm:vua_lookups_deferred", "Lookups still running after lookup_budget_ms: vLLM was told to "
     "ask again at its next step while the lookup went on in the background."),
    ("lookup_timeouts", "vllm:vua_lookup_timeouts", "Lookups storage did not answer within storage_timeout_s: "
     "misses, after which lookups skip the store for a while."),
    ("load_timeouts", "vllm:vua_load_timeouts", "Steps whose loads storage did not finish within storage_timeout_s "
     "(their blocks are recomputed)."),
    ("async_loads", "vllm:vua_async_loads", "Requests admitted with an asynchronous load: they waited for their KV "
     "while other requests ran."),
    ("loaded_fragments", "vllm:vua_loaded_fragments", "Fragments loaded from the VUA store."),
    ("loaded_bytes", "vllm:vua_loaded_bytes", "KV bytes loaded from the VUA store."),
    ("load_seconds", "vllm:vua_load_seconds", "Time spent loading, from the start of a step's loads to their last byte."),
    ("saved_fragments", "vllm:vua_saved_fragments", "Fragments saved to the VUA store."),
    ("saved_bytes", "vllm:vua_saved_bytes", "KV bytes saved to the VUA store."),
    ("save_seconds", "vllm:vua_save_seconds", "Time spent writing saved fragments, summed over writer threads."),
    ("saves_skipped", "vllm:vua_saves_skipped", "Saves skipped because staging memory (max_staging_bytes) was full."),
    ("saves_poisoned", "vllm:vua_saves_poisoned", "Saves dropped because they were computed over KV that failed to load."),
    ("decode_saves", "vllm:vua_decode_saves", "Fragments planned for saving that hold generated tokens (for the next turn)."),
    ("tails_skipped", "vllm:vua_tails_skipped", "Tails not stored because their head directory already holds "
     "MAX_TAILS_PER_HEAD tails."),
)
# Counters with a "kind" label: storage (a missing, corrupt or unreadable file, a full or read-only
# disk: a miss or a skipped save) or internal (a bug, logged with its traceback: a recompute).
_ERRORS = (
    ("vllm:vua_load_errors", "Fragments that failed to load (their blocks are recomputed), by kind.",
     {"storage": "load_errors", "internal": "load_internal_errors"}),
    ("vllm:vua_save_errors", "Saves that failed, by kind.", {"storage": "save_errors", "internal": "save_internal_errors"}),
)


class VUAPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        engines = self.per_engine_labelvalues
        self.counters = {
            field: create_metric_per_engine(self._counter_cls(name=name, documentation=doc, labelnames=labelnames), engines)
            for field, name, doc in _COUNTERS
        }
        for name, doc, kinds in _ERRORS:
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames + ["kind"])
            for kind, field in kinds.items():
                self.counters[field] = {idx: metric.labels(*values, kind) for idx, values in engines.items()}
        self.lookup_seconds = create_metric_per_engine(
            self._histogram_cls(name="vllm:vua_lookup_time_seconds", documentation="Time of one lookup in the VUA store.",
                                buckets=list(LOOKUP_BUCKETS), labelnames=labelnames),
            engines,
        )

        def gauge(name: str, doc: str) -> dict[int, Any]:
            return create_metric_per_engine(
                self._gauge_cls(name=name, documentation=doc, labelnames=labelnames, multiprocess_mode="mostrecent"), engines
            )

        self.hit_rate = gauge("vllm:vua_hit_rate", "vllm:vua_hit_tokens / vllm:vua_query_tokens since the server started (0 to 1).")
        self.load_throughput = gauge("vllm:vua_load_throughput_gb_per_second",
                                     "vllm:vua_loaded_bytes / vllm:vua_load_seconds since the server started, in GB/s.")
        self.save_throughput = gauge("vllm:vua_save_throughput_gb_per_second",
                                     "vllm:vua_saved_bytes / vllm:vua_save_seconds since the server started, in GB/s.")
        # Totals since start per engine, for the gauges (a Prometheus counter cannot be read back).
        self._totals = {idx: VUAConnectorStats() for idx in engines}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        stats = VUAConnectorStats(data=dict(transfer_stats_data))
        for field in COUNTERS:
            if stats.data[field]:
                self.counters[field][engine_idx].inc(stats.data[field])
        for seconds in stats.data["lookup_seconds"]:
            self.lookup_seconds[engine_idx].observe(seconds)
        totals = self._totals[engine_idx].aggregate(stats)
        totals.data["lookup_seconds"] = []  # the histogram has them; keep no history
        d = totals.data
        if d["prompt_tokens"]:
            self.hit_rate[engine_idx].set(d["hit_tokens"] / d["prompt_tokens"])
        if d["load_seconds"] > 0:
            self.load_throughput[engine_idx].set(d["loaded_bytes"] / d["load_seconds"] / 1e9)
        if d["save_seconds"] > 0:
            self.save_throughput[engine_idx].set(d["saved_bytes"] / d["save_seconds"] / 1e9)
