"""The connector's settings: ``kv_connector_extra_config`` parsed once into a frozen, validated dataclass.

Every key, its default and why:

``shared_storage_path`` (required)
    The storage root, an existing directory (a shared filesystem mount, typically). It is never
    created: a mount that is missing must fail start-up rather than fill the local disk.
``chunk_size`` (default: ``--max-num-batched-tokens`` rounded down to the KV block size)
    Tokens per stored fragment, a multiple of the KV block size. A chunk is saved as soon as all
    its tokens are computed, so one prefill step fills whole chunks; bigger chunks mean fewer
    files and larger I/Os, smaller chunks mean finer reuse between prompts that diverge.
``use_gds`` (default ``"auto"``)
    GPUDirect Storage reads through kvikio: ``auto`` uses it on CUDA when kvikio imports,
    ``true`` requires it, ``false`` always uses POSIX reads.
``io_threads`` (default 4)
    Threads reading fragments (per layer) and writing saved chunks in the background.
``max_staging_bytes`` (default ``"2G"``)
    Host memory held by saves waiting for the disk. When a save would go over it, it is skipped
    (and counted) rather than stalling the forward pass.
``max_store_size`` (default: unlimited)
    The size the store may grow to. When set, the scheduler process of each engine runs the
    ``vua gc`` policy in a background thread (a pass a minute, least recently used first, down
    to 90% of the budget; a lease on the root lets one node scan at a time).
``layerwise_load`` (default true)
    Each attention layer waits only for its own layer's reads, so loading overlaps the forward
    pass. vLLM then runs attention outside CUDA graphs (piecewise graphs), since the wait must
    run. False loads everything before the forward pass and leaves full CUDA graphs alone.
``async_load_min_tokens`` (default: 0 on a filesystem that can hang, else the tokens whose KV is
:data:`ASYNC_LOAD_MIN_BYTES` per worker)
    Claims of at least this many tokens load asynchronously (vLLM's ``load_kv_async``): the
    request waits while its fragments are read in the background, and every other request keeps
    running its steps, so decoding requests never wait on a long load or on a slow mount. Shorter
    claims load in the step that computes the rest of the prompt, layer by layer (above), which
    answers sooner: an asynchronous load costs its request up to two engine steps of waiting on
    top of the reads, where a short load in the step costs the running requests a few ms.
    0 makes every load asynchronous; a number above the longest prompt, none. Measured in
    doc/benchmarks.md ("Asynchronous loads").
``min_recompute_tokens`` (default 1)
    Prompt tokens always computed rather than loaded, at least 1 (vLLM needs the last one's
    logits). A claim may then end inside its last block, as vLLM's own offloading tier does: that
    block is loaded whole before the forward pass, and vLLM overwrites the slots it computes. For
    a prompt that ends on a block boundary this computes one token instead of a whole block.
    Outputs then differ from a recompute only as much as a different step shape makes them
    (measured in doc/kv-connector-v1.md).
``claim_whole_blocks`` (default false)
    True ends every claim on a KV-block boundary, so the tokens vLLM still computes start on a
    block boundary exactly as in a full prefill and outputs are bit-identical to a recompute, at
    the cost of computing up to one block more.
``save_decode`` (default true)
    Also store the KV of generated tokens, so that the next chat turn (prompt + answer + new
    message) reuses the answer as well as the prompt. Only whole blocks whose every token's KV
    is in the cache are stored: full chunks as decoding fills them, and when the request ends,
    the full blocks past its last full chunk as a tail (the request's blocks are held for one
    more step for that copy). False stores prompts only.
``lookup_budget_ms`` (default 20)
    How long a lookup may hold vLLM's scheduler. A lookup still running after this answers
    "ask again later" (vLLM keeps the request waiting and asks at its next step) and finishes in
    a background thread, so a slow metadata server delays that request, not every request.
``storage_timeout_s`` (default 10)
    On a filesystem that can hang (anything but a local disk: NFS, Lustre, GlusterFS and other
    FUSE mounts...), the longest a lookup or a step's loads may wait for storage. A lookup that
    takes longer answers "nothing stored", and lookups then skip the store for a while
    (``storage_timeout_s`` again, then one lookup tries it); loads that take longer fail and are
    recomputed, and what they read later is dropped: on such filesystems loads go through
    staging memory, so a late read never lands in the KV cache. Saves are written in the
    background; while storage hangs they wait there and new ones are skipped once
    ``max_staging_bytes`` are held.
``durable`` (default true)
    fsync each fragment and its directory before it becomes visible (a crash never leaves a
    claimed fragment half written). False trades that for write speed on scratch storage.

At run time ``touch <root>/disable-get`` turns loads off and ``touch <root>/disable-put`` turns
saves off, for every engine using that root; removing the file turns them back on. Each process
checks at most about once a second.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from ..errors import ConfigError, StoreRootError
from ..layout import check_root
from ..mounts import may_hang
from ..sizes import parse_byte_count

__all__ = ["ASYNC_LOAD_MIN_BYTES", "ConnectorSettings", "RuntimeSwitches", "parse_byte_size", "parse_bool", "DISABLE_GET", "DISABLE_PUT"]

# On a local disk, loads of more KV than this (per worker) are asynchronous: read in the step, they
# would stall every running request by more than a decode step or two (doc/benchmarks.md,
# "Asynchronous loads").
ASYNC_LOAD_MIN_BYTES = 64 << 20

DISABLE_GET = "disable-get"
DISABLE_PUT = "disable-put"

_KNOWN_KEYS = {
    "shared_storage_path",
    "chunk_size",
    "use_gds",
    "io_threads",
    "max_staging_bytes",
    "max_store_size",
    "durable",
    "layerwise_load",
    "min_recompute_tokens",
    "claim_whole_blocks",
    "save_decode",
    "lookup_budget_ms",
    "storage_timeout_s",
    "async_load_min_tokens",
}


def parse_byte_size(value: Any, key: str) -> int:
    """A positive byte count from an int or a string such as ``"200G"``, ``"1.5TiB"`` or ``"4096"``
    (:func:`vua.sizes.parse_byte_count`)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key} must be a byte size such as '200G' or an int, got {value!r}")
    try:
        size = value if isinstance(value, int) else parse_byte_count(value)
    except ValueError:
        raise ConfigError(f"{key} must be a byte size such as '200G' or an int, got {value!r}") from None
    if size <= 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")
    return size


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _parse_positive_seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
    return seconds


