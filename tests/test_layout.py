"""Paths under the storage root: fan-out, bounded length, temp names, root guards."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import torch

from vua import VUA, StoreRootError, VUAConfig
from vua.keys import Namespace
from vua.layout import STORE_DIR, StoreLayout, check_root, is_temp_name


class LayoutTest(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vua-layout-"))
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.layout = StoreLayout(self.root, "0123456789abcdef")

    def test_nested_fan_out(self) -> None:
        digest = bytes.fromhex("a1b2c3d4" + "00" * 12)
        path = self.layout.fragment_path(digest, "kv")
        self.assertEqual(
            path.relative_to(self.root).parts,
            (STORE_DIR, "0123456789abcdef", "a1", "b2", digest.hex(), "kv.safetensors"),
        )
        self.assertEqual(self.layout.prefix_dir(digest), path.parent)

    def test_tails_and_their_names(self) -> None:
        head, digest = b"\x01" * 16, b"\x02" * 16
        path = self.layout.tail_path(head, digest, "rank0")
        self.assertEqual(path.parent, self.layout.tails_dir(head))
        self.assertEqual(path.relative_to(self.layout.namespace_dir).parts[:4], ("tails", "01", "01", head.hex()))
        self.assertEqual(StoreLayout.parse_tail_name(path.name), (digest.hex(), "rank0"))
        for name in ("kv.safetensors", f".{path.name}.tmp-12-ab", f"{digest.hex()}.rank0.bin", f"{digest.hex()}.safetensors"):
            self.assertIsNone(StoreLayout.parse_tail_name(name), name)

    def test_temp_names(self) -> None:
        self.assertTrue(is_temp_name(".kv.safetensors.tmp-123-abcd"))
        self.assertFalse(is_temp_name("kv.safetensors"))
        self.assertFalse(is_temp_name(".hidden"))

    def test_path_length_is_bounded_whatever_the_prompt_length(self) -> None:
        config = VUAConfig(split_factor=16)
        short = config.tokens_to_paths(torch.arange(16))
        long = config.tokens_to_paths(torch.arange(16 * 5000) % 50000)
        self.assertEqual(len(long), 5000)
        self.assertEqual({len(p) for p in short + long}, {len(short[0])})
        self.assertLess(len(short[0]), 80)


class RootTest(unittest.TestCase):
    def setUp(self) -> None:
        self.parent = Path(tempfile.mkdtemp(prefix="vua-root-"))
        self.addCleanup(shutil.rmtree, self.parent, ignore_errors=True)

    def test_missing_root_is_named_and_never_created(self) -> None:
        missing = self.parent / "not-mounted"
        for open_store in (lambda: check_root(missing), lambda: VUA(VUAConfig, missing)):
            with self.assertRaises(StoreRootError) as caught:
                open_store()
            self.assertIsInstance(caught.exception, FileNotFoundError)
            self.assertIn(repr(str(missing)), str(caught.exception))
            self.assertIn("does not exist", str(caught.exception))
            self.assertFalse(missing.exists())

    def test_file_as_root(self) -> None:
        file = self.parent / "file"
        file.write_text("x")
        with self.assertRaisesRegex(StoreRootError, "is not a directory"):
            check_root(file)

    def test_root_is_resolved(self) -> None:
        os.symlink(self.parent, self.parent.with_name(self.parent.name + "-link"))
        self.addCleanup(os.unlink, self.parent.with_name(self.parent.name + "-link"))
        self.assertEqual(check_root(self.parent.with_name(self.parent.name + "-link")), self.parent.resolve())

    def test_namespace_directory_is_named_after_the_namespace(self) -> None:
        namespace = Namespace(granularity=8, identity="m")
        layout = StoreLayout(self.parent, namespace.name)
        self.assertEqual(layout.namespace_dir, self.parent / STORE_DIR / namespace.name)


if __name__ == "__main__":
    unittest.main()
