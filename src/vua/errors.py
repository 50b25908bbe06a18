"""Every exception VUA raises on purpose.

Each error is also an instance of the matching builtin, so callers may catch either
``VUAError`` or the builtin they already handle (``ValueError``, ``TypeError``, ``OSError``).
"""

from __future__ import annotations

__all__ = [
    "VUAError",
    "SplitFactorError",
    "TokensError",
    "KVCacheError",
    "StoreRootError",
    "StoreWriteError",
    "FragmentFormatError",
    "CorruptFragmentError",
    "ConfigError",
]


class VUAError(Exception):
    """Base class of every error raised by VUA."""


class SplitFactorError(VUAError, ValueError):
    """A token count is not a multiple of ``split_factor`` where it must be."""


class TokensError(VUAError, ValueError):
    """Token ids of the wrong dtype, rank or length."""


class KVCacheError(VUAError, ValueError):
    """A KV cache whose layers, shapes, dtypes or batch size do not fit the tokens."""


class StoreRootError(VUAError, FileNotFoundError):
    """The storage root is missing or is not a directory."""


class StoreWriteError(VUAError, OSError):
    """A fragment could not be stored (full disk, read-only store, permissions, I/O error)."""


class FragmentFormatError(VUAError, ValueError):
    """Bytes that are not a valid safetensors buffer."""


class CorruptFragmentError(FragmentFormatError):
    """A stored fragment that fails verification: bad header, checksum, key or tokens.

    Raised inside the engine only; the store turns it into a miss and one log line.
    """


class ConfigError(VUAError, ValueError):
    """An invalid configuration value."""
