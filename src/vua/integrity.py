"""What makes a stored fragment trustworthy: per-tensor checksums and the fragment's own claims.

Each fragment's ``__metadata__`` records the format version, the key (prefix digest) it was
stored under, its token count and an xxh3-64 checksum per tensor, so any subset of tensors (one
layer, say) can be read and verified on its own. The token ids are stored as the tensor
``tokens`` and compared with the query, so a hash collision or a misplaced file can never be
served.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xxhash

from .errors import CorruptFragmentError
from .keys import FORMAT_VERSION
from .serdes import Header

__all__ = ["TOKENS_TENSOR", "stored_start", "checksum", "fragment_metadata", "check_header", "check_tokens", "check_tensor"]

TOKENS_TENSOR = "tokens"
_FORMAT = "vua_format"
_KEY = "vua_key"
_START = "vua_start"
_TOKENS = "vua_tokens"
_CHECKSUMS = "vua_checksums"


def checksum(buffers: Iterable[Any]) -> str:
    """xxh3-64 over the concatenation of host ``buffers``, as 16 hex digits."""
    hasher = xxhash.xxh3_64()
    for buffer in buffers:
        hasher.update(buffer)
    return hasher.hexdigest()


def fragment_metadata(
    key: bytes, start: int, token_count: int, checksums: Sequence[str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``start`` is the position of the fragment's first token in its sequence (gc evicts deep fragments first)."""
    metadata = dict(extra or {})
    metadata.update(
        {
            _FORMAT: str(FORMAT_VERSION),
            _KEY: key.hex(),
            _START: str(start),
            _TOKENS: str(token_count),
            _CHECKSUMS: ",".join(checksums),
        }
    )
    return metadata


def stored_start(header: Header) -> int | None:
    """The position of the fragment's first token as its metadata records it, or None if unreadable."""
    value = header.metadata.get(_START, "")
    return int(value) if value.isascii() and value.isdigit() else None


def check_header(header: Header, key: bytes) -> None:
    """Raise :class:`CorruptFragmentError` unless ``header`` is a VUA fragment stored under ``key``."""
    meta = header.metadata
    if meta.get(_FORMAT) != str(FORMAT_VERSION):
        raise CorruptFragmentError(f"not a VUA v{FORMAT_VERSION} fragment (format {meta.get(_FORMAT)!r})")
    if meta.get(_KEY) != key.hex():
        raise CorruptFragmentError(f"fragment was stored under key {meta.get(_KEY)!r}, not {key.hex()}")
    sums = meta.get(_CHECKSUMS, "").split(",")
    if len(sums) != len(header.entries):
        raise CorruptFragmentError(f"{len(sums)} checksums for {len(header.entries)} tensors")
    tokens = header.entry(TOKENS_TENSOR)
    count = meta.get(_TOKENS, "")
    if not (count.isascii() and count.isdigit() and len(count) < 20):
        raise CorruptFragmentError(f"token count {count!r} is not a non-negative integer"[:200])
    if tokens.dtype != "I64" or tokens.shape != (int(count),):
        raise CorruptFragmentError(f"tokens tensor {tokens.dtype}{list(tokens.shape)} disagrees with the metadata")


def check_tensor(header: Header, name: str, buffers: Iterable[Any]) -> None:
    """Raise :class:`CorruptFragmentError` unless ``buffers`` hold the bytes checksummed for ``name``."""
    index = next(i for i, e in enumerate(header.entries) if e.name == name)
    expected = header.metadata[_CHECKSUMS].split(",")[index]
    if checksum(buffers) != expected:
        raise CorruptFragmentError(f"checksum mismatch in tensor {name!r}")


def check_tokens(stored: np.ndarray, expected: np.ndarray) -> None:
    if stored.shape != expected.shape or not np.array_equal(stored, expected):
        raise CorruptFragmentError("stored token ids differ from the query")
