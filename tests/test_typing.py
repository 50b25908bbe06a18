"""The engine (keys, layout, serdes, integrity, publish, store, inventory, eviction, backends)
type-checks with ``mypy --strict``: its types are its contract with both faces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "vua"
ENGINE = ["errors.py", "keys.py", "layout.py", "serdes.py", "integrity.py", "publish.py", "store.py", "sizes.py", "mounts.py",
          "inventory.py", "eviction.py", "backends"]


def test_engine_is_strictly_typed() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", *(str(SRC / m) for m in ENGINE)],
                          capture_output=True, text=True, cwd=SRC.parents[1], timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
