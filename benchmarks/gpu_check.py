"""GPU check of the connector's worker half: save KV blocks from CUDA memory, load them back with
GPUDirect Storage (kvikio), verified in GPU memory and unverified, and with POSIX reads into pinned
memory (verified on the host), compare, and print GB/s beside a raw kvikio read of the same files.

    python benchmarks/gpu_check.py [--root DIR] [--layers 8] [--blocks 512]

Without CUDA it says so and exits 0. Without kvikio (or with GDS unusable) only the POSIX path
is checked. Exit status 1 means a load returned different bytes or reported errors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="storage root (default: a temporary directory)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks loaded per run (16 tokens each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (this is not a failure).")
        return 0
    with tempfile.TemporaryDirectory(dir=args.root) as root:
        return check(root, args.layers, args.blocks, args.repeats)


def check(root: str, layers: int, blocks: int, repeats: int) -> int:
    import numpy as np
    import torch

    import vua.store
    from vua.errors import ConfigError
    from vua.keys import chained_digests
    from vua.store import FragmentStore
    from vua.vllm.identity import StoreIdentity
    from vua.vllm.metadata import FragmentRef, LoadJob, SaveJob
    from vua.vllm.settings import ConnectorSettings
    from vua.vllm.worker import WorkerSide

    block_size, chunk_blocks = 16, 16
    block_shape = (8, block_size, 256)  # 8 KV heads, head_size 128 for K and for V
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(layers))
    identity = StoreIdentity("gpu-check", "BF16", block_shape, block_size, block_size * chunk_blocks)
    settings = ConnectorSettings.from_extra_config(
        {"shared_storage_path": root, "chunk_size": block_size * chunk_blocks, "use_gds": "false"},
        block_size=block_size, max_num_batched_tokens=2048, kv_bytes_per_token=2 * layers * 8 * 256)
    namespace = identity.namespace()
    total_blocks = 2 * blocks
    source = {n: torch.randn((total_blocks, *block_shape), device="cuda").to(torch.bfloat16) for n in names}
    tokens = np.random.default_rng(0).integers(3, 30000, blocks * block_size).astype("<i8")
    digests = chained_digests(tokens, block_size, namespace.seed)
    chunks = blocks // chunk_blocks
    source_ids = [list(range(c * chunk_blocks, (c + 1) * chunk_blocks)) for c in range(chunks)]
    refs = [FragmentRef(digests[(c + 1) * chunk_blocks - 1], None, c * chunk_blocks * block_size, chunk_blocks,
                        tokens[c * chunk_blocks * block_size:(c + 1) * chunk_blocks * block_size]) for c in range(chunks)]

    saver = WorkerSide(settings, identity, FragmentStore(root, namespace, backend="posix"))
    saver.register_kv_caches(source)
    started = time.perf_counter()
    saver.wait_for_save([SaveJob("check", ref, ids, sum(source_ids[: c + 1], [])) for c, (ref, ids)
                         in enumerate(zip(refs, source_ids))], 0)
    saver.flush()
    saved = saver.totals.data
    print(f"saved {saved['saved_fragments']} fragments, {saved['saved_bytes'] / 1e9:.3f} GB "
          f"in {time.perf_counter() - started:.3f} s (save errors {saved['save_errors']})")
    if saved["saved_fragments"] != chunks:
        print("FAIL: not every chunk was saved")
        return 1

    # Load into other blocks (the upper half, reversed) so a wrong scatter cannot go unnoticed.
    target_ids = [[total_blocks - 1 - b for b in ids] for ids in source_ids]
    verify = vua.store.check_device_tensor
    status = 0
    nbytes = blocks * source[names[0]][0].numel() * 2 * layers
    raw = _raw_kvikio_seconds(root, repeats)
    if raw is not None:
        print(f"raw kvikio read of the same files: {nbytes / raw / 1e9:.2f} GB/s (median of {repeats})")
    for backend, verified in (("gds", True), ("gds", False), ("posix", True)):
        try:
            store = FragmentStore(root, namespace, backend=backend)
        except ConfigError as exc:
            print(f"{backend}: skipped ({exc})")
            continue
        if not verified:  # what verification costs: the same reads with the device check taken out
            vua.store.check_device_tensor = lambda *args: None
        seconds = []
        for _ in range(repeats):
            target = {n: torch.zeros_like(t) for n, t in source.items()}
            worker = WorkerSide(settings, identity, store)
            worker.register_kv_caches(target)
            _drop_page_cache(root)
            torch.cuda.synchronize()
            started = time.perf_counter()
            worker.start_load([LoadJob("check", refs, target_ids)])
            for name in names:
                worker.wait_for_layer_load(name)
            errors = worker.take_load_errors()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            same = all(torch.equal(target[n][torch.tensor(sum(target_ids, []), device="cuda")],
                                   source[n][torch.tensor(sum(source_ids, []), device="cuda")]) for n in names)
            worker.shutdown()
            if errors or not same:
                print(f"{backend}: FAIL (load errors {len(errors)}, equal {same})")
                status = 1
                break
        else:
            median = statistics.median(seconds)
            label = f"{backend} ({store.backend.name}, {'verified' if verified else 'UNVERIFIED'})"
            ratio = f", {raw / median:.2f}x raw kvikio" if raw is not None else ""
            print(f"{label}: {nbytes / 1e9:.3f} GB in {median:.4f} s median of {repeats}, "
                  f"{nbytes / median / 1e9:.2f} GB/s{ratio}, outputs equal")
        vua.store.check_device_tensor = verify
    return status


def _raw_kvikio_seconds(root: str, repeats: int) -> float | None:
    """Median seconds to read every stored file whole into one GPU buffer with kvikio, or None without it."""
    try:
        import kvikio
        import torch
    except ImportError:
        return None
    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".safetensors")]
    sizes = [os.path.getsize(p) for p in paths]
    buffer = torch.empty(max(sizes), dtype=torch.uint8, device="cuda")
    seconds = []
    for _ in range(repeats):
        _drop_page_cache(root)
        started = time.perf_counter()
        for path, size in zip(paths, sizes):
            with kvikio.CuFile(path, "r") as handle:
                handle.pread(buffer, size).get()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _drop_page_cache(root: str) -> None:
    """Ask the kernel to forget the fragments' cached pages, so reads come from the device."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
