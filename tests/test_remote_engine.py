"""Engines over outside OpenAI-compatible servers (``--engine-url``): here two real parrot-nb
servers serving the tiny model over HTTP, behind a third whose manager schedules across them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, wait_http_healthy

import parrot_nb
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError
from tests.tiny_oracle import expected_text

DOC = "Incident 7: the checkout service timed out on its payment dependency after a deploy. " * 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, list[ServerProcess]]]:
    """Two outside servers and a front server with one remote engine over each; connected to the front."""
    outside: list[ServerProcess] = []
    front = None
    try:
        for name in ("a", "b"):
            outside.append(wait_http_healthy(ServerProcess(tmp_path_factory.mktemp(f"outside-{name}"), "--http-port", "0")))
        urls = [arg for s in outside for arg in ("--engine-url", s.info.http)]
        front = ServerProcess(tmp_path_factory.mktemp("front"), *urls)
        parrot_nb.connect(front.connection_file)
        deadline = time.monotonic() + 60
        while [e.state for e in parrot_nb.status().engines] != ["ready", "ready"]:
            assert time.monotonic() < deadline, f"remote engines did not start: {parrot_nb.status().engines}"
            time.sleep(0.1)
        yield front, outside
    finally:
        parrot_nb.disconnect()
        for server in ([front] if front else []) + outside:
            server.stop()


def test_remote_engines_report_the_outside_model_and_url(fleet):
    front, outside = fleet
    engines = parrot_nb.status().engines
    assert [e.model for e in engines] == ["tiny", "tiny"]
    assert [e.device for e in engines] == [s.info.http for s in outside]


def test_a_chain_runs_server_side_and_gives_what_the_model_gives(fleet):
    draft = SemanticFunction.from_template("r_draft", "Topic {{input:x}}. Draft: {{output:d max_tokens=6 ignore_eos=true}}")
    polish = SemanticFunction.from_template("r_polish", "Draft: {{input:d}}\nBetter: {{output:p max_tokens=6 ignore_eos=true}}")
    with parrot_nb.app("remote-chain"):
        d = draft(x="semantic variables")
        p = polish(d=d)
    assert p.get(timeout=120) == expected_text(polish, d=expected_text(draft, x="semantic variables"))
    assert d.get(timeout=10) == expected_text(draft, x="semantic variables")


def test_requests_sharing_a_prefix_go_to_the_outside_server_that_holds_it(fleet):
    front, outside = fleet
    ask = SemanticFunction.from_template("r_ask", "{{input:doc}}Q: {{input:q}}\nA: {{output:a max_tokens=3}}")
    with parrot_nb.app("remote-affinity"):
        first = ask(doc=DOC, q="what failed?")
        first.get(timeout=120)  # its prefix now sits in one outside server's cache
        rest = [ask(doc=DOC, q=f"question {i}?") for i in range(4)]
        for v in rest:  # at once: without prefix affinity, the least-loaded rule would spread them
            v.activate()
        for v in rest:
            v.get(timeout=120)
    events = front.events()
    ids = [e["request_id"] for e in events if e["type"] == "RequestQueued" and e["function"] == "r_ask"]
    engines = {e["request_id"]: e["engine_id"] for e in events if e["type"] == "RequestDispatched"}
    assert len({engines[i] for i in ids}) == 1  # all on the engine whose server cached the document
    finished = {e["request_id"]: e for e in events if e["type"] == "RequestFinished"}
    # The outside server served the shared document from its block cache, and said so in its usage.
    assert all(finished[i]["cached_tokens"] >= len(DOC.encode()) // 16 * 16 for i in ids[1:])


def test_cancelling_a_call_closes_its_stream_on_the_outside_server(fleet):
    front, outside = fleet
    long = SemanticFunction.from_template("r_long", "Go on: {{output:o max_tokens=3000 ignore_eos=true}}")
    with parrot_nb.app("remote-cancel"):
        v = long()
        v.activate()
        deadline = time.monotonic() + 60

        def streaming() -> bool:  # this call's first token came back (earlier tests' events do not count)
            events = front.events()
            ids = {e["request_id"] for e in events if e["type"] == "RequestQueued" and e["function"] == "r_long"}
            return any(e["type"] == "RequestFirstToken" and e["request_id"] in ids for e in events)

        while not streaming():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert v.cancel()
    deadline = time.monotonic() + 30
    while not any(e["type"] == "RequestCancelled" for s in outside for e in s.events()):
        assert time.monotonic() < deadline, "the outside server never saw the stream close"
        time.sleep(0.1)


def test_an_unreachable_engine_url_fails_calls_with_the_reason(tmp_path: Path):
    server = ServerProcess(tmp_path, "--engine-url", "http://127.0.0.1:9/v1")
    try:
        parrot_nb.connect(server.connection_file)
        f = SemanticFunction.from_template("r_nowhere", "Hi {{output:o max_tokens=2}}")
        with parrot_nb.app("nowhere"):
            with pytest.raises(SemanticVariableError, match="cannot reach an OpenAI-compatible server at http://127.0.0.1:9"):
                f().get(timeout=120)
    finally:
        parrot_nb.disconnect()
        server.stop()
