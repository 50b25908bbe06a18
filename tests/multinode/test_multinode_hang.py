"""A storage server that stops answering (its process frozen with SIGSTOP) never stalls vLLM.

The engine serves a request while the GlusterFS brick behind its store is frozen: its lookup
gets no answer within ``storage_timeout_s`` (2 s here) and counts as a miss, its saves wait in
the background, and it is computed. The client would otherwise wait for the server up to
GlusterFS's ``network.ping-timeout`` (set to 120 s here): the request finishing well inside that
shows nothing waited on storage. Once the server is thawed, the store serves again, through
the loads a filesystem that may hang gets (asynchronous, through staging memory, with a deadline).
"""

from __future__ import annotations

import subprocess

import pytest
from vllm_engine_run import P, Q, assert_close_output, run_engine

from vua.tools.tinymodel import TinyLlamaSpec, build_tiny_llama

pytestmark = [pytest.mark.multinode, pytest.mark.vllm]


def brick_pid(volume_name: str) -> int:
    found = subprocess.run(["pgrep", "-f", f"glusterfsd.*{volume_name}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"brick processes of {volume_name}: {pids}"
    return pids[0]


@pytest.fixture
def slow_to_give_up(gluster):
    made = gluster.create("hang", 1, options={"network.ping-timeout": "120"})
    yield made
    subprocess.run(["pkill", "-CONT", "-f", f"glusterfsd.*{made.name}"])  # whatever happened
    gluster.destroy(made.name)


def test_a_frozen_storage_server_is_a_miss_not_a_stall(slow_to_give_up) -> None:
    model = build_tiny_llama(TinyLlamaSpec())
    (root,) = slow_to_give_up.root("store")
    brick = brick_pid(slow_to_give_up.name)
    baseline = run_engine(model, None, [P, Q])["results"]
    served = run_engine(
        model, root, [P, Q, P],
        extra={"chunk_size": 128, "storage_timeout_s": 2},
        # After P is stored: freeze the server, serve Q, thaw it, wait out the store's rest period.
        between={"0": [["signal", brick, "STOP"]], "1": [["signal", brick, "CONT"], ["sleep", 3]]},
        timeout=900,
    )
    cold, frozen, warm = served["results"]
    assert cold["cached"] == 0
    assert frozen["cached"] == 0  # it shares P's first two chunks, but the store did not answer
    assert frozen["seconds"] < 60, frozen["seconds"]  # nothing waited for the 120 s ping-timeout
    assert_close_output(frozen, baseline[1])
    assert warm["cached"] == 576  # served again once it answers: P's chunks and tail
    assert_close_output(warm, baseline[0])
    assert served["totals"]["load_errors"] == served["totals"]["load_timeouts"] == 0
    # On a filesystem that can hang, every load is asynchronous by default: only P's request waited.
    assert served["scheduler"]["async_loads"] == 1
    print(f"request while the server was frozen: {frozen['seconds']:.1f} s")
