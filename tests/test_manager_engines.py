"""The manager's optimizations on a real server with two CPU engines (tiny model).

Every assertion reads the server's event log: which engine a request went to,
in which order requests were dispatched, how many prompt tokens came from a
cached context. No test depends on how fast this machine is.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, crash_until_dead

import parrot_nb
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError
from tests.tiny_oracle import expected_text


MAX_RUNNING = 12  # requests an engine batches; the scheduler keeps MAX_RUNNING // 8 of them for latency work
TWO_ENGINE_ARGS = ("--engines", "2", "--max-running", str(MAX_RUNNING))


def _connect_when_ready(server: ServerProcess) -> None:
    """Connect, and wait until both engines have registered (placement tests need both)."""
    parrot_nb.connect(server.connection_file)
    deadline = time.monotonic() + 120
    while [e.state for e in parrot_nb.status().engines] != ["ready", "ready"]:
        assert time.monotonic() < deadline, f"engines did not start: {parrot_nb.status().engines}"
        time.sleep(0.1)


def _two_engine_server(path: Path) -> Iterator[ServerProcess]:
    """A server with two engines, connected once both are ready; stopped afterwards, whatever happened."""
    server = ServerProcess(path, *TWO_ENGINE_ARGS)
    try:
        _connect_when_ready(server)
        yield server
    finally:
        parrot_nb.disconnect()
        server.stop()


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _two_engine_server(tmp_path_factory.mktemp("engines"))


def _queued(server: ServerProcess, function: str) -> list[str]:
    """Request ids of ``function``'s calls, in the order they were queued."""
    ids: list[str] = []
    for e in server.events():
        if e["type"] == "RequestQueued" and e["function"] == function and e["request_id"] not in ids:
            ids.append(e["request_id"])
    return ids


def _dispatches(server: ServerProcess) -> list[dict]:
    return [e for e in server.events() if e["type"] == "RequestDispatched"]


def _finished(server: ServerProcess) -> dict[str, dict]:
    return {e["request_id"]: e for e in server.events() if e["type"] == "RequestFinished"}


def _first_token_seen(server: ServerProcess, function: str) -> bool:
    ids = set(_queued(server, function))
    return any(e["type"] == "RequestFirstToken" and e["request_id"] in ids for e in server.events())


def _system_prompt(tag: str) -> str:
    return f"[{tag}] You are a patient assistant for a small team. Answer briefly, cite the notes, stay polite. " * 4


def test_engines_report_the_batch_size_the_server_gave_them(two_engines: ServerProcess) -> None:
    # TWO_ENGINE_ARGS sets --max-running; an engine's capacity is what its worker reports back.
    assert [e.capacity for e in parrot_nb.status().engines] == [MAX_RUNNING, MAX_RUNNING]


def test_the_map_stage_is_dispatched_as_a_group_on_one_engine(two_engines: ServerProcess) -> None:
    summarize = SemanticFunction.from_template("mr_map", "Summarize: {{input:part}}\nSummary: {{output:s max_tokens=4}}")
    combine = SemanticFunction.from_template(
        "mr_reduce", "A: {{input:a}}\nB: {{input:b}}\nC: {{input:c}}\nD: {{input:d}}\nAll: {{output:o max_tokens=4}}"
    )
    with parrot_nb.app("map-reduce"):
        parts = [summarize(part=f"chapter {i} of the report") for i in range(4)]
        total = combine(a=parts[0], b=parts[1], c=parts[2], d=parts[3])
    total.get(timeout=120)

    maps, (reduce,) = _queued(two_engines, "mr_map"), _queued(two_engines, "mr_reduce")
    order = [e["request_id"] for e in _dispatches(two_engines)]
    first = order.index(maps[0])
    assert set(order[first : first + 4]) == set(maps)  # nothing else was dispatched in between
    groups = {e["group"] for e in _dispatches(two_engines) if e["request_id"] in maps}
    assert groups == {reduce}
    reduce_dispatch = next(e for e in _dispatches(two_engines) if e["request_id"] == reduce)
    assert reduce_dispatch["perf"] == "latency" and reduce_dispatch["group"] == ""
    # With engines that batch, the whole group shares one engine.
    assert len({e["engine_id"] for e in _dispatches(two_engines) if e["request_id"] in maps}) == 1


