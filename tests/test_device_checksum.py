"""Device checksums: what lets a GPUDirect read be verified in GPU memory.

They are plain tensor ops, so they run here on CPU tensors exactly as on a GPU (integer sums wrap
the same in any order); the GDS read that uses them needs CUDA and runs in
tests/backends/test_gds.py and benchmarks/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vua.errors import CorruptFragmentError
from vua.integrity import check_device_tensor, device_checksum, has_device_checksums
from vua.keys import Namespace
from vua.serdes import host_bytes
from vua.store import FragmentStore, TensorSource


def kv(seed: int = 0) -> torch.Tensor:
    return torch.randn((6, 2, 16, 32), generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_same_bytes_give_the_same_sum_however_they_are_split() -> None:
    tensor = kv()
    whole = device_checksum([tensor])
    assert device_checksum(list(tensor.unbind(0))) == whole  # one part per KV block, as a load reads them
    assert device_checksum([tensor.view(torch.int32)]) == whole  # bytes, not dtype
    assert len(whole) == 16 and int(whole, 16) != 0


@pytest.mark.parametrize("damage", ["flip a bit", "swap two blocks", "zero a block", "swap two words"])
def test_damage_changes_the_sum(damage: str) -> None:
    tensor = kv()
    damaged = tensor.clone()
    words = damaged.view(torch.int32).reshape(-1)
    if damage == "flip a bit":
        words[1234] ^= 1 << 17
    elif damage == "swap two blocks":
        damaged[[1, 4]] = damaged[[4, 1]]
    elif damage == "zero a block":
        damaged[3].zero_()
    else:
        words[[10, 11]] = words[[11, 10]]
    assert not torch.equal(damaged, tensor)
    assert device_checksum([damaged]) != device_checksum([tensor])


def test_sums_need_whole_words() -> None:
    with pytest.raises(ValueError, match="32-bit words"):
        device_checksum([torch.zeros(3, dtype=torch.uint8)])


def test_a_fragment_written_from_device_memory_records_them_and_they_verify(tmp_path: Path) -> None:
    store = FragmentStore(tmp_path, Namespace(granularity=16, identity="t"), backend="posix", durable=False)
    layers = {"a": kv(1), "b": kv(2)}
    path = store.layout.fragment_path(b"k" * 16, "tp0")
    tokens = np.arange(16, dtype="<i8")

    def sources() -> list[TensorSource]:
        return [TensorSource(n, "BF16", tuple(t.shape), [host_bytes(t)]) for n, t in layers.items()]

    store.write(path, b"k" * 16, tokens, sources(), start=0, device_checksums={n: device_checksum([t]) for n, t in layers.items()})
    fragment = store.open(path, b"k" * 16, tokens)
    assert fragment is not None and has_device_checksums(fragment.header, ["a", "b"])
    loaded = torch.empty_like(layers["a"])
    assert store.read(fragment, [("a", [host_bytes(loaded)])], None)
    check_device_tensor(fragment.header, "a", list(loaded.unbind(0)))
    loaded[2, 0, 0, 0] += 1
    with pytest.raises(CorruptFragmentError, match="device checksum mismatch"):
        check_device_tensor(fragment.header, "a", list(loaded.unbind(0)))
    fragment.close()
    # A fragment written from host memory has none: a GDS reader must read it through the host.
    plain = store.layout.fragment_path(b"p" * 16, "tp0")
    store.write(plain, b"p" * 16, tokens, sources(), start=0)
    fragment = store.open(plain, b"p" * 16, tokens)
    assert fragment is not None and not has_device_checksums(fragment.header, ["a"])
    with pytest.raises(CorruptFragmentError, match="no device checksum"):
        check_device_tensor(fragment.header, "a", [layers["a"]])
    fragment.close()
