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
from typing import Any, Sequence

import numpy as np

from .backends import IOBackend, OpenFile, ShortReadError, open_backend
from .errors import CorruptFragmentError, FragmentFormatError, StoreWriteError
from .integrity import TOKENS_TENSOR, check_header, check_tensor, check_tokens, checksum, fragment_metadata
from .keys import Namespace
from .layout import StoreLayout, check_root
from .publish import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, publish_file
from .serdes import Header, TensorEntry, decode_header, decode_header_length, encode_header

__all__ = ["TensorSource", "Fragment", "FragmentStore", "DATA_ALIGNMENT"]

logger = logging.getLogger(__name__)

DATA_ALIGNMENT = 4096
_FIRST_READ = 16384


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
    ) -> None:
        self.namespace = namespace
        self.layout = StoreLayout(check_root(root), namespace.name)
        self.backend = backend if isinstance(backend, IOBackend) else open_backend(backend)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.durable = durable
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

    def tails(self, anchor: bytes) -> dict[str, set[str]]:
        """Stored tails that extend the prefix ``anchor``: digest hex to the shards present."""
        try:
            names = os.listdir(self.layout.tails_dir(anchor))
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
        metadata: dict[str, str] | None = None,
    ) -> bool:
        """Store a fragment at ``path`` unless one is there. True if this call published it.

        ``tokens`` are the fragment's own token ids, ``start`` the position of the first of them.

        Raises :class:`StoreWriteError` when the filesystem refuses (full, read-only, permissions, EIO).
        """
        if self.exists(path):
            return False
        self._describe_namespace()
        token_bytes = np.ascontiguousarray(tokens, dtype="<i8")
        sources = [TensorSource(TOKENS_TENSOR, "I64", (len(token_bytes),), [token_bytes]), *tensors]
        sums = [checksum(s.segments) for s in sources]
        header, entries = encode_header(
            [(s.name, s.dtype, s.shape) for s in sources],
            fragment_metadata(key, start, len(token_bytes), sums, metadata),
            alignment=DATA_ALIGNMENT,
        )
        for source, entry in zip(sources, entries):
            given = sum(memoryview(b).nbytes for b in source.segments)
            if given != entry.nbytes:
                raise ValueError(f"tensor {source.name!r}: {given} bytes given for {entry.nbytes} declared")
        buffers = [header, *(b for s in sources for b in s.segments)]
        return publish_file(
            path,
            lambda fd: self.backend.write_from(fd, 0, buffers),
            file_mode=self.file_mode,
            dir_mode=self.dir_mode,
            durable=self.durable,
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
            publish_file(target, lambda fd: os.write(fd, text), file_mode=self.file_mode, dir_mode=self.dir_mode)
        except StoreWriteError as exc:
            logger.debug("could not describe namespace %s: %s", self.namespace.name, exc)

    # ---- reading ----

    def open(self, path: Path, key: bytes) -> Fragment | None:
        """Open and verify the header of the fragment at ``path``; None if it is missing or bad."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fault(path, exc, discard=exc.errno == errno.ELOOP)
            return None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _FIRST_READ, 0)
            length = decode_header_length(head, size)
            if len(head) < 8 + length:
                head += os.pread(fd, 8 + length - len(head), len(head))
            header = decode_header(head, size)
            check_header(header, key)
            return Fragment(path, OpenFile(fd, path, size), header)
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
        memory where the backend accepts it; those are not checksummed on the host.
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
            for run in _adjacent_runs(requests):
                offset = header.data_start + run[0][0].begin
                self.backend.read_into(fragment.file, offset, [b for _, buffers in run for b in buffers])
            if tokens is not None:
                check_tokens(stored, tokens)
            for entry, buffers in requests:
                if all(_is_host(b) for b in buffers):
                    check_tensor(header, entry.name, buffers)
            return True
        except (FragmentFormatError, OSError) as exc:
            self._fault(fragment.path, exc, discard=isinstance(exc, (CorruptFragmentError, ShortReadError)))
            return False

    def _fault(self, path: Path, exc: BaseException, *, discard: bool) -> None:
        logger.warning("VUA: treating %s as a miss: %s", path, exc)
        if discard:
            try:
                os.unlink(path)
            except OSError:
                pass


def _is_host(buffer: Any) -> bool:
    return not getattr(buffer, "is_cuda", False)


def _nbytes(buffer: Any) -> int:
    if hasattr(buffer, "element_size"):
        return buffer.numel() * buffer.element_size()
    return memoryview(buffer).nbytes


def _adjacent_runs(requests: list[tuple[TensorEntry, Sequence[Any]]]) -> list[list[tuple[TensorEntry, Sequence[Any]]]]:
    """Group sorted requests into runs of tensors that follow each other in the file (one vectored read each)."""
    runs: list[list[tuple[TensorEntry, Sequence[Any]]]] = []
    for request in requests:
        if runs and runs[-1][-1][0].end == request[0].begin:
            runs[-1].append(request)
        else:
            runs.append([request])
    return runs
