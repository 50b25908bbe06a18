"""The store namespace separates every configuration whose KV could differ, and only those.

Built from vLLM's own config objects (``ModelConfig`` over a tiny local checkpoint, ``CacheConfig``,
``ParallelConfig``, ``VllmConfig``) and KV cache specs; the few exceptions say why.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, ParallelConfig, VllmConfig
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    CrossAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from vua.errors import ConfigError
from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama
from vua.vllm.identity import store_identity, weights_fingerprint

BLOCK = 32
CHUNK = 128
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]
FULL = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
FP8 = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.uint8)  # how vLLM stores every fp8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(TinyLlamaSpec(seed=0), root=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ModelConfig:
    return ModelConfig(model=str(model_dir))


def kv_config(spec=FULL, layers=LAYERS) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(layers), spec)])


def engine(model: ModelConfig, parallel: ParallelConfig | None = None, **cache) -> VllmConfig:
    return VllmConfig(model_config=model, cache_config=CacheConfig(**cache), parallel_config=parallel or ParallelConfig())


def namespace(config: VllmConfig, kv: KVCacheConfig | None = None) -> str:
    return store_identity(config, kv or kv_config(), CHUNK).namespace().name


def test_fp8_variants_and_auto_get_their_own_namespaces(model: ModelConfig) -> None:
    names = {dtype: namespace(engine(model, cache_dtype=dtype), kv_config(FULL if dtype == "auto" else FP8))
             for dtype in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")}
    assert len(set(names.values())) == 4, names


def test_kv_scale_settings_change_the_namespace(model: ModelConfig) -> None:
    base = engine(model, cache_dtype="fp8_e4m3")
    skipping = engine(model, cache_dtype="fp8_e4m3", kv_cache_dtype_skip_layers=["0"])
    assert namespace(base, kv_config(FP8)) != namespace(skipping, kv_config(FP8))

    # vLLM 0.32 has dropped CacheConfig.calculate_kv_scales (older releases have it), so it is set by hand.
    computed, loaded = engine(model, cache_dtype="fp8_e4m3"), engine(model, cache_dtype="fp8_e4m3")
    object.__setattr__(computed.cache_config, "calculate_kv_scales", True)
    object.__setattr__(loaded.cache_config, "calculate_kv_scales", False)
    assert namespace(computed, kv_config(FP8)) != namespace(loaded, kv_config(FP8))


def test_weight_quantization_changes_the_namespace(model: ModelConfig, model_dir: Path) -> None:
    plain = namespace(engine(model))
    per_tensor = namespace(engine(ModelConfig(model=str(model_dir), quantization="fp8_per_tensor")))
    per_block = namespace(engine(ModelConfig(model=str(model_dir), quantization="fp8_per_block")))
    assert len({plain, per_tensor, per_block}) == 3
    # vLLM's own quantization config (here: a layer left unquantized) is part of it too. The CPU
    # build's VllmConfig cannot resolve such a config, so the ModelConfig is put in afterwards.
    ignoring = {"ignore": ["model.layers.0.mlp.down_proj"]}
    partial = engine(ModelConfig(model=str(model_dir), quantization="fp8_per_tensor"))
    partial.model_config = ModelConfig(model=str(model_dir), quantization="fp8_per_tensor", quantization_config=ignoring)
    assert namespace(partial) != per_tensor


def test_hf_overrides_change_the_namespace(model: ModelConfig, model_dir: Path) -> None:
    rope = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    scaled = ModelConfig(model=str(model_dir), hf_overrides=rope)
    assert scaled.hf_config.to_dict()["rope_parameters"]["rope_type"] == "linear"
    assert namespace(engine(scaled)) != namespace(engine(model))


def test_model_dtype_changes_the_namespace(model: ModelConfig, model_dir: Path) -> None:
    half = ModelConfig(model=str(model_dir), dtype="float16")
    assert namespace(engine(half), kv_config(FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64,
                                                               dtype=torch.float16))) != namespace(engine(model))
    # The compute dtype alone, with the KV dtype the same, still separates them.
    float32 = ModelConfig(model=str(model_dir), dtype="float32")
    assert namespace(engine(float32)) != namespace(engine(model))


def test_weights_rewritten_in_place_change_the_namespace_and_copies_share_it(tmp_path: Path) -> None:
    original = build_tiny_llama(TinyLlamaSpec(seed=0), root=tmp_path / "a")
    other = build_tiny_llama(TinyLlamaSpec(seed=1), root=tmp_path / "b")
    copy = tmp_path / "elsewhere" / original.name
    shutil.copytree(original, copy, copy_function=shutil.copyfile)  # new mtimes
    os.utime(copy / "model.safetensors", (1, 1))
    assert os.stat(copy / "model.safetensors").st_mtime != os.stat(original / "model.safetensors").st_mtime
    before = namespace(engine(ModelConfig(model=str(original))))
    assert namespace(engine(ModelConfig(model=str(copy)))) == before

    weights = (original / "model.safetensors").read_bytes()
    new_weights = (other / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(weights[:8], "little")
    # Same shapes and dtypes (same header, same size): only the values differ.
    assert new_weights[:header] == weights[:header] and len(new_weights) == len(weights)
    assert new_weights != weights
    fingerprint = weights_fingerprint(str(original))
    (original / "model.safetensors").write_bytes(new_weights)
    assert weights_fingerprint(str(original)) != fingerprint
    assert namespace(engine(ModelConfig(model=str(original)))) != before


def test_without_local_weights_the_namespace_names_the_model(model_dir: Path, tmp_path: Path, caplog) -> None:
    # local_files_only: the lookup never downloads, so an id missing from this cache has nothing to hash.
    assert weights_fingerprint("vua-tests/not-in-the-local-cache", download_dir=str(tmp_path)) is None
    bare = tmp_path / "config-only"
    bare.mkdir()
    shutil.copy(model_dir / "config.json", bare / "config.json")
    with caplog.at_level(logging.INFO, logger="vua.vllm.identity"):
        identity = store_identity(engine(ModelConfig(model=str(bare))), kv_config(), CHUNK)
    assert identity.weights == identity.model == f"{bare}@"
    assert "no local weight files" in caplog.text


def test_pipeline_stages_share_one_namespace(model: ModelConfig) -> None:
    config = engine(model, ParallelConfig(pipeline_parallel_size=2))
    first, second = store_identity(config, kv_config(layers=LAYERS[:2]), CHUNK), store_identity(
        config, kv_config(layers=LAYERS[2:]), CHUNK)
    assert first.namespace().name == second.namespace().name
    assert (first.shard(0, 0), second.shard(0, 1)) == ("pp0-tp0", "pp1-tp0")
    assert first.namespace().name != namespace(engine(model))  # pp_size stays in it


def test_full_attention_and_mla_are_served(model: ModelConfig) -> None:
    assert store_identity(engine(model), kv_config(), CHUNK).mla is False
    mla = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    assert store_identity(engine(model), kv_config(mla), CHUNK).mla is True


SPEC = dict(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "kv, words",
    [
        (kv_config(SlidingWindowSpec(**SPEC, sliding_window=64)), "sliding_window=64"),
        (kv_config(FullAttentionSpec(**SPEC, sliding_window=64)), "sliding_window=64"),
        (kv_config(ChunkedLocalAttentionSpec(**SPEC, attention_chunk_size=256)), "attention_chunk_size=256"),
        (kv_config(FullAttentionSpec(**SPEC, attention_chunk_size=256)), "attention_chunk_size=256"),
        (kv_config(FullAttentionSpec(**SPEC, non_causal=True)), "non_causal"),
        (kv_config(CrossAttentionSpec(**SPEC)), "CrossAttentionSpec"),
        (
            KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[
                KVCacheGroupSpec(LAYERS[:2], FULL), KVCacheGroupSpec(LAYERS[2:], SlidingWindowSpec(**SPEC, sliding_window=64))]),
            "hybrid",
        ),
    ],
    ids=["sliding-window", "full-with-window", "chunked-local", "full-with-chunks", "non-causal", "cross", "hybrid"],
)
def test_unservable_attention_is_refused(model: ModelConfig, kv: KVCacheConfig, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        store_identity(engine(model), kv, CHUNK)


def test_context_parallelism_is_refused(model: ModelConfig) -> None:
    with pytest.raises(ConfigError, match="decode_context_parallel_size is 2"):
        store_identity(engine(model, ParallelConfig(tensor_parallel_size=4, decode_context_parallel_size=2)), kv_config(), CHUNK)
    # The CPU build's VllmConfig refuses prefill context parallelism itself, so it is put in afterwards.
    config = engine(model)
    config.parallel_config = ParallelConfig(prefill_context_parallel_size=2)
    with pytest.raises(ConfigError, match="prefill_context_parallel_size is 2"):
        store_identity(config, kv_config(), CHUNK)
