"""The contract every :class:`~vua.backends.IOBackend` keeps, checked against an independent oracle.

The oracle writes and reads files with plain ``open``/``read``/``write``, never through a backend.
A backend's test class mixes :class:`BackendContract` into ``unittest.TestCase`` and provides
``make_backend`` and, for device backends, buffers in device memory (``make_buffer``/``buffer_bytes``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vua.backends import IOBackend, OpenFile, ShortReadError

# Awkward sizes on purpose: 1 byte, odd primes, either side of a page, over a 64 KiB read chunk.
SIZES = [1, 7, 199, 4095, 4096, 4097, 40960, 65537]


class BackendContract:
    """Mixin for ``unittest.TestCase`` subclasses (pytest collects them too)."""

    def make_backend(self) -> IOBackend:
        raise NotImplementedError

    def make_buffer(self, nbytes: int) -> Any:
        """A read target of ``nbytes`` bytes; host memory unless a subclass says otherwise."""
        return np.zeros(nbytes, dtype=np.uint8)

    def buffer_bytes(self, buffer: Any) -> bytes:
        return np.asarray(buffer).tobytes()

    # ---- fixtures and the oracle ----

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vua-backend-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)  # type: ignore[attr-defined]
        self.backend = self.make_backend()
        self.rng = np.random.default_rng(1234)

    def oracle_file(self, data: bytes) -> OpenFile:
        path = self.dir / f"f{len(list(self.dir.iterdir()))}"
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)  # type: ignore[attr-defined]
        return OpenFile(fd, path, len(data))

    def random_bytes(self, n: int) -> bytes:
        return self.rng.integers(0, 256, n, dtype=np.uint8).tobytes()

    # ---- reads ----

    def test_reads_each_size_at_each_offset(self) -> None:
        data = self.random_bytes(sum(SIZES) + 5000)
        file = self.oracle_file(data)
        for size in SIZES:
            for offset in (0, 1, 4096, len(data) - size):
                buffer = self.make_buffer(size)
                self.backend.read_into(file, offset, [buffer])
                self.assertEqual(self.buffer_bytes(buffer), data[offset : offset + size], (size, offset))  # type: ignore[attr-defined]

    def test_scatters_into_many_buffers_in_order(self) -> None:
        # More buffers than IOV_MAX (1024), of mixed sizes, some empty.
        sizes = [int(s) for s in self.rng.choice([0, 1, 3, 64, 511, 4096], size=2500)]
        data = self.random_bytes(sum(sizes) + 10)
        file = self.oracle_file(data)
        buffers = [self.make_buffer(s) for s in sizes]
        self.backend.read_into(file, 10, buffers)
        self.assertEqual(b"".join(self.buffer_bytes(b) for b in buffers), data[10:])  # type: ignore[attr-defined]

    def test_reading_past_the_end_raises(self) -> None:
        file = self.oracle_file(self.random_bytes(1000))
        for offset, size in ((900, 200), (1000, 1), (5000, 10)):
            with self.assertRaises(OSError) as caught:  # type: ignore[attr-defined]
                self.backend.read_into(file, offset, [self.make_buffer(size)])
            self.assertIsInstance(caught.exception, ShortReadError)  # type: ignore[attr-defined]

    def test_nothing_to_read(self) -> None:
        file = self.oracle_file(b"abc")
        self.backend.read_into(file, 0, [])
        self.backend.read_into(file, 3, [self.make_buffer(0)])

    def test_accepts(self) -> None:
        self.assertTrue(self.backend.accepts(self.make_buffer(8)))  # type: ignore[attr-defined]
        self.assertTrue(self.backend.accepts(bytearray(8)))  # type: ignore[attr-defined]
        self.assertFalse(self.backend.accepts(object()))  # type: ignore[attr-defined]

    # ---- writes ----

    def test_writes_gather_buffers_at_an_offset(self) -> None:
        pieces = [self.random_bytes(s) for s in [*SIZES, 0, 3] * 200]  # > IOV_MAX pieces
        path = self.dir / "written"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            self.backend.write_from(fd, 4096, [np.frombuffer(p, dtype=np.uint8) for p in pieces])
            self.backend.write_from(fd, 0, [memoryview(b"head")])
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            written = f.read()
        self.assertEqual(written[:4], b"head")  # type: ignore[attr-defined]
        self.assertEqual(written[4:4096], b"\0" * 4092)  # type: ignore[attr-defined]
        self.assertEqual(written[4096:], b"".join(pieces))  # type: ignore[attr-defined]

    def test_write_errors_surface_as_oserror(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            with self.assertRaises(OSError):  # type: ignore[attr-defined]
                self.backend.write_from(fd, 0, [b"x"])
        finally:
            os.close(fd)

    # ---- the store on this backend: what it reads is verified, whatever memory it lands in ----

    def _store_with_fragment(self) -> tuple[Any, Path, dict[str, bytes], np.ndarray]:
        import torch

        from vua.integrity import device_checksum
        from vua.keys import Namespace
        from vua.store import FragmentStore, TensorSource

        store = FragmentStore(self.dir, Namespace(granularity=4, identity="contract"), backend=self.backend, durable=False)
        tensors = {"layer.0": self.random_bytes(4096), "layer.1": self.random_bytes(65540)}
        tokens = np.arange(4, dtype="<i8")
        path = store.layout.fragment_path(b"c" * 16, "s")
        sums = {name: device_checksum([torch.frombuffer(bytearray(data), dtype=torch.uint8)]) for name, data in tensors.items()}
        sources = [TensorSource(name, "U8", (len(data),), [np.frombuffer(data, np.uint8)]) for name, data in tensors.items()]
        self.assertTrue(store.write(path, b"c" * 16, tokens, sources, start=0, device_checksums=sums))  # type: ignore[attr-defined]
        return store, path, tensors, tokens

    def _read_through_store(self, store: Any, path: Path, tensors: dict[str, bytes], tokens: np.ndarray) -> dict[str, bytes] | None:
        fragment = store.open(path, b"c" * 16, tokens)
        self.assertIsNotNone(fragment)  # type: ignore[attr-defined]
        with fragment:
            # Each tensor lands in three buffers of this backend's kind (host or device memory).
            wanted = {name: [self.make_buffer(n) for n in (4, len(data) - 8, 4)] for name, data in tensors.items()}
            if not store.read(fragment, list(wanted.items()), None):
                return None
        return {name: b"".join(self.buffer_bytes(b) for b in buffers) for name, buffers in wanted.items()}

    def test_store_reads_a_fragment_through_this_backend(self) -> None:
        store, path, tensors, tokens = self._store_with_fragment()
        self.assertEqual(self._read_through_store(store, path, tensors, tokens), tensors)  # type: ignore[attr-defined]

    def test_store_verifies_what_this_backend_reads(self) -> None:
        store, path, tensors, tokens = self._store_with_fragment()
        with open(path, "r+b") as handle:  # one byte of the last tensor's data
            handle.seek(-100, os.SEEK_END)
            byte = handle.read(1)
            handle.seek(-100, os.SEEK_END)
            handle.write(bytes([byte[0] ^ 1]))
        self.assertIsNone(self._read_through_store(store, path, tensors, tokens))  # type: ignore[attr-defined]
        self.assertFalse(path.exists())  # type: ignore[attr-defined]  # removed, for the next writer

    def test_store_refuses_a_fragment_of_other_tokens(self) -> None:
        store, path, _, _ = self._store_with_fragment()
        self.assertIsNone(store.open(path, b"c" * 16, np.arange(1, 5, dtype="<i8")))  # type: ignore[attr-defined]
