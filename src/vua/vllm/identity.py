"""What a connector engine stores, and the namespace that keeps it apart from engines whose KV differs.

The namespace is hashed into the root of every key chain, so two engines share stored KV only
when everything that decides the KV bytes of a token prefix agrees: the weights, the model's
configuration as vLLM resolved it, the compute dtype, weight quantization, the KV-cache dtype and
scales, the KV layout, and the parallel layout the shards are cut by. Nothing in it depends on
the pipeline stage or on where the checkpoint lies, so every stage of an engine, and engines on
other nodes with their own copy of the checkpoint, agree on it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from ..errors import ConfigError
from ..keys import Namespace
from ..serdes import dtype_name
from ._compat import kv_cache_settings, served_attention_spec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["StoreIdentity", "store_identity", "weights_fingerprint", "hf_config_digest"]

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
SAMPLE_BYTES = 64 << 10  # per window, three windows per file
# Keys of a config's to_dict() that say where it was read from or what wrote it, not what the model computes.
CONFIG_PROVENANCE = frozenset({"_name_or_path", "_commit_hash", "transformers_version"})
# Context parallelism interleaves a request's tokens over ranks, so a rank's KV block holds only
# some of the block's tokens, which the shard names do not record. (Older vLLM lacks prefill CP.)
CONTEXT_PARALLEL_SETTINGS = ("decode_context_parallel_size", "prefill_context_parallel_size")


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that decides whether stored KV fits this engine, hashed into the namespace."""

    model: str  # for people (``vua ls``): the checkpoint directory's name, a hub id, or name@revision
    kv_dtype: str
    block_shape: tuple[int, ...]
    block_size: int
    chunk_size: int
    tp_size: int = 1
    pp_size: int = 1
    mla: bool = False
    weights: str = ""  # weights_fingerprint(), or name@revision when there is nothing to fingerprint
    hf_config: str = ""  # hf_config_digest()
    model_dtype: str = ""
    quantization: str = ""  # the weight quantization method, "" for none
    quantization_config: str = ""  # vLLM's quantization config beyond the checkpoint's, as canonical JSON
    cache_dtype: str = "auto"  # the string: every fp8 variant is stored as uint8
    kv_settings: tuple[tuple[str, Any], ...] = ()  # kv_cache_settings()

    def namespace(self) -> Namespace:
        return Namespace(
            granularity=self.block_size,
            identity=f"vllm-v1:{self.model}",
            extra=(
                ("weights", self.weights),
                ("hf_config", self.hf_config),
                ("model_dtype", self.model_dtype),
                ("quantization", self.quantization),
                ("quantization_config", self.quantization_config),
                ("kv_cache_dtype", self.cache_dtype),
                *self.kv_settings,
                ("kv_dtype", self.kv_dtype),
                ("kv_block_shape", list(self.block_shape)),
                ("chunk_size", self.chunk_size),
                ("tp_size", self.tp_size),
                ("pp_size", self.pp_size),
                ("mla", self.mla),
            ),
        )

    def shard(self, tp_rank: int, pp_rank: int = 0) -> str:
        """The file a rank reads; MLA latents are the same on every TP rank, so they share one."""
        tp = 0 if self.mla else tp_rank
        return f"pp{pp_rank}-tp{tp}" if self.pp_size > 1 else f"tp{tp}"

    def writes(self, tp_rank: int) -> bool:
        """Whether this rank stores its KV (for MLA only rank 0 does)."""
        return not self.mla or tp_rank == 0

    def shards(self) -> list[str]:
        """Every shard a chunk must have before it counts as stored."""
        tp_ranks = [0] if self.mla else range(self.tp_size)
        return sorted({self.shard(t, p) for t in tp_ranks for p in range(self.pp_size)})


