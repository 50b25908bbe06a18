"""GPUDirect Storage reads through kvikio: file bytes land straight in GPU memory.

The only module that imports kvikio. kvikio imports without a GPU but cannot move a byte without
the CUDA driver, so :func:`gds_unavailable_reason` checks for a usable driver and device first.
Writes go through POSIX (the data is already in host memory when it is written).
"""

from __future__ import annotations

import errno
import os
from typing import Any, Sequence

from .base import OpenFile, ShortReadError
from .posix import PosixBackend

__all__ = ["GdsBackend", "gds_unavailable_reason"]


def gds_unavailable_reason() -> str | None:
    """Why GPUDirect reads cannot be used here, or None when they can."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
    except ImportError:
        return "torch is not installed"
    try:
        import kvikio  # noqa: F401
        import kvikio.defaults  # noqa: F401
    except ImportError as exc:
        return f"kvikio is not importable ({exc})"
    return None


class GdsBackend(PosixBackend):
    """Reads into CUDA tensors with kvikio (cuFile when GDS is set up, its POSIX path otherwise).

    Host buffers fall back to the POSIX implementation.
    """

    name = "gds"

    def __init__(self, threads: int | None = None) -> None:
        import kvikio
        import kvikio.defaults

        self._kvikio = kvikio
        if threads:
            kvikio.defaults.set("num_threads", threads)
        self.compat_mode = bool(kvikio.defaults.is_compat_mode_preferred()) if hasattr(
            kvikio.defaults, "is_compat_mode_preferred"
        ) else None

    @staticmethod
    def _is_device(buffer: Any) -> bool:
        return getattr(buffer, "is_cuda", False)

    def accepts(self, buffer: Any) -> bool:
        return self._is_device(buffer) or super().accepts(buffer)

    def read_into(self, file: OpenFile, offset: int, buffers: Sequence[Any]) -> None:
        if not any(self._is_device(b) for b in buffers):
            return super().read_into(file, offset, buffers)
        sizes = [b.numel() * b.element_size() if self._is_device(b) else memoryview(b).nbytes for b in buffers]
        # kvikio raises RuntimeError past the end of a file; the contract wants ShortReadError (an OSError).
        available = os.fstat(file.fd).st_size
        if offset + sum(sizes) > available:
            raise ShortReadError(f"file ended at byte {available} with {offset + sum(sizes) - available} bytes still expected")
        # kvikio opens the file again, by path: make sure the path still names the file whose
        # header was verified (the bytes themselves are verified by the device checksum).
        opened, named = os.fstat(file.fd), os.stat(file.path, follow_symlinks=False)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise OSError(errno.ESTALE, f"{file.path} was replaced after it was opened")
        try:
            with self._kvikio.CuFile(os.fspath(file.path), "r") as handle:
                futures = []
                for buffer, size in zip(buffers, sizes):
                    if size:
                        futures.append((handle.pread(buffer, size, offset), size))
                    offset += size
                for future, size in futures:
                    got = future.get()
                    if got != size:
                        raise ShortReadError(f"kvikio read {got} of {size} bytes from {file.path}")
        except RuntimeError as exc:
            raise OSError(errno.EIO, f"kvikio read from {file.path} failed: {exc}") from exc
