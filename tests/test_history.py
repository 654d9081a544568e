"""The events and replies pictures draw from, on a real server: submissions, a request's detail, the history."""

from __future__ import annotations

import time

import pytest

import parrot_nb
from engine_server.protocol import GetHistory, GetRequestDetail, History, RequestDetail, ServerStatus, Status
from parrot_nb import SemanticFunction, session
from parrot_nb.client import ServerError

pytestmark = pytest.mark.slow  # a server start

SERVER_ARGS = ("--client-timeout", "2")


def _wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _request_of(server, var: parrot_nb.SemanticVariable) -> str:
    """The id of the request that produces ``var``, from the server's event log (calls return before it is written)."""
    found: list[str] = []

    def logged() -> bool:
        submitted = [e for e in server.events() if e["type"] == "RequestSubmitted"]
        found.extend(e["request_id"] for e in submitted if var.id in e["outputs"].values())
        return bool(found)

    _wait_for(logged, "the call's submission")
    return found[0]


def _chain():
    first = SemanticFunction.from_template("first", "A {{input:x}} B{{output:y}}", max_tokens=3)
    second = SemanticFunction.from_template("second", "C {{input:y}} D{{output:z}}", max_tokens=3)
    return first, second


def test_a_submission_carries_the_dags_shape_inputs_with_their_producers(connected) -> None:
    first, second = _chain()
    with parrot_nb.app("shape"):
        y = first(x="one")
        z = second(y=y)
    _request_of(connected, z)
    submitted = {e["function"]: e for e in connected.events() if e["type"] == "RequestSubmitted" and e["app_name"] == "shape"}
    assert submitted["first"]["inputs"] == {}  # a text input is no edge
    assert submitted["first"]["outputs"] == {"y": y.id}
    assert submitted["second"]["inputs"] == {"y": {"var_id": y.id, "producer": submitted["first"]["request_id"]}}
    assert submitted["second"]["outputs"] == {"z": z.id}


def test_a_done_requests_detail_has_its_filled_prompt_output_and_counts(connected) -> None:
    first, second = _chain()
    y = first(x="one")
    z = second(y=y)
    value = z.get(timeout=60)
    detail = session.require_client().call(GetRequestDetail(_request_of(connected, z)), expect=RequestDetail)
    assert detail.function == "second" and detail.state == "done"
    assert detail.prompt == f"C {y.get()} D{{{{output:z}}}}"
    assert detail.outputs == {"z": value}
    assert detail.engine_id == 0 and detail.output_tokens >= 1 and detail.prompt_tokens >= 1
    assert detail.decode_s > 0 and detail.exec_s >= detail.decode_s and detail.error == ""


def test_a_waiting_requests_prompt_shows_its_inputs_not_computed_yet(connected) -> None:
    first, second = _chain()
    z = second(y=first(x="one"))  # nothing requested: nothing runs
    detail = session.require_client().call(GetRequestDetail(_request_of(connected, z)), expect=RequestDetail)
    assert detail.state == "waiting" and detail.prompt == "C {{input:y}} D{{output:z}}" and detail.outputs == {"z": ""}


def test_a_running_requests_detail_holds_the_output_streamed_so_far(connected) -> None:
    slow = SemanticFunction.from_template("slow", "Go: {{output:o}}", max_tokens=3000, ignore_eos=True)
    out = slow()
    out.activate()
    _wait_for(lambda: len(out.partial) > 20, "some output to stream")
    detail = session.require_client().call(GetRequestDetail(_request_of(connected, out)), expect=RequestDetail)
    out.cancel()
    assert detail.state == "running" and len(detail.outputs["o"]) > 20
    assert out.partial.startswith(detail.outputs["o"][:20])


def test_the_detail_of_an_unknown_request_is_refused_saying_why(connected) -> None:
    with pytest.raises(ServerError, match="unknown request 'nope': it was never submitted, or the server freed it"):
        session.require_client().call(GetRequestDetail("nope"), expect=RequestDetail)


def test_a_client_that_connects_late_gets_the_history_of_an_app(connected) -> None:
    first, second = _chain()
    with parrot_nb.app("late"):
        y = first(x="one")
        z = second(y=y)
    z.get(timeout=60)
    late = connected.client()  # another notebook, connected after the fact
    try:
        history = late.call(GetHistory("late"), expect=History)
    finally:
        late.close()
    assert {e.function for e in history.submitted} == {"first", "second"}
    assert {e.app_name for e in history.submitted} == {"late"}
    assert len(history.finished) == 2 and len(history.activations) == 1
    assert [s.done for s in history.app_stats] == [2]
    steps = [type(e).__name__ for e in history.ordered() if getattr(e, "request_id", None) == _request_of(connected, z)]
    assert steps == ["RequestSubmitted", "RequestQueued", "RequestDispatched", "RequestFirstToken", "RequestFinished"]
    assert history.engines and history.loads  # engine registration and load reports


def test_the_history_forgets_the_requests_the_server_frees(connected) -> None:
    first, _ = _chain()
    client = session.require_client()
    with parrot_nb.app("forgotten"):
        y = first(x="one")
    y.get(timeout=60)
    request_id = _request_of(connected, y)
    assert request_id in {e.request_id for e in client.call(GetHistory("forgotten"), expect=History).submitted}
    del y  # the notebook drops the variable: the server frees the request, and its app (closed)
    _wait_for(lambda: not client.call(GetHistory("forgotten"), expect=History).submitted, "the history to forget it")
    assert "forgotten" not in {a.name for a in client.call(Status(), expect=ServerStatus).apps}
