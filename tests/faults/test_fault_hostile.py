"""Hostile input: fuzzed headers and fragment bytes, planted links, file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workload import SPLIT, check_prefix, kv_for, open_store, prompt, soak

from vua.cli import main
from vua.errors import FragmentFormatError
from vua.inventory import FULL, walk
from vua.keys import as_token_array, chained_digests
from vua.serdes import MAX_HEADER_BYTES, decode_header, encode_header

FUZZ = settings(
    max_examples=soak(300),
    deadline=10_000,  # a guard against hangs only: a clean example takes well under a millisecond
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_ints = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70))
_dtypes = st.one_of(st.sampled_from(["F32", "BF16", "I64", "U8", "F8_E4M3", "BOOL"]), st.text(max_size=8))
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _dtypes,
        "shape": st.one_of(st.lists(_ints, max_size=4), _ints, st.text(max_size=3), st.lists(st.floats(), max_size=2)),
        "data_offsets": st.one_of(st.lists(_ints, min_size=0, max_size=3), st.none(), st.booleans()),
    },
)
_metadata = st.one_of(
    st.dictionaries(st.text(max_size=12), st.text(max_size=24), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers() | st.none() | st.lists(st.integers(), max_size=2), max_size=3),
    st.integers(),
)
_documents = st.dictionaries(
    st.text(max_size=10), st.one_of(_entry, st.integers(), st.text(max_size=5), st.none()), max_size=5
).flatmap(lambda doc: st.one_of(st.just(doc), _metadata.map(lambda m: {**doc, "__metadata__": m})))


def _check_decoded(buffer: bytes, file_size: int) -> None:
    try:
        header = decode_header(buffer, file_size)
    except FragmentFormatError:
        return
    # Accepted: the header must then describe exactly the file it came from.
    assert header.data_start == 8 + struct.unpack_from("<Q", buffer)[0]
    position = 0
    for entry in header.entries:
        assert entry.begin == position and entry.end >= entry.begin
        position = entry.end
    assert header.data_start + position == file_size


@FUZZ
@given(document=_documents, data_size=st.integers(0, 4096), slack=st.integers(-16, 16))
def test_structured_headers_decode_or_fail_cleanly(document: dict, data_size: int, slack: int) -> None:
    text = json.dumps(document).encode()
    buffer = struct.pack("<Q", len(text)) + text
    _check_decoded(buffer, len(buffer) + data_size)
    _check_decoded(buffer, max(0, len(buffer) + slack))


@FUZZ
@given(raw=st.binary(max_size=512), length=st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)), size=st.integers(0, 2**40))
def test_arbitrary_bytes_decode_or_fail_cleanly(raw: bytes, length: int, size: int) -> None:
    _check_decoded(struct.pack("<Q", length) + raw, size)
    _check_decoded(raw, len(raw))


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000, b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', b"\xff\xfe{}", b"{} trailing"],
    ids=["deep-nesting", "huge-integer", "bad-utf8", "trailing-data"],
)
def test_pathological_json_is_a_format_error(text: bytes) -> None:
    with pytest.raises(FragmentFormatError, match="not valid JSON"):
        decode_header(struct.pack("<Q", len(text)) + text, 8 + len(text))


def test_claimed_sizes_allocate_nothing(tmp_path: Path) -> None:
    with open_store(str(tmp_path)) as vua:
        tokens = prompt(0)
        vua.put(tokens, kv_for(tokens))
        path = vua.store.layout.fragment_path(_first_digest(vua, tokens), "kv")
        claims = [
            struct.pack("<Q", MAX_HEADER_BYTES) + b"{}",  # a 16 MiB header in a 10-byte file
            struct.pack("<Q", 2**64 - 1),
            _header_claiming({"tokens": {"dtype": "I64", "shape": [2**40], "data_offsets": [0, 2**43]}}),
        ]
        for claim in claims:
            path.write_bytes(claim)
            tracemalloc.start()
            assert check_prefix(vua, tokens) == 0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 4 << 20, f"{peak} bytes allocated for a {len(claim)}-byte file"


def _header_claiming(document: dict) -> bytes:
    text = json.dumps(document).encode()
    return struct.pack("<Q", len(text)) + text


def _first_digest(vua, tokens) -> bytes:
    return chained_digests(as_token_array(tokens), SPLIT, vua.store.namespace.seed, count=1)[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("pristine")
    with open_store(str(root)) as vua:
        tokens = prompt(0)
        vua.put(tokens, kv_for(tokens))
    return root, sorted(f.path for f in walk(root) if f.kind == FULL)


@FUZZ
@given(
    which=st.integers(0, 10),
    edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 2**20)),
    tail=st.binary(max_size=64),
)
def test_get_closest_survives_arbitrary_fragment_bytes(pristine, tmp_path_factory, which, edits, cut, tail) -> None:
    source, files = pristine
    root = tmp_path_factory.mktemp("fuzzed")
    shutil.copytree(source / "vua-v1", root / "vua-v1")
    target = root / files[which % len(files)].relative_to(source)
    data = bytearray(target.read_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    target.write_bytes(bytes(data) + tail)
    with open_store(str(root)) as vua:
        groups = check_prefix(vua, prompt(0))  # exact or shorter (else AssertionError); never another exception
    unchanged = bytes(data) + tail == (source / target.relative_to(root)).read_bytes()
    assert groups == len(files) or not unchanged
    shutil.rmtree(root)


def test_links_out_of_the_store_are_never_followed(tmp_path: Path) -> None:
    outside_root, root = tmp_path / "outside", tmp_path / "store"
    outside_root.mkdir()
    root.mkdir()
    tokens = prompt(0)
    with open_store(str(outside_root)) as vua:
        vua.put(tokens, kv_for(tokens))  # valid fragments for the same keys, outside the root
    outside = sorted(f.path for f in walk(outside_root))
    before = {p: p.read_bytes() for p in outside}
    with open_store(str(root)) as vua:
        digest = _first_digest(vua, tokens)
        planted_file = vua.store.layout.fragment_path(digest, "kv")
        planted_file.parent.mkdir(parents=True)
        planted_file.symlink_to(outside_root / planted_file.relative_to(root))
        assert check_prefix(vua, tokens) == 0  # O_NOFOLLOW: a miss, and the link is dropped
        assert not planted_file.is_symlink()

        planted_dir = vua.store.layout.prefix_dir(digest)
        planted_dir.rmdir()
        planted_dir.symlink_to(outside_root / planted_dir.relative_to(root), target_is_directory=True)
        assert check_prefix(vua, tokens) == 0  # a directory link on the path: a miss too
        assert [f.kind for f in walk(root)] == ["stray"]  # listed as a stray, never descended into
        assert main(["gc", str(root), "--max-size", "0"]) == 0
        assert main(["verify", str(root), "--fix"]) == 0  # removes the link itself
        assert not planted_dir.exists() and not planted_dir.is_symlink()
    assert {p: p.read_bytes() for p in outside} == before  # nothing outside was touched


@pytest.mark.parametrize("file_mode,dir_mode", [(None, None), (0o600, 0o700), (0o664, 0o2775)])
def test_file_and_directory_modes(tmp_path: Path, file_mode: int | None, dir_mode: int | None) -> None:
    options = {k: v for k, v in (("file_mode", file_mode), ("dir_mode", dir_mode)) if v is not None}
    old_umask = os.umask(0o022)
    try:
        with open_store(str(tmp_path), **options) as vua:
            tokens = prompt(1)
            vua.put(tokens, kv_for(tokens))
    finally:
        os.umask(old_umask)
    want_file, want_dir = file_mode or 0o640, dir_mode or 0o750
    created = [p for p in tmp_path.rglob("*")]
    assert created
    for path in created:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (want_dir if path.is_dir() else want_file), f"{path.relative_to(tmp_path)}: {oct(mode)}"


@pytest.mark.parametrize("field,value", [("vua_tokens", "abc"), ("vua_tokens", "9" * 5000), ("vua_tokens", "-16"), ("vua_checksums", ""), ("vua_format", "2")])
def test_lying_metadata_is_a_miss(tmp_path: Path, field: str, value: str) -> None:
    with open_store(str(tmp_path)) as vua:
        tokens = prompt(0)
        vua.put(tokens, kv_for(tokens))
        path = vua.store.layout.fragment_path(_first_digest(vua, tokens), "kv")
        original = path.read_bytes()
        header = decode_header(original, len(original))
        forged, _ = encode_header(
            [(e.name, e.dtype, e.shape) for e in header.entries], {**header.metadata, field: value}, alignment=4096
        )
        path.write_bytes(forged + original[header.data_start :])
        assert check_prefix(vua, tokens) == 0
        assert not path.exists()  # discarded, so that the next writer can replace it
