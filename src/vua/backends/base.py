"""The I/O backend contract: move bytes between an open file and caller-owned buffers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["OpenFile", "IOBackend", "ShortReadError"]


@dataclass(frozen=True)
class OpenFile:
    """A file opened by the store: the descriptor for POSIX calls, the path for libraries that open their own."""

    fd: int
    path: os.PathLike[str] | str
    size: int


class ShortReadError(OSError):
    """The file ended before the requested bytes (it was truncated underneath us)."""


@runtime_checkable
class IOBackend(Protocol):
    """Scatter/gather file I/O.

    ``buffers`` are filled (or written) back to back starting at ``offset``. A backend either
    moves every byte or raises ``OSError``; it never returns partial data silently.
    """

    name: str

    def accepts(self, buffer: Any) -> bool:
        """Whether ``buffer`` (host memory, or device memory for GPU backends) can be a read target."""
        ...

    def read_into(self, file: OpenFile, offset: int, buffers: Sequence[Any]) -> None: ...

    def write_from(self, fd: int, offset: int, buffers: Sequence[Any]) -> None: ...
