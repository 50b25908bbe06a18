"""The worker-to-scheduler carrier of "this worker published these fragments" (see :mod:`vua.vllm.events`).

Its own module because it subclasses a vLLM class: imported only where vLLM is already running,
never by ``import vua.vllm`` (``bin/vua-vllm`` must set the environment before vLLM loads).
"""

from __future__ import annotations

from vllm.distributed.kv_events import KVConnectorKVEvents

__all__ = ["PublishedFragments"]


class PublishedFragments(KVConnectorKVEvents):
    """``(digest, shard)`` pairs, in the container vLLM merges over workers and hands the scheduler.

    They are not vLLM events yet: only the scheduler holds the requests' vLLM block hashes, so it
    turns a fragment into ``BlockStored`` once every shard of it is published.
    """

    def __init__(self, published: list[tuple[bytes, str]]) -> None:
        self._published = list(published)
        self._workers = 1

    def add_events(self, events: list) -> None:
        self._published.extend(events)

    def aggregate(self) -> "PublishedFragments":
        return self  # every pair counts: shards differ per worker

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list:
        return list(self._published)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._published = []
