"""The fragment store: the one place where keys meet files and where faults become misses.

A *fragment* is one safetensors file holding the KV of one group of tokens (all layers of one
shard), the group's token ids, and the metadata :mod:`vua.integrity` checks. Callers describe
tensors as lists of host buffers (zero-copy views of their own tensors) and the store moves the
bytes with an :class:`~vua.backends.IOBackend`, publishing atomically (:mod:`vua.publish`).

Reads never raise for what storage can do to a file: a missing fragment is a miss, a corrupt,
truncated or foreign one is a miss plus one warning (and the file is removed so that the next
writer can replace it). Writes raise :class:`~vua.errors.StoreWriteError`; callers that must
not fail (the vLLM connector) catch it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .backends import IOBackend, OpenFile, ShortReadError, open_backend
from .errors import CorruptFragmentError, FragmentFormatError, StoreWriteError
from .integrity import (
    TOKENS_TENSOR,
    check_device_tensor,
    check_header,
    check_tensor,
    check_tokens,
    checksum,
    fragment_metadata,
)
from .keys import Namespace
from .layout import STORE_DIR, StoreLayout, check_root
from .publish import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, publish_file
from .serdes import Header, TensorEntry, decode_header, decode_header_length, encode_header

__all__ = ["TensorSource", "Fragment", "FragmentStore", "DATA_ALIGNMENT", "HitHook", "read_header"]

logger = logging.getLogger(__name__)

DATA_ALIGNMENT = 4096
_FIRST_READ = 16384

# Called with the open descriptor and its fstat after a fragment's header verified (a hit), so
# that eviction can record recent use without another metadata round trip; must not raise.
HitHook = Callable[[int, os.stat_result], None]


def read_header(fd: int, size: int) -> Header:
    """Read and decode the header of the open file ``fd`` of ``size`` bytes (one read when it is small)."""
    return _read_head(fd, size)[0]


def _read_head(fd: int, size: int) -> tuple[Header, bytes]:
    """The header, and the bytes read from offset 0 to get it (often more: the data that follows)."""
    head = os.pread(fd, _FIRST_READ, 0)
    length = decode_header_length(head, size)
    if len(head) < 8 + length:
        head += os.pread(fd, 8 + length - len(head), len(head))
    return decode_header(head, size), head


# Bytes per vectored read or write: small enough to still be in the CPU cache when checksummed.
_IO_BATCH_BYTES = 1 << 20
_PLACEHOLDER_SUM = "0" * 16


@dataclass(frozen=True)
class TensorSource:
    """A tensor to store: its safetensors dtype and shape, and host buffers that concatenate to its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segments: Sequence[Any]


@dataclass
class Fragment:
    """An open fragment whose header has been verified against the key it was looked up by."""

    path: Path
    file: OpenFile
    header: Header
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.file.fd)

    def __enter__(self) -> "Fragment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tensor_entries(self) -> tuple[TensorEntry, ...]:
        """Every tensor but the token ids, in file order."""
        return tuple(e for e in self.header.entries if e.name != TOKENS_TENSOR)


