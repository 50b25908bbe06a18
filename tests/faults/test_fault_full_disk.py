"""Full disk and read-only store on a real tmpfs: puts fail cleanly, nothing stored is lost, nothing is left behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from workload import PROMPTS, SPLIT, check_prefix, kv_for, open_store, prompt

from vua.errors import StoreWriteError
from vua.inventory import FULL, TEMP, walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_then_read_only_disk(small_disk: Path) -> None:
    stored: list[int] = []
    with open_store(str(small_disk)) as vua:
        for index in range(PROMPTS):
            tokens = prompt(index)
            try:
                vua.put(tokens, kv_for(tokens))
                stored.append(index)
            except StoreWriteError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            pytest.fail("1 MiB held the whole workload; the disk never filled")
        assert stored, "not even one prompt fitted"
        assert [f for f in walk(small_disk) if f.kind == TEMP] == []
        for index in stored:
            assert check_prefix(vua, prompt(index)) == len(prompt(index)) // SPLIT
        before = sorted((f.path, f.size) for f in walk(small_disk) if f.kind == FULL)

        # every further put fails the same way, and the failed ones still leave nothing behind
        for index in range(stored[-1] + 1, min(stored[-1] + 6, PROMPTS)):
            tokens = prompt(index)
            with pytest.raises(StoreWriteError):
                vua.put(tokens, kv_for(tokens))
            check_prefix(vua, tokens)
        assert [f for f in walk(small_disk) if f.kind == TEMP] == []

        print(f"full disk: {len(stored)} prompts ({len(before)} fragments) stored before ENOSPC")
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        tokens = prompt(PROMPTS - 1)
        with pytest.raises(StoreWriteError) as refused:
            vua.put(tokens, kv_for(tokens))
        assert refused.value.errno == errno.EROFS
        for index in stored:
            assert check_prefix(vua, prompt(index)) == len(prompt(index)) // SPLIT
        assert sorted((f.path, f.size) for f in walk(small_disk) if f.kind == FULL) == before

        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        for path, _ in before[: len(before) // 2]:
            os.unlink(path)
        tokens = prompt(stored[0])
        vua.put(tokens, kv_for(tokens))  # room again: writes work again
        assert check_prefix(vua, tokens) == len(tokens) // SPLIT
