"""The ``vua`` command: inspect, verify and bound a storage root.

::

    vua ls ROOT [--fragments] [--json]       namespaces (models) and what each holds
    vua stats ROOT [--json]                  totals, age and last-use histograms
    vua verify ROOT [--fix] [--json]         check every fragment; --fix removes the bad ones
    vua gc ROOT --max-size 200G [--max-age 7d] [--dry-run] [--json]
    vua bench [--lengths 1024,2048] ...      TTFT with vLLM, side by side (:mod:`vua.tools.bench`)

Exit status: 0 when done and nothing is wrong, 1 when ``verify`` leaves problems in place,
2 for a bad argument or a missing root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Sequence, TextIO

from tqdm import tqdm

from .errors import VUAError
from .eviction import DEFAULT_RESOLUTION_S, DEFAULT_TEMP_GRACE_S, collect
from .inventory import FULL, STRAY, TAIL, TEMP, StoredFile, check_fragment, namespaces, walk
from .layout import check_root
from .sizes import parse_byte_count

__all__ = ["main", "parse_size", "parse_duration"]

_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Upper bounds of the age histogram buckets, in seconds.
_AGE_BUCKETS = [("<1m", 60), ("<10m", 600), ("<1h", 3600), ("<1d", 86400), ("<7d", 7 * 86400), ("<30d", 30 * 86400), (">=30d", float("inf"))]
# The windows `vua stats` reports activity over, ending now.
_WINDOWS = [("1h", 3600), ("1d", 86400), ("7d", 7 * 86400)]


def parse_size(text: str) -> int:
    """``"200G"``, ``"1.5T"``, ``"512M"``, ``"4096"`` (:func:`vua.sizes.parse_byte_count`), for argparse."""
    try:
        return parse_byte_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_duration(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"10m"``, ``"30s"``, ``"90"`` (seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 7d, 12h, 10m or 30s")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _histogram(seconds: list[float]) -> dict[str, int]:
    counts = dict.fromkeys((name for name, _ in _AGE_BUCKETS), 0)
    for value in seconds:
        counts[next(name for name, bound in _AGE_BUCKETS if value < bound)] += 1
    return counts


def _progress(args: argparse.Namespace, label: str, total: int | None, unit: str) -> tqdm | None:
    """A progress bar on stderr for a person watching a terminal; none for scripts (``--json``, a pipe)."""
    if args.json or not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr)


def _inventory(root: str) -> tuple[list[Any], list[StoredFile]]:
    return namespaces(root), list(walk(root))


def _namespace_rows(spaces: list[Any], files: list[StoredFile]) -> list[dict[str, Any]]:
    rows = []
    for space in spaces:
        mine = [f for f in files if f.namespace == space.name]
        kinds = Counter(f.kind for f in mine)
        stored = [f for f in mine if f.kind in (FULL, TAIL)]
        rows.append(
            {
                "name": space.name,
                "description": space.description,
                "fragments": kinds[FULL],
                "tails": kinds[TAIL],
                "bytes": sum(f.size for f in stored),
                "temp_files": kinds[TEMP],
                "strays": kinds[STRAY],
                "last_used": max((f.last_used for f in stored), default=None),
            }
        )
    return rows


def _describe(description: dict | None) -> str:
    if not description:
        return "(no namespace.json)"
    identity = description.get("identity") or "(no identity)"
    return f"{identity}  granularity={description.get('granularity')}"


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    spaces, files = _inventory(args.root)
    if args.fragments:
        listed = [f for f in files if f.kind in (FULL, TAIL)]
        if args.json:
            json.dump([_file_json(f) for f in listed], out, indent=1)
            out.write("\n")
        for f in listed if not args.json else ():
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.last_used))
            out.write(f"{f.namespace}  {f.kind:4}  {f.key}  {f.size:>12}  {used}  {f.location}\n")
        return 0
    rows = _namespace_rows(spaces, files)
    if args.json:
        json.dump({"root": str(check_root(args.root)), "namespaces": rows}, out, indent=1)
        out.write("\n")
        return 0
    if not rows:
        out.write("no namespaces stored\n")
    for row in rows:
        extras = "".join(f", {row[key]} {label}" for key, label in (("temp_files", "temp files"), ("strays", "strays")) if row[key])
        out.write(
            f"{row['name']}  {_describe(row['description'])}\n"
            f"    {row['fragments']} fragments, {row['tails']} tails, {_human(row['bytes'])}{extras}\n"
        )
    return 0


def _file_json(f: StoredFile) -> dict[str, Any]:
    return {"namespace": f.namespace, "kind": f.kind, "key": f.key, "path": f.location, "size": f.size, "mtime": f.mtime, "last_used": f.last_used}


def _windows(stored: list[StoredFile], now: float) -> dict[str, dict[str, Any]]:
    """Activity per window, from the files alone.

    A fragment was *written* in a window when its mtime falls in it, and *reused* when it was read
    back in it: its atime is past its mtime (the kernel moves atime on the first read after a
    write on relatime mounts, and the connector's RecencyTouch at most every 10 minutes) and falls
    in the window. The hit rate is the share of the bytes used in the window, written or read,
    that were reused. Fragments evicted since are not counted, and reads within 10 minutes of the
    last recorded one leave no trace, so it is a floor, not a request-level hit rate (that one is
    on vLLM's /metrics, ``vllm:vua_hit_tokens_total``).
    """
    result = {}
    for name, seconds in _WINDOWS:
        since = now - seconds
        written = [f for f in stored if f.mtime >= since]
        reused = [f for f in stored if f.atime > f.mtime and f.atime >= since]
        used_bytes = sum(f.size for f in stored if f.last_used >= since)
        reused_bytes = sum(f.size for f in reused)
        result[name] = {
            "written": len(written),
            "written_bytes": sum(f.size for f in written),
            "reused": len(reused),
            "reused_bytes": reused_bytes,
            "hit_rate": round(reused_bytes / used_bytes, 4) if used_bytes else None,
        }
    return result


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    spaces, files = _inventory(args.root)
    now = time.time()
    stored = [f for f in files if f.kind in (FULL, TAIL)]
    temps = [f for f in files if f.kind == TEMP]
    result = {
        "root": str(check_root(args.root)),
        "fragments": sum(f.kind == FULL for f in stored),
        "tails": sum(f.kind == TAIL for f in stored),
        "bytes": sum(f.size for f in stored),
        "temp_files": len(temps),
        "temp_bytes": sum(f.size for f in temps),
        "strays": sum(f.kind == STRAY for f in files),
        "namespaces": [
            row | {"windows": _windows([f for f in stored if f.namespace == row["name"]], now)}
            for row in _namespace_rows(spaces, files)
        ],
        "age": _histogram([now - f.mtime for f in stored]),
        "last_use": _histogram([now - f.last_used for f in stored]),
    }
    if args.json:
        json.dump(result, out, indent=1)
        out.write("\n")
        return 0
    out.write(
        f"{result['root']}: {result['fragments']} fragments + {result['tails']} tails, {_human(result['bytes'])} "
        f"in {len(spaces)} namespaces; {result['temp_files']} temp files ({_human(result['temp_bytes'])}), "
        f"{result['strays']} strays\n"
    )
    for row in result["namespaces"]:
        out.write(f"  {row['name']}  {_describe(row['description'])}: {row['fragments'] + row['tails']} entries, {_human(row['bytes'])}\n")
        for window, w in row["windows"].items():
            rate = "-" if w["hit_rate"] is None else f"{100 * w['hit_rate']:.1f}%"
            out.write(f"    last {window:>3}: written {w['written']} ({_human(w['written_bytes'])}), "
                      f"reused {w['reused']} ({_human(w['reused_bytes'])}), hit rate {rate}\n")
    for title, key in (("age (since written)", "age"), ("last use", "last_use")):
        out.write(f"{title}:\n")
        for bucket, count in result[key].items():
            out.write(f"  {bucket:>6} {count:>10}\n")
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    _, files = _inventory(args.root)
    now = time.time()
    fragments = [f for f in files if f.kind in (FULL, TAIL)]
    problems: list[dict[str, Any]] = []
    bar = _progress(args, "verify", len(fragments), "fragment")
    for fragment in fragments:
        problem = check_fragment(fragment)
        if problem:
            problems.append({"path": fragment.location, "kind": "corrupt", "problem": problem, "removable": True})
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    for f in files:
        if f.kind == TEMP and now - f.mtime > args.temp_grace:
            problems.append({"path": f.location, "kind": "stale temp", "problem": f"unpublished for {now - f.mtime:.0f} s", "removable": True})
        elif f.kind == STRAY:
            is_link = _is_link(f.location)
            what = "symbolic link" if is_link else "unexpected entry"
            # Only links are removed: an unknown file may be an operator's, and unlinking a link never touches its target.
            problems.append({"path": f.location, "kind": "stray", "problem": what, "removable": is_link})
    fixed = 0
    if args.fix:
        for problem in problems:
            if problem["removable"]:
                try:
                    os.unlink(problem["path"])
                except FileNotFoundError:
                    pass
                problem["removed"] = True
                fixed += 1
    remaining = len(problems) - fixed
    if args.json:
        json.dump({"fragments": len(fragments), "problems": problems, "removed": fixed, "remaining": remaining}, out, indent=1)
        out.write("\n")
    else:
        for problem in problems:
            action = "  (removed)" if problem.get("removed") else ""
            out.write(f"{problem['kind']}: {problem['path']}: {problem['problem']}{action}\n")
        out.write(f"checked {len(fragments)} fragments: {len(problems)} problems, {fixed} removed\n")
    return 1 if remaining else 0


def _is_link(path: Any) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    if args.max_size is None and args.max_age is None:
        raise argparse.ArgumentTypeError("gc needs --max-size and/or --max-age")
    # One bar per phase as it runs: scan, evict, and again when a pass must scan for more victims.
    current: dict[str, Any] = {"phase": None, "bar": None}

    def close() -> None:
        if current["bar"] is not None:
            current["bar"].close()
        current["phase"] = current["bar"] = None

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase != current["phase"]:
            close()
            current["phase"] = phase
            current["bar"] = _progress(args, {"scan": "gc scan", "evict": "gc evict"}[phase], total, "file")
        bar = current["bar"]
        if bar is not None:
            bar.update(done - bar.n)

    report = collect(
        args.root,
        max_bytes=args.max_size,
        max_age_s=args.max_age,
        target_bytes=args.target_size,
        temp_grace_s=args.temp_grace,
        resolution_s=args.resolution,
        dry_run=args.dry_run,
        progress=progress,
    )
    close()
    if args.json:
        json.dump(asdict(report), out, indent=1)
        out.write("\n")
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    out.write(
        f"{report.fragments} fragments, {_human(report.bytes_before)} -> {_human(report.bytes_after)}: "
        f"{verb} {report.evicted} ({_human(report.evicted_bytes)}; {report.expired} past --max-age), "
        f"{report.temp_removed} stale temp files, {report.dirs_removed} empty directories removed "
        f"(scan {report.scan_s:.2f} s, evict {report.evict_s:.2f} s)\n"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vua", description="Inspect, verify and bound a VUA storage root, and benchmark VUA with vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace, TextIO], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("root", help="the storage root (the directory given to VUA / the connector)")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(handler=handler)
        return sub

    ls = command("ls", cmd_ls, "list namespaces (one per model and KV layout) and what each holds")
    ls.add_argument("--fragments", action="store_true", help="one line per fragment instead")
    command("stats", cmd_stats, "totals and histograms of age and last use")
    verify = command("verify", cmd_verify, "check every fragment's header, key, token count and checksums")
    verify.add_argument("--fix", action="store_true", help="remove bad fragments, stale temp files and planted links")
    grace = dict(type=parse_duration, default=DEFAULT_TEMP_GRACE_S, help="temp files younger than this may belong to a live writer (default 10m)")
    verify.add_argument("--temp-grace", **grace)
    gc = command("gc", cmd_gc, "evict least-recently-used fragments until the store fits its budget")
    gc.add_argument("--max-size", type=parse_size, help="budget for the whole root, e.g. 200G")
    gc.add_argument("--target-size", type=parse_size, help="once over --max-size, evict down to this (default: --max-size)")
    gc.add_argument("--max-age", type=parse_duration, help="evict fragments unused for this long, e.g. 7d")
    gc.add_argument("--temp-grace", **grace)
    gc.add_argument("--resolution", type=parse_duration, default=DEFAULT_RESOLUTION_S, help="uses closer than this count as equally recent (default 10m)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    bench_help = "time to first token with vLLM: recompute vs vLLM's ExampleConnector vs VUA"
    # Listed here for --help only: main() hands `vua bench ...` to vua.tools.bench, which needs
    # vLLM and a plotting library that the operator commands must not import.
    commands.add_parser("bench", help=bench_help, description=bench_help)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .tools import bench

        return bench.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, out or sys.stdout)
    except (VUAError, argparse.ArgumentTypeError, ValueError) as exc:
        print(f"vua {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `vua ls ROOT --fragments | head`: the reader left. Point stdout at /dev/null so that
        # the interpreter's final flush does not print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

