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
from typing import TYPE_CHECKING, Any

from ..eviction import RecencyTouch
from ..store import FragmentStore
from ._compat import (
    KVConnectorBase_V1,
    KVConnectorRole,
    init_base,
    kv_block_size,
    recompute_failed_loads,
    parallel_ranks,
    route_logs_like_vllm,
)
from .identity import store_identity
from .metadata import VUAConnectorMetadata
from .scheduler import SchedulerSide
from .settings import ConnectorSettings, parse_bool
from .stats import VUAConnectorStats
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig

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
        else:
            store = FragmentStore(
                settings.root, namespace, backend=settings.backend, durable=settings.durable, on_hit=RecencyTouch()
            )
            self._worker = WorkerSide(settings, identity, store, *parallel_ranks())

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
        self._scheduler.update_connector_output(connector_output.invalid_block_ids or set())

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
        return self._worker.take_finished() or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

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

    def shutdown(self) -> None:
        self._side().shutdown()
