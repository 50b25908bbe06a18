"""Token ids to storage keys.

A key names a whole token prefix: ``digest[i]`` is xxh3_128 over ``digest[i-1]`` and the i-th
group of token ids, encoded as little-endian int64 so that equal ids give equal keys whatever the
tensor dtype. The chain starts from a namespace digest, so different formats, group sizes, models
or KV layouts can never share a key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from .errors import TokensError

__all__ = [
    "FORMAT_VERSION",
    "Namespace",
    "DIGEST_BYTES",
    "as_token_array",
    "squeeze_batch",
    "chained_digests",
    "salted_seed",
]

FORMAT_VERSION = 1
DIGEST_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything that changes the stored bytes, hashed into the root of every key chain.

    ``identity`` is free-form (a model name and KV layout, say); ``granularity`` is the number
    of tokens hashed per link of the chain.
    """

    granularity: int
    identity: str = ""
    extra: tuple[tuple[str, Any], ...] = ()

    def canonical(self) -> str:
        fields = {"format": FORMAT_VERSION, "granularity": self.granularity, "identity": self.identity}
        fields.update(dict(self.extra))
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def seed(self) -> bytes:
        return xxhash.xxh3_128_digest(self.canonical().encode())

    @property
    def name(self) -> str:
        """A short directory name for this namespace (64 bits of its seed)."""
        return self.seed.hex()[:16]


def as_token_array(tokens: Any) -> np.ndarray:
    """Token ids (torch tensor, numpy array or sequence of ints) as a 1-D little-endian int64 array."""
    if hasattr(tokens, "detach"):
        if tokens.is_floating_point() or tokens.is_complex() or str(tokens.dtype) == "torch.bool":
            raise TokensError(f"token ids must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    array = np.asarray(tokens)
    if array.size == 0:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TokensError(f"token ids must be integers, got {array.dtype}")
    if array.ndim != 1:
        raise TokensError(f"expected a 1-D sequence of token ids, got shape {tuple(array.shape)}")
    if array.size and int(array.min()) < 0:
        raise TokensError("token ids must be non-negative")
    return array.astype("<i8", copy=False)


def squeeze_batch(tokens: Any) -> Any:
    """A ``[1, N]`` batch of one as ``[N]``; anything else unchanged."""
    shape = getattr(tokens, "shape", None)
    if shape is not None and len(shape) == 2 and shape[0] == 1:
        return tokens[0]
    return tokens


def chained_digests(tokens: np.ndarray, granularity: int, seed: bytes, count: int | None = None) -> list[bytes]:
    """Digests of the first ``count`` (default: every full) group of ``granularity`` tokens.

    ``tokens`` must come from :func:`as_token_array`.
    """
    full = len(tokens) // granularity
    count = full if count is None else min(count, full)
    digests: list[bytes] = []
    parent = seed
    for i in range(count):
        parent = _link_digest(parent, tokens[i * granularity : (i + 1) * granularity])
        digests.append(parent)
    return digests


def _link_digest(parent: bytes, tokens: np.ndarray) -> bytes:
    """One link of the chain: the digest of ``parent``'s prefix extended by ``tokens``."""
    hasher = xxhash.xxh3_128(parent)
    hasher.update(np.ascontiguousarray(tokens, dtype="<i8").data.cast("B"))
    return hasher.digest()


def salted_seed(seed: bytes, salt: str) -> bytes:
    """The chain seed for a cache salt (vLLM's per-tenant ``cache_salt``): another salt, other keys."""
    return xxhash.xxh3_128_digest(seed + salt.encode()) if salt else seed
