"""VUA: LLM KV caches on shared storage, keyed by token prefix.

``VUA.put`` / ``VUA.get_closest`` (:mod:`vua.core`) for plain transformers; the vLLM connector
lives in :mod:`vua.vllm.kv_connector_v1`. Both sit on one storage engine: :mod:`vua.keys`
(prefix hashes), :mod:`vua.layout` (paths), :mod:`vua.serdes` (safetensors format),
:mod:`vua.integrity` (checks), :mod:`vua.backends` (POSIX, GPUDirect), :mod:`vua.publish`
(atomic writes) and :mod:`vua.store` (where faults become misses).
"""

from .core import VUA, ClosestKV, VUAConfig
from .errors import (
    ConfigError,
    KVCacheError,
    SplitFactorError,
    StoreRootError,
    StoreWriteError,
    TokensError,
    VUAError,
)

__all__ = [
    "VUA",
    "VUAConfig",
    "ClosestKV",
    "VUAError",
    "SplitFactorError",
    "TokensError",
    "KVCacheError",
    "StoreRootError",
    "StoreWriteError",
    "ConfigError",
    "__version__",
]
__version__ = "0.2.0"
