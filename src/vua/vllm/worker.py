"""The worker half: KV blocks <-> fragments, for the jobs the scheduler half planned.

Loads go straight into the paged KV tensor: each block of a layer is one contiguous slice of
dimension 0, so a fragment's layer tensor ``[n_blocks, *block_shape]`` is read with one vectored
read whose pieces are the destination blocks themselves (POSIX ``preadv`` into host memory, or
kvikio into GPU memory). Without GPUDirect Storage on CUDA, bytes land in a pinned host buffer
and are copied up. Reads run per (layer, fragment) on a thread pool in layer order, and each
attention layer waits only for its own layer.

A long claim loads asynchronously instead (vLLM's ``load_kv_async``): its request waits while
one task per fragment reads every layer in the background, and is reported finished receiving
once all of them have ended; meanwhile other requests' steps run, untouched by those reads.

Saves copy the computed blocks out of the KV cache (``index_select``) when the forward pass has
finished, then write in the background; staging memory is bounded and a save that does not fit
is skipped, never waited for. Every storage fault is a miss or a skipped save plus a log line;
blocks that failed to load are reported so that vLLM recomputes them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import VUAError
from ..integrity import device_checksum, has_device_checksums
from ..layout import MAX_TAILS_PER_HEAD
from ..mounts import may_hang
from ..serdes import dtype_name, host_bytes
from ..store import Fragment, FragmentStore, TensorSource
from ._compat import allow_cpu_attention_tiles, any_rank_failed
from .identity import StoreIdentity
from .metadata import SCRATCH, FragmentRef, LoadJob, SaveJob
from .settings import ConnectorSettings
from .stats import VUAConnectorStats

__all__ = ["WorkerSide"]

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0


@dataclass
class _OpenFragment:
    request_id: str
    ref: FragmentRef
    block_ids: list[int]
    fragment: Fragment | None  # None: missing, unreadable, or after such a piece
    ends_claim: bool = False  # holds the block the claim ends inside: read before the forward pass
    failed: bool = False
    internal_error: bool = False  # failed by a bug of ours, not by storage
    done: bool = False  # its task (detached or asynchronous loads) finished and closed the file


@dataclass
class _LoadBatch:
    """The fragments of one step's loads, or of one request's asynchronous load."""

    started: float
    finished: float = 0.0  # when the last read ended
    fragments: list[_OpenFragment] = field(default_factory=list)
    by_layer: dict[str, list[Future]] = field(default_factory=dict)
    tasks_own_files: bool = False  # one task per fragment opens and closes it (detached and asynchronous loads)
    deadline: float | None = None  # on storage that may hang: when a wait gives up on it
    abandoned: bool = False  # a wait gave up: no late read may touch the KV cache any more
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed_here(self) -> list[bool]:
        """Per fragment: whether it failed on this worker (missing, unreadable, or after such a piece)."""
        return [opened.fragment is None or opened.failed for opened in self.fragments]


def _yield_cpu() -> None:
    """Lower this thread's CPU priority: asynchronous loads must not take cores from the steps."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:
        pass


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
        # Apart from the step's readers, so that a long asynchronous load never queues ahead of a
        # step's reads, which the forward pass waits for.
        self._async_readers = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="vua-load-async",
                                                 initializer=_yield_cpu)
        self._async: dict[str, _LoadBatch] = {}  # request id -> its asynchronous load
        self._writers = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="vua-save")
        self._lock = threading.Lock()
        self._step: _LoadBatch | None = None
        self._load_errors: set[int] = set()
        self._reports = 0  # calls of take_load_errors that reported failed blocks
        self._poisoned: list[tuple[int, set[int]]] = []  # (report number, blocks) not yet seen by the scheduler
        self._staged_bytes = 0
        # On a filesystem that can hang (NFS, Lustre, FUSE...) reads land in staging memory and are
        # copied into the KV cache only if nobody has given up on them: a read that returns after
        # its step was abandoned must not write into blocks vLLM may have handed to another request.
        self.detached = may_hang(store.layout.root)
        self._released: set[str] = set()  # finished requests whose held blocks were copied out
        self._stats = VUAConnectorStats()
        self.totals = VUAConnectorStats()  # since start-up, for tests and benchmarks
        self._warned: dict[str, float] = {}
        # (digest, shard) of each fragment this worker published since the last report; None while
        # vLLM's KV events are off, so that nothing accumulates unread (see vua.vllm.events).
        self.published: list[tuple[bytes, str]] | None = None

    # ---- set-up ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer paged tensors whose layout is the one the namespace records; refuse the rest."""
        expected = tuple(self.identity.block_shape)
        if any(not tensor.is_cuda for tensor in kv_caches.values()):
            allow_cpu_attention_tiles()
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

    def _gds_verifiable(self, opened: _OpenFragment, kv: torch.Tensor, layer: str) -> bool:
        """Whether GPUDirect can read this layer into device memory and verify it there (the
        fragment was written from GPU memory, with device checksums)."""
        assert opened.fragment is not None
        return self.store.backend.accepts(kv) and has_device_checksums(opened.fragment.header, [layer])

    # ---- loads ----

    def start_load(self, jobs: list[LoadJob]) -> None:
        """Start the asynchronous loads in the background; open every fragment of this step's other
        loads (verifying headers and token ids) and queue its layer reads, first layer first. A
        fragment holding the block a claim ends inside is read before this returns, so before the
        forward pass: vLLM then writes the slots it computes over the loaded block, never the
        other way round."""
        for job in jobs:
            if job.asynchronous:
                self._start_async(job)
        jobs = [job for job in jobs if not job.asynchronous]
        if not jobs:
            return
        step = self._step = _LoadBatch(time.monotonic())
        if self.detached:
            self._start_detached(step, jobs)
        else:
            self._start_in_place(step, jobs)
        if not self.settings.layerwise_load:
            for layer in self._layers:
                self.wait_for_layer_load(layer)

    def _start_in_place(self, step: _LoadBatch, jobs: list[LoadJob]) -> None:
        for job in jobs:
            broken = not self._layers
            for ref, ids in zip(job.fragments, job.block_ids):
                fragment = None if broken else self._open(ref)
                # Everything after a missing piece is unusable too: it fails with it.
                broken = broken or fragment is None
                step.fragments.append(_OpenFragment(job.request_id, ref, ids, fragment, self._ends_claim(ref, job)))
        readable = [opened for opened in step.fragments if opened.fragment is not None]
        first = [opened for opened in readable if opened.ends_claim]
        for layer in self._layers:
            step.by_layer[layer] = [self._readers.submit(self._read_layers, step, opened, (layer,)) for opened in first]
        for layer in self._layers:
            self.wait_for_layer_load(layer)
        for layer in self._layers:
            step.by_layer[layer] = [
                self._readers.submit(self._read_layers, step, opened, (layer,)) for opened in readable if not opened.ends_claim
            ]

    def _start_detached(self, step: _LoadBatch, jobs: list[LoadJob]) -> None:
        """One task per fragment opens it and reads it layer by layer into staging memory; each
        layer's future completes when that layer is in the KV cache (or has failed)."""
        step.deadline = step.started + self.settings.storage_timeout_s
        step.tasks_own_files = True
        tasks = []
        for job in jobs:
            for ref, ids in zip(job.fragments, job.block_ids):
                opened = _OpenFragment(job.request_id, ref, ids, None, self._ends_claim(ref, job))
                step.fragments.append(opened)
                layers: dict[str, Future] = {layer: Future() for layer in self._layers}
                tasks.append((opened, layers))
        for layer in self._layers:
            step.by_layer[layer] = [layers[layer] for opened, layers in tasks if opened.ends_claim]
        for opened, layers in tasks:
            self._readers.submit(self._load_fragment, step, opened, layers)
        for layer in self._layers:
            self.wait_for_layer_load(layer)
        for layer in self._layers:
            step.by_layer[layer] = [layers[layer] for opened, layers in tasks if not opened.ends_claim]

    def _start_async(self, job: LoadJob) -> None:
        """One task per fragment, off the step's path; the request is reported finished receiving
        by :meth:`take_finished_loads` once they have all ended (or storage that may hang has
        kept them past ``storage_timeout_s``)."""
        batch = self._async[job.request_id] = _LoadBatch(time.monotonic(), tasks_own_files=True)
        if self.detached:
            batch.deadline = batch.started + self.settings.storage_timeout_s
        for ref, ids in zip(job.fragments, job.block_ids):
            opened = _OpenFragment(job.request_id, ref, ids, None)
            batch.fragments.append(opened)
            self._async_readers.submit(self._load_fragment, batch, opened, {})

    def take_finished_loads(self) -> set[str]:
        """Requests whose asynchronous loads have ended (vLLM's ``finished_recving``). Their failed
        blocks go to the load errors vLLM asks for next in the same step, as it requires; no other
        rank needs to agree, since vLLM waits for every worker's report and unites their errors."""
        finished = set()
        now = time.monotonic()
        for request_id, batch in list(self._async.items()):
            if not all(opened.done for opened in batch.fragments):
                if batch.deadline is None or now < batch.deadline:
                    continue
                self._abandon(batch)
            del self._async[request_id]
            self._settle(batch, batch.failed_here())
            finished.add(request_id)
        return finished

    def _ends_claim(self, ref: FragmentRef, job: LoadJob) -> bool:
        return ref.start < job.claimed_end < ref.start + ref.n_blocks * self.identity.block_size

    def _open(self, ref: FragmentRef) -> Fragment | None:
        """The fragment of ``ref``, its header and token ids verified and its layout this engine's; None otherwise."""
        fragment = self.store.open(ref.path(self.store.layout, self.shard), ref.digest, ref.tokens)
        if fragment is not None and not self._fits(fragment, ref):
            fragment.close()
            return None
        return fragment

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

    def _read_layers(self, step: _LoadBatch, opened: _OpenFragment, layers: Sequence[str]) -> None:
        """Read some layers of one fragment into their blocks. Never raises: a failure marks the
        fragment, and whatever the failed read put in the paged blocks is zeroed before a layer may run."""
        if opened.failed:
            return  # another layer of it already failed: its blocks are recomputed anyway
        try:
            via_pinned = any(self._layers[layer].is_cuda and not self._gds_verifiable(opened, self._layers[layer], layer)
                             for layer in layers)
            loaded = self._read_staged(step, opened, layers) if via_pinned else self._read_in_place(opened, layers)
        except Exception:  # noqa: BLE001 - a bug here must cost a recompute, not the engine
            logger.exception("VUA: internal error loading %s (layers %s); the blocks are recomputed",
                             opened.fragment.path, list(layers))
            self._count(load_internal_errors=1)
            opened.internal_error = True
            loaded = False
        if not loaded:
            opened.failed = True
            for layer in layers:
                self._scrub(opened, layer)
        step.finished = max(step.finished, time.monotonic())

    def _read_in_place(self, opened: _OpenFragment, layers: Sequence[str]) -> bool:
        """Read straight into the paged blocks (host memory, or device memory through GDS), in one
        call for all ``layers``; blocks nobody wants (held by vLLM already, or past the claim) go to scratch."""
        wanted = []
        for layer in layers:
            kv = self._layers[layer]
            ids = opened.block_ids
            aside = {j: torch.empty_like(kv[0]) for j, b in enumerate(ids) if b == SCRATCH}
            if kv.is_cuda:
                targets = [aside[j] if j in aside else kv[b] for j, b in enumerate(ids)]
            else:
                targets = [host_bytes(aside[j]) if j in aside else self._host_blocks[layer][b] for j, b in enumerate(ids)]
            wanted.append((layer, targets))
        if not self.store.read(opened.fragment, wanted, None):
            return False
        kv = self._layers[layers[0]]
        if kv.is_cuda:
            torch.cuda.current_stream(kv.device).synchronize()
        return True

    def _load_fragment(self, batch: _LoadBatch, opened: _OpenFragment, layers: dict[str, Future]) -> None:
        """Open, verify and read one fragment, and close it. With ``layers`` (a step's loads, which
        each attention layer waits for), layer by layer, completing each layer's future once that
        layer is in the KV cache or has failed; without (an asynchronous load, which nothing waits
        for layer by layer), every layer in one read: each read ends in a hand-off of Python's
        lock to this thread, which the engine's own thread then waits for, so fewer is better. On
        storage that may hang, bytes go through staging memory and are copied into the KV cache
        only if the batch was not abandoned meanwhile. Never raises."""
        try:
            if self._layers:
                opened.fragment = self._open(opened.ref)
            groups = [(layer,) for layer in self._layers] if layers else [tuple(self._layers)]
            for group in groups:
                if opened.fragment is not None and not opened.failed:
                    if not self.detached:
                        self._read_layers(batch, opened, group)
                    elif not self._read_staged(batch, opened, group):
                        opened.failed = True
                for layer in group:
                    if layer in layers:
                        layers[layer].set_result(None)
                batch.finished = max(batch.finished, time.monotonic())
        except Exception:  # noqa: BLE001 - a bug here must cost a recompute, not the engine
            logger.exception("VUA: internal error loading %s", opened.ref.digest.hex())
            self._count(load_internal_errors=1)
            opened.internal_error = opened.failed = True
        finally:
            for future in layers.values():
                if not future.done():
                    future.set_result(None)
            if opened.fragment is not None:
                opened.fragment.close()
            opened.done = True

    def _read_staged(self, step: _LoadBatch, opened: _OpenFragment, layers: Sequence[str]) -> bool:
        """Read and verify ``layers`` in staging memory (pinned on CUDA), in one call, then copy what
        is wanted into the KV cache, unless the step was abandoned meanwhile. False if the read failed.

        Used where bytes may not land in the KV cache as they are read: storage that may hang
        (detached loads), and CUDA without GPUDirect Storage."""
        assert opened.fragment is not None
        staged = {}
        for layer in layers:
            kv = self._layers[layer]
            staged[layer] = torch.empty((len(opened.block_ids), *kv.shape[1:]), dtype=kv.dtype, pin_memory=kv.is_cuda)
        if not self.store.read(opened.fragment, [(layer, [host_bytes(t)]) for layer, t in staged.items()], None):
            return False
        wanted = [j for j, b in enumerate(opened.block_ids) if b != SCRATCH]
        with step.lock:
            if step.abandoned:
                return True
            for layer, staging in staged.items():
                kv = self._layers[layer]
                if wanted:
                    destination = torch.tensor([opened.block_ids[j] for j in wanted], device=kv.device)
                    kv.index_copy_(0, destination, staging[wanted].to(kv.device, non_blocking=kv.is_cuda))
                if kv.is_cuda:
                    torch.cuda.current_stream(kv.device).synchronize()
        return True

    def _abandon(self, step: _LoadBatch) -> None:
        """Storage did not answer in time: every fragment still loading fails, and nothing it reads
        later reaches the KV cache (the copy into it and this flag share the step's lock)."""
        with step.lock:
            if step.abandoned:
                return
            step.abandoned = True
            late = [opened for opened in step.fragments if not opened.done]
            for opened in late:
                opened.failed = True
        self._count(load_timeouts=1)
        self._warn("timeout", "VUA: storage did not finish %d fragment read(s) within %.1f s; their blocks are "
                   "recomputed", len(late), self.settings.storage_timeout_s)

    def _scrub(self, opened: _OpenFragment, layer: str) -> None:
        """Zero the blocks a failed in-place read may have filled: bytes that failed verification
        must never reach attention, not even in the step that is thrown away."""
        kv = self._layers[layer]
        for b in opened.block_ids:
            if b != SCRATCH:
                kv[b].zero_()

    def wait_for_layer_load(self, layer: str) -> None:
        step = self._step
        if step is None:
            return
        for future in step.by_layer.pop(layer, []):
            if step.deadline is None:
                future.result()
                continue
            if step.abandoned:
                return
            try:
                future.result(timeout=max(0.0, step.deadline - time.monotonic()))
            except FutureTimeout:
                self._abandon(step)
                return

    def _finish_loads(self, agree: bool = True) -> None:
        """Wait for every read of the step, close its files, and settle with every other worker of
        the engine which fragments failed: a fragment that failed on any rank fails on all."""
        step = self._step
        if step is None:
            return
        for layer in list(step.by_layer):
            self.wait_for_layer_load(layer)
        self._step = None
        failed_here = step.failed_here()
        self._settle(step, any_rank_failed(failed_here) if agree else failed_here)

    def _settle(self, step: _LoadBatch, failed: list[bool]) -> None:
        """Close the files, count, and record the blocks of the ``failed`` fragments as load errors."""
        failed_here = step.failed_here()
        failed_blocks: set[int] = set()
        loaded_bytes = 0
        per_request: dict[str, int] = {}
        for opened, bad in zip(step.fragments, failed):
            if opened.fragment is not None and not step.tasks_own_files:
                opened.fragment.close()
            if bad:
                failed_blocks.update(b for b in opened.block_ids if b != SCRATCH)
            else:
                loaded_bytes += sum(e.nbytes for e in opened.fragment.tensor_entries() if e.name in self._layers)
                per_request[opened.request_id] = per_request.get(opened.request_id, 0) + 1
        seconds = max(step.finished, step.started) - step.started
        errors = sum(bad and not opened.internal_error for bad, opened in zip(failed_here, step.fragments))
        self._count(loaded_fragments=len(step.fragments) - sum(failed), loaded_bytes=loaded_bytes,
                    load_seconds=seconds, load_errors=errors)
        if failed_blocks:
            self._load_errors |= failed_blocks
            # Reported with the next call for load errors, which is the scheduler's report number:
            self._poisoned.append((self._reports + 1, failed_blocks))
            logger.warning("VUA: %d KV block(s) failed to load (%d of %d fragment(s) failed on this rank); "
                           "vLLM recomputes them", len(failed_blocks), sum(failed_here), sum(failed))
        logger.debug("VUA: loaded %d fragment(s) for %s, %.1f MB in %.4f s", len(step.fragments) - sum(failed),
                     per_request, loaded_bytes / 1e6, seconds)

    def take_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        if errors:
            self._reports += 1
        return errors

    # ---- saves ----

    def wait_for_save(self, jobs: list[SaveJob], failures_seen: int, released: Sequence[str] = ()) -> None:
        """Called once the forward pass is done: stage the due chunks and hand them to the writers.

        A save that depends on a block whose load failed is dropped: it was computed over KV that
        is not the prompt's. ``failures_seen`` tells which failures the scheduler had already
        accounted for (rewinding the request) when it planned these saves. ``released`` are
        finished requests whose blocks vLLM held for these saves: once they are copied out (or
        skipped), :meth:`take_finished` reports them so that vLLM frees the blocks. Every worker
        reports them, writing or not, since vLLM waits for all of them.
        """
        self._finish_loads()
        self._poisoned = [(report, blocks) for report, blocks in self._poisoned if report > failures_seen]
        try:
            self._stage_all(jobs)
        finally:
            self._released.update(released)

    def take_finished(self) -> set[str]:
        """Finished requests whose blocks are no longer needed (vLLM's ``finished_sending``)."""
        finished, self._released = self._released, set()
        return finished

    def _stage_all(self, jobs: list[SaveJob]) -> None:
        if not jobs or not self.writes or not self._layers:
            return
        poisoned = set().union(*(blocks for _, blocks in self._poisoned))
        for job in jobs:
            if poisoned.intersection(job.depends_on):
                self._count(saves_poisoned=1)
                logger.info("VUA: not saving %s of request %s: computed over KV that failed to load",
                            job.fragment.path(self.store.layout, self.shard).name, job.request_id)
                continue
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
        device_sums: dict[str, str] = {}
        for layer, kv in self._layers.items():
            picked = kv.index_select(0, torch.tensor(job.block_ids, device=kv.device))
            if picked.is_cuda:
                # Lets GPUDirect readers verify in device memory; costs one GPU pass, here, not on the host.
                device_sums[layer] = device_checksum([picked])
                host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
                host.copy_(picked, non_blocking=True)
                picked = host
            staged.append((layer, picked))
        if next(iter(self._layers.values())).is_cuda:
            done = torch.cuda.Event()
            done.record()
        self._writers.submit(self._write, job, staged, device_sums, done, nbytes)

    def _write(self, job: SaveJob, staged: list[tuple[str, torch.Tensor]], device_sums: dict[str, str], done: Any,
               nbytes: int) -> None:
        try:
            if done is not None:
                done.synchronize()
            started = time.monotonic()
            tensors = [TensorSource(layer, dtype_name(t.dtype), tuple(t.shape), [host_bytes(t)]) for layer, t in staged]
            ref = job.fragment
            if ref.head is not None:
                # One listing, here in the background rather than in the scheduler's step: a tail's
                # head directory is listed by every lookup that reaches it, so it stays bounded.
                listed = self.store.tails(ref.head)
                if ref.digest.hex() not in listed and len(listed) >= MAX_TAILS_PER_HEAD:
                    self._count(tails_skipped=1)
                    return
            written = self.store.write(ref.path(self.store.layout, self.shard), ref.digest, ref.tokens, tensors,
                                       start=ref.start, device_checksums=device_sums)
            if written:
                self._count(saved_fragments=1, saved_bytes=nbytes, save_seconds=time.monotonic() - started)
                if self.published is not None:
                    with self._lock:
                        self.published.append((ref.digest, self.shard))
        except VUAError as exc:  # a full, read-only or vanished store must not stop serving
            self._count(save_errors=1)
            self._warn("write", "VUA: could not save a chunk of request %s: %s", job.request_id, exc)
        except Exception:  # noqa: BLE001 - nor may a bug here
            self._count(save_internal_errors=1)
            logger.exception("VUA: internal error saving a chunk of request %s", job.request_id)
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

    def take_published(self) -> list[tuple[bytes, str]]:
        """The fragments published since the last call, for the scheduler's KV events."""
        with self._lock:
            if not self.published:
                return []
            published, self.published = self.published, []
            return published

    def shutdown(self) -> None:
        self._finish_loads(agree=False)  # the other ranks may already be gone
        self._writers.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._async_readers.shutdown(wait=True)