class FragmentStore:
    """Fragments of one namespace under one storage root.

    Args:
        root: an existing directory (a shared filesystem mount, typically). It is never created.
        namespace: the key namespace; fragments of other namespaces are invisible.
        backend: ``"auto"``, ``"posix"``, ``"gds"`` or an :class:`IOBackend`.
        file_mode / dir_mode: permissions of what the store creates (default: owner and group).
        durable: fsync each fragment and its directory before it becomes visible.
        on_hit: called after each verified open (see :data:`HitHook`), e.g.
            :class:`vua.eviction.RecencyTouch` so that gc evicts least-recently-used fragments.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        namespace: Namespace,
        *,
        backend: str | bool | IOBackend = "auto",
        file_mode: int = DEFAULT_FILE_MODE,
        dir_mode: int = DEFAULT_DIR_MODE,
        durable: bool = True,
        on_hit: HitHook | None = None,
    ) -> None:
        self.namespace = namespace
        self.layout = StoreLayout(check_root(root), namespace.name)
        self.backend = backend if isinstance(backend, IOBackend) else open_backend(backend)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.durable = durable
        self.on_hit = on_hit
        self._store_prefix = f"{self.layout.root / STORE_DIR}{os.sep}"
        self._described = False

    # ---- lookups: one metadata operation each, never an exception ----

    def exists(self, path: Path) -> bool:
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def has_shards(self, digest: bytes, shards: Sequence[str]) -> bool:
        """Whether every shard of the prefix ``digest`` is stored (one stat, or one listing for several)."""
        if len(shards) == 1:
            return self.exists(self.layout.fragment_path(digest, shards[0]))
        try:
            names = set(os.listdir(self.layout.prefix_dir(digest)))
        except OSError:
            return False
        return all(self.layout.fragment_path(digest, s).name in names for s in shards)

    def tails(self, head: bytes) -> dict[str, set[str]]:
        """Stored tails whose first block ends the prefix ``head``: digest hex to the shards present."""
        try:
            names = os.listdir(self.layout.tails_dir(head))
        except OSError:
            return {}
        found: dict[str, set[str]] = {}
        for name in names:
            parsed = self.layout.parse_tail_name(name)
            if parsed:
                found.setdefault(parsed[0], set()).add(parsed[1])
        return found

    # ---- writing ----

    def write(
        self,
        path: Path,
        key: bytes,
        tokens: np.ndarray,
        tensors: Sequence[TensorSource],
        *,
        start: int,
        device_checksums: dict[str, str] | None = None,
    ) -> bool:
        """Store a fragment at ``path`` unless one is there. True if this call published it.

        ``tokens`` are the fragment's own token ids, ``start`` the position of the first of them.
        ``device_checksums`` (tensor name to :func:`~vua.integrity.device_checksum`), computed
        by a writer whose tensors were in GPU memory, let GPUDirect readers verify them there.

        Raises :class:`StoreWriteError` when the filesystem refuses (full, read-only, permissions, EIO).
        """
        if self.exists(path):
            return False
        self._describe_namespace()
        token_bytes = np.ascontiguousarray(tokens, dtype="<i8")
        sources = [TensorSource(TOKENS_TENSOR, "I64", (len(token_bytes),), [token_bytes]), *tensors]
        specs = [(s.name, s.dtype, s.shape) for s in sources]

        def encode(sums: Sequence[str]) -> tuple[bytes, tuple[TensorEntry, ...]]:
            return encode_header(
                specs,
                fragment_metadata(key, start, len(token_bytes), sums, device_checksums, [s.name for s in sources]),
                alignment=DATA_ALIGNMENT,
            )

        # Checksums are fixed-width hex, so a header with placeholders has the final header's length
        # and the data can be written (and checksummed) before the header that records the sums.
        placeholder, entries = encode([_PLACEHOLDER_SUM] * len(sources))
        header_size = len(placeholder)
        for source, entry in zip(sources, entries):
            given = sum(memoryview(b).nbytes for b in source.segments)
            if given != entry.nbytes:
                raise ValueError(f"tensor {source.name!r}: {given} bytes given for {entry.nbytes} declared")

        def write_fragment(fd: int) -> None:
            # One pass over the caller's memory: each batch is checksummed, then written while it
            # is still in the CPU cache; the header goes last, at offset 0 of the temporary file.
            sums: list[str] = []
            for batch in _io_batches(list(zip(entries, (s.segments for s in sources)))):
                sums.extend(checksum(segments) for _, segments in batch)
                buffers = [b for _, segments in batch for b in segments]
                self.backend.write_from(fd, header_size + batch[0][0].begin, buffers)
            header = encode(sums)[0]
            if len(header) != header_size:
                raise AssertionError("fragment header changed length between encodings")
            self.backend.write_from(fd, 0, [header])

        return publish_file(
            path,
            write_fragment,
            file_mode=self.file_mode,
            dir_mode=self.dir_mode,
            durable=self.durable,
            root=self.layout.root,
        )

    def _describe_namespace(self) -> None:
        """Leave a namespace.json beside the fragments so that tools can name what is stored."""
        if self._described:
            return
        self._described = True
        target = self.layout.namespace_dir / "namespace.json"
        if self.exists(target):
            return
        text = json.dumps(json.loads(self.namespace.canonical()), indent=1).encode()
        try:
            publish_file(
                target, lambda fd: os.write(fd, text), file_mode=self.file_mode, dir_mode=self.dir_mode, root=self.layout.root
            )
        except StoreWriteError as exc:
            logger.debug("could not describe namespace %s: %s", self.namespace.name, exc)

    # ---- reading ----

    def open(self, path: Path, key: bytes, tokens: np.ndarray | None = None) -> Fragment | None:
        """Open and verify the header of the fragment at ``path``; None if it is missing or bad.

        With ``tokens``, the stored token ids must equal them too, so that no byte of a fragment
        stored for other tokens is ever read into a caller's memory. They follow the header, so
        this usually costs no I/O beyond the header's own first read.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fault(path, exc, discard=exc.errno == errno.ELOOP)
            return None
        if not self._inside_store(fd):
            os.close(fd)
            # Not discarded: unlinking through the planted directory link would act outside the root.
            self._fault(path, OSError(errno.ELOOP, "a directory on the path is a link out of the store"), discard=False)
            return None
        try:
            info = os.fstat(fd)
            header, head = _read_head(fd, info.st_size)
            check_header(header, key)
            if tokens is not None:
                check_tokens(_stored_tokens(fd, header, head), tokens)
            if self.on_hit is not None:
                self.on_hit(fd, info)
            return Fragment(path, OpenFile(fd, path, info.st_size), header)
        except (FragmentFormatError, OSError) as exc:
            os.close(fd)
            self._fault(path, exc, discard=isinstance(exc, FragmentFormatError))
            return None

    def read(
        self,
        fragment: Fragment,
        wanted: Sequence[tuple[str, Sequence[Any]]],
        tokens: np.ndarray | None,
    ) -> bool:
        """Read the tensors ``wanted`` (name, destination buffers) and verify them; False on any fault.

        ``tokens``, when given, must equal the stored token ids. Destination buffers may be device
        memory where the backend accepts it: those are verified there, with the fragment's device
        checksums (a fragment without them cannot be read into device memory).
        """
        header = fragment.header
        try:
            requests: list[tuple[TensorEntry, Sequence[Any]]] = []
            if tokens is not None:
                stored = np.empty(header.entry(TOKENS_TENSOR).shape, dtype="<i8")
                requests.append((header.entry(TOKENS_TENSOR), [stored]))
            for name, buffers in wanted:
                entry = header.entry(name)
                given = sum(_nbytes(b) for b in buffers)
                if given != entry.nbytes:
                    raise FragmentFormatError(f"tensor {name!r} holds {entry.nbytes} bytes, {given} expected")
                requests.append((entry, buffers))
            requests.sort(key=lambda r: r[0].begin)
            # Verify each batch right after reading it, while its bytes are still in the CPU cache:
            # hashing from cache is several times cheaper than a second pass over memory, and a
            # token mismatch (the stored ids come first) stops the read before the KV is moved.
            for batch in _io_batches(requests):
                offset = header.data_start + batch[0][0].begin
                self.backend.read_into(fragment.file, offset, [b for _, buffers in batch for b in buffers])
                for entry, buffers in batch:
                    if tokens is not None and entry.name == TOKENS_TENSOR:
                        check_tokens(stored, tokens)
                    if all(_is_host(b) for b in buffers):
                        check_tensor(header, entry.name, buffers)
                    else:
                        check_device_tensor(header, entry.name, buffers)
            return True
        except (FragmentFormatError, OSError) as exc:
            self._fault(fragment.path, exc, discard=isinstance(exc, (CorruptFragmentError, ShortReadError)))
            return False

    def _inside_store(self, fd: int) -> bool:
        """Whether the open file really lies under the store directory (O_NOFOLLOW guards only the
        last path component; a planted directory link could lead anywhere). One readlink of procfs,
        no filesystem round trip; where procfs is missing the check is skipped."""
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True
        return real.startswith(self._store_prefix)

    def _fault(self, path: Path, exc: BaseException, *, discard: bool) -> None:
        logger.warning("VUA: treating %s as a miss: %s", path, exc)
        if discard:
            try:
                os.unlink(path)
            except OSError:
                pass


