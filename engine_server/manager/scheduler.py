"""Which ready request runs next, and on which engine.

A walking-skeleton policy: latency-critical requests before throughput ones,
then FIFO by DAG depth and arrival; each engine takes up to ``capacity``
requests at a time (1 while engines run one request at a time, so that
queued work stays here, where priorities apply) and the least-loaded live
engine gets the next one.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from engine_server.manager.graph import RequestNode


@dataclass
class EngineSlot:
    """What the scheduler knows of an engine."""

    engine_id: int
    capacity: int
    alive: bool = False
    running: set[str] = field(default_factory=set)
    finished: int = 0

    @property
    def free(self) -> int:
        return self.capacity - len(self.running) if self.alive else 0


class Scheduler:
    def __init__(self) -> None:
        self.engines: dict[int, EngineSlot] = {}
        self._queue: list[tuple[int, int, int, str]] = []
        # The live heap entry of each queued request: re-pushing (a priority upgrade) or
        # discarding (a failure) leaves stale entries in the heap, skipped when popped.
        self._live: dict[str, tuple[int, int, int, str]] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def add_engine(self, engine_id: int, capacity: int) -> EngineSlot:
        slot = self.engines[engine_id] = EngineSlot(engine_id, capacity)
        return slot

    def push(self, node: RequestNode) -> None:
        """Queue ``node`` (again, with its current priority, if it is already queued)."""
        priority = 0 if node.perf == "latency" else 1
        entry = (priority, node.depth, next(self._order), node.id)
        self._live[node.id] = entry
        heapq.heappush(self._queue, entry)

    def discard(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    def pop_assignments(self) -> list[tuple[str, int]]:
        """Pair queued request ids with engines that have room, in priority order."""
        out: list[tuple[str, int]] = []
        while self._live:
            slot = max(self.engines.values(), key=lambda s: s.free, default=None)
            if slot is None or slot.free <= 0:
                break
            entry = heapq.heappop(self._queue)
            request_id = entry[3]
            if self._live.get(request_id) != entry:
                continue
            del self._live[request_id]
            slot.running.add(request_id)
            out.append((request_id, slot.engine_id))
        return out
