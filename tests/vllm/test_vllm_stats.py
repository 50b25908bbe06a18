"""Connector stats as vLLM's loggers use them: serialised, rebuilt, aggregated, reduced, exposed to
Prometheus; and what the scheduler counts as a hit."""

from __future__ import annotations

import functools
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.request import Request

from vua.vllm.kv_connector_v1 import VUAStorageConnector_V1
from vua.vllm.prometheus import VUAPromMetrics
from vua.vllm.stats import COUNTERS, OBSERVATIONS, VUAConnectorStats

from test_vllm_failed_loads import SHORT, corrupt_last_layer, chunk_file
from vllm_steps import Engine


def test_stats_round_trip_aggregate_and_reduce() -> None:
    worker = VUAConnectorStats()
    worker.add(loaded_fragments=2, loaded_bytes=3_000_000_000, load_seconds=1.5, saved_bytes=1_000_000_000,
               save_seconds=2.0, load_errors=1, load_internal_errors=1, save_internal_errors=2)
    scheduler = VUAConnectorStats()
    scheduler.add(requests=2, prompt_tokens=1000, hit_tokens=250, decode_saves=3, lookups_deferred=1)
    scheduler.add_lookup(0.004)
    scheduler.add_lookup(0.002)
    rebuilt = VUAStorageConnector_V1.build_kv_connector_stats(worker.to_dict())
    assert rebuilt is not None and rebuilt.data == worker.data
    total = rebuilt.aggregate(scheduler)
    assert set(total.data) == set(COUNTERS) | set(OBSERVATIONS)
    assert total.data["lookup_seconds"] == [0.004, 0.002]
    assert total.reduce() == {
        "Requests": 2, "Hit tokens": 250, "Hit rate (%)": 25.0, "Lookups": 2, "Loaded GB": 3.0, "Load GB/s": 2.0,
        "Saved GB": 1.0, "Save GB/s": 0.5, "Load errors": 1, "Save errors": 0, "Saves skipped": 0,
        "Saves dropped after a failed load": 0, "Internal errors": 3, "Decode fragments planned": 3,
        "Lookup ms (mean)": 3.0, "Lookups deferred": 1,
    }
    # The one lookup histogram (the same observations Prometheus buckets): cumulative counts.
    assert (total.data["lookups"], total.lookups_within(1e-3), total.lookups_within(1e-2)) == (2, 0, 2)
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()
    assert VUAStorageConnector_V1.build_kv_connector_stats(None) is None


def test_prometheus_metrics_accumulate_what_the_engines_report() -> None:
    registry = CollectorRegistry()  # vLLM's metric classes, on a registry of this test's own
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    metrics = VUAStorageConnector_V1.build_prom_metrics(VllmConfig(), types, ["model_name", "engine"], {0: ["m", "0"]})
    assert isinstance(metrics, VUAPromMetrics)
    first = VUAConnectorStats()
    first.add(requests=1, prompt_tokens=600, hit_tokens=0, lookups=1, saved_fragments=5, saved_bytes=4_000_000,
              save_seconds=0.004, save_errors=1)
    first.observe("lookup_seconds", 0.0003)
    second = VUAConnectorStats()
    second.add(requests=1, prompt_tokens=600, hit_tokens=576, lookups=1, loaded_fragments=5, loaded_bytes=2_000_000,
               load_seconds=0.001, load_errors=2, load_internal_errors=1, saves_skipped=3, saves_poisoned=4)
    second.observe("lookup_seconds", 0.02)
    for stats in (first, second):  # as vLLM hands them over: plain dicts, after a trip between processes
        metrics.observe(stats.to_dict(), 0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})

    assert value("vllm:vua_requests_total") == 2
    assert value("vllm:vua_query_tokens_total") == 1200
    assert value("vllm:vua_hit_tokens_total") == 576
    assert value("vllm:vua_hit_rate") == 576 / 1200
    assert value("vllm:vua_lookups_total") == 2
    assert value("vllm:vua_lookup_time_seconds_count") == 2
    assert value("vllm:vua_lookup_time_seconds_bucket", le="0.0005") == 1
    assert value("vllm:vua_lookup_time_seconds_bucket", le="0.025") == 2
    assert value("vllm:vua_loaded_bytes_total") == 2_000_000 and value("vllm:vua_saved_fragments_total") == 5
    assert value("vllm:vua_load_throughput_gb_per_second") == 2.0
    assert value("vllm:vua_save_throughput_gb_per_second") == 1.0
    assert value("vllm:vua_load_errors_total", kind="storage") == 2
    assert value("vllm:vua_load_errors_total", kind="internal") == 1
    assert value("vllm:vua_save_errors_total", kind="storage") == 1
    assert value("vllm:vua_save_errors_total", kind="internal") == 0
    assert value("vllm:vua_saves_skipped_total") == 3 and value("vllm:vua_saves_poisoned_total") == 4


