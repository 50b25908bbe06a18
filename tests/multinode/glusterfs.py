"""A real GlusterFS volume on this machine, mounted once per "node", for the multi-node tests.

Everything runs on loopback: one ``glusterd``, one brick per volume under /var/tmp, and
``mount -t glusterfs 127.0.0.1:/VOL`` once per node (each mount is its own FUSE client process
with its own caches, as on separate machines). Used by ``conftest.py``; also usable by hand::

    python tests/multinode/glusterfs.py up 3      # a volume mounted 3 times; prints the mounts
    python tests/multinode/glusterfs.py down      # remove every volume and mount these tests made

Names carry the owning process id (``vuatest-<pid>-<tag>``), so a run never touches another
live run's volumes and the leftovers of a killed run (its pid gone) are swept before the next.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "vuatest"
BASE = Path("/var/tmp")  # bricks and mount points: /var/tmp/vua-gluster-<pid>/
GLUSTERD_PIDFILE = Path("/run/vua-test-glusterd.pid")
PACKAGES = ("glusterfs-server", "glusterfs-client")
# Client caches that would answer reads and lookups without asking the server (used where a test
# needs every operation to reach the brick: injected latency and injected read errors).
NO_CLIENT_CACHE = {
    "performance.io-cache": "off",
    "performance.quick-read": "off",
    "performance.read-ahead": "off",
    "performance.stat-prefetch": "off",
    "performance.open-behind": "off",
    "performance.write-behind": "off",
}


class Unavailable(Exception):
    """GlusterFS cannot run on this machine at all (the reason says why); the tests skip with it."""


def _run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {done.returncode}): {done.stdout}{done.stderr}")
    return done


def gluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("gluster", "--mode=script", *args, check=check)


# ---- installation and the management daemon ----


def ensure_installed() -> None:
    """Install GlusterFS from the distribution's packages where missing (CI starts from a bare machine)."""
    if os.geteuid() != 0:
        raise Unavailable("GlusterFS mounts need root")
    if not os.path.exists("/dev/fuse"):
        raise Unavailable("no /dev/fuse: FUSE mounts are impossible here")
    if all(shutil.which(tool) for tool in ("gluster", "glusterd", "mount.glusterfs")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("GlusterFS is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
    # apt-get update exits 0 even when every mirror is unreachable; the warnings say so.
    unreachable = re.search(r"Could not resolve|Temporary failure|Failed to fetch|Unable to connect|Network is unreachable",
                            update.stdout + update.stderr)
    install = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                             capture_output=True, text=True, env=env, timeout=900)
    if install.returncode != 0:
        log = (update.stdout + update.stderr)[-1500:] + (install.stdout + install.stderr)[-1500:]
        if unreachable or update.returncode != 0:
            raise Unavailable(f"apt cannot reach its mirrors to install {' '.join(PACKAGES)}: {log}")
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{log}")
    if not shutil.which("gluster"):
        raise RuntimeError(f"{' '.join(PACKAGES)} installed but no gluster command on PATH")


def glusterd_running() -> bool:
    return gluster("pool", "list", check=False).returncode == 0


def ensure_glusterd() -> int | None:
    """Start glusterd unless one answers already (no systemd in CI containers: run the daemon
    directly). Returns the pid of the daemon started here, None if one was running."""
    if glusterd_running():
        return None
    GLUSTERD_PIDFILE.unlink(missing_ok=True)
    _run("glusterd", "-p", str(GLUSTERD_PIDFILE))  # daemonizes; returns once it forked
    deadline = time.monotonic() + 60
    while not glusterd_running():
        if time.monotonic() > deadline:
            raise RuntimeError("glusterd did not answer within 60 s; see /var/log/glusterfs/glusterd.log")
        time.sleep(0.2)
    return int(GLUSTERD_PIDFILE.read_text().strip())


def stop_glusterd(pid: int) -> None:
    """Stop the daemon this run started (by its pid), once no volume of any run is left on it."""
    if gluster("volume", "list", check=False).stdout.strip() not in ("", "No volumes present in cluster"):
        return  # someone else's volumes still need it
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.1)


# ---- volumes ----


@dataclass
class Volume:
    name: str
    brick: Path
    mounts: list[Path] = field(default_factory=list)

    def set(self, option: str, value: str) -> None:
        gluster("volume", "set", self.name, option, value)

    def root(self, name: str) -> list[Path]:
        """A fresh store root ``name`` on the volume, as each mount (node) sees it."""
        (self.mounts[0] / name).mkdir()
        return [mount / name for mount in self.mounts]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _glusterfs_mounts() -> list[tuple[str, Path]]:
    """(source, mount point) of every GlusterFS FUSE mount on the machine."""
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            source, point, kind = line.split()[:3]
            if kind == "fuse.glusterfs":
                found.append((source, Path(point.replace("\\040", " "))))
    return found


