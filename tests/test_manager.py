"""The manager on its own: DAG, criteria, scheduler and executor, driven through their callbacks."""

from __future__ import annotations

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
    SubmitCall,
    WorkerDone,
)


class Manager:
    """An executor with one engine of capacity 1, recording what it sends and publishes."""

    def __init__(self) -> None:
        self.graph, self.scheduler = Graph(), Scheduler()
        self.scheduler.add_engine(0, capacity=1).alive = True
        self.sent: list[RunRequest] = []
        self.events: list[Message] = []
        self.executor = Executor(self.graph, self.scheduler, self.events.append, lambda _e, m: self.sent.append(m))
        self.app = self.graph.open_app("app", "test").id

    def call(self, request_id: str, inputs: dict[str, InputValue] | None = None) -> str:
        """Submit a call whose single output variable is ``<request_id>.out``; return that id."""
        chunks = [ChunkSpec("text", text=f"{request_id}: ")]
        chunks += [ChunkSpec("input", name=n) for n in (inputs or {})]
        chunks.append(ChunkSpec("output", name="out", sampling=SamplingSpec()))
        var_id = f"{request_id}.out"
        self.executor.submit(SubmitCall(self.app, request_id, FunctionSpec(request_id, chunks), inputs or {}, {"out": var_id}))
        return var_id

    def finish(self, request_id: str, text: str = "done") -> None:
        node = self.graph.requests[request_id]
        outputs = {v: text for v in node.outputs.values()}
        self.executor.on_worker_message(0, WorkerDone(request_id, outputs, 1, 1, 0.0, 0.0, 0.0))

    def dispatched(self) -> list[str]:
        return [m.request_id for m in self.sent]


def test_a_queued_request_upgraded_to_latency_overtakes_throughput_work() -> None:
    m = Manager()
    busy, x, y = m.call("busy"), m.call("x"), m.call("y")
    m.executor.activate(busy, "latency")
    m.executor.activate(x, "throughput")
    m.executor.activate(y, "throughput")
    m.executor.activate(y, "latency")  # someone now waits on y
    m.finish("busy")
    assert m.dispatched() == ["busy", "y"]
    m.finish("y")
    assert m.dispatched() == ["busy", "y", "x"]


def test_a_request_is_dispatched_once_even_when_activated_twice() -> None:
    m = Manager()
    a = m.call("a")
    m.executor.activate(a, "throughput")
    m.executor.activate(a, "latency")
    m.finish("a")
    assert m.dispatched() == ["a"]
    assert len(m.scheduler) == 0


def test_a_consumer_is_dispatched_with_its_producers_text_filled_in() -> None:
    m = Manager()
    a = m.call("a")
    b = m.call("b", {"x": InputValue(var_id=a)})
    m.executor.activate(b, "latency")
    assert m.dispatched() == ["a"]
    m.finish("a", text="PRODUCED")
    assert m.dispatched() == ["a", "b"]
    assert m.sent[-1].segments[0].text == "b: PRODUCED"


def test_a_failed_queued_request_leaves_the_queue() -> None:
    m = Manager()
    busy, x = m.call("busy"), m.call("x")
    m.executor.activate(busy, "latency")
    m.executor.activate(x, "latency")
    assert len(m.scheduler) == 1
    m.executor.fail_queued("no engine")
    assert len(m.scheduler) == 0
    assert m.graph.variables[x].state == "failed"
    m.finish("busy")
    assert m.dispatched() == ["busy"]


def test_an_engine_loss_requeues_its_request_and_a_second_loss_fails_it() -> None:
    m = Manager()
    a = m.call("a")
    m.executor.activate(a, "latency")
    m.executor.on_engine_lost(0, "killed")
    assert m.graph.requests["a"].state == "queued"
    m.scheduler.engines[0].alive = True  # the restarted engine registers
    m.executor.pump()
    assert m.dispatched() == ["a", "a"]
    m.executor.on_engine_lost(0, "killed again")
    assert m.graph.variables[a].state == "failed"
    assert "tried 2 times" in (m.graph.variables[a].error or "")