def _stored_tokens(fd: int, header: Header, head: bytes) -> np.ndarray:
    entry = header.entry(TOKENS_TENSOR)
    begin, end = header.data_start + entry.begin, header.data_start + entry.end
    raw = head[begin:end] if end <= len(head) else os.pread(fd, end - begin, begin)
    if len(raw) != end - begin:
        raise ShortReadError(f"token ids: {len(raw)} of {end - begin} bytes")
    stored = np.frombuffer(raw, dtype="<i8")
    check_tensor(header, TOKENS_TENSOR, [raw])
    return stored


def _is_host(buffer: Any) -> bool:
    return not getattr(buffer, "is_cuda", False)


def _nbytes(buffer: Any) -> int:
    if hasattr(buffer, "element_size"):
        return buffer.numel() * buffer.element_size()
    return memoryview(buffer).nbytes


def _io_batches(requests: list[tuple[TensorEntry, Sequence[Any]]]) -> list[list[tuple[TensorEntry, Sequence[Any]]]]:
    """Group sorted requests into batches of adjacent tensors, one vectored read or write each.

    A batch grows while the tensors follow each other in the file and stay under
    ``_IO_BATCH_BYTES`` (a tensor larger than that is a batch of its own).
    """
    batches: list[list[tuple[TensorEntry, Sequence[Any]]]] = []
    size = 0
    for request in requests:
        entry = request[0]
        if batches and batches[-1][-1][0].end == entry.begin and size + entry.nbytes <= _IO_BATCH_BYTES:
            batches[-1].append(request)
            size += entry.nbytes
        else:
            batches.append([request])
            size = entry.nbytes
    return batches
