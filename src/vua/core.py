"""The core API: ``VUA.put`` stores KV caches by token prefix, ``VUA.get_closest`` finds the longest stored prefix.

Example::

    vua = VUA(VUAConfig, "/mnt/shared/kv")
    vua.put(tokens, kvcache)                       # tokens [N] or [B, N]; kvcache: per layer (K, V)
    hit = vua.get_closest(tokens, device="cpu")    # ClosestKV(tokens, data) or None

KV caches use the transformers legacy layout: a list with one ``(keys, values)`` pair per layer,
each ``[batch, heads, tokens, head_dim]``; a ``DynamicCache`` is accepted too. Every group of
``split_factor`` tokens is one fragment file holding all layers for that group, named by the
chained hash of the whole prefix it ends.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .config import VUAConfig
from .errors import KVCacheError, SplitFactorError, TokensError
from .eviction import RecencyTouch
from .keys import as_token_array, chained_digests, squeeze_batch
from .serdes import dtype_name, host_bytes, torch_dtype
from .store import Fragment, FragmentStore, TensorSource

__all__ = ["VUA", "VUAConfig", "ClosestKV", "SplitFactorError"]

logger = logging.getLogger(__name__)

SHARD = "kv"
KVCache = Sequence[tuple[torch.Tensor, torch.Tensor]]


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query: its token ids and, per layer, ``(keys, values)``."""

    tokens: Any
    data: list[tuple[torch.Tensor, torch.Tensor]]


def _entry_names(layer: int) -> tuple[str, str]:
    return f"layer.{layer}.keys", f"layer.{layer}.values"


