"""FragmentStore: writing, lookups and verified reads of fragments, through the real POSIX backend."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from vua.errors import StoreWriteError
from vua.integrity import TOKENS_TENSOR
from vua.keys import Namespace
from vua.store import DATA_ALIGNMENT, FragmentStore, TensorSource


def _source(name: str, tensor: torch.Tensor, pieces: int = 1) -> TensorSource:
    """A TensorSource whose bytes arrive in ``pieces`` segments (as the core passes one per head)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return TensorSource(name, {torch.float16: "F16", torch.float32: "F32"}[tensor.dtype], tuple(tensor.shape), np.array_split(raw, pieces))


class FragmentStoreTest(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vua-store-"))
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.namespace = Namespace(granularity=4, identity="store-test")
        self.store = FragmentStore(self.root, self.namespace, backend="posix")
        self.key = bytes(range(16))
        self.path = self.store.layout.fragment_path(self.key, "kv")
        self.tokens = np.array([5, 6, 7, 8], dtype="<i8")
        generator = torch.Generator().manual_seed(1)
        self.tensors = {
            "small": torch.randn(3, 5, generator=generator).half(),
            # Larger than one read batch, so reads are split across several vectored reads.
            "large": torch.randn(2, 300_000, generator=generator),
            "after": torch.randn(7, generator=generator).half(),
        }

    def _write(self, **kwargs: object) -> bool:
        sources = [_source(name, t, pieces=3) for name, t in self.tensors.items()]
        return self.store.write(self.path, self.key, self.tokens, sources, start=8, **kwargs)  # type: ignore[arg-type]

    def _read(self, names: list[str], tokens: np.ndarray | None = None) -> dict[str, torch.Tensor] | None:
        outputs = {name: torch.empty_like(self.tensors[name]) for name in names}
        fragment = self.store.open(self.path, self.key)
        self.assertIsNotNone(fragment)
        with fragment:
            wanted = [(name, [t.view(torch.uint8).numpy()]) for name, t in outputs.items()]
            ok = self.store.read(fragment, wanted, self.tokens if tokens is None else tokens)
        return outputs if ok else None

    def test_round_trip_and_format(self) -> None:
        self.assertTrue(self._write())
        loaded = safetensors.torch.load_file(self.path)
        self.assertEqual(list(loaded), [TOKENS_TENSOR, *self.tensors])
        self.assertEqual(loaded[TOKENS_TENSOR].tolist(), [5, 6, 7, 8])
        for name, tensor in self.tensors.items():
            self.assertTrue(torch.equal(loaded[name], tensor), name)
        with safetensors.safe_open(self.path, "pt") as handle:
            metadata = handle.metadata()
        self.assertEqual(metadata["vua_key"], self.key.hex())
        self.assertEqual((metadata["vua_start"], metadata["vua_tokens"]), ("8", "4"))
        self.assertEqual(len(metadata["vua_checksums"].split(",")), 4)
        with open(self.path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
        self.assertEqual((8 + header_length) % DATA_ALIGNMENT, 0)
        self.assertEqual(oct(os.stat(self.path).st_mode & 0o777), oct(0o640))

        got = self._read(list(self.tensors))
        self.assertIsNotNone(got)
        for name, tensor in self.tensors.items():
            self.assertTrue(torch.equal(got[name], tensor), name)

    def test_header_padding_grows_in_4_kib_steps(self) -> None:
        many = [_source(f"layer.{i}.keys", torch.ones(1)) for i in range(120)]
        self.store.write(self.path, self.key, self.tokens, many, start=0)
        with open(self.path, "rb") as f:
            self.assertEqual(int.from_bytes(f.read(8), "little"), 3 * DATA_ALIGNMENT - 8)
        self.assertEqual(len(safetensors.torch.load_file(self.path)), 121)

    def test_reads_any_subset_and_skips_the_token_check_when_asked(self) -> None:
        self._write()
        got = self._read(["after"])
        self.assertTrue(torch.equal(got["after"], self.tensors["after"]))
        outputs = torch.empty_like(self.tensors["small"])
        with self.store.open(self.path, self.key) as fragment:
            self.assertTrue(self.store.read(fragment, [("small", [outputs.view(torch.uint8).numpy()])], None))
            self.assertEqual([e.name for e in fragment.tensor_entries()], list(self.tensors))
        self.assertTrue(torch.equal(outputs, self.tensors["small"]))

    def test_second_write_is_a_no_op(self) -> None:
        self.assertTrue(self._write())
        before = os.stat(self.path)
        self.assertFalse(self._write())
        after = os.stat(self.path)
        self.assertEqual((before.st_ino, before.st_mtime_ns), (after.st_ino, after.st_mtime_ns))

    def test_a_vanished_root_is_never_recreated(self) -> None:
        shutil.rmtree(self.root)  # the shared mount went away under a running store
        with self.assertRaises(StoreWriteError) as caught:
            self._write()
        self.assertEqual(caught.exception.errno, errno.ENOENT)
        self.assertFalse(self.root.exists())

    def test_segment_sizes_must_match_the_shape(self) -> None:
        bad = TensorSource("t", "F32", (4,), [np.zeros(12, dtype=np.uint8)])
        with self.assertRaisesRegex(ValueError, "tensor 't': 12 bytes given for 16 declared"):
            self.store.write(self.path, self.key, self.tokens, [bad], start=0)
        self.assertFalse(self.path.exists())

    def test_lookups(self) -> None:
        self.assertFalse(self.store.exists(self.path))
        self.assertFalse(self.store.has_shards(self.key, ["kv"]))
        self._write()
        self.assertTrue(self.store.exists(self.path))
        self.assertFalse(self.store.exists(self.path.parent))  # a directory is not a fragment
        self.assertTrue(self.store.has_shards(self.key, ["kv"]))
        self.assertFalse(self.store.has_shards(self.key, ["kv", "rank1"]))
        other = self.store.layout.fragment_path(self.key, "rank1")
        self.store.write(other, self.key, self.tokens, [_source("t", torch.ones(2))], start=8)
        self.assertTrue(self.store.has_shards(self.key, ["kv", "rank1"]))
        self.assertIsNone(self.store.open(self.store.layout.fragment_path(b"\xff" * 16, "kv"), b"\xff" * 16))

    def test_tails_are_listed_by_anchor(self) -> None:
        anchor = b"\x07" * 16
        self.assertEqual(self.store.tails(anchor), {})
        for digest, shard in ((b"\x01" * 16, "r0"), (b"\x01" * 16, "r1"), (b"\x02" * 16, "r0")):
            path = self.store.layout.tail_path(anchor, digest, shard)
            self.store.write(path, digest, self.tokens[:2], [_source("t", torch.ones(2))], start=4)
        (self.store.layout.tails_dir(anchor) / ".junk.tmp-1-ab").write_bytes(b"")
        self.assertEqual(self.store.tails(anchor), {("01" * 16): {"r0", "r1"}, ("02" * 16): {"r0"}})

    def test_namespace_is_described_once(self) -> None:
        self._write()
        described = json.loads((self.store.layout.namespace_dir / "namespace.json").read_text())
        self.assertEqual(described, json.loads(self.namespace.canonical()))

    def test_wrong_destination_size_is_a_miss_with_a_warning(self) -> None:
        self._write()
        with self.store.open(self.path, self.key) as fragment:
            with self.assertLogs("vua.store", "WARNING") as logs:
                self.assertFalse(self.store.read(fragment, [("small", [np.empty(3, dtype=np.uint8)])], None))
        self.assertEqual(len(logs.output), 1)
        self.assertIn("tensor 'small' holds 30 bytes, 3 expected", logs.output[0])
        self.assertTrue(self.path.exists())  # the caller's mistake is no reason to drop the fragment

    def test_store_options(self) -> None:
        store = FragmentStore(self.root, self.namespace, backend="posix", file_mode=0o600, durable=False)
        path = store.layout.fragment_path(b"\x09" * 16, "kv")
        self.assertTrue(store.write(path, b"\x09" * 16, self.tokens, [_source("t", torch.ones(2))], start=0))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


if __name__ == "__main__":
    unittest.main()
