"""The fs-tier shim's worker (``vua.tools.fs_tier_cpu``) copies KV blocks to and from vLLM's CPU
region exactly where vLLM's own layout puts them: real tensors, no engine."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.v1.kv_offload.base import CanonicalKVCacheRef, GPULoadStoreSpec  # noqa: E402
from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec  # noqa: E402

from vua.tools.fs_tier_cpu import MemmoveOffloadingWorker, fs_tier_connector  # noqa: E402

PAGES = (96, 160)  # bytes per KV block of two KV tensors (say, two layers of different width)
NUM_BLOCKS, NUM_CHUNKS, PER_CHUNK = 12, 5, 4


def _setup(used: tuple[int, int] = PAGES):
    """KV tensors filled with random bytes, and a CPU region laid out as vLLM's
    ``SharedOffloadRegion`` lays it out for one worker: each chunk row holds every tensor's
    ``page * blocks_per_chunk`` bytes, side by side, and rows are strided (with padding)."""
    generator = torch.Generator().manual_seed(0)
    kv = [torch.randint(-128, 128, (NUM_BLOCKS, page), dtype=torch.int8, generator=generator) for page in PAGES]
    row = sum(PAGES) * PER_CHUNK + 64
    base = torch.zeros(NUM_CHUNKS * row, dtype=torch.int8)
    host, offset = [], 0
    for page in PAGES:
        host.append(torch.as_strided(base, (NUM_CHUNKS, page * PER_CHUNK), (row, 1), offset))
        offset += page * PER_CHUNK
    refs = [[CanonicalKVCacheRef(tensor_idx=i, page_size_bytes=used[i]) for i in range(len(PAGES))]]
    return kv, host, base, MemmoveOffloadingWorker(kv, host, refs, PER_CHUNK)


def _host_block(host: torch.Tensor, chunk: int, slot: int, page: int) -> torch.Tensor:
    return host[chunk, slot * page : (slot + 1) * page]


def test_store_then_load_round_trips_blocks_through_the_cpu_region() -> None:
    kv, host, base, worker = _setup()
    # Request blocks with logical indices 2..7 live in KV blocks 9, 3, 0, 11, 5, 6. With 4 blocks
    # per chunk, index 2 starts half way into the first chunk: chunks 4 (slots 2, 3) and 1 (0..3).
    kv_blocks, chunks = [9, 3, 0, 11, 5, 6], [4, 1]
    assert worker.submit_store(7, GPULoadStoreSpec(kv_blocks, [6], [2]), CPULoadStoreSpec(chunks))
    (result,) = worker.get_finished()
    assert (result.job_id, result.success, result.transfer_size) == (7, True, 6 * sum(PAGES))
    for t, page in enumerate(PAGES):
        places = [(4, 2), (4, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
        for block, (chunk, slot) in zip(kv_blocks, places):
            assert torch.equal(_host_block(host[t], chunk, slot, page), kv[t][block]), (t, block)
    # Nothing else in the region was written: the untouched chunks and the padding stay zero.
    for chunk in (0, 2, 3):
        assert not host[0][chunk].any() and not host[1][chunk].any()
    assert not host[0][4, : 2 * PAGES[0]].any()

    # Load the same logical blocks back into other KV blocks.
    expected = [kv[t][kv_blocks].clone() for t in range(len(PAGES))]
    targets = [1, 2, 4, 7, 8, 10]
    for t in range(len(PAGES)):
        kv[t][targets] = 0
    assert worker.submit_load(8, CPULoadStoreSpec(chunks), GPULoadStoreSpec(targets, [6], [2]))
    assert worker.get_finished()[0].job_id == 8
    for t in range(len(PAGES)):
        assert torch.equal(kv[t][targets], expected[t])
    worker.wait({8})
    assert worker.get_finished() == []


def test_only_the_used_bytes_of_a_padded_page_are_copied() -> None:
    kv, host, _, worker = _setup(used=(64, 160))
    assert worker.submit_store(1, GPULoadStoreSpec([5], [1], [0]), CPULoadStoreSpec([3]))
    assert torch.equal(host[0][3, :64], kv[0][5, :64])
    assert not host[0][3, 64:].any()  # the padding of tensor 0's page is not copied
    assert torch.equal(host[1][3, :160], kv[1][5])


def test_mismatched_specs_are_refused() -> None:
    _, _, _, worker = _setup()
    with pytest.raises(ValueError):
        worker.submit_store(1, GPULoadStoreSpec([1, 2], [2], [0]), CPULoadStoreSpec([0, 1]))  # one chunk too many


def test_connector_config_names_the_shim_and_the_fs_tier(tmp_path) -> None:
    config = fs_tier_connector(str(tmp_path), 1 << 30, n_read_threads=4)
    extra = config["kv_connector_extra_config"]
    assert config["kv_connector"] == "OffloadingConnector"
    assert (extra["spec_name"], extra["spec_module_path"]) == ("CPUMemmoveTieringSpec", "vua.tools.fs_tier_cpu")
    assert extra["secondary_tiers"] == [{"type": "fs", "root_dir": str(tmp_path), "n_read_threads": 4}]
