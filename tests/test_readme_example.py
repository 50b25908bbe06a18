"""The README example, verbatim apart from the cache directory."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import unittest

import torch


class ReadmeExampleTest(unittest.TestCase):
    def test_runs_as_written(self) -> None:
        workdir = tempfile.mkdtemp(prefix="vua-readme-")
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            # ---- README, verbatim except cache_dir ----
            import os
            import torch
            from vua.core import VUA, VUAConfig
            cache_dir = os.path.join(workdir, "vua_cache")
            os.makedirs(cache_dir, exist_ok=True)
            vua = VUA(VUAConfig, cache_dir)
            tokens = torch.randint(0, 0xFFFF, (1, 512), dtype=torch.uint16)
            trimmed_tokens = VUAConfig.trim_to_split_factor(tokens)
            kvcache = [[torch.randn(1, 2, trimmed_tokens.size(1), 64), torch.randn(1, 2, trimmed_tokens.size(1), 64)]]
            vua.put(trimmed_tokens, kvcache)
            result = vua.get_closest(trimmed_tokens, device="cpu")
            print("Retrieved tokens:", result.tokens)
            print("Retrieved data:", result.data)
            # ---- end of README ----
        vua.close()
        self.assertEqual(tuple(trimmed_tokens.shape), (1, 400))
        self.assertTrue(torch.equal(result.tokens, tokens[:, :400]))
        self.assertEqual(len(result.data), 1)
        for got, expected in zip(result.data[0], kvcache[0]):
            self.assertTrue(torch.equal(got, expected))
        self.assertIn("Retrieved tokens: tensor(", printed.getvalue())
        self.assertIn("Retrieved data: [(tensor(", printed.getvalue())


if __name__ == "__main__":
    unittest.main()
