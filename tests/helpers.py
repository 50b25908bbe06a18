"""Shared by the core test modules: temporary stores, deterministic KV caches and file listings."""

from __future__ import annotations

import shutil
import tempfile
import unittest
from pathlib import Path
from typing import Any

import torch

from vua import VUA, VUAConfig
from vua.layout import STORE_DIR, is_temp_name


def make_kv(
    *, layers: int = 2, batch: int = 1, heads: int = 2, tokens: int = 8, head_dim: int = 4,
    dtype: torch.dtype = torch.float16, seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A legacy-layout KV cache with deterministic random contents."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    return [
        (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype))
        for _ in range(layers)
    ]


def make_tokens(count: int, *, seed: int = 0, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 0xFFFF, (count,), generator=generator).to(dtype)


def fragment_files(root: Path) -> list[Path]:
    """Every published fragment under ``root``, sorted."""
    return sorted(p for p in (root / STORE_DIR).rglob("*.safetensors") if not is_temp_name(p.name))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if is_temp_name(p.name))


def assert_kv_equal(case: unittest.TestCase, got: Any, expected: Any) -> None:
    """Bit-exact comparison of two per-layer (keys, values) lists."""
    case.assertEqual(len(got), len(expected))
    for index, (got_pair, expected_pair) in enumerate(zip(got, expected)):
        for got_t, expected_t in zip(got_pair, expected_pair):
            case.assertEqual(got_t.dtype, expected_t.dtype, f"layer {index}")
            case.assertEqual(tuple(got_t.shape), tuple(expected_t.shape), f"layer {index}")
            case.assertTrue(torch.equal(got_t.view(torch.uint8), expected_t.contiguous().view(torch.uint8)), f"layer {index}")


class StoreTestCase(unittest.TestCase):
    """A fresh storage root per test; ``self.vua(...)`` opens VUA instances that are closed afterwards."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vua-test-"))
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def vua(self, config: Any = None, **options: Any) -> VUA:
        options.setdefault("backend", "posix")
        instance = VUA(config if config is not None else VUAConfig(split_factor=4), self.root, **options)
        self.addCleanup(instance.close)
        return instance
