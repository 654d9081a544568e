"""How much time the manager spends per request: graph, criteria, prefix keys, scheduling, events.

The real Graph, Scheduler and Executor run in this process against engines that
return instantly: each engine is a callback that records the ``RunRequest`` and
the loop answers it with ``WorkerDone`` at once, so every second measured is
manager time. Two workloads:

- ``independent``: N single requests spread over the applications, each
  submitted, activated, dispatched and finished (the per-request cost);
- ``dag``: 100 applications of 100 requests each (10,000 nodes), every
  application four map-reduce stages (24 maps and one reduce per stage, each
  stage's maps reading the previous reduce), all activated up front so the
  scheduler juggles every application's queue at once.

With ``--encode``, every event is also encoded and signed as the server's PUB
socket would send it (msgpack + HMAC), which is the rest of the server's
per-event cost.

    .venv/bin/python benchmarks/manager_overhead.py [--engines 4] [--max-running 64] [--encode]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections import deque
from collections.abc import Callable

from engine_server.manager.executor import Executor
from engine_server.manager.graph import Graph
from engine_server.manager.scheduler import Scheduler
from engine_server.protocol import (
    ChunkSpec,
    FunctionSpec,
    InputValue,
    Message,
    RunRequest,
    SamplingSpec,
    Sender,
    SubmitCall,
    WorkerDone,
    WorkerHello,
)

SYSTEM = "You are a summarizer. Read the passage and write three short bullet points. " * 4
MAP = FunctionSpec(
    "map",
    [ChunkSpec("text", text=SYSTEM), ChunkSpec("input", name="doc"), ChunkSpec("output", name="s", sampling=SamplingSpec())],
)


def reduce_fn(n: int) -> FunctionSpec:
    chunks = [ChunkSpec("text", text="Combine these summaries:\n")]
    for i in range(n):
        chunks += [ChunkSpec("input", name=f"s{i}"), ChunkSpec("text", text="\n")]
    chunks.append(ChunkSpec("output", name="out", sampling=SamplingSpec()))
    return FunctionSpec("reduce", chunks)


class InstantEngines:
    """The manager plus ``engines`` engines that finish every request the moment it arrives."""

    def __init__(self, engines: int, max_running: int, publish: Callable[[Message], None]) -> None:
        self.graph, self.scheduler = Graph(), Scheduler()
        self.inbox: deque[tuple[int, RunRequest]] = deque()
        self.executor = Executor(self.graph, self.scheduler, publish, self._send)
        for i in range(engines):
            self.scheduler.add_engine(i, 1)
            self.executor.on_engine_ready(WorkerHello(i, i, "instant", "none", max_running=max_running))
        self.ids = iter(range(10**9))

    def _send(self, engine_id: int, msg: Message) -> None:
        if isinstance(msg, RunRequest):
            self.inbox.append((engine_id, msg))

    def submit(self, app: str, fn: FunctionSpec, inputs: dict[str, InputValue]) -> str:
        n = next(self.ids)
        outputs = {c.name: f"v{n}.{c.name}" for c in fn.chunks if c.kind == "output"}
        self.executor.submit(SubmitCall(app, f"r{n}", fn, inputs, outputs))
        return next(iter(outputs.values()))

    def drain(self) -> int:
        """Answer every dispatched request (which dispatches more) until nothing is left."""
        done = 0
        while self.inbox:
            engine_id, run = self.inbox.popleft()
            outputs = {s.var_id: "a short summary" for s in run.segments if s.kind == "gen"}
            self.executor.on_worker_message(engine_id, WorkerDone(run.request_id, outputs, 100, 4, 0.0, 0.0, 0.0))
            done += 1
        return done


def independent(n: int, apps: int, engines: int, max_running: int, publish: Callable[[Message], None]) -> float:
    """Seconds to submit, activate, dispatch and finish ``n`` independent requests."""
    m = InstantEngines(engines, max_running, publish)
    app_ids = [m.graph.open_app(f"a{i}", f"app{i}").id for i in range(apps)]
    t0 = time.perf_counter()
    for i in range(n):
        var = m.submit(app_ids[i % apps], MAP, {"doc": InputValue(text=f"passage {i}")})
        m.executor.activate(var, "throughput")
    assert m.drain() == n
    return time.perf_counter() - t0


def dag(apps: int, stages: int, maps: int, engines: int, max_running: int, publish: Callable[[Message], None]) -> tuple[float, int]:
    """Seconds to run ``apps`` applications of ``stages`` map-reduce stages; and the node count."""
    m = InstantEngines(engines, max_running, publish)
    reduce = reduce_fn(maps)
    t0 = time.perf_counter()
    finals = []
    for a in range(apps):
        app = m.graph.open_app(f"a{a}", f"app{a}").id
        previous = InputValue(text=f"document {a}")
        for _ in range(stages):
            outs = [m.submit(app, MAP, {"doc": previous}) for _ in range(maps)]
            previous = InputValue(var_id=m.submit(app, reduce, {f"s{i}": InputValue(var_id=o) for i, o in enumerate(outs)}))
        finals.append(previous.var_id)
    for a, var in enumerate(finals):
        m.executor.activate(var, "latency" if a % 2 else "throughput")
    nodes = m.drain()
    elapsed = time.perf_counter() - t0
    assert all(m.graph.variables[v].state == "done" for v in finals)
    return elapsed, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--encode", action="store_true", help="also encode and sign every event, as the server does")
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args()

    events = [0]
    sender = Sender(b"k" * 64)

    def publish(msg: Message) -> None:
        events[0] += 1
        if args.encode:
            sender.encode(msg)

    best_ind = min(independent(args.requests, 100, args.engines, args.max_running, publish) for _ in range(args.repeat))
    events[0] = 0
    best_dag, nodes = dag(100, 4, 24, args.engines, args.max_running, publish)
    dag_events = events[0]
    for _ in range(args.repeat - 1):
        best_dag = min(best_dag, dag(100, 4, 24, args.engines, args.max_running, publish)[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"commit: {commit}; engines {args.engines} x max_running {args.max_running}; events encoded: {args.encode}")
    per_request = best_ind / args.requests * 1e3
    print(f"independent: {args.requests} requests from 100 apps in {best_ind:.3f} s = {per_request:.3f} ms/request")
    print(f"dag: {nodes} nodes from 100 apps in {best_dag:.3f} s = {best_dag / nodes * 1e3:.3f} ms/request")
    print(f"events published per dag run: {dag_events}")


if __name__ == "__main__":
    main()
