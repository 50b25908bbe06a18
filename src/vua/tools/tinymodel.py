"""A small random-weight Llama, built locally (no downloads), for tests, the demo and benchmarks.

Weights come from a fixed seed, so every process that loads the directory computes the same
thing. The tokenizer is a word-level tokenizer trained on a fixed vocabulary: enough to turn text
into ids and back, which is all vLLM's front end needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["TinyLlamaSpec", "build_tiny_llama", "default_model_dir"]


@dataclass(frozen=True)
class TinyLlamaSpec:
    # Head dim 64 and a KV block multiple of 32 are what vLLM's CPU attention accepts.
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 2048
    max_positions: int = 16384
    seed: int = 0

    @property
    def name(self) -> str:
        return f"tiny-llama-l{self.layers}-h{self.hidden}-kv{self.kv_heads}-v{self.vocab}-s{self.seed}"


def default_model_dir() -> Path:
    return Path(os.environ.get("VUA_MODEL_CACHE", Path.home() / ".cache" / "vua" / "models"))


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def build_tiny_llama(spec: TinyLlamaSpec = TinyLlamaSpec(), root: Path | None = None) -> Path:
    """The directory of the model for ``spec``, building it on first use (atomically, so concurrent callers agree)."""
    root = Path(root) if root is not None else default_model_dir()
    target = root / spec.name
    if (target / "vua-tiny-llama.json").exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{spec.name}.{os.getpid()}"
    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(staging, safe_serialization=True)
    _write_tokenizer(staging, spec.vocab)
    (staging / "vua-tiny-llama.json").write_text(json.dumps(asdict(spec)))
    try:
        os.rename(staging, target)
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)  # another process built it first
    return target
