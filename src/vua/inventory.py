"""What is stored under a root: a walk that classifies every file, and a full check of one fragment.

Used by ``vua ls/stats/verify/gc`` (:mod:`vua.cli`) and by eviction (:mod:`vua.eviction`). The
walk never follows a symbolic link: a link planted in the store is reported as a stray and never
descended into, so no tool acting on the walk can read, count or delete anything outside the root.
Reads open files with ``O_NOATIME`` where allowed, so inspecting the store does not make every
fragment look recently used to gc.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .backends import ShortReadError
from .errors import FragmentFormatError
from .integrity import TOKENS_TENSOR, check_header, check_tensor, stored_start
from .layout import FRAGMENT_SUFFIX, STORE_DIR, TAILS_DIR, StoreLayout, check_root, is_temp_name
from .store import read_header

__all__ = ["FULL", "TAIL", "TEMP", "STRAY", "StoredFile", "NamespaceInfo", "walk", "namespaces", "check_fragment", "fragment_start", "GC_LEASE_NAME"]

FULL = "full"
TAIL = "tail"
TEMP = "temp"
STRAY = "stray"
NAMESPACE_FILE = "namespace.json"
GC_LEASE_NAME = ".gc-lease"
_HEX = frozenset("0123456789abcdef")
# Checksums are computed over pieces of this size, so checking never holds a whole tensor.
_CHUNK = 1 << 24


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file (or stray link) found under a namespace.

    ``kind`` is :data:`FULL` (found by its prefix digest), :data:`TAIL`, :data:`TEMP` (a writer's
    unpublished file) or :data:`STRAY` (anything else, symbolic links included). ``key`` is the
    digest hex the fragment must have been stored under ("" for other kinds).
    """

    location: str  # the path as a string: a walk of millions of files builds no Path objects
    namespace: str
    kind: str
    key: str
    size: int
    mtime: float
    atime: float

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def last_used(self) -> float:
        """When the fragment was last written or (as far as the filesystem recorded) read."""
        return max(self.mtime, self.atime)


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    path: Path
    description: dict[str, Any] | None  # namespace.json, None when missing or unreadable


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and set(name) <= _HEX


