"""Which ready request runs next, and on which engine.

A walking-skeleton policy: latency-critical requests before throughput ones,
then FIFO by DAG depth and arrival; each engine takes up to ``capacity``
requests at a time and the least-loaded live engine gets the next one.
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
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    def add_engine(self, engine_id: int, capacity: int) -> EngineSlot:
        slot = self.engines[engine_id] = EngineSlot(engine_id, capacity)
        return slot

    def push(self, node: RequestNode) -> None:
        priority = 0 if node.perf == "latency" else 1
        heapq.heappush(self._queue, (priority, node.depth, next(self._order), node.id))

    def pop_assignments(self) -> list[tuple[str, int]]:
        """Pair queued request ids with engines that have room, in priority order."""
        out: list[tuple[str, int]] = []
        while self._queue:
            slot = max(self.engines.values(), key=lambda s: s.free, default=None)
            if slot is None or slot.free <= 0:
                break
            _, _, _, request_id = heapq.heappop(self._queue)
            slot.running.add(request_id)
            out.append((request_id, slot.engine_id))
        return out
