"""Connector stats as vLLM's loggers use them: serialised, rebuilt, aggregated, reduced."""

from __future__ import annotations

from vua.vllm.kv_connector_v1 import VUAStorageConnector_V1
from vua.vllm.stats import COUNTERS, VUAConnectorStats


def test_stats_round_trip_aggregate_and_reduce() -> None:
    worker = VUAConnectorStats()
    worker.add(loaded_fragments=2, loaded_bytes=3_000_000_000, load_seconds=1.5, saved_bytes=1_000_000_000,
               save_seconds=2.0, load_errors=1)
    scheduler = VUAConnectorStats()
    scheduler.add(requests=2, prompt_tokens=1000, hit_tokens=250, decode_saves=3, lookups_deferred=1)
    scheduler.add_lookup(0.004)
    scheduler.add_lookup(0.002)
    rebuilt = VUAStorageConnector_V1.build_kv_connector_stats(worker.to_dict())
    assert rebuilt is not None and rebuilt.data == worker.data
    total = rebuilt.aggregate(scheduler)
    assert set(total.data) == set(COUNTERS)
    assert total.reduce() == {
        "Prompts looked up": 2, "Hit tokens": 250, "Hit rate (%)": 25.0, "Loaded GB": 3.0, "Load GB/s": 2.0,
        "Saved GB": 1.0, "Save GB/s": 0.5, "Load errors": 1, "Save errors": 0, "Saves skipped": 0,
        "Saves dropped after a failed load": 0, "Internal errors": 0, "Decode fragments planned": 3,
        "Lookup ms (mean)": 3.0, "Lookups deferred": 1,
    }
    assert (total.data["lookups"], total.data["lookups_le_1ms"], total.data["lookups_le_10ms"]) == (2, 0, 2)
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()
    assert VUAStorageConnector_V1.build_kv_connector_stats(None) is None
