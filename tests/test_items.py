"""Outputs split into items: each item variable resolves as its line completes, and its consumers start then."""

from __future__ import annotations

import pytest

import parrot_nb
from engine_server.manager.executor import _item_text
from engine_server.protocol import (
    ChunkSpec,
    FunctionSpec,
    GetRequestDetail,
    InputValue,
    SamplingSpec,
    SubmitCall,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
)
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError
from tests.test_manager import Manager

LINES = "[a-z]{4}\n[a-z]{4}\n[a-z]{4}"


def _expand(m: Manager, items: int = 3) -> None:
    chunks = [ChunkSpec("text", text="Queries:\n"), ChunkSpec("output", name="q", sampling=SamplingSpec(max_tokens=40, items=items))]
    m.executor.submit(SubmitCall(m.app, "expand", FunctionSpec("expand", chunks), {}, {"q": "q"}, {"q": [f"q{i}" for i in range(items)]}))


def _search(m: Manager, i: int) -> str:
    return m.call(f"search{i}", {"query": InputValue(var_id=f"q{i}")}, prefix="Search: ")


def test_an_items_consumer_starts_as_soon_as_its_line_is_complete() -> None:
    m = Manager(capacity=8)
    _expand(m)
    searches = [_search(m, i) for i in range(3)]
    for s in searches:
        m.executor.activate(s, "latency")
    assert m.dispatched() == ["expand"]
    engine = m.engine_of("expand")
    m.executor.on_worker_message(engine, WorkerDelta("expand", "q", "1. red"))
    assert m.dispatched() == ["expand"]  # the line may still grow
    m.executor.on_worker_message(engine, WorkerDelta("expand", "q", " fox\n- blue"))
    assert m.dispatched() == ["expand", "search0"]
    assert m.graph.variables["q0"].value == "red fox"
    (run,) = [r for r in m.runs() if r.request_id == "search0"]
    assert [s.text for s in run.segments if s.kind == "text"] == ["Search: ", "red fox"]
    m.executor.on_worker_message(engine, WorkerDelta("expand", "q", "\n\n"))
    assert m.dispatched() == ["expand", "search0", "search1"]
    m.executor.on_worker_message(engine, WorkerDone("expand", {"q": "1. red fox\n- blue\n\ngreen"}, 5, 5, 0, 0, 0))
    assert m.dispatched() == ["expand", "search0", "search1", "search2"]
    assert [m.graph.variables[f"q{i}"].value for i in range(3)] == ["red fox", "blue", "green"]


def test_the_submitted_event_lists_item_variables_as_outputs() -> None:
    from engine_server.protocol import RequestSubmitted

    m = Manager()
    _expand(m)
    (submitted,) = [e for e in m.events if isinstance(e, RequestSubmitted)]
    assert submitted.outputs == {"q": "q", "q[0]": "q0", "q[1]": "q1", "q[2]": "q2"}


def test_items_the_output_did_not_have_fail_and_so_do_their_consumers() -> None:
    m = Manager(capacity=8)
    _expand(m)
    searches = [_search(m, i) for i in range(3)]
    m.executor.activate(searches[2], "latency")
    m.executor.on_worker_message(m.engine_of("expand"), WorkerDone("expand", {"q": "only\none"}, 5, 5, 0, 0, 0))
    assert m.graph.variables["q2"].state == "failed"
    assert "ended with 2 item(s), not the 3 its items option asks for" in m.graph.variables["q2"].error
    assert m.graph.requests["search2"].state == "failed"
    assert m.graph.variables["q0"].value == "only"


def test_a_failed_producer_keeps_the_items_it_had_resolved() -> None:
    m = Manager(capacity=8)
    _expand(m)
    m.executor.activate(_search(m, 0), "latency")
    m.executor.activate(_search(m, 1), "latency")
    engine = m.engine_of("expand")
    m.executor.on_worker_message(engine, WorkerDelta("expand", "q", "one\ntw"))
    m.executor.on_worker_message(engine, WorkerFailed("expand", "boom"))
    assert m.graph.variables["q0"].state == "done" and m.graph.variables["q1"].state == "failed"
    assert m.graph.requests["search0"].state == "running"


def test_a_call_whose_item_variables_do_not_match_its_items_option_is_refused() -> None:
    m = Manager()
    chunks = [ChunkSpec("output", name="q", sampling=SamplingSpec(items=2))]
    with pytest.raises(ValueError, match="do not match the outputs' items option"):
        m.executor.submit(SubmitCall(m.app, "x", FunctionSpec("x", [ChunkSpec("text", text="Q:"), *chunks]), {}, {"q": "q"}, {"q": ["a"]}))


@pytest.mark.parametrize(
    "line, item", [("  plain  ", "plain"), ("- dash", "dash"), ("* star", "star"), ("12. twelve", "twelve"), ("3) three", "three"), ("-5 degrees", "-5 degrees")]
)
def test_an_item_loses_its_list_marker_and_spaces(line: str, item: str) -> None:
    assert _item_text(line) == item


def test_items_on_a_real_server_start_their_consumers_before_the_producer_ends(connected) -> None:
    expand = SemanticFunction.from_template("it_expand", "Queries:\n{{output:q items=3}}", regex=LINES, max_tokens=20)
    search = SemanticFunction.from_template("it_search", "Search: {{input:query}}\nFound: {{output:hits}}", max_tokens=8)
    queries = expand()
    assert len(queries.items) == 3 and queries.items[1].name == "q[1]"
    hits = [search(query=item) for item in queries.items]
    for h in hits:
        h.activate()
    assert all(isinstance(h.get(timeout=120), str) for h in hits)
    lines = queries.get().split("\n")
    assert [item.get() for item in queries.items] == lines
    events = connected.events()
    finished = next(i for i, e in enumerate(events) if e["type"] == "RequestFinished" and e["request_id"] in _ids(events, "it_expand"))
    first = min(i for i, e in enumerate(events) if e["type"] == "RequestQueued" and e["function"] == "it_search")
    assert first < finished  # the first search was queued while the expansion still ran
    client = parrot_nb.session.require_client()
    prompts = sorted(client.call(GetRequestDetail(r)).prompt for r in _ids(events, "it_search"))
    assert prompts == sorted(f"Search: {line}\nFound: {{{{output:hits}}}}" for line in lines)


def test_an_item_the_output_lacks_fails_with_the_reason(connected) -> None:
    expand = SemanticFunction.from_template("it_short", "Queries:\n{{output:q items=3}}", regex="[a-z]{4}", max_tokens=10)
    queries = expand()
    assert len(queries.items[0].get(timeout=120)) == 4
    with pytest.raises(SemanticVariableError, match=r"ended with 1 item\(s\), not the 3"):
        queries.items[2].get(timeout=120)


def _ids(events: list[dict], function: str) -> set[str]:
    return {e["request_id"] for e in events if e["type"] == "RequestQueued" and e["function"] == function}
