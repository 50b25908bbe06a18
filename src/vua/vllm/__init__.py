"""The vLLM V1 KV connector (:mod:`vua.vllm.kv_connector_v1`).

:func:`register` is VUA's ``vllm.general_plugins`` entry point: vLLM calls it in every process
it starts (front end, engine core, workers), so ``"kv_connector": "VUAStorageConnector_V1"``
resolves everywhere. Importing this package does not import vLLM.
"""

from __future__ import annotations

__all__ = ["register", "CONNECTOR_NAME", "CONNECTOR_MODULE"]

CONNECTOR_NAME = "VUAStorageConnector_V1"
CONNECTOR_MODULE = "vua.vllm.kv_connector_v1"


def register() -> None:
    """Register the connector with vLLM's factory; safe to call any number of times."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:  # registered by someone else in the meantime
        pass
