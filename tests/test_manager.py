"""The manager on its own: DAG, criteria, prefix keys, scheduler and executor, driven through their callbacks."""

from __future__ import annotations

import pytest

from engine_server.manager import scheduler as scheduling
from engine_server.manager.executor import Executor
from engine_server.manager.graph import Graph, GraphError
from engine_server.manager.prefix import assign_keys
from engine_server.manager.scheduler import Scheduler
from engine_server.protocol import (
    AbortRequest,
    ActivationDone,
    AppStats,
    ChunkSpec,
    EngineLoad,
    ExtendPrefill,
    FunctionSpec,
    InputValue,
    Message,
    ReleaseContexts,
    RequestCancelled,
    RequestFirstToken,
    RunRequest,
    SamplingSpec,
    SegmentSpec,
    SubmitCall,
    WorkerDelta,
    WorkerDone,
    WorkerHello,
    WorkerLoad,
)

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 3  # long enough to pull


class Clock:
    """Time for the scheduler's aging, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Manager:
    """An executor over ``engines`` ready engines, recording what it sends and publishes."""

    def __init__(self, engines: int = 1, capacity: int = 1) -> None:
        self.clock = Clock()
        self.graph, self.scheduler = Graph(), Scheduler(self.clock)
        self.sent: list[tuple[int, Message]] = []
        self.events: list[Message] = []
        self.executor = Executor(self.graph, self.scheduler, self.events.append, lambda e, m: self.sent.append((e, m)))
        for i in range(engines):
            self.scheduler.add_engine(i, 1)
            self.executor.on_engine_ready(WorkerHello(i, 100 + i, "tiny", "cpu", max_running=capacity))
        self.app = self.open_app("test")

    def open_app(self, name: str) -> str:
        return self.graph.open_app(name, name).id

    def call(
        self, request_id: str, inputs: dict[str, InputValue] | None = None, app: str | None = None, prefix: str | None = None
    ) -> str:
        """Submit a call whose single output variable is ``<request_id>.out``; return that id."""
        chunks = [ChunkSpec("text", text=prefix if prefix is not None else f"{request_id}: ")]
        chunks += [ChunkSpec("input", name=n) for n in (inputs or {})]
        chunks.append(ChunkSpec("output", name="out", sampling=SamplingSpec(max_tokens=4)))
        var_id = f"{request_id}.out"
        call = SubmitCall(app or self.app, request_id, FunctionSpec(request_id, chunks), inputs or {}, {"out": var_id})
        self.executor.submit(call)
        return var_id

    def finish(self, request_id: str, text: str = "done", cached: int = 0) -> None:
        node = self.graph.requests[request_id]
        assert node.engine_id is not None, f"{request_id} is not running"
        outputs = {v: text for v in node.outputs.values()}
        self.executor.on_worker_message(node.engine_id, WorkerDone(request_id, outputs, 10, 1, 0.0, 0.0, 0.0, cached))

    def runs(self) -> list[RunRequest]:
        return [m for _, m in self.sent if isinstance(m, RunRequest) and not m.prefill_only]

    def extensions(self) -> list[ExtendPrefill]:
        return [m for _, m in self.sent if isinstance(m, ExtendPrefill)]

    def prefills(self) -> list[tuple[int, RunRequest]]:
        return [(e, m) for e, m in self.sent if isinstance(m, RunRequest) and m.prefill_only]

    def dispatched(self) -> list[str]:
        return [m.request_id for m in self.runs()]

    def engine_of(self, request_id: str) -> int:
        return next(e for e, m in self.sent if isinstance(m, RunRequest) and m.request_id == request_id and not m.prefill_only)

    def released(self) -> list[tuple[int, list[str]]]:
        return [(e, m.keys) for e, m in self.sent if isinstance(m, ReleaseContexts)]


# ---------------------------------------------------------------- order and the DAG


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
    assert [s.text for s in m.runs()[-1].segments if s.kind == "text"] == ["b: ", "PRODUCED"]


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
    m.executor.on_engine_ready(WorkerHello(0, 200, "tiny", "cpu"))  # the restarted engine registers
    assert m.dispatched() == ["a", "a"]
    m.executor.on_engine_lost(0, "killed again")
    assert m.graph.variables[a].state == "failed"
    assert "tried 2 times" in (m.graph.variables[a].error or "")


# ---------------------------------------------------------------- context keys


def _keys(*texts: str) -> list[str]:
    return assign_keys([SegmentSpec("text", text=t) for t in texts] + [SegmentSpec("gen", var_id="v")])


def test_the_same_system_prompt_gets_the_same_key_in_any_prompt() -> None:
    assert _keys(SYSTEM, "doc one")[0] == _keys(SYSTEM, "doc two")[0]
    assert _keys(SYSTEM, "doc one")[1] != _keys(SYSTEM, "doc two")[1]


def test_keys_name_the_whole_prefix_and_its_boundaries() -> None:
    assert _keys("ab", "c")[1] != _keys("a", "bc")[1]
    assert _keys("x", "shared")[1] != _keys("y", "shared")[1]


def test_only_text_before_the_first_output_is_keyed() -> None:
    segments = [SegmentSpec("text", text="a"), SegmentSpec("gen", var_id="v"), SegmentSpec("text", text="b")]
    assert len(assign_keys(segments)) == 1
    assert segments[2].key == ""


KEYS_OF_A_KNOWN_PROMPT = """
from engine_server.manager.prefix import assign_keys
from engine_server.protocol import SegmentSpec
segments = [SegmentSpec("text", text="You are a helpful assistant. "), SegmentSpec("text", text="Q: why?"),
            SegmentSpec("gen", var_id="v")]
