"""Atomic publish: first writer wins, failures leave nothing, and concurrent processes never expose partial files."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

import safetensors.torch
import torch

from tests.helpers import assert_kv_equal, fragment_files, make_kv, make_tokens, temp_files
from vua import StoreWriteError, VUAConfig
from vua.core import VUA
from vua.publish import publish_file

SPLIT = 4
GROUPS = 8
SEQUENCES = 12
CONFIG = VUAConfig(split_factor=SPLIT, identity="publish")


def _sequence(index: int) -> tuple:
    # head_dim 512 makes each fragment ~130 KB, so writes take long enough to overlap.
    return make_tokens(SPLIT * GROUPS, seed=index), make_kv(tokens=SPLIT * GROUPS, heads=4, head_dim=512, seed=index)


def _writer(root: str, worker: int, start, durable: bool) -> None:
    """Put prefixes of every sequence, each worker in its own order and with its own prefix lengths."""
    data = [_sequence(i) for i in range(SEQUENCES)]
    start.wait()
    with VUA(CONFIG, root, backend="posix", io_threads=4, durable=durable) as vua:
        order = list(range(SEQUENCES))[worker % SEQUENCES :] + list(range(SEQUENCES))[: worker % SEQUENCES]
        for index in order:
            tokens, kv = data[index]
            groups = GROUPS if worker % 2 == 0 else 1 + (index + worker) % GROUPS
            count = groups * SPLIT
            vua.put(tokens[:count], [(k[:, :, :count], v[:, :, :count]) for k, v in kv])


def _reader(root: str, start, stop, results) -> None:
    """Read every sequence until told to stop; report hits, wrong answers and warnings."""
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("vua").addHandler(handler)
    data = [_sequence(i) for i in range(SEQUENCES)]
    hits = wrong = 0
    start.wait()
    with VUA(CONFIG, root, backend="posix", io_threads=2) as vua:
        while not stop.is_set():
            for tokens, kv in data:
                hit = vua.get_closest(tokens, device="cpu")
                if hit is None:
                    continue
                hits += 1
                count = hit.tokens.shape[-1]
                same = count % SPLIT == 0 and torch.equal(hit.tokens, tokens[:count]) and all(
                    torch.equal(got_k, k[:, :, :count]) and torch.equal(got_v, v[:, :, :count])
                    for (got_k, got_v), (k, v) in zip(hit.data, kv)
                )
                wrong += not same
    results.put((hits, wrong, warnings))


class PublishFileTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vua-publish-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def test_first_writer_wins(self) -> None:
        final = self.dir / "a" / "b" / "f"
        self.assertTrue(publish_file(final, lambda fd: os.write(fd, b"first")))
        inode = final.stat().st_ino
        self.assertFalse(publish_file(final, lambda fd: os.write(fd, b"second")))
        self.assertEqual(final.read_bytes(), b"first")
        self.assertEqual(final.stat().st_ino, inode)
        self.assertEqual(final.stat().st_mode & 0o777, 0o640)
        self.assertEqual(final.parent.stat().st_mode & 0o777, 0o750)
        self.assertEqual(temp_files(self.dir), [])

    def test_failed_write_leaves_nothing_and_keeps_errno(self) -> None:
        final = self.dir / "f"

        def fail(fd: int) -> None:
            os.write(fd, b"partial")
            raise OSError(errno.EIO, "Input/output error")

        with self.assertRaises(StoreWriteError) as caught:
            publish_file(final, fail)
        self.assertEqual(caught.exception.errno, errno.EIO)
        self.assertIsInstance(caught.exception, OSError)
        self.assertIn("cannot store f", str(caught.exception))
        self.assertEqual(list(self.dir.iterdir()), [])

    def test_full_filesystem(self) -> None:
        mount = self.dir / "small"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs to fill up: {done.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", str(mount)], check=True)
        final = mount / "f"
        with self.assertRaises(StoreWriteError) as caught:
            publish_file(final, lambda fd: os.write(fd, b"x" * (1 << 20)) and os.write(fd, b"x" * (1 << 20)))
        self.assertEqual(caught.exception.errno, errno.ENOSPC)
        self.assertEqual(list(mount.iterdir()), [])


class ConcurrentProcessesTest(unittest.TestCase):
    def test_writers_and_a_reader_in_separate_processes(self) -> None:
        root = tempfile.mkdtemp(prefix="vua-concurrent-")
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        context = multiprocessing.get_context("spawn")
        start, stop, results = context.Event(), context.Event(), context.Queue()
        writers = [context.Process(target=_writer, args=(root, w, start, w != 0)) for w in range(4)]
        reader = context.Process(target=_reader, args=(root, start, stop, results))
        processes = [reader, *writers]
        for process in processes:
            process.start()
        try:
            time.sleep(0.5)
            start.set()
            for writer in writers:
                writer.join(timeout=120)
                self.assertEqual(writer.exitcode, 0)
            stop.set()
            hits, wrong, warnings = results.get(timeout=60)
            reader.join(timeout=30)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        self.assertEqual(wrong, 0)
        self.assertEqual(warnings, [])
        self.assertGreater(hits, 0)
        self.assertEqual(temp_files(Path(root)), [])
        files = fragment_files(Path(root))
        self.assertEqual(len(files), SEQUENCES * GROUPS)
        for path in files:
            self.assertEqual(len(safetensors.torch.load_file(path)), 1 + 2 * 2)
        with VUA(CONFIG, root, backend="posix") as vua:
            for index in range(SEQUENCES):
                tokens, kv = _sequence(index)
                hit = vua.get_closest(tokens)
                assert_kv_equal(self, hit.data, kv)


if __name__ == "__main__":
    unittest.main()
