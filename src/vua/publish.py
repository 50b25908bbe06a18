"""Atomic publish: a fragment becomes visible whole or not at all.

Bytes go to a unique temporary name in the destination directory, are fsynced, then linked to
the final name. ``link`` fails if the name exists, so the first writer wins and a published file
is never replaced underneath a reader; where a filesystem has no hard links, ``rename`` is used
(the contents are identical for identical keys). The directory is fsynced so the name survives a
crash. A writer killed at any point leaves at most a temporary file, which readers never open and
``vua verify --fix`` or gc removes.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from .errors import StoreWriteError
from .layout import TEMP_MARK

__all__ = ["publish_file", "make_dirs", "DEFAULT_FILE_MODE", "DEFAULT_DIR_MODE"]

DEFAULT_FILE_MODE = 0o640
DEFAULT_DIR_MODE = 0o750
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int, root: Path | None = None) -> None:
    """Create ``directory`` and its missing parents below ``root``, each with exactly ``mode``.

    ``Path.mkdir(parents=True)`` would give the parents the umask's default mode, and ``mkdir``'s
    own mode is filtered by the umask; a store shared by a group needs the configured mode on
    every level. The common case (it exists) costs one ``mkdir`` call. ``root`` itself is never
    created: a storage mount that went away must not turn into a directory on the local disk.
    """
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        return
    except FileNotFoundError:
        if directory.parent == root:
            raise
        make_dirs(directory.parent, mode, root)
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            return
    os.chmod(directory, mode)


# Pauses before each retry of creating a temporary file: enough for a network filesystem's
# directory caches to settle (GlusterFS measured: retries within 10 ms kept failing).
_CREATE_BACKOFF_S = (0.0, 0.05, 0.2, 0.5, 1.0)


def _create_temp(tmp: Path, file_mode: int, dir_mode: int, root: Path | None) -> int:
    """Create ``tmp`` (and its directories), retried when its directory is not there after all:
    gc may remove an empty directory between our mkdir and our create (it only ever removes
    empty ones), and on a network filesystem two nodes creating the same new directory at once
    can leave the loser's client with a stale entry (ENOENT or ESTALE) for a moment."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt, pause in enumerate(_CREATE_BACKOFF_S):
        time.sleep(pause)
        try:
            make_dirs(tmp.parent, dir_mode, root)
            return os.open(tmp, flags, file_mode)
        except OSError as exc:
            retry = exc.errno in (errno.ENOENT, errno.ESTALE) and attempt < len(_CREATE_BACKOFF_S) - 1
            if not retry or (root is not None and not root.is_dir()):  # a vanished root stays vanished
                raise
    raise AssertionError("unreachable")


def publish_file(
    final: Path,
    write: Callable[[int], None],
    *,
    file_mode: int = DEFAULT_FILE_MODE,
    dir_mode: int = DEFAULT_DIR_MODE,
    durable: bool = True,
    root: Path | None = None,
) -> bool:
    """Create ``final`` with the bytes ``write(fd)`` puts in a fresh file (its directories too,
    below ``root``, which must exist).

    Returns False when another writer published ``final`` first. Raises :class:`StoreWriteError`
    (with the original ``errno``) on any filesystem fault, leaving nothing behind.
    """
    tmp = final.parent / f".{final.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = _create_temp(tmp, file_mode, dir_mode, root)
        try:
            os.fchmod(fd, file_mode)
            write(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
            created = True
        except FileExistsError:
            created = False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            os.replace(tmp, final)
            created = True
        if created and durable:
            _fsync_dir(final.parent)
        return created
    except OSError as exc:
        raise StoreWriteError(exc.errno, f"cannot store {final.name}: {exc.strerror or exc}", str(final)) from exc
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
