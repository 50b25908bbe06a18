"""Which kind of filesystem holds a store: local disks answer or fail, network filesystems can hang.

A read from a network filesystem (NFS, Lustre, GlusterFS and other FUSE filesystems, SMB, Ceph)
can block for as long as its server is gone. Callers that must not block that long (the vLLM
connector's worker) give such reads a deadline, and never let a read they gave up on write
into memory someone else may own by then.
"""

from __future__ import annotations

import os

__all__ = ["mount_type", "may_hang"]

# Filesystems whose I/O is served by this machine's own kernel and block devices.
_LOCAL = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs", "bcachefs", "jfs"})


def mount_type(path: str | os.PathLike[str]) -> str:
    """The filesystem type (``/proc/self/mountinfo``'s name, e.g. ``ext4`` or ``fuse.glusterfs``) of
    the mount holding ``path``; ``""`` where that cannot be read."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo") as info:
            for line in info:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, right.split()[0]
    except OSError:
        return ""
    return kind


def may_hang(path: str | os.PathLike[str]) -> bool:
    """Whether I/O under ``path`` may block indefinitely (anything but a known local filesystem)."""
    return mount_type(path) not in _LOCAL
