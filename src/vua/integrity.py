"""What makes a stored fragment trustworthy: per-tensor checksums and the fragment's own claims.

Each fragment's ``__metadata__`` records the format version, the key (prefix digest) it was
stored under, its token count and an xxh3-64 checksum per tensor, so any subset of tensors (one
layer, say) can be read and verified on its own. The token ids are stored as the tensor
``tokens`` and compared with the query, so a hash collision or a misplaced file can never be
served.

Bytes that GPUDirect Storage puts straight into GPU memory never pass through the host, where
xxh3 runs. For them a fragment written from GPU memory also records a *device checksum* per KV
tensor (:func:`device_checksum`): a position-weighted sum of its 32-bit words modulo 2**64, made
of plain tensor ops, so the GPU computes it at memory speed and any device gets the same value
(integer sums wrap identically in any order). A GDS read is verified with it; a fragment
without one is read through host memory instead.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import xxhash

from .errors import CorruptFragmentError
from .keys import FORMAT_VERSION
from .serdes import Header

__all__ = [
    "TOKENS_TENSOR",
    "stored_start",
    "checksum",
    "device_checksum",
    "fragment_metadata",
    "check_header",
    "check_tokens",
    "check_tensor",
    "has_device_checksums",
    "check_device_tensor",
]

TOKENS_TENSOR = "tokens"
_FORMAT = "vua_format"
_KEY = "vua_key"
_START = "vua_start"
_TOKENS = "vua_tokens"
_CHECKSUMS = "vua_checksums"
_DEVICE_CHECKSUMS = "vua_device_checksums"


def checksum(buffers: Iterable[Any]) -> str:
    """xxh3-64 over the concatenation of host ``buffers``, as 16 hex digits."""
    hasher = xxhash.xxh3_64()
    for buffer in buffers:
        hasher.update(buffer)
    return hasher.hexdigest()


def device_checksum(parts: Sequence[torch.Tensor]) -> str:
    """The device checksum of the concatenated bytes of ``parts`` (on any one device), 16 hex digits.

    Word i (32 bits, sign-extended) is weighted by 2i+1: odd weights make every changed word
    count, and distinct weights make swapped words or blocks count too.
    """
    total = torch.zeros((), dtype=torch.int64, device=parts[0].device if parts else "cpu")
    offset = 0
    for part in parts:
        raw = part.reshape(-1).view(torch.uint8)
        if raw.numel() % 4:
            raise ValueError(f"a device checksum needs whole 32-bit words, got {raw.numel()} bytes")
        words = raw.view(torch.int32).to(torch.int64)
        weights = torch.arange(offset, offset + words.numel(), dtype=torch.int64, device=words.device) * 2 + 1
        total += (words * weights).sum()
        offset += words.numel()
    return f"{int(total.item()) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def fragment_metadata(
    key: bytes, start: int, token_count: int, checksums: Sequence[str], device_checksums: Mapping[str, str] | None = None,
    tensor_names: Sequence[str] = (),
) -> dict[str, str]:
    """``start`` is the position of the fragment's first token in its sequence (gc evicts deep fragments first).

    ``device_checksums`` maps some of ``tensor_names`` (the tensors in file order) to their
    :func:`device_checksum`; they are recorded in that order, empty for the others.
    """
    metadata = {
        _FORMAT: str(FORMAT_VERSION),
        _KEY: key.hex(),
        _START: str(start),
        _TOKENS: str(token_count),
        _CHECKSUMS: ",".join(checksums),
    }
    if device_checksums:
        metadata[_DEVICE_CHECKSUMS] = ",".join(device_checksums.get(name, "") for name in tensor_names)
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


def has_device_checksums(header: Header, names: Iterable[str]) -> bool:
    """Whether a device checksum is recorded for every tensor of ``names``."""
    sums = header.metadata.get(_DEVICE_CHECKSUMS, "").split(",")
    if len(sums) != len(header.entries):
        return False
    recorded = {e.name for e, value in zip(header.entries, sums) if value}
    return set(names) <= recorded


def check_device_tensor(header: Header, name: str, parts: Sequence[torch.Tensor]) -> None:
    """Raise :class:`CorruptFragmentError` unless device memory ``parts`` hold the bytes recorded for ``name``."""
    sums = header.metadata.get(_DEVICE_CHECKSUMS, "").split(",")
    index = next(i for i, e in enumerate(header.entries) if e.name == name)
    if len(sums) != len(header.entries) or not sums[index]:
        raise CorruptFragmentError(f"tensor {name!r} has no device checksum; it cannot be verified in device memory")
    if device_checksum(parts) != sums[index]:
        raise CorruptFragmentError(f"device checksum mismatch in tensor {name!r}")
