"""Damaged, foreign or misplaced fragments are a miss plus one warning: never an exception, never wrong KV."""

from __future__ import annotations

import os
import shutil
import unittest
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch
import torch
import xxhash

from tests.helpers import StoreTestCase, assert_kv_equal, make_kv, make_tokens
from vua import VUAConfig
from vua.core import SHARD
from vua.errors import CorruptFragmentError
from vua.integrity import check_tokens, checksum
from vua.keys import as_token_array, chained_digests
from vua.store import TensorSource

SPLIT = 4
GROUPS = 3


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class DamagedFragmentTest(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = VUAConfig(split_factor=SPLIT, identity="integrity")
        self.store_vua = self.vua(self.config)
        self.tokens = make_tokens(SPLIT * GROUPS)
        self.kv = make_kv(tokens=SPLIT * GROUPS)
        self.store_vua.put(self.tokens, self.kv)
        namespace = self.config.namespace()
        self.digests = chained_digests(as_token_array(self.tokens), SPLIT, namespace.seed)
        self.paths = [self.store_vua.store.layout.fragment_path(d, SHARD) for d in self.digests]

    def _assert_prefix_of_one_group_and_one_warning(self, damage: Callable[[Path], None], *, removed: bool = True) -> None:
        middle = self.paths[1]
        damage(middle)
        with self.assertLogs("vua", "WARNING") as logs:
            hit = self.vua(self.config).get_closest(self.tokens, device="cpu")
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn(str(middle), logs.output[0])
        self.assertIsNotNone(hit)
        self.assertTrue(torch.equal(hit.tokens, self.tokens[:SPLIT]))
        assert_kv_equal(self, hit.data, [(k[:, :, :SPLIT], v[:, :, :SPLIT]) for k, v in self.kv])
        self.assertEqual(middle.exists(), not removed)

    def test_flipped_bit_in_kv_data(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: _flip_byte(p, p.stat().st_size - 1))

    def test_flipped_bit_in_stored_tokens(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: _flip_byte(p, _data_start(p)))

    def test_flipped_bit_in_header_length(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: _flip_byte(p, 2))

    def test_tampered_checksum_in_metadata(self) -> None:
        def tamper(path: Path) -> None:
            blob = path.read_bytes()
            at = blob.index(b"vua_checksums") + len(b'vua_checksums":"')
            path.write_bytes(blob[:at] + (b"0" if blob[at : at + 1] != b"0" else b"1") + blob[at + 1 :])

        self._assert_prefix_of_one_group_and_one_warning(tamper)

    def test_truncated(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: os.truncate(p, p.stat().st_size // 2))

    def test_empty(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: os.truncate(p, 0))

    def test_foreign_safetensors_file(self) -> None:
        def replace(path: Path) -> None:
            path.unlink()
            safetensors.torch.save_file({"layer.0.keys": torch.zeros(2, SPLIT, 4)}, path)

        self._assert_prefix_of_one_group_and_one_warning(replace)

    def test_fragment_of_another_prefix_in_its_place(self) -> None:
        self._assert_prefix_of_one_group_and_one_warning(lambda p: shutil.copyfile(self.paths[2], p))

    def test_symlink_in_place_of_a_fragment(self) -> None:
        def link(path: Path) -> None:
            path.unlink()
            os.symlink(self.paths[0], path)

        self._assert_prefix_of_one_group_and_one_warning(link)

    def test_right_key_but_other_token_ids(self) -> None:
        # A well-formed fragment filed under the right key whose stored ids differ (a hash collision).
        def forge(path: Path) -> None:
            path.unlink()
            wrong = np.arange(SPLIT, dtype="<i8") + 70000
            source = [TensorSource(f"layer.{i}.{kind}", "F16", (2, SPLIT, 4), [t[0, :, SPLIT : 2 * SPLIT].contiguous().view(torch.uint8).numpy()])
                      for i, (k, v) in enumerate(self.kv) for kind, t in (("keys", k), ("values", v))]
            self.store_vua.store.write(path, self.digests[1], wrong, source, start=SPLIT)

        self._assert_prefix_of_one_group_and_one_warning(forge)

    def test_damaged_first_group_is_a_plain_miss(self) -> None:
        os.truncate(self.paths[0], 100)
        with self.assertLogs("vua", "WARNING") as logs:
            self.assertIsNone(self.vua(self.config).get_closest(self.tokens, device="cpu"))
        self.assertEqual(len(logs.output), 1)

    def test_file_truncated_after_it_was_opened(self) -> None:
        store = self.store_vua.store
        fragment = store.open(self.paths[0], self.digests[0])
        self.assertIsNotNone(fragment)
        os.truncate(self.paths[0], fragment.header.data_start + 10)
        buffers = [(e.name, [np.empty(e.nbytes, dtype=np.uint8)]) for e in fragment.tensor_entries()]
        with fragment, self.assertLogs("vua.store", "WARNING") as logs:
            self.assertFalse(store.read(fragment, buffers, as_token_array(self.tokens[:SPLIT])))
        self.assertEqual(len(logs.output), 1)
        self.assertIn("file ended at byte", logs.output[0])

    def test_a_rewrite_after_damage_heals_the_store(self) -> None:
        os.truncate(self.paths[1], 0)
        with self.assertLogs("vua", "WARNING"):
            self.vua(self.config).get_closest(self.tokens)
        self.store_vua.put(self.tokens, self.kv)
        hit = self.vua(self.config).get_closest(self.tokens)
        assert_kv_equal(self, hit.data, self.kv)


class ChecksTest(unittest.TestCase):
    def test_checksum_is_xxh3_64_over_the_concatenation(self) -> None:
        self.assertEqual(checksum([b"ab", memoryview(b"cd")]), xxhash.xxh3_64_hexdigest(b"abcd"))
        self.assertEqual(len(checksum([])), 16)

    def test_check_tokens(self) -> None:
        check_tokens(np.array([1, 2]), np.array([1, 2]))
        for other in (np.array([1, 3]), np.array([1, 2, 3])):
            with self.assertRaisesRegex(CorruptFragmentError, "stored token ids differ from the query"):
                check_tokens(np.array([1, 2]), other)


if __name__ == "__main__":
    unittest.main()