def test_a_system_prompt_shared_by_two_applications_is_prefilled_once(two_engines: ServerProcess) -> None:
    system = _system_prompt("shared")
    ask = SemanticFunction.from_template(
        "gpt_ask", "{{input:system}}User: {{input:q}}\nAssistant: {{output:a}}", max_tokens=48, ignore_eos=True
    )
    review = SemanticFunction.from_template(
        "gpt_review", "{{input:system}}Review this: {{input:t}}\nVerdict: {{output:v max_tokens=4}}"
    )
    with parrot_nb.app("gpts-one"):
        answer = ask(system=system, q="what is a semantic variable?")
        answer.activate()
    # While the first application's request decodes (its prompt is cached), the second one arrives.
    deadline = time.monotonic() + 120
    while not _first_token_seen(two_engines, "gpt_ask"):
        assert time.monotonic() < deadline, "the first request never produced a token"
        time.sleep(0.05)
    with parrot_nb.app("gpts-two"):
        review(system=system, t="the quarterly notes").get(timeout=120)
    answer.get(timeout=120)

    finished = _finished(two_engines)
    (first,), (second,) = _queued(two_engines, "gpt_ask"), _queued(two_engines, "gpt_review")
    assert finished[first]["cached_tokens"] == 0
    assert finished[second]["engine_id"] == finished[first]["engine_id"]
    # The second application's request reused the first one's system prompt instead of prefilling it.
    assert finished[second]["cached_tokens"] >= len(system.encode()) // 2
    stats = [e for e in two_engines.events() if e["type"] == "AppStats" and e["name"] == "gpts-two"][-1]
    assert stats["cache_hit_rate"] > 0


def test_requests_sharing_a_prefix_land_on_the_same_engine(two_engines: ServerProcess) -> None:
    document = _system_prompt("document")
    question = SemanticFunction.from_template("doc_q", "{{input:doc}}Question: {{input:q}}\nAnswer: {{output:a max_tokens=4}}")
    other = SemanticFunction.from_template("doc_other", "Unrelated {{input:x}}: {{output:o max_tokens=4}}")
    outs = []
    for i in range(3):
        with parrot_nb.app(f"reader-{i}"):
            outs.append(question(doc=document, q=f"question {i}"))
        with parrot_nb.app(f"bystander-{i}"):
            outs.append(other(x=f"task {i}"))
    for out in outs:
        out.activate()
    for out in outs:
        out.get(timeout=120)

    ids = _queued(two_engines, "doc_q")
    engines = {e["engine_id"] for e in _dispatches(two_engines) if e["request_id"] in ids}
    assert len(engines) == 1
    finished = _finished(two_engines)
    assert sum(finished[r]["cached_tokens"] > 0 for r in ids) >= 2


def _throughput_running_at(events: list[dict], index: int, ids: set[str]) -> dict[int, set[str]]:
    """Which of ``ids`` each engine was running just before ``events[index]``."""
    running: dict[int, set[str]] = {0: set(), 1: set()}
    for e in events[:index]:
        if e["type"] == "RequestDispatched" and e["request_id"] in ids:
            running[e["engine_id"]].add(e["request_id"])
        elif e["type"] in ("RequestFinished", "RequestFailed") and e["request_id"] in ids:
            for s in running.values():
                s.discard(e["request_id"])
    return running


