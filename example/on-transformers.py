#!/usr/bin/env python3
"""VUA with plain transformers: compute a long prefix once, store its KV, reuse it later.

1. "Yesterday": run the model over a shared prefix (a long document, a system prompt) and
   ``VUA.put`` its KV cache on the store.
2. "Today", in a fresh ``VUA`` instance: ``get_closest`` finds the longest stored prefix of a
   new prompt (prefix + question), its KV goes into a ``DynamicCache`` and the model computes
   only the question before generating.
3. The same prompt is generated without the store; the tokens must be identical (exit code 1
   otherwise).

    python example/on-transformers.py                       # built-in random-weight Llama
    python example/on-transformers.py --model /models/Llama-3.2-1B --prefix-tokens 4000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from vua import VUA, VUAConfig
from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama


def generate(model, prompt: torch.Tensor, max_new_tokens: int, cache: DynamicCache | None = None) -> tuple[list[int], float]:
    """Greedy tokens after ``prompt`` ([1, N]) and the seconds it took; ``cache`` holds KV for a prefix of it."""
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return output[0, prompt.shape[1] :].tolist(), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local path or hub name (default: built-in random-weight Llama)")
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="length of the shared prefix")
    parser.add_argument("--question-tokens", type=int, default=40, help="tokens after the prefix")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--split-factor", type=int, default=256, help="tokens per stored fragment")
    parser.add_argument("--root", help="store root (default: a temporary directory)")
    args = parser.parse_args()

    model_path = args.model or str(build_tiny_llama(TinyLlamaSpec()))
    # float32 on CPU so that the prefix computed alone and inside the full prompt match bit for bit.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = VUAConfig(split_factor=args.split_factor, identity=f"{model_path}:float32")
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prefix = torch.tensor([[rng.randrange(16, vocab) for _ in range(args.prefix_tokens)]])
    question = torch.tensor([[rng.randrange(16, vocab) for _ in range(args.question_tokens)]])
    prompt = torch.cat([prefix, question], dim=1)

    with tempfile.TemporaryDirectory(prefix="vua-example-") as scratch:
        root = args.root or scratch
        # 1. Compute the prefix once and store it (put needs whole fragments: trim to split_factor).
        stored = config.trim_to_split_factor(prefix)
        if stored.shape[1]:
            with torch.no_grad():
                kv = model(stored, use_cache=True).past_key_values
            with VUA(config, root) as vua:
                vua.put(stored, kv)
            print(f"stored the KV of {stored.shape[1]} prefix tokens in {root}")
        else:
            print(f"the prefix is shorter than split_factor={config.split_factor}: nothing to store")

        # 2. Later, another process: load the closest stored prefix and compute only the rest.
        with VUA(config, root) as vua:
            start = time.perf_counter()
            hit = vua.get_closest(prompt, device="cpu")
            load_seconds = time.perf_counter() - start
        if hit is None:
            print("FAIL: nothing found in the store", file=sys.stderr)
            return 1
        cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(hit.data):
            cache.update(keys, values, layer)
        reused = hit.tokens.shape[-1]
        with_store, seconds_with = generate(model, prompt, args.max_new_tokens, cache)

    # 3. The same prompt from scratch.
    without_store, seconds_without = generate(model, prompt, args.max_new_tokens)
    print(f"reused {reused} of {prompt.shape[1]} prompt tokens (loaded in {load_seconds * 1000:.0f} ms)")
    print(f"generate with the store:    {seconds_with:.2f} s  {with_store}")
    print(f"generate without the store: {seconds_without:.2f} s  {without_store}")
    if with_store != without_store:
        print("FAIL: the tokens differ with and without the store", file=sys.stderr)
        return 1
    print(f"OK: identical {len(with_store)} tokens with and without the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
