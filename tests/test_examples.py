"""The examples in example/ run as shipped, on the built-in small model, and check themselves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def test_on_transformers_reuses_the_stored_prefix_and_generates_the_same_tokens() -> None:
    done = _run([sys.executable, "example/on-transformers.py", "--prefix-tokens", "700", "--split-factor", "128"], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # 700 prefix tokens trimmed to whole fragments of 128: 640 stored and found again.
    assert "stored the KV of 640 prefix tokens" in done.stdout
    assert "reused 640 of 740 prompt tokens" in done.stdout
    assert "OK: identical 16 tokens with and without the store" in done.stdout


def test_on_transformers_reports_a_store_that_holds_nothing_for_the_prompt(tmp_path: Path) -> None:
    # A prefix shorter than one fragment stores nothing, so nothing can be found: exit code 1, said plainly.
    done = _run(
        [sys.executable, "example/on-transformers.py", "--prefix-tokens", "100", "--split-factor", "128", "--root", str(tmp_path)],
        timeout=300,
    )
    assert done.returncode == 1
    assert "FAIL: nothing found in the store" in done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.vllm
def test_serve_vllm_second_request_loads_from_the_store() -> None:
    done = _run(["bash", "example/serve-vllm.sh"], timeout=600, PORT=str(_free_port()), PYTHON=sys.executable, PROMPT_WORDS="1000")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = re.search(r"first \(compute \+ store\):.*?(\d+) prompt tokens, (\d+) reused", done.stdout)
    second = re.search(r"second \(load\):.*?(\d+) prompt tokens, (\d+) reused", done.stdout)
    assert first and second, done.stdout
    assert first.group(1) == second.group(1) == "1000"
    assert first.group(2) == "0"
    # Every whole 128-token KV block before the last prompt token: three 256-token chunks and
    # the 128-token tail after them.
    assert second.group(2) == "896"
    assert "same completion both times: yes" in done.stdout


def _readme_python_block() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    assert "## Python API" in text, "README.md has no '## Python API' section"
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_example_runs_as_printed(tmp_path: Path) -> None:
    (tmp_path / "readme_example.py").write_text(_readme_python_block())
    done = subprocess.run([sys.executable, "readme_example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # 512 tokens trimmed to whole groups of split_factor=200: 400 stored and retrieved.
    assert "Retrieved tokens: tensor([[" in done.stdout
    assert "Retrieved data: [(tensor([[[[" in done.stdout
    assert len(list((tmp_path / "vua_cache").rglob("*.safetensors"))) == 2