def store_identity(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig", chunk_size: int) -> StoreIdentity:
    """The model and KV layout this engine stores, from its configuration (the same in every process).

    Raises :class:`~vua.errors.ConfigError` for engines whose KV VUA cannot store correctly.
    """
    spec, mla = served_attention_spec(kv_cache_config)
    parallel = vllm_config.parallel_config
    for setting in CONTEXT_PARALLEL_SETTINGS:
        size = getattr(parallel, setting, 1)
        if size > 1:
            raise ConfigError(f"VUA cannot store KV under context parallelism: {setting} is {size} (set it to 1)")
    # The per-layer paged tensor vLLM 0.32+ hands out is [blocks, kv_heads, block, head_size + head_size_v].
    head_v = getattr(spec, "head_size_v", None)
    head_v = spec.head_size if head_v is None else head_v
    model = vllm_config.model_config
    fingerprint = _weights_of(vllm_config)
    named = f"{model.model_weights or model.model}@{model.revision or ''}"
    return StoreIdentity(
        model=_model_label(model.model) if fingerprint else named,
        kv_dtype=dtype_name(spec.dtype),
        block_shape=(spec.num_kv_heads, spec.block_size, spec.head_size + head_v),
        block_size=spec.block_size,
        chunk_size=chunk_size,
        tp_size=parallel.tensor_parallel_size,
        pp_size=parallel.pipeline_parallel_size,
        mla=mla,
        weights=fingerprint or named,
        hf_config=hf_config_digest(model.hf_config),
        model_dtype=str(model.dtype),
        quantization=str(model.quantization or ""),
        quantization_config="" if model.quantization_config is None else _canonical_json(model.quantization_config),
        cache_dtype=str(vllm_config.cache_config.cache_dtype),
        kv_settings=kv_cache_settings(vllm_config.cache_config),
    )


def _weights_of(vllm_config: "VllmConfig") -> str | None:
    model = vllm_config.model_config
    load = vllm_config.load_config
    if str(load.load_format) == "dummy":
        return "dummy"  # vLLM's dummy weights come from a fixed seed, not from the checkpoint
    # Weights vLLM streams from object storage (model_weights) are not on this machine to fingerprint.
    fingerprint = None if model.model_weights else weights_fingerprint(model.model, model.revision, load.download_dir)
    if fingerprint is None:
        logger.info(
            "VUA: no local weight files of %s to fingerprint; the store namespace names the weights by "
            "name@revision, so do not publish new weights under the same name and revision",
            model.model_weights or model.model,
        )
    return fingerprint


def _model_label(model: str) -> str:
    # A local checkpoint is named by its directory's name, not its path: copies elsewhere agree.
    return Path(model).name if os.path.exists(model) else model


def weights_fingerprint(model: str, revision: str | None = None, download_dir: str | None = None) -> str | None:
    """A cheap hash of a checkpoint's weight files, or None when none can be found on this machine.

    ``model`` is a checkpoint directory, a single weight file, or a hub id looked up (never
    downloaded) in the local Hugging Face cache. Per file it hashes the name, the size, the
    safetensors header and three ``SAMPLE_BYTES`` windows of data (start, middle, end): a
    checkpoint rewritten in place with new weights of the same shapes gets a new fingerprint,
    at a cost of a few small reads per file. Modification times are left out on purpose: copies
    of one checkpoint on different nodes (or restored from a backup) must agree.
    """
    files = _weight_files(model, revision, download_dir)
    if not files:
        return None
    hasher = xxhash.xxh3_128()
    for name, path in files:
        with open(path, "rb") as handle:
            _hash_file(hasher, name, handle)
    return hasher.hexdigest()


def _weight_files(model: str, revision: str | None, download_dir: str | None) -> list[tuple[str, Path]]:
    path = Path(model)
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True))
        except (ImportError, OSError, ValueError):  # no hub client, not cached here, or not a hub id
            return []
    # Only the top level: vLLM loads no weights from subdirectories (e.g. original/ checkpoints).
    return sorted((entry.name, entry) for entry in path.iterdir() if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file())


def _hash_file(hasher: Any, name: str, handle: BinaryIO) -> None:
    size = os.fstat(handle.fileno()).st_size
    hasher.update(json.dumps([name, size]).encode())
    data_start = 0
    if name.endswith(".safetensors") and size >= 8:
        data_start = min(size, 8 + int.from_bytes(handle.read(8), "little"))
        handle.seek(0)
        hasher.update(handle.read(data_start))
    if size - data_start <= 3 * SAMPLE_BYTES:
        hasher.update(handle.read(size - data_start))
        return
    for offset in (data_start, data_start + (size - data_start - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
        handle.seek(offset)
        hasher.update(handle.read(SAMPLE_BYTES))


def hf_config_digest(hf_config: Any) -> str:
    """A hash of the model's Hugging Face config as vLLM resolved it (``hf_overrides`` applied).

    It covers what decides the KV beyond the weights: the architecture, layer count, heads, RoPE
    scaling, sliding windows. Provenance keys are left out so copies of a checkpoint agree.
    """
    return xxhash.xxh3_128_hexdigest(_canonical_json(_without_provenance(hf_config.to_dict())).encode())


def _without_provenance(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_provenance(v) for k, v in value.items() if k not in CONFIG_PROVENANCE}
    if isinstance(value, (list, tuple)):
        return [_without_provenance(v) for v in value]
    return value


def _canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys; dataclasses, enums, sets and dtypes by value or name."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=_canonical_json)
    return str(value)  # torch.dtype and the like: their str is their name
