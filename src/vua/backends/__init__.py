"""I/O backends: POSIX (always) and GPUDirect Storage through kvikio (when a GPU and kvikio are present)."""

from __future__ import annotations

import logging
from typing import Literal

from ..errors import ConfigError
from .base import IOBackend, OpenFile, ShortReadError
from .posix import PosixBackend

__all__ = ["IOBackend", "OpenFile", "ShortReadError", "PosixBackend", "open_backend"]

logger = logging.getLogger(__name__)
_reported: set[str] = set()


def open_backend(kind: Literal["auto", "posix", "gds"] | bool | str = "auto") -> IOBackend:
    """The backend for ``kind``: ``"posix"``, ``"gds"`` (error if unusable) or ``"auto"``.

    ``auto`` uses GDS where a CUDA device and kvikio are present and POSIX otherwise, logging the
    reason once. ``True``/``False`` mean ``"gds"``/``"posix"``.
    """
    if kind is True:
        kind = "gds"
    elif kind is False:
        kind = "posix"
    kind = str(kind).lower()
    if kind not in ("auto", "posix", "gds", "true", "false"):
        raise ConfigError(f"unknown I/O backend {kind!r}; use 'auto', 'posix' or 'gds'")
    kind = {"true": "gds", "false": "posix"}.get(kind, kind)
    if kind == "posix":
        return PosixBackend()
    from .gds import GdsBackend, gds_unavailable_reason

    reason = gds_unavailable_reason()
    if reason is None:
        return GdsBackend()
    if kind == "gds":
        raise ConfigError(f"GPUDirect Storage was requested but cannot be used: {reason}")
    if reason not in _reported:
        _reported.add(reason)
        logger.info("VUA uses POSIX I/O: %s", reason)
    return PosixBackend()
