"""``make demo`` (quick mode: tiny model, short prompt) and the pieces of ``vua bench`` that need no engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vua.tools import bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_quick_demo_reuses_stored_tokens_with_identical_outputs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vua.tools.demo"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "VUA_DEMO_QUICK": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "outputs identical: yes (8 generated tokens" in out
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(vLLM.*?)\s+\d+ ms\s+[\d.]+x\s+(\d+)", out, re.MULTILINE)}
    assert rows == {
        "vLLM, no connector (recompute)": 0,
        "vLLM + VUA, cold store (save)": 0,
        # 512 tokens, 4 whole 128-token blocks: everything is loaded but the last token.
        "vLLM + VUA, warm store (load)": 511,
    }, out
    # Progress is shown while it runs, and the temporary store is gone afterwards.
    assert "engine ready in" in out
    store = re.search(r"store (\S+)", out).group(1)
    assert not Path(store).exists()


def _result(
    ttft: dict[str, list[float]], cached: int, outputs: dict[str, list[list[int]]], stats: list[dict] | None = None,
    logprobs: dict[str, list[list[float]]] | None = None,
) -> dict:
    """An engine-runner result for one length (1024) in the shape ``_engine_runner`` writes."""
    phases = {}
    for phase in ("cold", "warm"):
        phases[f"{phase}-1024"] = [
            {
                "ttft_s": seconds,
                "seconds": seconds,
                "cached_tokens": cached if phase == "warm" else 0,
                "prompt_tokens": 1024,
                "output_ids": outputs[phase][index],
                "logprobs": (logprobs or {}).get(phase, [[-1.0, -2.0]] * 3)[index],
                "connector_stats": (stats or []) if phase == "warm" else [],
            }
            for index, seconds in enumerate(ttft[phase])
        ]
    return {"startup_s": 1.0, "phases": phases}


def test_bench_cells_table_and_goals() -> None:
    same = {"cold": [[1, 2], [3, 4], [5, 6]], "warm": [[1, 2], [3, 4], [5, 6]]}
    recompute_result = _result({"cold": [1.0, 1.2, 0.8], "warm": [1.0, 1.0, 1.0]}, 0, same)
    recompute = bench._system_cell("recompute", 1024, recompute_result, None)
    baseline = recompute_result["phases"]["cold-1024"]
    stats = [{"loaded_bytes": 1e8, "load_seconds": 0.05}, {"not": "a VUA stat"}]
    drift = {"cold": [[-1.0, -2.0]] * 3, "warm": [[-1.0, -2.0], [-1.0 + 3e-3, -2.0], [-1.0, -2.0]]}
    vua = bench._system_cell("vua", 1024, _result({"cold": [1.05, 1.0, 1.1], "warm": [0.05, 0.06, 0.04]}, 896, same, stats, drift), baseline)
    fs_drift = {"cold": [[-1.0, -2.0]] * 3, "warm": [[-1.0, -2.0 - 5e-3], [-1.0, -2.0], [-1.0, -2.0]]}
    fs = bench._system_cell("fs-tier", 1024, _result({"cold": [1.0] * 3, "warm": [0.1] * 3}, 1024, same, None, fs_drift), baseline)
    # After a token differs, the logprobs of what follows are not compared (the texts diverged).
    wrong = {"cold": same["cold"], "warm": [[1, 2], [3, 9], [5, 6]]}
    wrong_drift = {"cold": [[-1.0, -2.0]] * 3, "warm": [[-1.0, -2.0], [-1.0, -9.0], [-1.0, -2.0]]}
    example = bench._system_cell("example", 1024, _result({"cold": [1.0] * 3, "warm": [0.1] * 3}, 896, wrong, None, wrong_drift), baseline)

    assert (recompute.cold_ttft_s, recompute.reused_tokens, recompute.identical, recompute.max_logprob_diff) == (1.0, 0, True, 0.0)
    assert (vua.cold_ttft_s, vua.warm_ttft_s, vua.reused_tokens, vua.identical) == (1.05, 0.05, 896, True)
    assert vua.max_logprob_diff == pytest.approx(3e-3)
    assert vua.load_gb_s == pytest.approx(3 * 1e8 / (3 * 0.05) / 1e9)
    assert example.identical is False and example.load_gb_s is None
    assert example.max_logprob_diff == pytest.approx(7.0)  # the differing token's own logprob counts

    table = bench._markdown([recompute, example, fs, vua], [1024])
    assert "| 1024 | VUA | 1050 ms | 50 ms | 0.05x | 1.05x | 896 | 2.00 | 3.0e-03 | yes |" in table
    assert "| 1024 | vLLM ExampleConnector | 1000 ms | 100 ms | 0.10x | 1.00x | 896 | - | 7.0e+00 | NO |" in table
    assert "| 1024 | recompute (no connector) | 1000 ms | 1000 ms | 1.00x | 1.00x | 0 | - | 0 | yes |" in table
    (goals,) = bench._goals([recompute, example, fs, vua], [1024])
    assert goals == (
        "1024 tokens: warm 0.50x fs tier (goal <= 0.90x) ok; logprob diff 3.0e-03 vs fs tier's 5.0e-03 (goal <=) ok; "
        "greedy tokens equal ok"
    )
    # Without the fs tier the warm goal is against the best other contender; the cold goal applies from 3K tokens.
    long = [bench.Cell(s, 3072, c, w, a, 0, None, True, 0.0) for s, c, w, a in (("recompute", 2.0, 2.0, 2.0), ("vua", 2.2, 0.1, 1.0))]
    (goals,) = bench._goals(long, [3072])
    assert goals == (
        "3072 tokens: warm 0.05x best alternative (goal <= 0.90x) ok; cold 1.10x recompute (goal <= 1.05x) MISSED; "
        "greedy tokens equal ok"
    )


def test_bench_rejects_unknown_systems(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--systems", "recompute,lmcache", "--out", "unused"]) == 2
    assert "unknown systems ['lmcache']" in capsys.readouterr().err