def _latency_turn_behind(jobs: int, tag: str, server: ServerProcess) -> tuple[list[dict], int, set[str]]:
    """Queue ``jobs`` throughput requests of one application, then ask one latency-critical turn of
    another. Returns the event log, the index of the turn's dispatch, and the batch's request ids."""
    work = SemanticFunction.from_template(f"batch_{tag}", "Item {{input:i}}: {{output:o}}", max_tokens=200, ignore_eos=True)
    chat = SemanticFunction.from_template(f"chat_{tag}", "Hello! {{output:o max_tokens=4}}")
    with parrot_nb.app(f"batch-{tag}"):
        batch = [work(i=str(i)) for i in range(jobs)]
        for job in batch:
            job.activate("throughput")
    with parrot_nb.app(f"chat-{tag}"):
        reply = chat()
        reply.get("latency", timeout=120)
    for job in batch:
        job.cancel()  # what they generate does not matter here
    events = server.events()
    (chat_id,) = _queued(server, f"chat_{tag}")
    dispatched_at = next(i for i, e in enumerate(events) if e["type"] == "RequestDispatched" and e["request_id"] == chat_id)
    return events, dispatched_at, set(_queued(server, f"batch_{tag}"))


def test_a_latency_critical_request_is_not_stuck_behind_a_throughput_batch(two_engines: ServerProcess) -> None:
    # More batch work than both engines may run for throughput: they fill up and the rest queues.
    events, dispatched_at, batch_ids = _latency_turn_behind(4 * MAX_RUNNING, "full", two_engines)
    chat_id = events[dispatched_at]["request_id"]
    queued_at = next(i for i, e in enumerate(events) if e["type"] == "RequestQueued" and e["request_id"] == chat_id)
    waited = events[queued_at:dispatched_at]
    # Batch requests queued before it were still waiting for a slot when it went...
    before = events[:dispatched_at]
    queued = {e["request_id"] for e in before if e["type"] == "RequestQueued" and e["request_id"] in batch_ids}
    dispatched = {e["request_id"] for e in before if e["type"] == "RequestDispatched" and e["request_id"] in batch_ids}
    assert queued - dispatched
    # ...yet it did not wait for one of them to finish: the reserve kept it a slot. Without the
    # reserve the engines would be full and it would go only when a batch request ended.
    assert not [e for e in waited if e["type"] in ("RequestDispatched", "RequestFinished", "RequestFailed")]
    running = _throughput_running_at(events, dispatched_at, batch_ids)
    assert [len(running[0]), len(running[1])] == [MAX_RUNNING - MAX_RUNNING // 8] * 2


def test_a_latency_critical_request_goes_to_the_engine_with_less_throughput_work(two_engines: ServerProcess) -> None:
    # Fewer jobs than one engine's throughput slots plus a few: co-location puts the batch's
    # application on one engine until it is full, so the two engines carry unequal batches.
    events, dispatched_at, batch_ids = _latency_turn_behind(MAX_RUNNING, "uneven", two_engines)
    running = _throughput_running_at(events, dispatched_at, batch_ids)
    loads = sorted(len(r) for r in running.values())
    assert loads[0] < loads[1], f"the batch did not load the engines unequally: {running}"
    chosen = events[dispatched_at]["engine_id"]
    assert len(running[chosen]) == loads[0]


def test_a_flooding_application_does_not_starve_another(two_engines: ServerProcess) -> None:
    # Long enough that the flood is still waiting for slots when the quiet application arrives.
    flood_fn = SemanticFunction.from_template("flood_req", "Flood {{input:i}}: {{output:o}}", max_tokens=200, ignore_eos=True)
    quiet_fn = SemanticFunction.from_template("quiet_req", "Quiet {{input:i}}: {{output:o}}", max_tokens=16, ignore_eos=True)
    with parrot_nb.app("flood"):
        flood = [flood_fn(i=str(i)) for i in range(80)]
        for v in flood:
            v.activate("throughput")
    with parrot_nb.app("quiet"):
        quiet = [quiet_fn(i=str(i)) for i in range(3)]
        for v in quiet:
            v.activate("throughput")
    for v in quiet:
        v.get(timeout=300)
    for v in flood:
        v.cancel()  # what the flood generates does not matter here

    events = two_engines.events()
    flood_ids = set(_queued(two_engines, "flood_req"))
    for quiet_id in _queued(two_engines, "quiet_req"):
        queued_at = next(i for i, e in enumerate(events) if e["type"] == "RequestQueued" and e["request_id"] == quiet_id)
        dispatched_at = next(i for i, e in enumerate(events) if e["type"] == "RequestDispatched" and e["request_id"] == quiet_id)
        before = events[:queued_at]
        waiting = {e["request_id"] for e in before if e["type"] == "RequestQueued" and e["request_id"] in flood_ids} - {
            e["request_id"] for e in before if e["type"] == "RequestDispatched"
        }
        assert waiting, "the flood had no request waiting when the quiet application arrived"
        # The flood was queued first, yet no flood request took a slot while this one waited.
        jumped = [e for e in events[queued_at:dispatched_at] if e["type"] == "RequestDispatched" and e["request_id"] in flood_ids]
        assert not jumped


# ---------------------------------------------------------------- an engine that keeps dying


@pytest.fixture
def fresh_two_engines(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from _two_engine_server(tmp_path)


def test_an_engine_given_up_for_crashing_takes_no_other_engine_with_it(fresh_two_engines: ServerProcess) -> None:
    # An engine whose GPU fails at every start is left dead; the other engine serves everything.
    crash_until_dead(1)
    assert [e.state for e in parrot_nb.status().engines] == ["ready", "dead"]
    fn = SemanticFunction.from_template("survivor", "Still {{input:i}}: {{output:o max_tokens=4}}")
    with parrot_nb.app("survivor"):
        outs = [fn(i=str(i)) for i in range(4)]
        assert [o.get(timeout=120) for o in outs] == [expected_text(fn, i=str(i)) for i in range(4)]
    survivors = {e["request_id"] for e in fresh_two_engines.events() if e["type"] == "RequestQueued" and e["function"] == "survivor"}
    placed = {e["engine_id"] for e in _dispatches(fresh_two_engines) if e["request_id"] in survivors}
    assert placed == {0}
    assert [e.state for e in parrot_nb.status().engines] == ["ready", "dead"]


def _wait_for_dispatch(server: ServerProcess, request_fn: str, attempt: int) -> int:
    """The engine the ``attempt``-th dispatch of ``request_fn``'s request went to, once it happened."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ids = _queued(server, request_fn)
        hits = [e for e in _dispatches(server) if ids and e["request_id"] == ids[0]]
        if len(hits) >= attempt:
            return hits[attempt - 1]["engine_id"]
        time.sleep(0.05)
    raise AssertionError(f"{request_fn} was not dispatched {attempt} times")


def test_a_request_whose_engines_die_fails_clearly_while_others_go_on(fresh_two_engines: ServerProcess) -> None:
    victim_fn = SemanticFunction.from_template("victim", "Go: {{output:o}}", max_tokens=4000, ignore_eos=True)
    other_fn = SemanticFunction.from_template("bystander", "Fine {{input:i}}: {{output:o max_tokens=4}}")
    with parrot_nb.app("victim"):
        victim = victim_fn()
        victim.activate()
    for attempt in (1, 2):
        engine = _wait_for_dispatch(fresh_two_engines, "victim", attempt)
        os.kill(parrot_nb.status().engines[engine].pid, signal.SIGKILL)
    with pytest.raises(SemanticVariableError, match=r"engine \d died while running 'victim'.*tried 2 times"):
        victim.get(timeout=120)
    with parrot_nb.app("bystander"):
        assert [other_fn(i=str(i)).get(timeout=120) for i in range(2)] == [expected_text(other_fn, i=str(i)) for i in range(2)]
    failed = [e for e in fresh_two_engines.events() if e["type"] == "RequestFailed"]
    assert len(failed) == 1
