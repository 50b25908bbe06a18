"""The core API: VUA.put / VUA.get_closest with exact tensors, batches, DynamicCache and input errors."""

from __future__ import annotations

import os
import unittest

import numpy as np
import safetensors
import safetensors.torch
import torch

import vua
from tests.helpers import StoreTestCase, assert_kv_equal, fragment_files, make_kv, make_tokens
from vua.core import VUA, ClosestKV, SplitFactorError, VUAConfig
from vua.errors import KVCacheError, TokensError


def _prefix(kv: list, count: int, row: int = 0) -> list:
    return [(k[row : row + 1, :, :count], v[row : row + 1, :, :count]) for k, v in kv]


class ConfigTest(unittest.TestCase):
    def test_public_names(self) -> None:
        self.assertIs(vua.VUA, VUA)
        self.assertIs(vua.VUAConfig, VUAConfig)
        self.assertIs(vua.ClosestKV, ClosestKV)
        self.assertIs(vua.SplitFactorError, SplitFactorError)
        self.assertTrue(issubclass(SplitFactorError, ValueError))

    def test_split_factor_default_subclass_and_instance(self) -> None:
        class Coarse(VUAConfig):
            split_factor = 512

        self.assertEqual(VUAConfig.split_factor, 200)
        self.assertEqual(VUAConfig().split_factor, 200)
        self.assertEqual(Coarse.split_factor, 512)
        self.assertEqual(VUAConfig(split_factor=64).split_factor, 64)
        self.assertEqual(VUAConfig.trim_to_split_factor(torch.zeros(1, 450)).shape, (1, 400))
        self.assertEqual(Coarse.trim_to_split_factor(torch.zeros(1, 1100)).shape, (1, 1024))
        self.assertEqual(VUAConfig(split_factor=64).trim_to_split_factor(torch.zeros(3, 2, 130)).shape, (3, 2, 128))
        self.assertEqual(VUAConfig.trim_to_split_factor(list(range(450))), list(range(400)))
        self.assertEqual(VUAConfig.trim_to_split_factor(torch.zeros(150)).shape, (0,))

    def test_invalid_split_factor(self) -> None:
        for bad in (0, -4, 2.5, "8"):
            with self.assertRaisesRegex(ValueError, "split_factor must be a positive int"):
                VUAConfig(split_factor=bad)  # type: ignore[arg-type]


