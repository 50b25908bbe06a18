"""POSIX scatter/gather I/O with ``preadv``/``pwritev``: bytes go straight into the caller's buffers."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .base import OpenFile, ShortReadError

__all__ = ["PosixBackend"]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _byte_views(buffers: Sequence[Any]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in buffers]


def _transfer(call: Callable[[int, list[memoryview], int], int], fd: int, offset: int, buffers: Sequence[Any]) -> None:
    """Loop ``call`` (os.preadv or os.pwritev) until every buffer is done, at most IOV_MAX at a time."""
    pending = [v for v in _byte_views(buffers) if v.nbytes]
    while pending:
        batch = pending[:_IOV_MAX]
        done = call(fd, batch, offset)
        if done == 0:
            raise ShortReadError(f"file ended at byte {offset} with {sum(v.nbytes for v in pending)} bytes still expected")
        offset += done
        # Drop the buffers fully done and trim the one a short transfer stopped inside.
        while done and pending:
            head = pending[0]
            if done >= head.nbytes:
                done -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[done:]
                done = 0


class PosixBackend:
    name = "posix"

    def accepts(self, buffer: Any) -> bool:
        try:
            memoryview(buffer)
        except TypeError:
            return False
        return True

    def read_into(self, file: OpenFile, offset: int, buffers: Sequence[Any]) -> None:
        _transfer(os.preadv, file.fd, offset, buffers)

    def write_from(self, fd: int, offset: int, buffers: Sequence[Any]) -> None:
        _transfer(os.pwritev, fd, offset, buffers)
