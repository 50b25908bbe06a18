"""kv_connector_extra_config parsing: defaults, validation and the run-time switches."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from vua.errors import ConfigError, StoreRootError
from vua.vllm.settings import ConnectorSettings, RuntimeSwitches, parse_byte_size


def parse(extra: dict, block_size: int = 32, max_num_batched_tokens: int = 300,
          kv_bytes_per_token: int = 16 << 10) -> ConnectorSettings:
    return ConnectorSettings.from_extra_config(extra, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                                               kv_bytes_per_token=kv_bytes_per_token)


def test_defaults(tmp_path: Path) -> None:
    settings = parse({"shared_storage_path": str(tmp_path)})
    assert settings.root == tmp_path.resolve()
    assert settings.chunk_size == 288  # --max-num-batched-tokens rounded down to the block size
    assert settings.blocks_per_chunk == 9
    assert (settings.use_gds, settings.backend) == ("auto", "auto")
    assert (settings.io_threads, settings.max_staging_bytes, settings.max_store_size, settings.durable) == (
        4, 2 << 30, None, True)


def test_asynchronous_loads_by_claim_length(tmp_path: Path) -> None:
    # A local disk: claims of 64 MiB of KV or more (tmp_path is on one here; tests/multinode checks
    # GlusterFS's default of 0). 16 KiB a token: 4096 tokens; 128 KiB a token (Llama-3-8B, bf16): 512.
    assert parse({"shared_storage_path": str(tmp_path)}).async_load_min_tokens == 4096
    assert parse({"shared_storage_path": str(tmp_path)}, kv_bytes_per_token=128 << 10).async_load_min_tokens == 512
    assert parse({"shared_storage_path": str(tmp_path), "async_load_min_tokens": "0"}).async_load_min_tokens == 0


def test_chunk_is_at_least_one_block(tmp_path: Path) -> None:
    assert parse({"shared_storage_path": str(tmp_path)}, block_size=128, max_num_batched_tokens=64).chunk_size == 128


def test_every_key(tmp_path: Path) -> None:
    settings = parse({"shared_storage_path": str(tmp_path), "chunk_size": "256", "use_gds": False, "io_threads": 2,
                      "max_staging_bytes": "512M", "max_store_size": "1.5T", "durable": "false"})
    assert settings.chunk_size == 256
    assert (settings.use_gds, settings.backend) == ("false", "posix")
    assert settings.max_staging_bytes == 512 << 20
    assert settings.max_store_size == int(1.5 * (1 << 40))
    assert settings.durable is False
    assert parse({"shared_storage_path": str(tmp_path), "use_gds": "TRUE"}).backend == "gds"


def test_settings_are_frozen(tmp_path: Path) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse({"shared_storage_path": str(tmp_path)}).chunk_size = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("extra", "error", "words"),
    [
        ({"shared_storage_path": ""}, ConfigError, "needs kv_connector_extra_config.shared_storage_path"),
        ({"shared_storage_path": "/nonexistent/vua"}, StoreRootError, "does not exist"),
        ({"chunk_size": 100}, ConfigError, "multiple of the KV block size 32"),
        ({"chunk_size": 0}, ConfigError, "chunk_size must be a positive integer"),
        ({"chunk_size": "lots"}, ConfigError, "chunk_size must be a positive integer"),
        ({"async_load_min_tokens": -1}, ConfigError, "async_load_min_tokens must be an integer of at least 0"),
        ({"async_load_min_tokens": True}, ConfigError, "async_load_min_tokens must be an integer of at least 0"),
        ({"use_gds": "maybe"}, ConfigError, "use_gds"),
        ({"max_store_size": "200X"}, ConfigError, "max_store_size"),
        ({"max_store_size": 0}, ConfigError, "max_store_size must be positive"),
        ({"durable": "sometimes"}, ConfigError, "durable"),
        ({"root_path": "/x"}, ConfigError, "unknown VUA kv_connector_extra_config key(s) ['root_path']"),
    ],
)
def test_bad_values_name_the_problem(tmp_path: Path, extra: dict, error: type, words: str) -> None:
    with pytest.raises(error) as caught:
        parse({"shared_storage_path": str(tmp_path), **extra})
    assert words in str(caught.value)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreRootError, match="not a directory"):
        parse({"shared_storage_path": str(tmp_path / "file")})


@pytest.mark.parametrize(("text", "size"), [("200G", 200 << 30), ("4096", 4096), (8192, 8192), ("1KiB", 1024), ("2 MB", 2 << 20)])
def test_byte_sizes(text: object, size: int) -> None:
    assert parse_byte_size(text, "x") == size


def test_switches_are_read_in_the_background_not_by_the_caller(tmp_path: Path, monkeypatch) -> None:
    switches = RuntimeSwitches(tmp_path, interval=3600)
    assert switches.get_enabled and switches.put_enabled
    (tmp_path / "disable-get").touch()
    assert switches.get_enabled  # not looked at again yet
    switches.stop()
    fresh = RuntimeSwitches(tmp_path, interval=0.01)
    assert not fresh.get_enabled and fresh.put_enabled
    (tmp_path / "disable-put").touch()
    (tmp_path / "disable-get").unlink()
    deadline = time.monotonic() + 10
    while not (fresh.get_enabled and not fresh.put_enabled):
        assert time.monotonic() < deadline, "the watcher never saw the change"
        time.sleep(0.01)

    def hung(path):  # storage that stops answering: the caller must not wait for it
        time.sleep(3600)

    monkeypatch.setattr(os.path, "exists", hung)
    time.sleep(0.05)  # the watcher is now stuck in a look
    started = time.monotonic()
    assert fresh.get_enabled and not fresh.put_enabled  # the last answer
    assert time.monotonic() - started < 1
    fresh.stop()


def test_storage_timeout_key(tmp_path: Path) -> None:
    assert parse({"shared_storage_path": str(tmp_path)}).storage_timeout_s == 10
    assert parse({"shared_storage_path": str(tmp_path), "storage_timeout_s": "2.5"}).storage_timeout_s == 2.5
    for bad in (0, -1, "soon", True, float("inf")):
        with pytest.raises(ConfigError, match="storage_timeout_s"):
            parse({"shared_storage_path": str(tmp_path), "storage_timeout_s": bad})


def test_decode_and_lookup_budget_keys(tmp_path: Path) -> None:
    defaults = parse({"shared_storage_path": str(tmp_path)})
    assert (defaults.save_decode, defaults.lookup_budget_ms) == (True, 20)
    chosen = parse({"shared_storage_path": str(tmp_path), "save_decode": "false", "lookup_budget_ms": 5})
    assert (chosen.save_decode, chosen.lookup_budget_ms) == (False, 5)
    for key, bad in (("save_decode", "maybe"), ("lookup_budget_ms", 0), ("lookup_budget_ms", "soon")):
        with pytest.raises(ConfigError, match=key):
            parse({"shared_storage_path": str(tmp_path), key: bad})
