"""The worker half: KV blocks <-> fragments, for the jobs the scheduler half planned.

Loads go straight into the paged KV tensor: each block of a layer is one contiguous slice of
dimension 0, so a fragment's layer tensor ``[n_blocks, *block_shape]`` is read with one vectored
read whose pieces are the destination blocks themselves (POSIX ``preadv`` into host memory, or
kvikio into GPU memory). Without GPUDirect Storage on CUDA, bytes land in a pinned host buffer
and are copied up. Reads run per (layer, fragment) on a thread pool in layer order, and each
attention layer waits only for its own layer.

Saves copy the computed blocks out of the KV cache (``index_select``) when the forward pass has
finished, then write in the background; staging memory is bounded and a save that does not fit
is skipped, never waited for. Every storage fault is a miss or a skipped save plus a log line;
blocks that failed to load are reported so that vLLM recomputes them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import VUAError
from ..serdes import dtype_name, host_bytes
from ..store import Fragment, FragmentStore, TensorSource
from .identity import StoreIdentity
from .metadata import SCRATCH, FragmentRef, LoadJob, SaveJob
from .settings import ConnectorSettings
from .stats import VUAConnectorStats

__all__ = ["WorkerSide"]

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0
# vLLM >= 0.32 presents each KV block as [kv_heads, tokens, head_size (K then V)].
_TOKEN_DIM = 1


@dataclass
class _OpenFragment:
    request_id: str
    ref: FragmentRef
    block_ids: list[int]
    fragment: Fragment
    cut: tuple[int, int] | None = None  # (block j, slots kept): the block the claim ends inside
    failed: bool = False


@dataclass
class _StepLoads:
    started: float
    finished: float = 0.0  # when the last read ended
    fragments: list[_OpenFragment] = field(default_factory=list)
    by_layer: dict[str, list[Future]] = field(default_factory=dict)
    failed_blocks: set[int] = field(default_factory=set)


class WorkerSide:
    def __init__(
        self, settings: ConnectorSettings, identity: StoreIdentity, store: FragmentStore, tp_rank: int = 0, pp_rank: int = 0
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.store = store
        self.shard = identity.shard(tp_rank, pp_rank)
        self.writes = identity.writes(tp_rank)
        self._layers: dict[str, torch.Tensor] = {}
        self._host_blocks: dict[str, Any] = {}  # layer -> numpy [num_blocks, block_bytes] over the KV tensor
        self._readers = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="vua-load")
        self._writers = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="vua-save")
        self._lock = threading.Lock()
        self._step: _StepLoads | None = None
        self._load_errors: set[int] = set()
        self._staged_bytes = 0
        self._stats = VUAConnectorStats()
        self.totals = VUAConnectorStats()  # since start-up, for tests and benchmarks
        self._warned: dict[str, float] = {}

    # ---- set-up ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer paged tensors whose layout is the one the namespace records; refuse the rest."""
        expected = tuple(self.identity.block_shape)
        for name, tensor in kv_caches.items():
            block_numel = tensor[0].numel() if tensor.dim() > 1 else 0
            fits = (
                tuple(tensor.shape[1:]) == expected
                and dtype_name(tensor.dtype) == self.identity.kv_dtype
                and tensor.stride(0) == block_numel
                and tensor[0].is_contiguous()
            )
            if not fits:
                logger.error(
                    "VUA: layer %s has KV layout %s %s (strides %s), not [blocks, %s] %s; VUA is off on this worker",
                    name, tuple(tensor.shape), tensor.dtype, tensor.stride(), list(expected), self.identity.kv_dtype,
                )
                self._layers.clear()
                return
            self._layers[name] = tensor
            if not tensor.is_cuda:
                self._host_blocks[name] = host_bytes(tensor).reshape(tensor.shape[0], -1)

    @property
    def _block_bytes(self) -> int:
        first = next(iter(self._layers.values()))
        return first[0].numel() * first.element_size()

    def _use_gds(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda and self.store.backend.accepts(tensor)

    # ---- loads ----

    def start_load(self, jobs: list[LoadJob]) -> None:
        """Open every fragment of this step (verifying headers) and queue its layer reads, first layer first."""
        if not jobs:
            return
        step = self._step = _StepLoads(time.monotonic())
        if not self._layers:
            step.failed_blocks.update(b for job in jobs for ids in job.block_ids for b in ids if b != SCRATCH)
            return
        for job in jobs:
            broken = False
            for ref, ids in zip(job.fragments, job.block_ids):
                fragment = None if broken else self.store.open(ref.path(self.store.layout, self.shard), ref.digest)
                if fragment is not None and not self._fits(fragment, ref):
                    fragment.close()
                    fragment = None
                if fragment is None:
                    # Everything after a missing piece is unusable too: report it all.
                    broken = True
                    step.failed_blocks.update(b for b in ids if b != SCRATCH)
                    continue
                step.fragments.append(_OpenFragment(job.request_id, ref, ids, fragment, self._cut(ref, job.claimed_end)))
        for index, layer in enumerate(self._layers):
            step.by_layer[layer] = [
                self._readers.submit(self._read_layer, step, opened, layer, index == 0) for opened in step.fragments
            ]
        if not self.settings.layerwise_load:
            for layer in self._layers:
                self.wait_for_layer_load(layer)

    def _cut(self, ref: FragmentRef, claimed_end: int) -> tuple[int, int] | None:
        """The block of ``ref`` that ``claimed_end`` falls strictly inside, and how many of its slots are claimed."""
        offset = claimed_end - ref.start
        block = self.identity.block_size
        if 0 < offset < ref.n_blocks * block and offset % block:
            return offset // block, offset % block
        return None

    def _fits(self, fragment: Fragment, ref: FragmentRef) -> bool:
        shape = (ref.n_blocks, *self.identity.block_shape)
        try:
            for layer in self._layers:
                entry = fragment.header.entry(layer)
                if entry.shape != shape or entry.dtype != self.identity.kv_dtype:
                    raise VUAError(f"tensor {layer!r} is {entry.dtype}{list(entry.shape)}, expected {list(shape)}")
        except VUAError as exc:
            self._warn("layout", "VUA: ignoring %s: %s", fragment.path, exc)
            return False
        return True

    def _read_layer(self, step: _StepLoads, opened: _OpenFragment, layer: str, verify_tokens: bool) -> None:
        """Read one layer of one fragment into its blocks; a failure marks the fragment (never raises)."""
        try:
            if not self._read_layer_into_blocks(opened, layer, verify_tokens):
                opened.failed = True
        except Exception as exc:  # noqa: BLE001 - a worker thread must not take the engine down
            self._warn("read", "VUA: load of %s failed: %r", opened.fragment.path, exc)
            opened.failed = True
        step.finished = max(step.finished, time.monotonic())

    def _read_layer_into_blocks(self, opened: _OpenFragment, layer: str, verify_tokens: bool) -> bool:
        kv = self._layers[layer]
        tokens = opened.ref.tokens if verify_tokens else None
        ids = opened.block_ids
        cut_block, kept = opened.cut if opened.cut is not None else (-1, 0)
        if kv.is_cuda and not self._use_gds(kv):
            staging = torch.empty((len(ids), *kv.shape[1:]), dtype=kv.dtype, pin_memory=True)
            if not self.store.read(opened.fragment, [(layer, [host_bytes(staging)])], tokens):
                return False
            whole = [j for j, b in enumerate(ids) if b != SCRATCH and j != cut_block]
            if whole:
                destination = torch.tensor([ids[j] for j in whole], device=kv.device)
                kv.index_copy_(0, destination, staging[whole].to(kv.device, non_blocking=True))
            staged = {cut_block: staging[cut_block]} if opened.cut else {}
        else:
            # In place, except blocks nobody wants and the block the claim ends inside: vLLM's own
            # KV write for the rest of that block may already have happened, so it is read aside.
            staged = {j: torch.empty_like(kv[0]) for j, b in enumerate(ids) if b == SCRATCH or j == cut_block}
            targets = [
                (staged[j] if kv.is_cuda else host_bytes(staged[j]))
                if j in staged
                else (kv[b] if kv.is_cuda else self._host_blocks[layer][b])
                for j, b in enumerate(ids)
            ]
            if not self.store.read(opened.fragment, [(layer, targets)], tokens):
                return False
        if opened.cut is not None and ids[cut_block] != SCRATCH:
            source = staged[cut_block].narrow(_TOKEN_DIM, 0, kept)
            kv[ids[cut_block]].narrow(_TOKEN_DIM, 0, kept).copy_(source.to(kv.device, non_blocking=True))
        if kv.is_cuda:
            torch.cuda.current_stream(kv.device).synchronize()
        return True

    def wait_for_layer_load(self, layer: str) -> None:
        if self._step is not None:
            for future in self._step.by_layer.pop(layer, []):
                future.result()

    def _finish_loads(self) -> None:
        """Wait for every read of the step, close its files, turn failures into reported blocks."""
        step, self._step = self._step, None
        if step is None:
            return
        for futures in step.by_layer.values():
            for future in futures:
                future.result()
        loaded_bytes = 0
        per_request: dict[str, int] = {}
        for opened in step.fragments:
            opened.fragment.close()
            if opened.failed:
                step.failed_blocks.update(b for b in opened.block_ids if b != SCRATCH)
            else:
                loaded_bytes += sum(e.nbytes for e in opened.fragment.tensor_entries() if e.name in self._layers)
                per_request[opened.request_id] = per_request.get(opened.request_id, 0) + 1
        seconds = max(step.finished, step.started) - step.started
        failed = sum(1 for o in step.fragments if o.failed)
        self._count(loaded_fragments=len(step.fragments) - failed, loaded_bytes=loaded_bytes, load_seconds=seconds,
                    load_errors=failed)
        self._load_errors |= step.failed_blocks
        if step.failed_blocks:
            logger.warning("VUA: %d KV block(s) failed to load; vLLM recomputes them", len(step.failed_blocks))
        logger.debug("VUA: loaded %d fragment(s) for %s, %.1f MB in %.4f s", len(step.fragments) - failed,
                     per_request, loaded_bytes / 1e6, seconds)

    def take_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ---- saves ----

    def wait_for_save(self, jobs: list[SaveJob]) -> None:
        """Called once the forward pass is done: stage the due chunks and hand them to the writers."""
        self._finish_loads()
        if not jobs or not self.writes or not self._layers:
            return
        for job in jobs:
            if self._load_errors.intersection(job.block_ids):
                continue  # those blocks hold no valid KV until recomputed
            self._stage(job)

    def _stage(self, job: SaveJob) -> None:
        nbytes = len(job.block_ids) * self._block_bytes * len(self._layers)
        with self._lock:
            if self._staged_bytes + nbytes > self.settings.max_staging_bytes:
                self._count_locked(saves_skipped=1)
                self._warn("staging", "VUA: staging memory (%d bytes) is full; skipping saves", self.settings.max_staging_bytes)
                return
            self._staged_bytes += nbytes
        staged = []
        done: Any = None
        ref = job.fragment
        unused = ref.n_blocks * self.identity.block_size - len(ref.tokens)
        for layer, kv in self._layers.items():
            picked = kv.index_select(0, torch.tensor(job.block_ids, device=kv.device))
            if unused:
                # The prompt ends inside the last block: the slots past it hold whatever the block
                # held before (another request's KV), which must not leave the engine.
                picked[-1].narrow(_TOKEN_DIM, self.identity.block_size - unused, unused).zero_()
            if picked.is_cuda:
                host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
                host.copy_(picked, non_blocking=True)
                picked = host
            staged.append((layer, picked))
        if next(iter(self._layers.values())).is_cuda:
            done = torch.cuda.Event()
            done.record()
        self._writers.submit(self._write, job, staged, done, nbytes)

    def _write(self, job: SaveJob, staged: list[tuple[str, torch.Tensor]], done: Any, nbytes: int) -> None:
        try:
            if done is not None:
                done.synchronize()
            started = time.monotonic()
            tensors = [TensorSource(layer, dtype_name(t.dtype), tuple(t.shape), [host_bytes(t)]) for layer, t in staged]
            ref = job.fragment
            written = self.store.write(ref.path(self.store.layout, self.shard), ref.digest, ref.tokens, tensors, start=ref.start)
            if written:
                self._count(saved_fragments=1, saved_bytes=nbytes, save_seconds=time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a full or vanished store must not stop serving
            self._count(save_errors=1)
            self._warn("write", "VUA: could not save a chunk of request %s: %s", job.request_id, exc)
        finally:
            with self._lock:
                self._staged_bytes -= nbytes

    def flush(self) -> None:
        """Wait for every queued write (tests, benchmarks)."""
        while True:
            with self._lock:
                if self._staged_bytes == 0:
                    return
            time.sleep(0.005)

    # ---- bookkeeping ----

    def _count(self, **counts: float) -> None:
        with self._lock:
            self._count_locked(**counts)

    def _count_locked(self, **counts: float) -> None:
        self._stats.add(**counts)
        self.totals.add(**counts)

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """One warning per kind of fault every 30 s; the rest go to debug (a full disk fails every save)."""
        now = time.monotonic()
        if now - self._warned.get(kind, float("-inf")) >= _WARN_EVERY_S:
            self._warned[kind] = now
            logger.warning(message, *args)
        else:
            logger.debug(message, *args)

    def take_stats(self) -> VUAConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, VUAConnectorStats()
            return stats

    def shutdown(self) -> None:
        self._finish_loads()
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
