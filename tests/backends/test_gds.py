"""The GPUDirect Storage backend keeps the backend contract, reading into CUDA tensors.

Needs a CUDA device and kvikio; elsewhere the class is skipped with the reason, and the fallback
that replaces it is checked instead.
"""

from __future__ import annotations

import logging
import unittest
from typing import Any

from vua.backends import IOBackend, PosixBackend, open_backend
from vua.backends.gds import gds_unavailable_reason
from vua.errors import ConfigError

from .contract import BackendContract

UNAVAILABLE = gds_unavailable_reason()


@unittest.skipIf(UNAVAILABLE is not None, f"GPUDirect Storage backend not testable here: {UNAVAILABLE}")
class GdsBackendTest(BackendContract, unittest.TestCase):
    def make_backend(self) -> IOBackend:
        return open_backend("gds")

    def make_buffer(self, nbytes: int) -> Any:
        import torch

        return torch.zeros(nbytes, dtype=torch.uint8, device="cuda")

    def buffer_bytes(self, buffer: Any) -> bytes:
        return buffer.cpu().numpy().tobytes()

    def test_host_buffers_take_the_posix_path(self) -> None:
        import numpy as np

        file = self.oracle_file(b"0123456789")
        host = np.zeros(4, dtype=np.uint8)
        self.backend.read_into(file, 3, [host])
        self.assertEqual(host.tobytes(), b"3456")


@unittest.skipIf(UNAVAILABLE is None, "GPUDirect Storage is usable here, so there is no fallback to check")
class GdsFallbackTest(unittest.TestCase):
    def test_auto_falls_back_to_posix_and_gds_names_the_reason(self) -> None:
        self.assertIsInstance(open_backend("auto"), PosixBackend)
        with self.assertRaises(ConfigError) as caught:
            open_backend("gds")
        self.assertEqual(str(caught.exception), f"GPUDirect Storage was requested but cannot be used: {UNAVAILABLE}")

    def test_fallback_reason_is_logged_once(self) -> None:
        from vua import backends

        backends._reported.discard(UNAVAILABLE)
        with self.assertLogs("vua.backends", logging.INFO) as logs:
            open_backend("auto")
            open_backend("auto")
        self.assertEqual(logs.output, [f"INFO:vua.backends:VUA uses POSIX I/O: {UNAVAILABLE}"])


if __name__ == "__main__":
    unittest.main()