def _legacy_layers(kvcache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of a legacy list or of a transformers cache object."""
    if hasattr(kvcache, "layers") and not isinstance(kvcache, (list, tuple)):
        return [(layer.keys, layer.values) for layer in kvcache.layers]
    if hasattr(kvcache, "key_cache"):
        return list(zip(kvcache.key_cache, kvcache.value_cache))
    if not isinstance(kvcache, (list, tuple)):
        raise KVCacheError(f"kvcache must be a list of (keys, values) per layer or a DynamicCache, got {type(kvcache).__name__}")
    layers = []
    for index, pair in enumerate(kvcache):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise KVCacheError(f"kvcache layer {index} must be a (keys, values) pair of tensors")
        layers.append((pair[0], pair[1]))
    return layers


class VUA:
    """KV-cache storage on a (shared) filesystem root.

    Args:
        config: :class:`VUAConfig`, a subclass, or an instance.
        root_path: an existing directory; several processes and nodes may share it.
        backend: ``"auto"`` (GPUDirect Storage when usable, else POSIX), ``"posix"`` or ``"gds"``.
        io_threads: parallel fragment reads and writes; default: one per CPU, at most 8. From the
            page cache more threads than cores only contend (on 2 cores, 2 threads read 403 MB at
            10.3 GB/s, 8 threads at 7.9); on a network filesystem, more hide latency.
        **store_options: passed to :class:`~vua.store.FragmentStore` (``file_mode``, ``durable``...).
    """

    def __init__(
        self,
        config: type[VUAConfig] | VUAConfig,
        root_path: str | os.PathLike[str],
        *,
        backend: str = "auto",
        io_threads: int | None = None,
        **store_options: Any,
    ) -> None:
        self.config = config
        self.split_factor = config.split_factor
        store_options.setdefault("on_hit", RecencyTouch())  # so that `vua gc` evicts least recently used
        self.store = FragmentStore(root_path, config.namespace(), backend=backend, **store_options)
        threads = io_threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vua-io")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "VUA":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- put ----

    def put(self, tokens: Any, kvcache: Any) -> None:
        """Store ``kvcache`` for ``tokens`` ([N] or a batch [B, N]); groups already stored are skipped.

        Raises:
            SplitFactorError: N is not a multiple of ``split_factor``.
            TokensError / KVCacheError: malformed input (the message names the problem).
            StoreWriteError: the filesystem refused a write (full, read-only, permissions).
        """
        rows = self._token_rows(tokens)
        length = len(rows[0])
        if length % self.split_factor:
            raise SplitFactorError(
                f"put() needs a token count that is a multiple of split_factor={self.split_factor}, got {length}; "
                "trim it with VUAConfig.trim_to_split_factor()"
            )
        layers = self._checked_layers(kvcache, len(rows), length)
        host = [(host_bytes(k), host_bytes(v)) for k, v in layers]
        jobs = []
        for row, row_tokens in enumerate(rows):
            for group, digest in enumerate(chained_digests(row_tokens, self.split_factor, self.store.namespace.seed)):
                jobs.append(self._pool.submit(self._put_group, digest, row_tokens, row, group, layers, host))
        # Every write ends (stored, or refused and cleaned up) before put returns or raises: a
        # caller that sees the first error must not find another group's write still under way.
        concurrent.futures.wait(jobs)
        for job in jobs:
            job.result()

    def _put_group(self, digest: bytes, row_tokens: np.ndarray, row: int, group: int, layers: KVCache, host: list) -> None:
        begin, end = group * self.split_factor, (group + 1) * self.split_factor
        tensors = []
        for index, ((keys, values), (key_bytes, value_bytes)) in enumerate(zip(layers, host)):
            for name, tensor, raw in zip(_entry_names(index), (keys, values), (key_bytes, value_bytes)):
                heads, head_dim = tensor.shape[1], tensor.shape[3]
                segments = [raw[row, h, begin:end] for h in range(heads)]
                tensors.append(TensorSource(name, dtype_name(tensor.dtype), (heads, end - begin, head_dim), segments))
        path = self.store.layout.fragment_path(digest, SHARD)
        self.store.write(path, digest, row_tokens[begin:end], tensors, start=begin)

    # ---- get ----

    def get_closest(self, tokens: Any, device: str | torch.device = "cpu") -> ClosestKV | None | list[ClosestKV | None]:
        """The longest contiguous stored prefix of ``tokens``, with its KV on ``device``.

        ``tokens`` [N] or [1, N] gives a :class:`ClosestKV` or None; a list of 1-D tensors (or a
        [B, N] tensor with B > 1) gives a list. A query that is not a multiple of ``split_factor``
        is trimmed. Stored data that is missing, corrupt or unreadable ends the prefix there.
        """
        if isinstance(tokens, (list, tuple)) and tokens and not isinstance(tokens[0], (int, np.integer)):
            return [self._get_one(t, device) for t in tokens]
        shape = getattr(tokens, "shape", None)
        if shape is not None and len(shape) == 2 and shape[0] != 1:
            return [self._get_one(t, device) for t in tokens]
        return self._get_one(tokens, device)

    def _get_one(self, tokens: Any, device: str | torch.device) -> ClosestKV | None:
        query = as_token_array(squeeze_batch(tokens))  # bad input raises here, before any I/O
        target = torch.device(device)
        try:
            return self._load_closest(tokens, query, target)
        except Exception:  # noqa: BLE001 - whatever storage holds, a lookup is a hit or a miss
            logger.exception("VUA: get_closest failed; treating it as a miss")
            return None

    def _load_closest(self, tokens: Any, query: np.ndarray, device: torch.device) -> ClosestKV | None:
        digests = chained_digests(query, self.split_factor, self.store.namespace.seed)
        fragments = self._open_prefix(digests)
        if not fragments:
            return None
        try:
            outputs = self._allocate(fragments, device)
            if outputs is None:
                return None
            found = self._read_prefix(fragments, outputs, query)
        finally:
            for fragment in fragments:
                fragment.close()
        if found == 0:
            return None
        count = found * self.split_factor
        data = [(k[:, :, :count].to(device), v[:, :, :count].to(device)) for k, v in outputs]
        trimmed = self.config.trim_to_split_factor(tokens)
        # Same type and leading dims as the query: a tensor/array slices its last dim, a list slices itself.
        return ClosestKV(trimmed[..., :count] if hasattr(trimmed, "shape") else trimmed[:count], data)

    def _open_prefix(self, digests: list[bytes]) -> list[Fragment]:
        """Open the leading run of stored fragments (in parallel); the rest are closed."""
        paths = [self.store.layout.fragment_path(d, SHARD) for d in digests]
        opened = list(self._pool.map(self.store.open, paths, digests))
        prefix: list[Fragment] = []
        for fragment in opened:
            if fragment is None or (prefix and not _same_layout(prefix[0], fragment)):
                break
            prefix.append(fragment)
        for fragment in opened[len(prefix) :]:
            if fragment is not None:
                fragment.close()
        return prefix

    def _allocate(self, fragments: list[Fragment], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        entries = fragments[0].tensor_entries()
        if len(entries) % 2 or any(len(e.shape) != 3 for e in entries):
            logger.warning("VUA: fragment %s does not hold a (keys, values) layout; ignoring it", fragments[0].path)
            return None
        total = len(fragments) * self.split_factor
        pin = device.type == "cuda"
        outputs = []
        for index in range(len(entries) // 2):
            pair = []
            for name in _entry_names(index):
                entry = fragments[0].header.entry(name)
                heads, _, head_dim = entry.shape
                pair.append(torch.empty((1, heads, total, head_dim), dtype=torch_dtype(entry.dtype), pin_memory=pin))
            outputs.append((pair[0], pair[1]))
        return outputs

    def _read_prefix(self, fragments: list[Fragment], outputs: list[tuple[torch.Tensor, torch.Tensor]], query: np.ndarray) -> int:
        """Read every fragment into its slice of ``outputs``; the number of leading groups read intact."""
        host = [(host_bytes(k), host_bytes(v)) for k, v in outputs]

        def read(group: int) -> bool:
            begin, end = group * self.split_factor, (group + 1) * self.split_factor
            wanted = []
            for index, pair in enumerate(host):
                for name, raw in zip(_entry_names(index), pair):
                    wanted.append((name, [raw[0, h, begin:end] for h in range(raw.shape[1])]))
            return self.store.read(fragments[group], wanted, query[begin:end])

        results = list(self._pool.map(read, range(len(fragments))))
        return results.index(False) if False in results else len(results)

    # ---- validation ----

    def _token_rows(self, tokens: Any) -> list[np.ndarray]:
        shape = getattr(tokens, "shape", None)
        if shape is None:
            if not isinstance(tokens, (list, tuple)):
                raise TokensError(f"tokens must be a tensor, array or sequence of ints, got {type(tokens).__name__}")
            tokens = np.asarray(tokens)
            shape = tokens.shape
        if len(shape) == 1:
            return [as_token_array(tokens)]
        if len(shape) == 2:
            return [as_token_array(row) for row in tokens]
        raise TokensError(f"tokens must be [N] or [B, N], got shape {tuple(shape)}")

    def _checked_layers(self, kvcache: Any, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers = _legacy_layers(kvcache)
        if not layers:
            raise KVCacheError("kvcache has no layers")
        checked = []
        for index, (keys, values) in enumerate(layers):
            pair = []
            for what, tensor in (("keys", keys), ("values", values)):
                if tensor.dim() != 4:
                    raise KVCacheError(f"layer {index} {what}: expected [batch, heads, tokens, head_dim], got shape {tuple(tensor.shape)}")
                if tensor.shape[0] != batch:
                    raise KVCacheError(f"layer {index} {what}: batch size {tensor.shape[0]} but {batch} token rows")
                if tensor.shape[2] != length:
                    raise KVCacheError(f"layer {index} {what}: {tensor.shape[2]} tokens but {length} token ids")
                dtype_name(tensor.dtype)
                pair.append(tensor.detach().to("cpu").contiguous())
            checked.append((pair[0], pair[1]))
        return checked


def _same_layout(first: Fragment, other: Fragment) -> bool:
    return [(e.name, e.dtype, e.shape) for e in first.tensor_entries()] == [
        (e.name, e.dtype, e.shape) for e in other.tensor_entries()
    ]