print(" ".join(assign_keys(segments)))
"""


def test_context_keys_are_the_same_in_every_server_process() -> None:
    import subprocess
    import sys

    # Two fresh interpreters with different hash seeds stand for two runs of the server: a key
    # that an engine cached under in one run must name the same prompt in the next. The value
    # is pinned too, so a change of the scheme is a visible change to this test.
    outs = {
        subprocess.run(
            [sys.executable, "-c", KEYS_OF_A_KNOWN_PROMPT], capture_output=True, text=True, check=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert outs == {"7cf84712f99abe940a59d8b5e393a6f8 68481734e238cabb9c5b92d2a9537ef1"}


def test_a_filled_input_is_keyed_by_its_value_whoever_produced_it() -> None:
    m = Manager(capacity=4)
    doc = m.call("doc")
    m.call("direct", {"d": InputValue(text="THE DOCUMENT")}, prefix=SYSTEM)
    m.call("chained", {"d": InputValue(var_id=doc)}, prefix=SYSTEM)
    m.executor.activate("direct.out", "latency")
    m.executor.activate("chained.out", "latency")
    m.finish("doc", text="THE DOCUMENT")
    runs = {r.request_id: [s.key for s in r.segments if s.kind == "text"] for r in m.runs()}
    assert runs["direct"] == runs["chained"] and len(runs["direct"]) == 2


def test_a_context_is_released_when_the_last_request_needing_it_finishes() -> None:
    m = Manager(capacity=4)
    m.call("a", {"q": InputValue(text="one")}, prefix=SYSTEM)
    m.call("b", {"q": InputValue(text="two")}, prefix=SYSTEM)
    m.executor.activate("a.out", "latency")
    m.executor.activate("b.out", "latency")
    system_key = m.runs()[0].segments[0].key
    m.finish("a")
    assert all(system_key not in keys for _, keys in m.released())  # b still needs it
    m.finish("b")
    released = [k for _, keys in m.released() for k in keys]
    assert system_key in released and len(m.executor.contexts) == 0
    assert {e for e, _ in m.released()} == {0}


# ---------------------------------------------------------------- prefill before the inputs arrive

PREAMBLE = "You review code for a living; here are the house rules, one per line. " * 5  # > 256 bytes


def _waiting_consumer(m: Manager, preamble: str = PREAMBLE) -> str:
    m.call("write", {"task": InputValue(text="sort")})
    return m.call("review", {"code": InputValue(var_id="write.out")}, prefix=preamble)


def test_a_requested_call_waiting_on_its_input_prefills_the_text_before_it() -> None:
    m = Manager(capacity=4)
    review = _waiting_consumer(m)
    m.executor.activate(review, "latency")
    ((engine, early),) = m.prefills()
    assert early.request_id == "review/prefill"
    assert [s.text for s in early.segments] == [PREAMBLE] and all(s.kind == "text" for s in early.segments)
    assert m.dispatched() == ["write"]  # the producer runs; the consumer itself waits
    m.finish("write", "def f(): pass")
    (run,) = [r for r in m.runs() if r.request_id == "review"]
    # The request's own program starts with the same keyed text, on the engine that prefilled it.
    assert run.segments[0].key == early.segments[0].key
    assert m.engine_of("review") == engine


def test_the_early_context_is_held_until_the_request_has_run() -> None:
    m = Manager(capacity=4)
    review = _waiting_consumer(m)
    m.executor.activate(review, "latency")
    key = m.prefills()[0][1].segments[0].key
    m.finish("write")
    assert all(key not in keys for _, keys in m.released())  # queued and running: still needed
    m.finish("review")
    assert key in [k for _, keys in m.released() for k in keys]
    assert len(m.executor.contexts) == 0


def test_cancelling_a_waiting_request_releases_its_early_context() -> None:
    m = Manager(capacity=4)
    review = _waiting_consumer(m)
    m.executor.activate(review, "latency")
    key = m.prefills()[0][1].segments[0].key
    m.executor.cancel([review], "test")
    assert key in [k for _, keys in m.released() for k in keys]
    assert len(m.executor.contexts) == 0


def test_a_consumer_prefills_its_producers_tokens_as_they_stream_and_adopts_them() -> None:
    m = Manager(capacity=4)
    m.call("write", {"task": InputValue(text="sort")})
    review = m.call("review", {"code": InputValue(var_id="write.out")}, prefix="Review: ")
    m.executor.activate(review, "latency")
    for delta in ("def ", "f(): ", "pass"):
        m.executor.on_worker_message(m.engine_of("write"), WorkerDelta("write", "write.out", delta))
    # Short known text, but its input streams: opened at the first token, then extended token by token.
    ((engine, opened),) = m.prefills()
    assert [s.text for s in opened.segments] == ["Review: "]
    assert [e.pieces for e in m.extensions()] == [["", "def "], ["f(): "], ["pass"]]
    m.finish("write", "def f(): pass")
    (run,) = [r for r in m.runs() if r.request_id == "review"]
    assert run.adopt == "review/prefill" and m.engine_of("review") == engine


def test_cancelling_a_waiting_request_frees_its_early_prefill_on_the_engine() -> None:
    m = Manager(capacity=4)
    review = _waiting_consumer(m)
    m.executor.activate(review, "latency")
    m.executor.cancel([review], "test")
    assert "review/prefill" in [msg.request_id for _, msg in m.sent if isinstance(msg, AbortRequest)]


def test_an_early_prefill_on_an_engine_that_died_is_opened_again_elsewhere() -> None:
    m = Manager(engines=2, capacity=4)
    m.call("write", {"task": InputValue(text="sort")})
    review = m.call("review", {"code": InputValue(var_id="write.out")}, prefix="Review: ")
    m.executor.activate(review, "latency")
    m.executor.on_worker_message(m.engine_of("write"), WorkerDelta("write", "write.out", "def "))
    ((first, _),) = m.prefills()
    m.executor.on_engine_lost(first, "killed")  # the engine holding the prefill (not the one running "write")
    m.executor.on_worker_message(m.engine_of("write"), WorkerDelta("write", "write.out", "def f"))
    assert [e for e, _ in m.prefills()] == [first, 1 - first]


def test_short_known_text_is_not_prefilled_early_before_its_input_streams() -> None:
    m = Manager(capacity=1)  # the producer waits for the engine: nothing streams yet
    m.call("other", {"q": InputValue(text="x")})
    m.executor.activate("other.out", "latency")
    review = _waiting_consumer(m, preamble="Review: ")
    m.executor.activate(review, "latency")
    assert m.prefills() == []


def test_early_prefill_can_be_turned_off() -> None:
    m = Manager(capacity=4)
    m.executor.early_prefill = False
    review = _waiting_consumer(m)
    m.executor.activate(review, "latency")
    assert m.prefills() == []


def test_a_request_waiting_on_two_inputs_prefills_again_as_the_first_arrives() -> None:
    m = Manager(capacity=4)
    m.call("a", {"q": InputValue(text="1")})
    m.call("b", {"q": InputValue(text="2")})
    chunks = [ChunkSpec("text", text=PREAMBLE), ChunkSpec("input", name="x"), ChunkSpec("text", text=PREAMBLE),
              ChunkSpec("input", name="y"), ChunkSpec("output", name="out", sampling=SamplingSpec(max_tokens=4))]
    inputs = {"x": InputValue(var_id="a.out"), "y": InputValue(var_id="b.out")}
    m.executor.submit(SubmitCall(m.app, "c", FunctionSpec("c", chunks), inputs, {"out": "c.out"}))
    m.executor.activate("c.out", "latency")
    assert [len(r.segments) for _, r in m.prefills()] == [1]
    m.finish("a", "first")
    # The first input's value and the text after it, up to the second input (still running, nothing streamed).
    assert m.extensions()[-1].pieces == ["", "first", PREAMBLE, ""]
    m.finish("b", "second")
    (run,) = [r for r in m.runs() if r.request_id == "c"]
    assert run.adopt == "c/prefill"
    m.finish("c")
    assert len(m.executor.contexts) == 0


# ---------------------------------------------------------------- task groups


def _map_reduce(m: Manager, n: int, app: str | None = None, perf: str = "latency") -> list[str]:
    chunks = [f"m{i}" for i in range(n)]
    outs = [m.call(c, {"doc": InputValue(text=f"part {i}")}, app=app, prefix="Summarize: ") for i, c in enumerate(chunks)]
    reduce = m.call("reduce", {f"s{i}": InputValue(var_id=o) for i, o in enumerate(outs)}, app=app)
    m.executor.activate(reduce, perf)  # type: ignore[arg-type]
    return chunks


def test_producers_feeding_one_consumer_form_its_task_group() -> None:
    m = Manager()
    chunks = _map_reduce(m, 3)
    assert {m.graph.requests[c].group for c in chunks} == {"reduce"}
    assert m.graph.requests["reduce"].group is None


def test_a_task_group_is_dispatched_together_on_one_engine() -> None:
    m = Manager(engines=2, capacity=8)
    other = m.open_app("other")
    m.call("o1", app=other)
    m.executor.activate("o1.out", "latency")
    chunks = _map_reduce(m, 5)
    group = [r for r in m.dispatched() if r in chunks]
    assert group == chunks
    assert len({m.engine_of(c) for c in chunks}) == 1


def test_a_task_group_that_does_not_fit_goes_first_when_room_frees() -> None:
    m = Manager(engines=1, capacity=1)
    other = m.open_app("other")
    chunks = _map_reduce(m, 3)
    for i in range(3):
        m.call(f"o{i}", app=other)
        m.executor.activate(f"o{i}.out", "latency")
    for c in chunks:
        m.finish(c)
    assert m.dispatched()[:3] == chunks  # the other app's work, queued before the rest of the group, waits


# ---------------------------------------------------------------- placement


def test_an_engine_takes_as_many_requests_as_it_batches() -> None:
    m = Manager(engines=1, capacity=16)
    for i in range(20):
        m.executor.activate(m.call(f"r{i}"), "latency")
    assert len(m.dispatched()) == 16


def test_throughput_work_leaves_a_reserve_that_latency_work_gets() -> None:
    m = Manager(engines=1, capacity=16)
    for i in range(20):
        m.executor.activate(m.call(f"t{i}"), "throughput")
    assert len(m.dispatched()) == 16 - 16 // 8
    m.executor.activate(m.call("urgent", app=m.open_app("chat")), "latency")
    assert m.dispatched()[-1] == "urgent"


def test_latency_work_goes_to_the_engine_without_a_throughput_batch() -> None:
    m = Manager(engines=2, capacity=16)
    for i in range(6):
        m.executor.activate(m.call(f"t{i}"), "throughput")
    assert {m.engine_of(f"t{i}") for i in range(6)} == {0}  # an app's batch stays together
    m.executor.activate(m.call("urgent", app=m.open_app("chat")), "latency")
    assert m.engine_of("urgent") == 1


def test_requests_sharing_a_long_prefix_go_to_the_engine_that_holds_it() -> None:
    m = Manager(engines=2, capacity=8)
    m.executor.activate(m.call("first", {"q": InputValue(text="1")}, prefix=SYSTEM), "latency")
    m.executor.activate(m.call("busy", app=m.open_app("x")), "latency")
    assert (m.engine_of("first"), m.engine_of("busy")) == (0, 1)
    m.finish("busy")
    other = m.open_app("other")
    m.executor.activate(m.call("second", {"q": InputValue(text="2")}, app=other, prefix=SYSTEM), "latency")
    assert m.engine_of("second") == 0  # more loaded, but it holds the system prompt


def test_an_evicted_context_no_longer_pulls_requests() -> None:
    m = Manager(engines=2, capacity=8)
    m.executor.activate(m.call("first", {"q": InputValue(text="1")}, prefix=SYSTEM), "latency")
    key = m.runs()[0].segments[0].key
    m.executor.on_engine_load(WorkerLoad(0, 1, 0, 10, 1000, 0, evicted_keys=[key]))
    other = m.open_app("other")
    m.executor.activate(m.call("second", {"q": InputValue(text="2")}, app=other, prefix=SYSTEM), "latency")
    assert m.engine_of("second") == 1
    assert any(isinstance(e, EngineLoad) and e.kv_blocks_total == 1000 for e in m.events)


def test_an_engine_whose_kv_pool_is_full_gets_no_more_work() -> None:
    m = Manager(engines=2, capacity=8)
    m.executor.activate(m.call("a"), "latency")
    m.executor.activate(m.call("b", app=m.open_app("b")), "latency")
    m.executor.on_engine_load(WorkerLoad(0, 1, 0, 99, 100, 0))
    m.executor.on_engine_load(WorkerLoad(1, 1, 0, 0, 100, 0))
    for i in range(3):
        m.executor.activate(m.call(f"more{i}"), "latency")  # app affinity would pull them to engine 0
    assert {m.engine_of(f"more{i}") for i in range(3)} == {1}


def test_blocks_only_cached_contexts_hold_count_as_room_on_a_full_pool() -> None:
    m = Manager(engines=2, capacity=8)
    m.executor.activate(m.call("a"), "latency")
    m.executor.activate(m.call("b", app=m.open_app("b")), "latency")
    # Engine 0's pool is full, but 95 of its blocks are cached contexts nobody runs on: it evicts
    # them for new work, so it still takes the requests its application pulls to it.
    m.executor.on_engine_load(WorkerLoad(0, 1, 0, 99, 100, 0, kv_blocks_cached=95))
    m.executor.on_engine_load(WorkerLoad(1, 1, 0, 0, 100, 0))
    for i in range(3):
        m.executor.activate(m.call(f"more{i}"), "latency")
    assert {m.engine_of(f"more{i}") for i in range(3)} == {0}


# ---------------------------------------------------------------- fairness


def test_a_flooding_application_does_not_starve_another() -> None:
    m = Manager(engines=1, capacity=2)
    for i in range(50):
        m.executor.activate(m.call(f"f{i}"), "throughput")
    quiet = m.open_app("quiet")
    m.executor.activate(m.call("q0", app=quiet), "throughput")
    m.finish("f0")
    assert m.dispatched()[-1] == "q0"


def test_a_throughput_request_that_waited_long_enough_overtakes_latency_work() -> None:
    m = Manager(engines=1, capacity=1)
    m.executor.activate(m.call("busy"), "latency")
    m.executor.activate(m.call("old", app=m.open_app("batch")), "throughput")
    m.clock.now += scheduling.AGING_S + 1
    m.executor.activate(m.call("new", app=m.open_app("chat")), "latency")
    m.finish("busy")
    assert m.dispatched() == ["busy", "old"]


# ---------------------------------------------------------------- events


def test_events_report_first_token_cache_hits_and_activation_latency() -> None:
    m = Manager()
    a = m.call("a")
    m.executor.activate(a, "latency")
    m.executor.on_worker_message(0, WorkerDelta("a", a, "x"))
    m.executor.on_worker_message(0, WorkerDelta("a", a, "y"))
    m.finish("a", cached=4)
    assert len([e for e in m.events if isinstance(e, RequestFirstToken)]) == 1
    stats = [e for e in m.events if isinstance(e, AppStats)][-1]
    assert (stats.prompt_tokens, stats.cached_tokens, stats.cache_hit_rate, stats.done) == (10, 4, 0.4, 1)
    (done,) = [e for e in m.events if isinstance(e, ActivationDone)]
    assert (done.var_id, done.perf, done.state) == (a, "latency", "done")


# --------------------------------------------------------------------------- cancel and forgetting


def test_cancel_aborts_a_running_request_on_its_engine_and_fails_its_variable() -> None:
    m = Manager()
    out = m.call("a")
    m.executor.activate(out, "latency")
    assert m.graph.requests["a"].state == "running"
    failed, cancelled = m.executor.cancel([out], "stop")
    assert (failed, cancelled) == ([out], ["a"])
    assert AbortRequest("a") in [msg for _, msg in m.sent]
    assert m.graph.variables[out].error == "cancelled: stop"
    assert [e.request_id for e in m.events if isinstance(e, RequestCancelled)] == ["a"]
    assert m.scheduler.engines[0].running == set()


def test_cancel_spares_an_upstream_request_that_another_requested_variable_needs() -> None:
    m = Manager(capacity=4)
    shared = m.call("shared")
    left = m.call("left", {"x": InputValue(var_id=shared)})
    right = m.call("right", {"x": InputValue(var_id=shared)})
    m.executor.activate(left, "latency")
    m.executor.activate(right, "latency")
    failed, cancelled = m.executor.cancel([left], "stop")
    assert (failed, cancelled) == ([left], ["left"])
    assert m.graph.requests["shared"].state == "running"
    m.finish("shared")
    assert m.graph.requests["right"].state == "running"  # still runs for the variable that waits on it


def test_cancel_takes_the_whole_unshared_chain_upstream() -> None:
    m = Manager()
    first = m.call("first")
    second = m.call("second", {"x": InputValue(var_id=first)})
    m.executor.activate(second, "latency")
    _, cancelled = m.executor.cancel([second], "stop")
    assert sorted(cancelled) == ["first", "second"]
    assert len(m.scheduler) == 0 and m.graph.apps[m.app].unfinished == 0


def test_collect_frees_finished_requests_whose_variables_were_dropped() -> None:
    m = Manager()
    kept, dropped = m.call("kept"), m.call("dropped")
    for var in (kept, dropped):
        m.executor.activate(var, "latency")
        m.finish(var.split(".")[0])
    m.graph.forget([dropped])
    assert m.executor.collect() == 1
    assert set(m.graph.requests) == {"kept"} and set(m.graph.variables) == {kept}
    assert m.graph.apps[m.app].submitted == 2 and m.graph.apps[m.app].done == 2


def test_collect_keeps_a_dropped_input_that_a_waiting_call_still_reads() -> None:
    m = Manager()
    source = m.call("source")
    m.executor.activate(source, "latency")
    m.finish("source", "the value")
    reader = m.call("reader", {"x": InputValue(var_id=source)})
    m.graph.forget([source])
    assert m.executor.collect() == 0
    m.executor.activate(reader, "latency")
    assert "the value" in [s.text for s in m.runs()[-1].segments]
    m.graph.forget([reader])
    m.finish("reader")
    assert m.executor.collect() == 2 and not m.graph.requests


def test_collect_keeps_running_requests_even_when_nobody_holds_their_outputs() -> None:
    m = Manager()
    out = m.call("busy")
    m.executor.activate(out, "latency")
    m.graph.forget([out])
    assert m.executor.collect() == 0
    m.finish("busy")
    assert m.executor.collect() == 1


def test_activation_stops_at_finished_requests_whose_inputs_were_freed() -> None:
    # A revision loop: draft -> revise (reads the draft) -> review (reads the revision). The client
    # rebinds its variable to the revision, so the draft is dropped and freed once revise is done.
    m = Manager()
    draft = m.call("draft")
    m.executor.activate(draft, "latency")
    m.finish("draft")
    revised = m.call("revise", {"x": InputValue(var_id=draft)})
    m.executor.activate(revised, "latency")
    m.finish("revise")
    review = m.call("review", {"x": InputValue(var_id=revised)})
    m.graph.forget([draft])
    assert m.executor.collect() == 1 and draft not in m.graph.variables
    m.executor.activate(review, "latency")  # walks up to revise, which is done: not into its freed input
    assert m.graph.requests["review"].state == "running"


def test_activating_a_running_request_whose_inputs_were_freed_upgrades_it() -> None:
    m = Manager()
    source = m.call("source")
    m.executor.activate(source, "throughput")
    m.finish("source")
    reader = m.call("reader", {"x": InputValue(var_id=source)})
    m.executor.activate(reader, "throughput")
    assert m.graph.requests["reader"].state == "running"
    m.graph.forget([source])
    assert m.executor.collect() == 1
    m.executor.activate(reader, "latency")
    assert m.graph.requests["reader"].perf == "latency"


def test_a_closed_app_goes_with_its_last_request_and_refuses_calls() -> None:
    m = Manager()
    app = m.open_app("closing")
    out = m.call("r", app=app)
    m.executor.close_app(app, "done with it")
    with pytest.raises(GraphError, match="'closing' is closed \\(done with it\\)"):
        m.call("late", app=app)
    assert m.executor.collect() == 0 and app in m.graph.apps  # its variable is still held
    m.graph.forget([out])
    assert m.executor.collect() == 1 and app not in m.graph.apps


def test_closing_the_app_of_a_gone_client_cancels_its_unfinished_requests() -> None:
    m = Manager()
    app = m.open_app("gone")
    out = m.call("r", app=app)
    m.executor.activate(out, "latency")
    cancelled = m.executor.close_app(app, "client gone", forget=True)
    assert cancelled == ["r"] and m.executor.collect() == 1 and app not in m.graph.apps


def test_a_call_asking_more_than_the_models_context_is_refused_naming_its_output() -> None:
    m = Manager()
    m.executor.on_engine_ready(WorkerHello(0, 100, "tiny", "cpu", max_running=1, max_context=128))
    spec = FunctionSpec("big", [ChunkSpec("output", name="y", sampling=SamplingSpec(max_tokens=129))])
    with pytest.raises(GraphError, match=r"\{\{output:y\}\}: max_tokens=129 .*\(128 tokens"):
        m.executor.submit(SubmitCall(m.app, "big", spec, {}, {"y": "big.y"}))


def test_a_call_whose_outputs_share_a_variable_id_is_refused() -> None:
    m = Manager()
    chunks = [ChunkSpec("output", name=n, sampling=SamplingSpec()) for n in ("a", "b")]
    with pytest.raises(GraphError, match="same variable id"):
        m.executor.submit(SubmitCall(m.app, "r", FunctionSpec("two", chunks), {}, {"a": "v", "b": "v"}))
    assert "v" not in m.graph.variables and "r" not in m.graph.requests


def test_a_function_declaring_an_output_twice_is_refused() -> None:
    m = Manager()
    chunks = [ChunkSpec("output", name="a", sampling=SamplingSpec()), ChunkSpec("output", name="a", sampling=SamplingSpec())]
    with pytest.raises(GraphError, match="declares output 'a' twice"):
        m.executor.submit(SubmitCall(m.app, "r", FunctionSpec("dup", chunks), {}, {"a": "v"}))


def test_cancelling_after_a_running_requests_inputs_were_freed_still_works() -> None:
    m = Manager(capacity=2)
    source = m.call("source")
    m.executor.activate(source, "latency")
    m.finish("source")
    reader = m.call("reader", {"x": InputValue(var_id=source)})
    other = m.call("other")
    m.executor.activate(reader, "latency")
    m.executor.activate(other, "latency")
    m.graph.forget([source])
    assert m.executor.collect() == 1  # the reader runs with its program fixed: its input can go
    _, cancelled = m.executor.cancel([other], "stop")  # walks upstream of the reader, still requested
    assert cancelled == ["other"] and m.graph.requests["reader"].state == "running"
