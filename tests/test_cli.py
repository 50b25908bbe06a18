"""The ``vua`` command on real stores: listing, statistics, verification with --fix, gc, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "faults"))

from workload import CONFIG, SPLIT, check_prefix, kv_for, open_store, prompt  # noqa: E402

from vua.cli import main, parse_duration, parse_size  # noqa: E402
from vua.inventory import FULL, walk  # noqa: E402


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    with open_store(str(tmp_path)) as vua:
        for index in (0, 1, 2):
            tokens = prompt(index)
            vua.put(tokens, kv_for(tokens))
    return tmp_path


def _expected_fragments() -> int:
    # prompts 0, 1, 2 are in different families: no shared groups
    return sum(len(prompt(i)) // SPLIT for i in (0, 1, 2))


def test_ls_names_the_namespace_and_counts(store: Path) -> None:
    code, text = run("ls", str(store), "--json")
    assert code == 0
    (row,) = json.loads(text)["namespaces"]
    assert row["name"] == CONFIG.namespace().name
    assert row["description"]["identity"] == "vua-fault-tests" and row["description"]["granularity"] == SPLIT
    assert row["fragments"] == _expected_fragments() and row["tails"] == 0
    assert row["bytes"] == sum(f.size for f in walk(store))
    code, text = run("ls", str(store))
    assert "vua-fault-tests" in text and f"{_expected_fragments()} fragments" in text
    code, text = run("ls", str(store), "--fragments", "--json")
    listed = json.loads(text)
    assert len(listed) == _expected_fragments()
    assert all(Path(item["path"]).parent.name == item["key"] for item in listed)


def test_stats_histograms(store: Path) -> None:
    old = next(f for f in walk(store) if f.kind == FULL)
    os.utime(old.path, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    code, text = run("stats", str(store), "--json")
    stats = json.loads(text)
    assert code == 0 and stats["fragments"] == _expected_fragments()
    assert stats["age"]["<7d"] == 1 and stats["age"]["<1m"] == _expected_fragments() - 1
    assert stats["last_use"] == stats["age"]
    assert run("stats", str(store))[1].startswith(f"{store.resolve()}: {_expected_fragments()} fragments")


def test_verify_finds_and_fixes_every_kind_of_damage(store: Path) -> None:
    assert run("verify", str(store)) == (0, f"checked {_expected_fragments()} fragments: 0 problems, 0 removed\n")
    fragments = [f.path for f in walk(store)]
    flipped, truncated, misplaced = fragments[0], fragments[1], fragments[2]
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x10
    flipped.write_bytes(bytes(data))
    os.truncate(truncated, truncated.stat().st_size - 1)
    misplaced.write_bytes(fragments[3].read_bytes())  # a valid fragment under the wrong key
    stale_temp = flipped.parent / ".kv.safetensors.tmp-99-dead"
    stale_temp.write_bytes(b"partial")
    os.utime(stale_temp, (time.time() - 3600, time.time() - 3600))
    fresh_temp = truncated.parent / ".kv.safetensors.tmp-98-beef"
    fresh_temp.write_bytes(b"partial")
    outside = store.parent / f"{store.name}-outside.txt"
    outside.write_text("not the store's")
    link = fragments[4].parent / "planted.safetensors"
    link.symlink_to(outside)

    code, text = run("verify", str(store), "--json")
    report = json.loads(text)
    assert code == 1
    found = {(p["kind"], p["path"]) for p in report["problems"]}
    assert found == {
        ("corrupt", str(flipped)), ("corrupt", str(truncated)), ("corrupt", str(misplaced)),
        ("stale temp", str(stale_temp)), ("stray", str(link)),
    }
    problems = {p["path"]: p["problem"] for p in report["problems"]}
    assert "checksum mismatch" in problems[str(flipped)]
    assert "stored under key" in problems[str(misplaced)]

    code, text = run("verify", str(store), "--fix")
    assert code == 0 and "5 problems, 5 removed" in text
    assert not any(p.exists() for p in (flipped, truncated, misplaced, stale_temp)) and not link.is_symlink()
    assert fresh_temp.exists() and outside.read_text() == "not the store's"
    assert run("verify", str(store))[0] == 0
    with open_store(str(store)) as vua:
        for index in (0, 1, 2):
            check_prefix(vua, prompt(index))  # exact prefix or miss, whatever was removed


def test_gc_command_enforces_the_budget(store: Path) -> None:
    total = sum(f.size for f in walk(store))
    code, text = run("gc", str(store), "--max-size", str(total // 2), "--dry-run", "--json")
    assert code == 0 and json.loads(text)["bytes_after"] <= total // 2
    assert sum(f.size for f in walk(store)) == total
    code, text = run("gc", str(store), "--max-size", str(total // 2))
    assert code == 0 and "evicted" in text
    assert 0 < sum(f.size for f in walk(store)) <= total // 2


def test_python_dash_m_vua_runs_the_same_command(store: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vua", "gc", str(store), "--max-size", "0", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["evicted"] == _expected_fragments()
    assert not [f for f in walk(store)]


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ls", str(tmp_path / "missing"))[0] == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("gc", str(tmp_path))[0] == 2
    assert "--max-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gc", str(tmp_path), "--max-size", "lots"])


def test_size_and_duration_parsing() -> None:
    assert parse_size("200G") == 200 << 30
    assert parse_size("1.5T") == int(1.5 * (1 << 40))
    assert parse_size("512MiB") == 512 << 20 and parse_size("4096") == 4096
    assert parse_duration("7d") == 7 * 86400 and parse_duration("10m") == 600 and parse_duration("30") == 30
    for bad in ("", "-1G", "12X"):
        with pytest.raises(Exception, match="not a size"):
            parse_size(bad)
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def _du(root: Path) -> int:
    """Bytes of every file under ``root``, as ``du -b`` sums files (directories left out)."""
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def test_gc_budget_counts_every_file_it_keeps(store: Path) -> None:
    fragments = sorted(walk(store), key=lambda f: f.location)
    now = time.time()
    for age, fragment in enumerate(fragments):  # the first is the most recently used
        os.utime(fragment.path, (now - 3600 * age, now - 3600 * age))
    # Room for all but the oldest fragment and 10 bytes: counting fragments alone, evicting the
    # oldest would do, and namespace.json (hundreds of bytes) would leave the root over budget.
    budget = sum(f.size for f in fragments[:-1]) + 10
    assert (store / "vua-v1" / CONFIG.namespace().name / "namespace.json").stat().st_size > 10
    code, text = run("gc", str(store), "--max-size", str(budget), "--json")
    report = json.loads(text)
    assert code == 0 and report["evicted"] == 2
    assert _du(store) == report["bytes_after"] <= budget


def test_stats_windows_per_namespace(store: Path) -> None:
    now = time.time()
    written_2d_read_30m, written_3h, never_read_8d = [f for f in walk(store)][:3]
    os.utime(written_2d_read_30m.path, (now - 1800, now - 2 * 86400))
    os.utime(written_3h.path, (now - 3 * 3600, now - 3 * 3600))
    os.utime(never_read_8d.path, (now - 8 * 86400, now - 8 * 86400))
    fresh = [f for f in walk(store) if f.path not in (written_2d_read_30m.path, written_3h.path, never_read_8d.path)]
    size = written_2d_read_30m.size
    assert all(f.size == size for f in walk(store))  # one chunk size: byte counts follow fragment counts
    code, text = run("stats", str(store), "--json")
    (row,) = json.loads(text)["namespaces"]
    windows = row["windows"]
    assert windows["1h"] == {"written": len(fresh), "written_bytes": len(fresh) * size, "reused": 1,
                             "reused_bytes": size, "hit_rate": round(1 / (len(fresh) + 1), 4)}
    assert windows["1d"]["written"] == len(fresh) + 1 and windows["1d"]["reused"] == 1
    assert windows["7d"]["written"] == len(fresh) + 2
    assert windows["7d"]["hit_rate"] == round(1 / (len(fresh) + 2), 4)  # the 8-day-old one is out
    assert "last  1h: written" in run("stats", str(store))[1]


def _stderr_on_a_terminal(*argv: str) -> str:
    """Run ``python -m vua ARGV`` with stderr on a pseudo-terminal (stdout a pipe); what the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0
    done = subprocess.run([sys.executable, "-m", "vua", *argv], stdout=subprocess.PIPE, stderr=slave, timeout=120)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal has no writer left
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert done.returncode == 0, shown
    return shown.decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_never_with_json(store: Path) -> None:
    n = _expected_fragments()
    verify = _stderr_on_a_terminal("verify", str(store))
    assert "verify: 100%" in verify and f"{n}/{n}" in verify
    assert _stderr_on_a_terminal("verify", str(store), "--json") == ""
    gc = _stderr_on_a_terminal("gc", str(store), "--max-size", "0")
    assert "gc scan" in gc and "gc evict: 100%" in gc and f"{n}/{n}" in gc
    piped = subprocess.run([sys.executable, "-m", "vua", "verify", str(store)], capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == b""
