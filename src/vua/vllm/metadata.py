"""Plain, picklable data passed between the scheduler half and the worker half of the connector.

The scheduler decides *what* moves (which stored fragments go into which KV blocks, which
computed blocks become which fragments); the worker moves the bytes. A fragment is named by the
digests of :func:`vua.keys.chained_digests` at KV-block granularity:

* a *full chunk* ``c`` (blocks ``[c*cb, (c+1)*cb)``) lives at ``fragment_path(digest[(c+1)*cb-1])``;
* a *tail* of ``k < cb`` blocks starting at chunk ``c`` lives at
  ``tail_path(head=digest[c*cb], digest[c*cb+k-1])``: it is filed under the prefix through its
  own first block, so a lookup lists only tails that share that block.

Each fragment holds one tensor per attention layer, ``[n_blocks, *block_shape]``, so every KV
block is one contiguous piece of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..layout import StoreLayout
from ._compat import KVConnectorMetadata

__all__ = ["FragmentRef", "LoadJob", "SaveJob", "VUAConnectorMetadata", "SCRATCH"]

# A block id meaning "read this block of the fragment, but into scratch": the engine already
# holds it (a local prefix-cache hit) or it lies past the claimed prefix.
SCRATCH = -1


@dataclass(frozen=True)
class FragmentRef:
    """One stored fragment: a full chunk (``head`` None) or a tail."""

    digest: bytes
    head: bytes | None  # a tail's directory: the digest of the prefix through its first block
    start: int  # position of its first token
    n_blocks: int
    tokens: np.ndarray  # its own token ids (int64), verified against the stored ones on load

    def path(self, layout: StoreLayout, shard: str) -> Path:
        if self.head is None:
            return layout.fragment_path(self.digest, shard)
        return layout.tail_path(self.head, self.digest, shard)


@dataclass
class LoadJob:
    """Read ``fragments`` of one request; ``block_ids[i][j]`` receives block j of fragment i (or SCRATCH).

    ``claimed_end`` is the position the claim ends at. The fragment whose block it falls inside
    is read before the forward pass, so that vLLM's own writes of the slots it computes land last.

    An ``asynchronous`` load is read in the background while the request waits (vLLM's
    ``load_kv_async``): the worker reports the request in ``finished_recving`` once every read
    has ended, and its failed blocks with that same step's load errors.
    """

    request_id: str
    fragments: list[FragmentRef]
    block_ids: list[list[int]]
    claimed_end: int
    asynchronous: bool = False


@dataclass
class SaveJob:
    """Store the blocks ``block_ids`` (all computed by the end of this step) as ``fragment``.

    ``depends_on`` is every block of the request up to the fragment's end: the KV attention read
    to compute it. A block that failed to load poisons every save that depends on it.
    """

    request_id: str
    fragment: FragmentRef
    block_ids: list[int]
    depends_on: list[int]


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata):
    """One step's jobs. ``failures_seen`` counts the load-failure reports (steps whose
    ``invalid_block_ids`` were not empty) the scheduler had processed when it planned the step:
    the worker keeps dropping saves that depend on a failed block until then.

    ``released`` are finished requests whose blocks vLLM holds for this step's saves (the
    scheduler half returned True from ``request_finished``): once the worker has copied them out
    in ``wait_for_save``, it reports them as finished sending and vLLM frees the blocks."""

    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    failures_seen: int = 0
    released: list[str] = field(default_factory=list)