def _subdirs(path: str | Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            yield from entries
    except (FileNotFoundError, NotADirectoryError):
        return  # removed by a concurrent gc


def namespaces(root: str | os.PathLike[str]) -> list[NamespaceInfo]:
    """Every namespace directory under ``root`` with its namespace.json."""
    found = []
    for entry in _subdirs(check_root(root) / STORE_DIR):
        if not entry.is_dir(follow_symlinks=False):
            continue
        description = None
        try:
            with open(os.path.join(entry.path, NAMESPACE_FILE), "rb") as handle:
                description = json.loads(handle.read(1 << 16))
        except (OSError, ValueError):
            pass
        found.append(NamespaceInfo(entry.name, Path(entry.path), description))
    return sorted(found, key=lambda n: n.name)


def _stored(entry: os.DirEntry[str], namespace: str, kind: str, key: str = "") -> StoredFile | None:
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    if kind != STRAY and not stat.S_ISREG(info.st_mode):
        kind, key = STRAY, ""
    return StoredFile(entry.path, namespace, kind, key, info.st_size, info.st_mtime, info.st_atime)


def walk(root: str | os.PathLike[str]) -> Iterator[StoredFile]:
    """Every fragment, temporary file and stray under ``root``, never following links."""
    for space in namespaces(root):
        for entry in _subdirs(space.path):
            if entry.is_dir(follow_symlinks=False) and entry.name == TAILS_DIR:
                yield from _walk_fans(entry.path, space.name, TAIL)
            elif entry.is_dir(follow_symlinks=False) and _is_hex(entry.name, 2):
                yield from _walk_fans(entry.path, space.name, FULL, first=entry)
            elif entry.name != NAMESPACE_FILE:
                found = _stored(entry, space.name, TEMP if is_temp_name(entry.name) else STRAY)
                if found:
                    yield found


def _walk_fans(top: str, namespace: str, kind: str, first: os.DirEntry[str] | None = None) -> Iterator[StoredFile]:
    """Walk ``<aa>/<bb>/<digest>/`` levels (below ``top`` for tails; ``first`` is ``<aa>`` itself for full ones)."""
    levels = [first] if first is not None else list(_subdirs(top))
    for level1 in levels:
        if not (level1.is_dir(follow_symlinks=False) and _is_hex(level1.name, 2)):
            yield from _strays([level1], namespace)
            continue
        for level2 in _subdirs(level1.path):
            if not (level2.is_dir(follow_symlinks=False) and _is_hex(level2.name, 2)):
                yield from _strays([level2], namespace)
                continue
            for leaf in _subdirs(level2.path):
                if not (leaf.is_dir(follow_symlinks=False) and _is_hex(leaf.name, 32)):
                    yield from _strays([leaf], namespace)
                    continue
                for entry in _subdirs(leaf.path):
                    found = _classify(entry, namespace, kind, leaf.name)
                    if found:
                        yield found


def _strays(entries: list[os.DirEntry[str]], namespace: str) -> Iterator[StoredFile]:
    for entry in entries:
        found = _stored(entry, namespace, STRAY)
        if found:
            yield found


def _classify(entry: os.DirEntry[str], namespace: str, kind: str, leaf: str) -> StoredFile | None:
    name = entry.name
    if is_temp_name(name):
        return _stored(entry, namespace, TEMP)
    if kind == FULL and name.endswith(FRAGMENT_SUFFIX) and len(name) > len(FRAGMENT_SUFFIX):
        return _stored(entry, namespace, FULL, leaf)
    if kind == TAIL:
        parsed = StoreLayout.parse_tail_name(name)
        if parsed and _is_hex(parsed[0], 32):
            return _stored(entry, namespace, TAIL, parsed[0])
    return _stored(entry, namespace, STRAY)


def open_quietly(path: str | Path) -> int:
    """Open a stored file for reading without following a link or (where permitted) updating its atime."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        # O_NOATIME needs ownership of the file (or CAP_FOWNER); fall back to a plain read.
        return os.open(path, flags)


def fragment_start(path: str | Path) -> int | None:
    """The fragment's ``vua_start`` (position of its first token), or None if it cannot be read."""
    try:
        fd = open_quietly(path)
    except OSError:
        return None
    try:
        return stored_start(read_header(fd, os.fstat(fd).st_size))
    except (OSError, FragmentFormatError):
        return None
    finally:
        os.close(fd)


def _chunks(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """The bytes ``[offset, offset + length)`` in pieces, so a checksum never holds a whole tensor."""
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            raise ShortReadError(f"file ends at byte {offset}, {end - offset} bytes short")
        offset += len(chunk)
        yield chunk


def check_fragment(fragment: StoredFile) -> str | None:
    """Everything that can be checked without the rest of the chain; the problem found, or None.

    Checks the header (format, tensor layout), that the fragment claims the key its name says,
    the token count, a readable ``vua_start``, and every tensor's checksum. A fragment that
    vanished meanwhile (a concurrent gc) is not a problem.
    """
    try:
        fd = open_quietly(fragment.location)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "cannot open: symbolic link" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror}"
    try:
        header = read_header(fd, os.fstat(fd).st_size)
        check_header(header, bytes.fromhex(fragment.key))
        if stored_start(header) is None:
            return f"bad vua_start {header.metadata.get('vua_start')!r}"
        if header.entries[0].name != TOKENS_TENSOR:
            return "token ids are not the first tensor"
        for entry in header.entries:
            check_tensor(header, entry.name, _chunks(fd, header.data_start + entry.begin, entry.nbytes))
        return None
    except FragmentFormatError as exc:
        return str(exc)
    except OSError as exc:
        return f"read error: {exc.strerror or exc}"
    finally:
        os.close(fd)