class PutGetTest(StoreTestCase):
    def test_round_trip_is_bit_exact_for_each_dtype(self) -> None:
        for index, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
            with self.subTest(dtype=dtype):
                store = self.vua(VUAConfig(split_factor=4, identity=str(dtype)))
                tokens, kv = make_tokens(12, seed=index), make_kv(tokens=12, dtype=dtype, layers=3, seed=index)
                store.put(tokens, kv)
                hit = store.get_closest(tokens, device="cpu")
                self.assertIsInstance(hit, ClosestKV)
                self.assertTrue(torch.equal(hit.tokens, tokens))
                assert_kv_equal(self, hit.data, kv)
                # 12 tokens in groups of 4: three more fragments per dtype (each its own identity).
                self.assertEqual(len(fragment_files(self.root)), 3 * (index + 1))

    def test_a_fragment_per_group_named_by_tokens_to_paths(self) -> None:
        config = VUAConfig(split_factor=4)
        tokens = make_tokens(12)
        self.vua(config).put(tokens, make_kv(tokens=12))
        expected = sorted(self.root / p / "kv.safetensors" for p in config.tokens_to_paths(tokens))
        self.assertEqual(fragment_files(self.root), expected)

    def test_fragments_are_safetensors_files_with_the_group_and_its_metadata(self) -> None:
        config = VUAConfig(split_factor=4)
        tokens, kv = make_tokens(12, dtype=torch.int32), make_kv(tokens=12, layers=2)
        self.vua(config).put(tokens, kv)
        for group, relpath in enumerate(config.tokens_to_paths(tokens)):
            path = self.root / relpath / "kv.safetensors"
            begin, end = group * 4, (group + 1) * 4
            loaded = safetensors.torch.load_file(path)
            self.assertEqual(list(loaded), ["tokens", "layer.0.keys", "layer.0.values", "layer.1.keys", "layer.1.values"])
            self.assertEqual(loaded["tokens"].dtype, torch.int64)
            self.assertEqual(loaded["tokens"].tolist(), tokens[begin:end].tolist())
            for index, (keys, values) in enumerate(kv):
                self.assertTrue(torch.equal(loaded[f"layer.{index}.keys"], keys[0, :, begin:end]))
                self.assertTrue(torch.equal(loaded[f"layer.{index}.values"], values[0, :, begin:end]))
            with safetensors.safe_open(path, "pt") as handle:
                metadata = handle.metadata()
            self.assertEqual(metadata["vua_format"], "1")
            self.assertEqual(metadata["vua_key"], path.parent.name)
            self.assertEqual((metadata["vua_start"], metadata["vua_tokens"]), (str(begin), "4"))
            with open(path, "rb") as f:
                self.assertEqual((8 + int.from_bytes(f.read(8), "little")) % 4096, 0)

    def test_longest_stored_prefix(self) -> None:
        store = self.vua()
        tokens, kv = make_tokens(16), make_kv(tokens=16)
        store.put(tokens[:8], _prefix(kv, 8))
        longer = store.get_closest(tokens, device="cpu")
        self.assertTrue(torch.equal(longer.tokens, tokens[:8]))
        assert_kv_equal(self, longer.data, _prefix(kv, 8))
        # A query that is not a multiple of split_factor is trimmed first.
        ragged = store.get_closest(tokens[:7], device="cpu")
        self.assertTrue(torch.equal(ragged.tokens, tokens[:4]))
        assert_kv_equal(self, ragged.data, _prefix(kv, 4))
        self.assertIsNone(store.get_closest(tokens[:3], device="cpu"))
        self.assertIsNone(store.get_closest(make_tokens(16, seed=9), device="cpu"))
        diverging = torch.cat([tokens[:4], make_tokens(12, seed=5)])
        self.assertTrue(torch.equal(store.get_closest(diverging).tokens, tokens[:4]))

    def test_query_shapes(self) -> None:
        store = self.vua()
        tokens, kv = make_tokens(8), make_kv(tokens=8)
        store.put(tokens.reshape(1, 8), kv)
        batch_of_one = store.get_closest(tokens.reshape(1, 8), device="cpu")
        self.assertEqual(tuple(batch_of_one.tokens.shape), (1, 8))
        assert_kv_equal(self, batch_of_one.data, kv)
        results = store.get_closest([tokens, tokens[:5], make_tokens(8, seed=3)], device="cpu")
        self.assertIsInstance(results, list)
        self.assertEqual(len(results), 3)
        assert_kv_equal(self, results[0].data, kv)
        assert_kv_equal(self, results[1].data, _prefix(kv, 4))
        self.assertIsNone(results[2])
        from_list = store.get_closest(tokens[:6].tolist())
        self.assertEqual(from_list.tokens, tokens[:4].tolist())
        assert_kv_equal(self, from_list.data, _prefix(kv, 4))
        from_numpy = store.get_closest(tokens.numpy())
        self.assertTrue(np.array_equal(from_numpy.tokens, tokens.numpy()))

    def test_equal_ids_in_other_dtypes_hit(self) -> None:
        store = self.vua()
        tokens, kv = make_tokens(8, dtype=torch.uint16), make_kv(tokens=8)
        store.put(tokens, kv)
        for dtype in (torch.int32, torch.int64):
            assert_kv_equal(self, store.get_closest(tokens.to(dtype)).data, kv)

    def test_batch_put_stores_every_row(self) -> None:
        store = self.vua()
        tokens = torch.stack([make_tokens(8, seed=s) for s in range(3)])
        kv = make_kv(batch=3, tokens=8, layers=2)
        store.put(tokens, kv)
        self.assertEqual(len(fragment_files(self.root)), 6)
        for row in range(3):
            hit = store.get_closest(tokens[row], device="cpu")
            assert_kv_equal(self, hit.data, _prefix(kv, 8, row))
        rows = store.get_closest(tokens, device="cpu")  # [B, N] with B > 1 gives a list
        self.assertEqual([r.tokens.tolist() for r in rows], tokens.tolist())

    def test_dynamic_cache(self) -> None:
        from transformers import DynamicCache

        tokens, kv = make_tokens(8), make_kv(tokens=8, layers=3, dtype=torch.bfloat16)
        cache = DynamicCache()
        for index, (keys, values) in enumerate(kv):
            cache.update(keys.clone(), values.clone(), index)
        store = self.vua()
        store.put(tokens, cache)
        assert_kv_equal(self, store.get_closest(tokens).data, kv)

    def test_non_contiguous_kv(self) -> None:
        store = self.vua()
        tokens = make_tokens(8)
        wide = make_kv(tokens=8, head_dim=8)
        kv = [(k[..., ::2], v[..., 1::2]) for k, v in wide]
        store.put(tokens, kv)
        assert_kv_equal(self, store.get_closest(tokens).data, kv)

    def test_missing_middle_group_ends_the_prefix(self) -> None:
        config = VUAConfig(split_factor=4)
        store = self.vua(config)
        tokens, kv = make_tokens(12), make_kv(tokens=12)
        store.put(tokens, kv)
        middle = self.root / config.tokens_to_paths(tokens)[1] / "kv.safetensors"
        middle.unlink()
        hit = store.get_closest(tokens)
        self.assertTrue(torch.equal(hit.tokens, tokens[:4]))
        assert_kv_equal(self, hit.data, _prefix(kv, 4))

    def test_groups_already_stored_are_not_rewritten(self) -> None:
        store = self.vua()
        tokens, kv = make_tokens(16), make_kv(tokens=16)
        store.put(tokens[:8], _prefix(kv, 8))
        before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in fragment_files(self.root)}
        store.put(tokens[:8], _prefix(kv, 8))
        store.put(tokens, kv)
        after = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in fragment_files(self.root)}
        self.assertEqual(len(after), 4)
        self.assertEqual({p: after[p] for p in before}, before)

    def test_namespaces_are_separate(self) -> None:
        tokens, kv = make_tokens(8), make_kv(tokens=8)
        self.vua(VUAConfig(split_factor=4, identity="a")).put(tokens, kv)
        self.assertIsNone(self.vua(VUAConfig(split_factor=4, identity="b")).get_closest(tokens))
        self.assertIsNone(self.vua(VUAConfig(split_factor=8, identity="a")).get_closest(tokens))

    def test_shared_root_between_instances(self) -> None:
        tokens, kv = make_tokens(8), make_kv(tokens=8)
        with VUA(VUAConfig(split_factor=4), self.root, backend="posix", io_threads=1) as writer:
            writer.put(tokens, kv)
        assert_kv_equal(self, self.vua().get_closest(tokens).data, kv)

    def test_layers_of_another_layout_end_the_prefix(self) -> None:
        store = self.vua()
        tokens = make_tokens(8)
        kv = make_kv(tokens=8)
        store.put(tokens[:4], _prefix(kv, 4))
        other = make_kv(tokens=8, head_dim=8)
        store.put(tokens, other)  # group 0 is already stored with head_dim 4; group 1 gets head_dim 8
        hit = store.get_closest(tokens)
        assert_kv_equal(self, hit.data, _prefix(kv, 4))


