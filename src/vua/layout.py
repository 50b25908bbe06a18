"""Where things live under a storage root.

::

    <root>/vua-v1/<namespace>/namespace.json
    <root>/vua-v1/<namespace>/<d0d1>/<d2d3>/<digest>/<shard>.safetensors
    <root>/vua-v1/<namespace>/tails/<h0h1>/<h2h3>/<head>/<digest>.<shard>.safetensors

A *full* fragment is found by the digest of the whole prefix it ends; a *tail* (a shorter,
block-aligned last piece of a prompt) is found by listing the directory of its *head*: the
digest of the prefix through the tail's first block. One directory read finds every stored tail
that could continue a prompt, and that directory holds only tails sharing the prompt up to and
including that block, not every tail after the same chunk (which, for prompts shorter than a
chunk, would be every short prompt of the namespace). Writers keep each head directory under
:data:`MAX_TAILS_PER_HEAD` tails. Two levels of 256-way fan-out keep the other directories small
(about 150 entries each at 10 million fragments) and paths short whatever the prompt length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreRootError

__all__ = ["MAX_TAILS_PER_HEAD", "STORE_DIR", "FRAGMENT_SUFFIX", "TEMP_MARK", "StoreLayout", "check_root", "is_temp_name", "prefix_relpath"]

STORE_DIR = "vua-v1"
FRAGMENT_SUFFIX = ".safetensors"
TEMP_MARK = ".tmp-"
TAILS_DIR = "tails"
# Tails one head directory may hold: a listing on the lookup path stays one small read however
# many prompts share a first block (a short system prompt, say); past it new tails are not stored.
MAX_TAILS_PER_HEAD = 64


def check_root(root: str | os.PathLike[str]) -> Path:
    """The root as an absolute path; raises :class:`StoreRootError` unless it is an existing directory.

    The root is never created: a network mount that is not there must not silently turn into a
    directory on the local disk.
    """
    path = Path(root)
    if not path.exists():
        raise StoreRootError(
            f"storage root {str(path)!r} does not exist; create it (or mount the shared filesystem) first"
        )
    if not path.is_dir():
        raise StoreRootError(f"storage root {str(path)!r} is not a directory")
    return path.resolve()


def prefix_relpath(namespace: str, digest: bytes) -> str:
    """The directory of the prefix named by ``digest``, relative to the root."""
    h = digest.hex()
    return f"{STORE_DIR}/{namespace}/{h[0:2]}/{h[2:4]}/{h}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


@dataclass(frozen=True)
class StoreLayout:
    root: Path
    namespace: str

    @property
    def namespace_dir(self) -> Path:
        return self.root / STORE_DIR / self.namespace

    def prefix_dir(self, digest: bytes) -> Path:
        """The directory of the prefix named by ``digest``."""
        return self.root / prefix_relpath(self.namespace, digest)

    def fragment_path(self, digest: bytes, shard: str) -> Path:
        return self.prefix_dir(digest) / f"{shard}{FRAGMENT_SUFFIX}"

    def tails_dir(self, head: bytes) -> Path:
        """The directory of the tails whose first block ends the prefix named by ``head``."""
        h = head.hex()
        return self.namespace_dir / TAILS_DIR / h[0:2] / h[2:4] / h

    def tail_path(self, head: bytes, digest: bytes, shard: str) -> Path:
        return self.tails_dir(head) / f"{digest.hex()}.{shard}{FRAGMENT_SUFFIX}"

    @staticmethod
    def parse_tail_name(name: str) -> tuple[str, str] | None:
        """``(digest_hex, shard)`` of a tail file name, or None for anything else."""
        if is_temp_name(name) or not name.endswith(FRAGMENT_SUFFIX):
            return None
        digest_hex, _, shard = name[: -len(FRAGMENT_SUFFIX)].partition(".")
        if len(digest_hex) != 32 or not shard:
            return None
        return digest_hex, shard