def test_a_request_is_counted_once_when_it_finishes_with_the_tokens_it_really_loaded(tmp_path: Path) -> None:
    writer = Engine(tmp_path)
    writer.run("w", SHORT)  # 20 tokens: chunk 0 and a one-block tail
    assert writer.scheduler.take_stats().data | {"lookup_seconds": []} == VUAConnectorStats().data | {
        "requests": 1, "prompt_tokens": 20, "lookups": 1}
    reader = Engine(tmp_path)
    assert reader.run("r", SHORT)["hit"] == 19
    stats = reader.scheduler.take_stats().data
    assert (stats["requests"], stats["prompt_tokens"], stats["hit_tokens"], stats["lookups"]) == (1, 20, 19, 1)
    assert len(stats["lookup_seconds"]) == 1 and 0 < stats["lookup_seconds"][0] < 1
    writer.close()
    reader.close()


def test_a_failed_claim_is_not_a_hit(tmp_path: Path) -> None:
    Engine(tmp_path).run("w", SHORT)
    corrupt_last_layer(chunk_file(tmp_path, 0))
    engine = Engine(tmp_path)
    result = engine.run("r", SHORT)
    assert result["hit"] == 19 and engine.errors  # claimed, then chunk 0 failed: all 19 recomputed
    stats = engine.scheduler.take_stats().data
    assert (stats["requests"], stats["prompt_tokens"], stats["hit_tokens"]) == (1, 20, 0)
    engine.close()


def test_a_resumed_request_is_counted_once_with_its_first_claim(tmp_path: Path) -> None:
    Engine(tmp_path).run("w", SHORT)
    engine = Engine(tmp_path)
    request = Request("r", list(SHORT), SamplingParams(max_tokens=1), None)
    claims = []
    for blocks in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]):  # admitted, preempted, admitted again
        hit, _ = engine.scheduler.get_num_new_matched_tokens(request, 0)
        engine.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), hit)
        claims.append(hit)
    engine.scheduler.request_finished(request, [6, 7, 8, 9, 10])
    stats = engine.scheduler.take_stats().data
    assert claims == [19, 19]
    assert (stats["requests"], stats["prompt_tokens"], stats["hit_tokens"], stats["lookups"]) == (1, 20, 19, 2)
    engine.close()


def test_hits_are_counted_once_across_deferred_lookups_and_only_for_the_prompt(tmp_path: Path) -> None:
    import threading

    from test_vllm_decode_and_lookups import ANSWER, P

    writer = Engine(tmp_path)
    writer.chat("t1", P, ANSWER)  # the prompt and the answer are stored
    stats = writer.scheduler.take_stats().data
    # Prompt tokens are the prompt's, not the answer the request generated.
    assert (stats["requests"], stats["prompt_tokens"], stats["hit_tokens"], stats["decode_saves"]) == (1, len(P), 0, 3)
    writer.close()

    reader = Engine(tmp_path, lookup_budget_ms=20)
    release = threading.Event()
    has_shards = reader.scheduler.store.has_shards
    reader.scheduler.store.has_shards = lambda *a: release.wait(5) and has_shards(*a)  # a stalled mount
    next_turn = P + ANSWER + [1, 2, 3, 4, 5, 6, 7, 8, 9]
    request = Request("t2", next_turn, SamplingParams(max_tokens=1), None)
    assert reader.scheduler.get_num_new_matched_tokens(request, 0) == (None, False)  # asked again later
    assert reader.scheduler._stats.data["requests"] == 0  # not finished: not counted yet
    release.set()
    reader.scheduler._requests["t2"].lookup.result(5)
    hit, _ = reader.scheduler.get_num_new_matched_tokens(request, 0)
    assert hit == 84
    blocks = list(range(1, 1 + -(-len(next_turn) // 4)))
    reader.scheduler.update_state_after_alloc(request, KVCacheBlocks(([KVCacheBlock(b) for b in blocks],)), hit)
    reader.scheduler.request_finished(request, blocks)
    stats = reader.scheduler.take_stats().data
    assert (stats["requests"], stats["prompt_tokens"], stats["hit_tokens"]) == (1, len(next_turn), 84)
    assert (stats["lookups"], stats["lookups_deferred"], len(stats["lookup_seconds"])) == (1, 1, 1)
    reader.close()
