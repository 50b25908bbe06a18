"""Token ids to keys: dtype independence, chaining and namespace separation."""

from __future__ import annotations

import json
import unittest

import numpy as np
import torch

from vua import VUAConfig
from vua.errors import TokensError
from vua.keys import DIGEST_BYTES, FORMAT_VERSION, Namespace, as_token_array, chained_digests, squeeze_batch


class TokenArrayTest(unittest.TestCase):
    def test_equal_ids_in_any_integer_dtype_give_equal_arrays_and_keys(self) -> None:
        ids = [0, 1, 255, 256, 40000, 65535, 7, 9]
        seed = Namespace(granularity=4).seed
        forms = [
            torch.tensor(ids, dtype=torch.uint16),
            torch.tensor(ids, dtype=torch.int32),
            torch.tensor(ids, dtype=torch.int64),
            np.array(ids, dtype=np.uint16),
            np.array(ids, dtype=">i4"),  # big-endian input still hashes as little-endian int64
            ids,
        ]
        expected = chained_digests(as_token_array(forms[0]), 4, seed)
        self.assertEqual(len(expected), 2)
        for form in forms:
            array = as_token_array(form)
            self.assertEqual(array.dtype, np.dtype("<i8"))
            self.assertEqual(array.tolist(), ids)
            self.assertEqual(chained_digests(array, 4, seed), expected, repr(form))

    def test_rejects_non_integer_ids_naming_the_dtype(self) -> None:
        cases = [
            (torch.tensor([1.0, 2.0]), "token ids must be integers, got a tensor of torch.float32"),
            (torch.tensor([True, False]), "token ids must be integers, got a tensor of torch.bool"),
            (np.array([1.5]), "token ids must be integers, got float64"),
        ]
        for tokens, message in cases:
            with self.assertRaises(TokensError) as caught:
                as_token_array(tokens)
            self.assertIsInstance(caught.exception, ValueError)
            self.assertEqual(str(caught.exception), message)

    def test_rejects_wrong_rank_and_negative_ids(self) -> None:
        with self.assertRaisesRegex(TokensError, r"expected a 1-D sequence of token ids, got shape \(2, 3\)"):
            as_token_array(torch.zeros(2, 3, dtype=torch.int64))
        with self.assertRaisesRegex(TokensError, "token ids must be non-negative"):
            as_token_array(torch.tensor([1, -1]))

    def test_empty_and_batch_of_one(self) -> None:
        self.assertEqual(as_token_array([]).dtype, np.dtype("<i8"))
        batch = torch.arange(6).reshape(1, 6)
        self.assertEqual(squeeze_batch(batch).tolist(), list(range(6)))
        two_rows = torch.arange(6).reshape(2, 3)
        self.assertIs(squeeze_batch(two_rows), two_rows)


class ChainedDigestsTest(unittest.TestCase):
    seed = Namespace(granularity=3).seed

    def test_one_digest_per_full_group_and_count(self) -> None:
        tokens = as_token_array(list(range(10)))
        digests = chained_digests(tokens, 3, self.seed)
        self.assertEqual(len(digests), 3)  # the partial last group is not named
        self.assertTrue(all(len(d) == DIGEST_BYTES for d in digests))
        self.assertEqual(len(set(digests)), 3)
        self.assertEqual(chained_digests(tokens, 3, self.seed, count=2), digests[:2])
        self.assertEqual(chained_digests(tokens, 3, self.seed, count=99), digests)

    def test_each_digest_names_the_whole_prefix(self) -> None:
        base = list(range(100, 112))
        digests = chained_digests(as_token_array(base), 3, self.seed)
        changed_first = chained_digests(as_token_array([999] + base[1:]), 3, self.seed)
        self.assertTrue(all(a != b for a, b in zip(digests, changed_first)))
        changed_third_group = base[:7] + [999] + base[8:]
        later = chained_digests(as_token_array(changed_third_group), 3, self.seed)
        self.assertEqual(later[:2], digests[:2])
        self.assertNotEqual(later[2], digests[2])
        self.assertNotEqual(later[3], digests[3])

    def test_group_boundaries_matter(self) -> None:
        # The same ids split differently must not collide: each link hashes the parent too.
        tokens = as_token_array(list(range(12)))
        self.assertNotEqual(chained_digests(tokens, 3, self.seed)[3], chained_digests(tokens, 4, self.seed)[2])


class NamespaceTest(unittest.TestCase):
    def test_canonical_fields(self) -> None:
        namespace = Namespace(granularity=256, identity="llama", extra=(("dtype", "bf16"),))
        self.assertEqual(
            json.loads(namespace.canonical()),
            {"format": FORMAT_VERSION, "granularity": 256, "identity": "llama", "dtype": "bf16"},
        )
        self.assertEqual(len(namespace.name), 16)
        self.assertEqual(namespace.name, namespace.seed.hex()[:16])

    def test_namespaces_never_share_keys(self) -> None:
        tokens = as_token_array(list(range(24)))
        namespaces = [
            Namespace(granularity=4),
            Namespace(granularity=4, identity="model-a"),
            Namespace(granularity=4, identity="model-b"),
            Namespace(granularity=4, extra=(("layout", "x"),)),
            VUAConfig(split_factor=8).namespace(),
        ]
        names = {n.name for n in namespaces}
        self.assertEqual(len(names), len(namespaces))
        keys = [d for n in namespaces for d in chained_digests(tokens, n.granularity, n.seed)]
        self.assertEqual(len(keys), len(set(keys)))


class TokensToPathsTest(unittest.TestCase):
    def test_one_path_per_full_group_naming_the_whole_prefix(self) -> None:
        config = VUAConfig(split_factor=4)
        namespace = config.namespace()
        tokens = torch.arange(18, dtype=torch.int32)
        paths = config.tokens_to_paths(tokens)
        digests = chained_digests(as_token_array(tokens), 4, namespace.seed)
        self.assertEqual(len(paths), 4)
        for path, digest in zip(paths, digests):
            h = digest.hex()
            self.assertEqual(path, f"vua-v1/{namespace.name}/{h[:2]}/{h[2:4]}/{h}")
        # A longer sequence with the same beginning shares the paths of that beginning.
        self.assertEqual(config.tokens_to_paths(torch.arange(8))[:2], paths[:2])
        self.assertEqual(config.tokens_to_paths(tokens.reshape(1, -1)), paths)

    def test_class_subclass_and_instance(self) -> None:
        tokens = torch.arange(800)

        class Small(VUAConfig):
            split_factor = 100

        self.assertEqual(len(VUAConfig.tokens_to_paths(tokens)), 4)
        self.assertEqual(len(Small.tokens_to_paths(tokens)), 8)
        self.assertEqual(Small.tokens_to_paths(tokens), VUAConfig(split_factor=100).tokens_to_paths(tokens))
        self.assertNotEqual(VUAConfig.tokens_to_paths(tokens)[0], Small.tokens_to_paths(tokens)[1])


if __name__ == "__main__":
    unittest.main()