def unmount(point: Path) -> None:
    if _run("umount", str(point), check=False).returncode != 0:
        _run("umount", "-l", str(point), check=False)  # a client still busy: detach it lazily


def destroy(name: str) -> None:
    """Unmount, stop and delete one volume and remove its directories; each step tolerates absence."""
    for source, point in _glusterfs_mounts():
        if source.endswith(f":/{name}"):
            unmount(point)
    gluster("volume", "stop", name, "force", check=False)
    gluster("volume", "delete", name, check=False)
    owner = _owner(name)
    if owner is not None:
        shutil.rmtree(BASE / f"vua-gluster-{owner}" / name, ignore_errors=True)


def _owner(name: str) -> int | None:
    match = re.fullmatch(rf"{PREFIX}-(\d+)-[\w-]+", name)
    return int(match.group(1)) if match else None


def sweep_leftovers() -> list[str]:
    """Remove the volumes, mounts and directories of earlier runs whose process is gone."""
    removed = []
    listed = gluster("volume", "list", check=False).stdout.split()
    for name in listed:
        owner = _owner(name)
        if owner is not None and not _alive(owner):
            destroy(name)
            removed.append(name)
    for source, point in _glusterfs_mounts():  # mounts of volumes already deleted
        owner = _owner(source.rsplit("/", 1)[-1])
        if owner is not None and not _alive(owner):
            unmount(point)
    for directory in BASE.glob("vua-gluster-*"):
        suffix = directory.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _alive(int(suffix)):
            shutil.rmtree(directory, ignore_errors=True)
    return removed


def create(tag: str, mounts: int, options: dict[str, str] | None = None,
           mount_options: str | None = None) -> Volume:
    """A started single-brick volume ``vuatest-<pid>-<tag>`` mounted ``mounts`` times.

    ``options`` are set before the volume starts, so translators they add (delay-gen, error-gen)
    are in the brick's graph from the start (adding one to a started volume needs a restart).
    """
    name = f"{PREFIX}-{os.getpid()}-{tag}"
    destroy(name)  # this process's own leftover from an interrupted fixture
    home = BASE / f"vua-gluster-{os.getpid()}" / name
    brick = home / "brick"
    # A brick directory remembers its volume in xattrs, so a fresh volume needs a fresh directory.
    shutil.rmtree(brick, ignore_errors=True)
    brick.mkdir(parents=True)
    # glusterd refuses "127.0.0.1"/"localhost" as a brick host; the host name resolves locally.
    # `force`: the brick lies on the root filesystem, which glusterd otherwise refuses.
    gluster("volume", "create", name, f"{socket.gethostname()}:{brick}", "force")
    volume = Volume(name, brick)
    try:
        for option, value in (options or {}).items():
            volume.set(option, value)
        gluster("volume", "start", name)
        for index in range(mounts):
            point = home / f"node{index}"
            point.mkdir()
            command = ["mount", "-t", "glusterfs"]
            if mount_options:
                command += ["-o", mount_options]
            _mount_with_retry(command + [f"127.0.0.1:/{name}", str(point)])
            volume.mounts.append(point)
    except BaseException:
        destroy(name)
        raise
    return volume


def _mount_with_retry(command: list[str]) -> None:
    """The brick process may still be starting right after `volume start`: retry for a few seconds."""
    deadline = time.monotonic() + 30
    while True:
        done = _run(*command, check=False)
        point = command[-1]
        if done.returncode == 0 and os.path.ismount(point):
            try:
                os.statvfs(point)
                return
            except OSError:
                unmount(Path(point))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        ensure_installed()
        ensure_glusterd()
        sweep_leftovers()
        volume = create("manual", int(argv[1]) if len(argv) > 1 else 2)
        print(volume.name, *volume.mounts)
        return 0
    if argv[:1] == ["down"]:
        for name in gluster("volume", "list", check=False).stdout.split():
            if _owner(name) is not None:
                destroy(name)
        for source, point in _glusterfs_mounts():
            if _owner(source.rsplit("/", 1)[-1]) is not None:
                unmount(point)
        for directory in BASE.glob("vua-gluster-*"):
            shutil.rmtree(directory, ignore_errors=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
