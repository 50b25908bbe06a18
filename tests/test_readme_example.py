"""The README's Python API example, read from README.md and run exactly as written.

It writes ``./vua_cache``, so it runs in a temporary working directory.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_api_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no ```python block under '## Python API'"
    return match.group(1)


def test_readme_python_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_python_api_block()
    assert "vua.put(" in code and "vua.get_closest(" in code  # the block this test is about
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{README}:Python API", "exec"), namespace)
    namespace["vua"].close()
    tokens, trimmed, kvcache, result = (namespace[k] for k in ("tokens", "trimmed_tokens", "kvcache", "result"))
    assert tuple(trimmed.shape) == (1, 400)
    assert torch.equal(result.tokens, tokens[:, :400])
    assert len(result.data) == 1
    for got, expected in zip(result.data[0], kvcache[0], strict=True):
        assert torch.equal(got, expected)
    assert list((tmp_path / "vua_cache").rglob("*.safetensors")), "the example stored nothing under ./vua_cache"
    assert "Retrieved tokens: tensor(" in printed.getvalue()
    assert "Retrieved data: [(tensor(" in printed.getvalue()
