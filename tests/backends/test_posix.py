"""The POSIX backend keeps the backend contract."""

from __future__ import annotations

import unittest

from vua.backends import IOBackend, PosixBackend, open_backend

from .contract import BackendContract


class PosixBackendTest(BackendContract, unittest.TestCase):
    def make_backend(self) -> IOBackend:
        return PosixBackend()

    def test_is_an_io_backend_and_chosen_by_name(self) -> None:
        self.assertIsInstance(self.backend, IOBackend)
        for kind in ("posix", False, "false", "POSIX"):
            self.assertIsInstance(open_backend(kind), PosixBackend)

    def test_unknown_backend_is_named(self) -> None:
        with self.assertRaisesRegex(ValueError, "unknown I/O backend 'nfs'; use 'auto', 'posix' or 'gds'"):
            open_backend("nfs")


if __name__ == "__main__":
    unittest.main()