class BadInputTest(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.vua()
        self.tokens = make_tokens(8)
        self.kv = make_kv(tokens=8)

    def assert_rejected(self, error: type, message: str, tokens: object, kvcache: object) -> None:
        with self.assertRaises(error) as caught:
            self.store.put(tokens, kvcache)
        self.assertEqual(str(caught.exception), message)
        self.assertEqual(fragment_files(self.root), [])

    def test_split_factor(self) -> None:
        self.assert_rejected(
            SplitFactorError,
            "put() needs a token count that is a multiple of split_factor=4, got 6; trim it with VUAConfig.trim_to_split_factor()",
            self.tokens[:6], _prefix(self.kv, 6),
        )

    def test_tokens(self) -> None:
        self.assert_rejected(TokensError, "token ids must be integers, got a tensor of torch.float32", self.tokens.float(), self.kv)
        self.assert_rejected(TokensError, "tokens must be [N] or [B, N], got shape (1, 1, 8)", self.tokens.reshape(1, 1, 8), self.kv)
        self.assert_rejected(TokensError, "tokens must be a tensor, array or sequence of ints, got str", "12345678", self.kv)
        with self.assertRaisesRegex(TokensError, "token ids must be integers, got a tensor of torch.float32"):
            self.store.get_closest(self.tokens.float())
        with self.assertRaisesRegex(TokensError, "expected a 1-D sequence"):
            self.store.get_closest(self.tokens.reshape(1, 1, 8))

    def test_kvcache(self) -> None:
        kv = self.kv
        cases = [
            ("layer 0 keys: 6 tokens but 8 token ids", _prefix(kv, 6)),
            ("layer 1 values: batch size 2 but 1 token rows", [kv[0], (kv[1][0], kv[1][1].repeat(2, 1, 1, 1))]),
            ("layer 0 keys: expected [batch, heads, tokens, head_dim], got shape (2, 8, 4)", [(kv[0][0][0], kv[0][1])]),
            ("kvcache layer 1 must be a (keys, values) pair of tensors", [kv[0], (kv[1][0], kv[1][1].numpy())]),
            ("kvcache layer 0 must be a (keys, values) pair of tensors", [(kv[0][0],)]),
            ("kvcache has no layers", []),
            ("kvcache must be a list of (keys, values) per layer or a DynamicCache, got Tensor", kv[0][0]),
        ]
        for message, kvcache in cases:
            with self.subTest(message=message):
                self.assert_rejected(KVCacheError, message, self.tokens, kvcache)
        self.assertTrue(issubclass(KVCacheError, ValueError))

    def test_mismatched_batch_rows(self) -> None:
        tokens = torch.stack([self.tokens, self.tokens])
        self.assert_rejected(KVCacheError, "layer 0 keys: batch size 1 but 2 token rows", tokens, self.kv)

    def test_unsupported_dtype(self) -> None:
        kv = [(k.to(torch.complex128), v) for k, v in self.kv]
        with self.assertRaisesRegex(ValueError, "dtype torch.complex128 has no safetensors equivalent"):
            self.store.put(self.tokens, kv)


if __name__ == "__main__":
    unittest.main()
