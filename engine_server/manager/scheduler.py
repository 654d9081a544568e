"""Which ready request runs next, and on which engine: application-centric scheduling.

Order. Requests wait in per-application queues, FIFO by DAG depth then
arrival. The next request is the head of the application that ranks first by
(class, requests it has running, arrival): latency-critical work before
throughput work, and among equals the application with the least work on the
engines, so a flood from one application cannot starve another. A throughput
request that has waited ``AGING_S`` is promoted to the latency class, so
nothing waits forever behind a stream of latency-critical work. Once a task
group (the map stage of a map-reduce) starts, its other queued members are
placed at once, and what does not fit goes first in its class next time.

Placement. An engine takes a request only while it has room under the
request's batch cap: latency-critical requests may fill an engine up to its
``capacity`` (its ``max_running``), throughput requests and task-group
members only up to ``capacity - reserve`` so that a latency-critical request
always finds a slot instead of waiting behind a throughput batch; and only
while its KV pool has room for the prompt and outputs (estimated, in bytes as
an upper bound of tokens, minus what the engine holds cached), unless it is
idle. Blocks that only cached contexts hold count as room: the engine evicts
them when new work needs them. Among engines with room the best is, in order: the one holding the
longest cached prefix of the prompt, the one running the request's task group,
the one running the request's application (co-location), for latency-critical
work the one with the fewest throughput requests, then the least loaded.

Pure Python over the graph's nodes: the executor calls it from the server loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_server.manager.graph import RequestNode

# A throughput request that has waited this long is scheduled as if latency-critical.
AGING_S = 30.0
# Cached prefixes shorter than this do not pull a request to an engine (a shared "Q: " is not worth it).
PREFIX_AFFINITY_MIN_BYTES = 64

LATENCY, THROUGHPUT = 0, 1


@dataclass
class EngineSlot:
    """What the scheduler knows of an engine."""

    engine_id: int
    capacity: int  # requests dispatched to it at once (its max_running)
    alive: bool = False
    running: set[str] = field(default_factory=set)
    finished: int = 0
    throughput_running: int = 0  # of ``running``, requests under the throughput batch cap
    apps: Counter[str] = field(default_factory=Counter)  # running requests per application
    groups: Counter[str] = field(default_factory=Counter)  # running requests per task group
    keys: set[str] = field(default_factory=set)  # contexts it may hold cached (dispatched, not yet evicted)
    # From the engine's last WorkerLoad (zeros until it sends one: no KV check then).
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_reclaimable: int = 0  # of those, blocks only cached contexts hold: evicted to make room
    block_size: int = 0
    engine_running: int = 0
    engine_waiting: int = 0
    cached_keys: int = 0
    kv_reserved: int = 0  # blocks estimated for requests dispatched since that report

    @property
    def free(self) -> int:
        return self.capacity - len(self.running) if self.alive else 0

    @property
    def reserve(self) -> int:
        """Slots kept for latency-critical work: throughput batches fill the rest."""
        return self.capacity // 8


@dataclass
class _Entry:
    depth: int
    seq: int
    request_id: str
    cls: int
    t: float

    def __lt__(self, other: _Entry) -> bool:
        return (self.depth, self.seq) < (other.depth, other.seq)


@dataclass
class _AppQueue:
    heaps: tuple[list[_Entry], list[_Entry]] = field(default_factory=lambda: ([], []))
    running: int = 0  # requests of this app on engines
    version: int = 0  # bumped whenever its rank changes; older ranking entries are stale


class Scheduler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.engines: dict[int, EngineSlot] = {}
        self.clock = clock
        self._apps: dict[str, _AppQueue] = {}
        # Applications by rank (class of their head, requests running, head's arrival), lazily
        # updated: each change pushes a fresh entry, and entries of an older version are skipped.
        self._ranking: list[tuple[int, int, int, int, str]] = []
        self._nodes: dict[str, RequestNode] = {}  # queued and running requests
        # The live entry of each queued request: re-pushing (a priority upgrade, aging) or
        # discarding (a failure) leaves stale entries in the heaps, skipped when seen.
        self._live: dict[str, _Entry] = {}
        self._aging: deque[_Entry] = deque()  # throughput entries in arrival order
        self._group_queued: dict[str, set[str]] = {}  # task group -> its queued members
        # Groups with members placed and others still queued: the rest, in dispatch order.
        self._started: dict[str, deque[str]] = {}
        # Dispatched request id -> its batch-cap class as placed (a later upgrade does not move it).
        self._dispatched: dict[str, int] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    # ----------------------------------------------------------------- engines

    def add_engine(self, engine_id: int, capacity: int) -> EngineSlot:
        slot = self.engines[engine_id] = EngineSlot(engine_id, capacity)
        return slot

    def engine_ready(self, engine_id: int, capacity: int, kv_blocks: int = 0, block_size: int = 0) -> None:
        """A (re)started engine registered: it holds nothing yet."""
        slot = self.engines[engine_id]
        slot.capacity, slot.alive = max(1, capacity), True
        slot.kv_blocks_total, slot.kv_blocks_used, slot.block_size = kv_blocks, 0, block_size
        slot.keys.clear()

    def engine_load(
        self, engine_id: int, running: int, waiting: int, used: int, total: int, cached: int, evicted: list[str],
        reclaimable: int = 0,
    ) -> None:
        """An engine's report. ``reclaimable``: of ``used``, blocks only its context cache holds, which it
        evicts when new work needs room, so they do not count against the KV check."""
        slot = self.engines[engine_id]
        slot.engine_running, slot.engine_waiting, slot.cached_keys = running, waiting, cached
        slot.kv_blocks_used, slot.kv_blocks_total, slot.kv_reserved = used, total, 0
        slot.kv_blocks_reclaimable = reclaimable
        slot.keys.difference_update(evicted)

    def engine_lost(self, engine_id: int) -> list[str]:
        """The engine died: forget what ran and was cached there; return its running request ids."""
        slot = self.engines[engine_id]
        lost = sorted(slot.running)
        for request_id in lost:
            self.finish(request_id, engine_id, count=False)
        slot.alive = False
        slot.keys.clear()
        slot.kv_blocks_used = slot.kv_blocks_reclaimable = slot.kv_reserved = slot.engine_running = slot.engine_waiting = 0
        return lost

    def finish(self, request_id: str, engine_id: int, count: bool = True) -> None:
        """A dispatched request left its engine (done, failed, or lost)."""
        slot = self.engines.get(engine_id)
        node = self._nodes.pop(request_id, None)
        if slot is None or node is None or request_id not in slot.running:
            return
        slot.running.discard(request_id)
        slot.finished += count
        if self._dispatched.pop(request_id) == THROUGHPUT:
            slot.throughput_running -= 1
        _decrement(slot.apps, node.app_id)
        if node.group is not None:
            _decrement(slot.groups, node.group)
        self._apps[node.app_id].running -= 1
        self._touch(node.app_id)

    # ----------------------------------------------------------------- queue

    def push(self, node: RequestNode) -> None:
        """Queue ``node`` (again, with its current priority, if it is already queued)."""
        cls = LATENCY if node.perf == "latency" else THROUGHPUT
        previous = self._live.get(node.id)
        if previous is not None and previous.cls == LATENCY:
            cls = LATENCY  # aged or upgraded: never demoted
        entry = _Entry(node.depth, next(self._order), node.id, cls, self.clock())
        self._push_entry(node, entry)

    def discard(self, request_id: str) -> None:
        """Take a queued request out (it failed)."""
        entry = self._live.pop(request_id, None)
        if entry is not None:
            node = self._nodes.pop(request_id)
            self._leave_group(node)
            self._touch(node.app_id)

    def pop_assignments(self) -> list[tuple[str, int]]:
        """Pair queued request ids with engines that have room, in priority order."""
        out: list[tuple[str, int]] = []
        if not self._live:
            return out
        self._age()
        while self._live:
            entry = self._select()
            if entry is None:
                break
            node = self._nodes[entry.request_id]
            engine_id = self._place(node)
            if engine_id is None:
                break  # the most urgent request cannot run yet: nothing jumps ahead of it
            self._take(entry, node, engine_id, out)
            if node.group is not None:
                self._place_group(node.group, out)
        return out

    # ----------------------------------------------------------------- internals

    def _push_entry(self, node: RequestNode, entry: _Entry) -> None:
        self._live[node.id] = entry
        self._nodes[node.id] = node
        app = self._apps.get(node.app_id)
        if app is None:
            app = self._apps[node.app_id] = _AppQueue()
        heapq.heappush(app.heaps[entry.cls], entry)
        if entry.cls == THROUGHPUT:
            self._aging.append(entry)
        if node.group is not None:
            self._group_queued.setdefault(node.group, set()).add(node.id)
        self._touch(node.app_id)

    def _touch(self, app_id: str) -> None:
        app = self._apps[app_id]
        app.version += 1
        head = self._head(app.heaps[LATENCY]) or self._head(app.heaps[THROUGHPUT])
        if head is not None:
            heapq.heappush(self._ranking, (head.cls, app.running, head.seq, app.version, app_id))
        if len(self._ranking) > 4 * len(self._apps) + 1024:
            # Stale entries are only dropped when they reach the top; on a long run, drop them all.
            self._ranking = [e for e in self._ranking if e[4] in self._apps and self._apps[e[4]].version == e[3]]
            heapq.heapify(self._ranking)

    def drop_app(self, app_id: str) -> None:
        """Forget a closed application that has nothing queued or running."""
        app = self._apps.get(app_id)
        if app is not None and app.running == 0 and not any(self._nodes[r].app_id == app_id for r in self._live):
            del self._apps[app_id]

    def _age(self) -> None:
        horizon = self.clock() - AGING_S
        while self._aging and self._aging[0].t <= horizon:
            entry = self._aging.popleft()
            if self._live.get(entry.request_id) is entry:
                node = self._nodes[entry.request_id]
                self._push_entry(node, _Entry(entry.depth, entry.seq, entry.request_id, LATENCY, entry.t))

    def _head(self, heap: list[_Entry]) -> _Entry | None:
        while heap and self._live.get(heap[0].request_id) is not heap[0]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _select(self) -> _Entry | None:
        """The next request: a started task group's member, else the best application's head."""
        best: _Entry | None = None
        while self._ranking:
            cls, _, _, version, app_id = self._ranking[0]
            app = self._apps.get(app_id)
            if app is not None and app.version == version:
                best = self._head(app.heaps[cls])
                break
            heapq.heappop(self._ranking)
        for group, rest in list(self._started.items()):
            while rest and rest[0] not in self._live:
                rest.popleft()
            if not rest:
                del self._started[group]
            elif best is None or self._live[rest[0]].cls <= best.cls:
                return self._live[rest[0]]
        return best

    def _take(self, entry: _Entry, node: RequestNode, engine_id: int, out: list[tuple[str, int]]) -> None:
        del self._live[node.id]
        self._leave_group(node)
        slot = self.engines[engine_id]
        slot.running.add(node.id)
        cap_class = _cap_class(node)
        if cap_class == THROUGHPUT:
            slot.throughput_running += 1
        slot.apps[node.app_id] += 1
        if node.group is not None:
            slot.groups[node.group] += 1
        slot.keys.update(node.prefix)
        if slot.kv_blocks_total:
            slot.kv_reserved += self._blocks(node, slot)
        self._dispatched[node.id] = cap_class
        self._apps[node.app_id].running += 1
        self._touch(node.app_id)
        out.append((node.id, engine_id))

    def _place_group(self, group: str, out: list[tuple[str, int]]) -> None:
        """Dispatch the rest of a task group together with its first member, as far as engines have room."""
        members = deque(sorted(self._group_queued.get(group, ()), key=lambda r: (self._live[r].depth, self._live[r].seq)))
        while members:
            node = self._nodes[members[0]]
            engine_id = self._place(node)
            if engine_id is None:
                self._started[group] = members  # the rest goes first in its class next time
                return
            self._take(self._live[members.popleft()], node, engine_id, out)
        self._started.pop(group, None)

    def _leave_group(self, node: RequestNode) -> None:
        if node.group is not None:
            members = self._group_queued.get(node.group)
            if members is not None:
                members.discard(node.id)
                if not members:
                    del self._group_queued[node.group]

    def _place(self, node: RequestNode) -> int | None:
        cap_class = _cap_class(node)
        latency = self._live[node.id].cls == LATENCY
        best: tuple[int, ...] | None = None
        best_id: int | None = None
        for slot in self.engines.values():
            if not slot.alive:
                continue
            cap = slot.capacity - slot.reserve if cap_class == THROUGHPUT else slot.capacity
            if len(slot.running) >= cap:
                continue
            cached = max((n for k, n in node.prefix.items() if k in slot.keys), default=0)
            if slot.kv_blocks_total and slot.running:
                committed = slot.kv_blocks_used - slot.kv_blocks_reclaimable + slot.kv_reserved
                if committed + self._blocks(node, slot, cached) > slot.kv_blocks_total:
                    continue
            score = (
                slot.engine_id == node.early_engine,  # it holds this request's own early prefill
                cached if cached >= PREFIX_AFFINITY_MIN_BYTES else 0,
                slot.groups[node.group] if node.group is not None else 0,
                slot.apps[node.app_id] > 0,
                -slot.throughput_running if latency else 0,
                -len(slot.running),
                -slot.engine_id,
            )
            if best is None or score > best:
                best, best_id = score, slot.engine_id
        return best_id

    def prefill_engine(self, prefix: dict[str, int]) -> int | None:
        """Where to prefill the known start of a waiting request early (``prefix``: key -> bytes).

        The engine that already holds the longest part of it, else the least busy one. The
        keys are then counted as held there, so the request itself is placed there later.
        """
        best: tuple[int, ...] | None = None
        best_id: int | None = None
        for slot in self.engines.values():
            if not slot.alive:
                continue
            cached = max((n for k, n in prefix.items() if k in slot.keys), default=0)
            score = (cached if cached >= PREFIX_AFFINITY_MIN_BYTES else 0, -len(slot.running), -slot.engine_id)
            if best is None or score > best:
                best, best_id = score, slot.engine_id
        if best_id is not None:
            self.engines[best_id].keys.update(prefix)
        return best_id

    @staticmethod
    def _blocks(node: RequestNode, slot: EngineSlot, cached: int = 0) -> int:
        """KV blocks the request may need there: bytes bound tokens from above, minus the cached prefix."""
        tokens = -cached
        for seg in node.segments or ():
            if seg.kind == "text":
                tokens += len(seg.text.encode())
            else:
                tokens += seg.sampling.max_tokens if seg.sampling is not None else 0
        return math.ceil(max(tokens, 0) / max(slot.block_size, 1))


def _cap_class(node: RequestNode) -> int:
    """Throughput requests and task-group members are batched: they leave the reserve alone."""
    return THROUGHPUT if node.perf == "throughput" or node.group is not None else LATENCY


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