def _parse_count(value: Any, key: str, least: int = 0) -> int:
    kind = "a positive integer" if least == 1 else f"an integer of at least {least}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be {kind}, got {value!r}") from None
    if number < least:
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    return number


def _parse_positive_int(value: Any, key: str) -> int:
    return _parse_count(value, key, least=1)


@dataclass(frozen=True)
class ConnectorSettings:
    root: Path
    block_size: int
    chunk_size: int
    use_gds: Literal["auto", "true", "false"] = "auto"
    io_threads: int = 4
    max_staging_bytes: int = 2 << 30
    max_store_size: int | None = None
    durable: bool = True
    layerwise_load: bool = True
    min_recompute_tokens: int = 1
    claim_whole_blocks: bool = False
    save_decode: bool = True
    lookup_budget_ms: int = 20
    storage_timeout_s: float = 10.0
    async_load_min_tokens: int = 0

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    @property
    def backend(self) -> str:
        """The :func:`vua.backends.open_backend` kind for ``use_gds``."""
        return {"auto": "auto", "true": "gds", "false": "posix"}[self.use_gds]

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, *, block_size: int, max_num_batched_tokens: int, kv_bytes_per_token: int
    ) -> "ConnectorSettings":
        """Validate ``kv_connector_extra_config``; raises :class:`ConfigError` or :class:`StoreRootError` naming the key.

        ``kv_bytes_per_token`` is the KV of one token on one worker (all its layers)."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - _KNOWN_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown VUA kv_connector_extra_config key(s) {unknown}; known keys: {sorted(_KNOWN_KEYS)}"
            )
        if "shared_storage_path" not in extra or not extra["shared_storage_path"]:
            raise ConfigError(
                "VUA needs kv_connector_extra_config.shared_storage_path: an existing directory for the KV store"
            )
        try:
            root = check_root(os.path.expanduser(str(extra["shared_storage_path"])))
        except StoreRootError as exc:
            raise StoreRootError(f"VUA shared_storage_path: {exc}") from None
        if block_size <= 0:
            raise ConfigError(f"the KV block size must be positive, got {block_size}")
        if "chunk_size" in extra:
            chunk = _parse_positive_int(extra["chunk_size"], "chunk_size")
            if chunk % block_size:
                raise ConfigError(
                    f"chunk_size={chunk} must be a multiple of the KV block size {block_size} "
                    f"(for example {max(block_size, chunk // block_size * block_size)})"
                )
        else:
            chunk = max(block_size, max_num_batched_tokens // block_size * block_size)
        use_gds = str(extra.get("use_gds", "auto")).lower()
        if use_gds not in ("auto", "true", "false"):
            raise ConfigError(f"use_gds must be 'auto', true or false, got {extra['use_gds']!r}")
        max_store = extra.get("max_store_size")
        if "async_load_min_tokens" in extra:
            async_min = _parse_count(extra["async_load_min_tokens"], "async_load_min_tokens")
        else:
            async_min = 0 if may_hang(root) else -(-ASYNC_LOAD_MIN_BYTES // max(1, kv_bytes_per_token))
        return cls(
            root=root,
            block_size=block_size,
            chunk_size=chunk,
            use_gds=use_gds,  # type: ignore[arg-type]
            io_threads=_parse_positive_int(extra.get("io_threads", 4), "io_threads"),
            max_staging_bytes=parse_byte_size(extra.get("max_staging_bytes", "2G"), "max_staging_bytes"),
            max_store_size=None if max_store is None else parse_byte_size(max_store, "max_store_size"),
            durable=parse_bool(extra.get("durable", True), "durable"),
            layerwise_load=parse_bool(extra.get("layerwise_load", True), "layerwise_load"),
            claim_whole_blocks=parse_bool(extra.get("claim_whole_blocks", False), "claim_whole_blocks"),
            min_recompute_tokens=_parse_positive_int(extra.get("min_recompute_tokens", 1), "min_recompute_tokens"),
            save_decode=parse_bool(extra.get("save_decode", True), "save_decode"),
            lookup_budget_ms=_parse_positive_int(extra.get("lookup_budget_ms", 20), "lookup_budget_ms"),
            storage_timeout_s=_parse_positive_seconds(extra.get("storage_timeout_s", 10), "storage_timeout_s"),
            async_load_min_tokens=async_min,
        )


class RuntimeSwitches:
    """``<root>/disable-get`` and ``<root>/disable-put``, looked at once at start-up and then about
    once per ``interval`` seconds by a background thread: the scheduler reads the last answer and
    never waits on storage for it (a hung mount must not stall every step)."""

    def __init__(self, root: Path, interval: float = 1.0) -> None:
        self._paths = (root / DISABLE_GET, root / DISABLE_PUT)
        self._interval = interval
        self._disabled = self._look()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vua-switches", daemon=True)
        self._thread.start()

    def _look(self) -> tuple[bool, bool]:
        return (os.path.exists(self._paths[0]), os.path.exists(self._paths[1]))

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self._disabled = self._look()

    @property
    def get_enabled(self) -> bool:
        return not self._disabled[0]

    @property
    def put_enabled(self) -> bool:
        return not self._disabled[1]

    def stop(self) -> None:
        self._stop.set()
