"""``VUAStorageConnector_V1``: vLLM V1 KV connector keeping KV caches on a shared filesystem.

Use::

    vllm serve <model> --kv-transfer-config '{"kv_connector": "VUAStorageConnector_V1", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": "/mnt/shared"}}'

(the ``vllm.general_plugins`` entry point registers the name in every vLLM process; or add
``"kv_connector_module_path": "vua.vllm.kv_connector_v1"``). Keys of ``kv_connector_extra_config``
are documented in :mod:`vua.vllm.settings`.

This class is a switchboard: vLLM builds it once with the scheduler role (the half that decides,
:mod:`vua.vllm.scheduler`) and once per worker (the half that moves bytes, :mod:`vua.vllm.worker`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from ..eviction import RecencyTouch
from ..store import FragmentStore
from ._compat import (
    KVConnectorBase_V1,
    KVConnectorRole,
    init_base,
    kv_block_size,
    kv_bytes_per_token,
    kv_events_enabled,
    recompute_failed_loads,
    parallel_ranks,
    route_logs_like_vllm,
)
from .events import StoreEvents
from .identity import store_identity
from .metadata import VUAConnectorMetadata
from .scheduler import SchedulerSide
from .settings import ConnectorSettings, parse_bool
from .stats import VUAConnectorStats
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

__all__ = ["VUAStorageConnector_V1"]

logger = logging.getLogger(__name__)


class VUAStorageConnector_V1(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: Any, kv_cache_config: Any = None) -> None:
        init_base(self, vllm_config, role, kv_cache_config)
        route_logs_like_vllm()
        settings = ConnectorSettings.from_extra_config(
            vllm_config.kv_transfer_config.kv_connector_extra_config,
            block_size=kv_block_size(kv_cache_config, vllm_config),
            max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            kv_bytes_per_token=kv_bytes_per_token(kv_cache_config),
        )
        identity = store_identity(vllm_config, kv_cache_config, settings.chunk_size)
        namespace = identity.namespace()
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(settings, identity, FragmentStore(settings.root, namespace, backend="posix"))
            replaced = recompute_failed_loads(vllm_config)
            if replaced is not None:
                logger.info("VUA: kv_load_failure_policy %r -> 'recompute': a fragment that fails to load is "
                            "recomputed, never a failed request", replaced)
            logger.info("VUA: store %s, namespace %s, chunks of %d tokens", settings.root, namespace.name, settings.chunk_size)
            if kv_events_enabled(vllm_config):
                events = StoreEvents(namespace.name, identity.shards(), identity.block_size)
                self._scheduler.events = events
                if self._scheduler.gc is not None:
                    self._scheduler.gc.on_evicted = events.evicted
                events.start()
        else:
            store = FragmentStore(
                settings.root, namespace, backend=settings.backend, durable=settings.durable, on_hit=RecencyTouch()
            )
            self._worker = WorkerSide(settings, identity, store, *parallel_ranks())
            if kv_events_enabled(vllm_config):
                self._worker.published = []

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a preempted request simply recomputes

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # wait_for_layer_load does real work, which a replayed full CUDA graph would skip.
        return parse_bool(extra_config.get("layerwise_load", True), "layerwise_load")

    # ---- scheduler role ----

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> VUAConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler.update_connector_output(connector_output.invalid_block_ids or set(),
                                                set(connector_output.finished_recving or ()))
        if self._scheduler.events is not None and connector_output.kv_cache_events:
            self._scheduler.events.published(connector_output.kv_cache_events.get_all_events())

    def take_events(self) -> Iterable["KVCacheEvent"]:
        return self._scheduler.events.take() if self._scheduler.events is not None else ()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        return self._scheduler.request_finished(request, block_ids)

    # ---- worker role ----

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker.start_load(self._bound().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # blocks are copied out once the whole forward pass is done (wait_for_save)

    def wait_for_save(self) -> None:
        meta = self._bound()
        self._worker.wait_for_save(meta.saves, meta.failures_seen, meta.released)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Finished sending: requests whose blocks were held for their last saves, copied out now.
        # Finished receiving: requests whose asynchronous loads have ended (loaded, or failed and
        # reported with this step's load errors, which vLLM asks for right after this).
        return self._worker.take_finished() or None, self._worker.take_finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def get_kv_connector_kv_cache_events(self) -> "KVConnectorKVEvents | None":
        published = self._worker.take_published()
        if not published:
            return None
        from ._published import PublishedFragments

        return PublishedFragments(published)

    def _bound(self) -> VUAConnectorMetadata:
        return self._connector_metadata or VUAConnectorMetadata()

    # ---- both ----

    def _side(self) -> SchedulerSide | WorkerSide:
        return self._scheduler if self.role == KVConnectorRole.SCHEDULER else self._worker

    def get_kv_connector_stats(self) -> VUAConnectorStats | None:
        return self._side().take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> VUAConnectorStats | None:
        return VUAConnectorStats(data=dict(data)) if data is not None else None

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: "VllmConfig",
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> "KVConnectorPromMetrics":
        from .prometheus import VUAPromMetrics  # subclasses a vLLM class: only where vLLM runs

        return VUAPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        self._side().shutdown()
