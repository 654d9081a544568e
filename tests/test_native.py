"""Native steps: Python functions as DAG nodes, run in the server's tool workers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from types import ModuleType

import pytest

import parrot_nb
from engine_server.protocol import GetRequestDetail
from engine_server.server import ServerConfig
from parrot_nb.function import SemanticFunction
from parrot_nb.native import NativeFunction, native
from parrot_nb.variable import SemanticVariableError
from tests.conftest import ServerProcess
from tests.tiny_oracle import expected_text

# One tool worker, so a crash or a timeout is followed by a call on the worker that replaced it.
SERVER_ARGS = ("--tool-workers", "1")


@native
def shout(text: str, times: int = 2) -> str:
    return " ".join([text.upper()] * times)


@native
def split_words(text: str) -> list[str]:
    return text.split()


@native
def describe(items: list, label: str = "items") -> dict:
    # Receives the upstream list parsed, not its JSON text.
    return {"label": label, "type": type(items).__name__, "count": len(items)}


@native
def fails(text: str) -> str:
    raise ValueError(f"no good: {text!r}")


@native
def crashes(text: str) -> str:
    os.kill(os.getpid(), signal.SIGKILL)
    return text


@native(timeout=1)
def sleeps(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@native(memory_mb=64)
def hungry(mb: int) -> int:
    block = bytearray(mb * 2**20)
    return len(block)


@native
def returns_object(text: str) -> object:
    return object()


@native
def pid(text: str) -> int:
    return os.getpid()


def _events(server: ServerProcess, kind: str) -> list[dict]:
    return [e for e in server.events() if e["type"] == kind]


def test_a_chain_llm_python_llm_runs_on_the_server_without_a_client_round_trip(connected) -> None:
    write = SemanticFunction.from_template("n_write", "Topic: {{input:topic}}\nDraft: {{output:draft}}", max_tokens=5)
    review = SemanticFunction.from_template("n_review", "Loud: {{input:loud}}\nReview: {{output:review}}", max_tokens=5)
    draft = write(topic="parrots")
    loud = shout(text=draft, times=1)
    verdict = review(loud=loud)
    assert verdict.get(timeout=120) == expected_text(review, loud=expected_text(write, topic="parrots").upper())
    assert loud.get() == draft.get().upper()

    events = connected.events()
    ids = {e["function"]: e["request_id"] for e in events if e["type"] == "RequestQueued"}
    start = next(i for i, e in enumerate(events) if e["type"] == "WorkerDone" and draft.id in e["outputs"])
    end = next(i for i, e in enumerate(events) if e["type"] == "RequestQueued" and e["request_id"] == ids["n_review"])
    between = events[start:end]
    # The producer's result started the native step, whose result started the consumer: no client message between.
    assert [e for e in between if e["dir"] == "in"] == []
    assert [e["type"] for e in between if e["type"] in ("NativeDone", "RequestDispatched")] == [
        "RequestDispatched", "NativeDone",
    ]  # fmt: skip
    dispatched = next(e for e in between if e["type"] == "RequestDispatched")
    assert dispatched["request_id"] == ids["shout"] and dispatched["engine_id"] == -1


def test_a_native_step_can_feed_from_constants_alone(connected) -> None:
    assert shout(text="hi", times=3).get(timeout=60) == "HI HI HI"


def test_a_json_value_travels_parsed_to_python_and_as_text_to_a_prompt(connected) -> None:
    words = split_words(text="one two three")
    assert words.get(timeout=60) == ["one", "two", "three"]
    assert words.text == '["one", "two", "three"]'
    summary = describe(items=words, label="words")
    assert summary.get(timeout=60) == {"label": "words", "type": "list", "count": 3}

    prompt = SemanticFunction.from_template("n_json", "Words: {{input:w}}\nNext: {{output:next}}", max_tokens=3)
    nxt = prompt(w=words)
    assert nxt.get(timeout=120) == expected_text(prompt, w='["one", "two", "three"]')
    request_id = next(e["request_id"] for e in _events(connected, "RequestQueued") if e["function"] == "n_json")
    detail = parrot_nb.session.require_client().call(GetRequestDetail(request_id))
    assert detail.prompt == 'Words: ["one", "two", "three"]\nNext: {{output:next}}'


def test_an_exception_fails_the_step_with_its_traceback_and_downstream_with_its_cause(connected) -> None:
    bad = fails(text="x")
    after = shout(text=bad)
    with pytest.raises(SemanticVariableError) as info:
        bad.get(timeout=60)
    message = str(info.value)
    assert "native step 'fails' raised ValueError: no good: 'x'" in message
    assert "Traceback" in message and 'raise ValueError(f"no good: {text!r}")' in message
    assert "tool_worker.py" not in message  # the user's frames, not ours
    with pytest.raises(SemanticVariableError, match="input variable 'value' failed: native step 'fails' raised"):
        after.get(timeout=60)


def test_a_crashed_tool_worker_fails_its_step_and_is_replaced(connected) -> None:
    before = pid(text="").get(timeout=60)
    with pytest.raises(SemanticVariableError, match=r"tool worker process \d+ died while running it \(killed by SIGKILL\)"):
        crashes(text="x").get(timeout=60)
    after = pid(text="").get(timeout=60)
    assert after != before  # a new worker ran it


def test_a_step_past_its_time_limit_is_stopped_and_the_next_one_runs(connected) -> None:
    started = time.monotonic()
    with pytest.raises(SemanticVariableError, match=r"ran for more than 1 s, its time limit"):
        sleeps(seconds=60).get(timeout=60)
    assert time.monotonic() - started < 50  # stopped, not waited for
    assert sleeps(seconds=0).get(timeout=60) == "woke"


def test_a_step_past_its_memory_limit_gets_a_memory_error(connected) -> None:
    with pytest.raises(SemanticVariableError, match="ran out of memory: it may allocate at most 64 MB"):
        hungry(mb=1024).get(timeout=60)
    assert hungry(mb=8).get(timeout=60) == 8 * 2**20


def test_a_result_that_is_not_json_fails_clearly(connected) -> None:
    with pytest.raises(SemanticVariableError, match="returned a object, which is neither a str nor JSON"):
        returns_object(text="x").get(timeout=60)


def test_cancelling_a_running_step_stops_its_worker(connected) -> None:
    @native(timeout=120)
    def long_sleep(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    before = pid(text="").get(timeout=60)
    var = long_sleep(seconds=100)
    var.activate()
    deadline = time.monotonic() + 30
    while not [e for e in _events(connected, "RequestDispatched") if e["engine_id"] == -1 and e["request_id"] in _ids(connected, "long_sleep")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert var.cancel("test")
    cancelled = _wait_for(connected, "RequestCancelled", lambda e: e["request_id"] in _ids(connected, "long_sleep"))
    assert "cancelled: test" in cancelled["reason"]
    assert pid(text="").get(timeout=60) != before  # the sleeping worker was killed and replaced


def _ids(server: ServerProcess, function: str) -> set[str]:
    return {e["request_id"] for e in _events(server, "RequestQueued") if e["function"] == function}


def _wait_for(server: ServerProcess, kind: str, match) -> dict:
    deadline = time.monotonic() + 30
    while True:
        found = [e for e in _events(server, kind) if match(e)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {kind} event"
        time.sleep(0.05)


def test_steps_run_in_parallel_on_the_pool(tmp_path) -> None:
    server = ServerProcess(tmp_path, "--tool-workers", "2")
    try:
        parrot_nb.connect(server.connection_file)

        @native
        def wait_a_bit(tag: str) -> float:
            time.sleep(1.0)
            return time.time()

        a, b = wait_a_bit(tag="a"), wait_a_bit(tag="b")
        a.activate(), b.activate()  # both requested before either is waited for
        ends = sorted([a.get(timeout=60), b.get(timeout=60)])
        done = [e for e in server.events() if e["type"] == "NativeDone"]
        starts = sorted(e["t"] - e["run_s"] for e in done)
        # Both started before either ended: two workers ran them side by side.
        assert len(done) == 2 and starts[1] < ends[0]
    finally:
        parrot_nb.disconnect()
        server.stop()


def test_a_server_started_with_no_native_refuses_them_saying_why(tmp_path) -> None:
    server = ServerProcess(tmp_path, "--no-native")
    try:
        parrot_nb.connect(server.connection_file)
        with pytest.raises(SemanticVariableError, match="native steps run Python code.*--no-native"):
            shout(text="x").get(timeout=60)
    finally:
        parrot_nb.disconnect()
        server.stop()


def test_native_steps_are_off_beyond_loopback_unless_allowed() -> None:
    assert ServerConfig(ip="127.0.0.1").native_allowed
    assert not ServerConfig(ip="0.0.0.0").native_allowed
    assert ServerConfig(ip="0.0.0.0", allow_native=True).native_allowed
    assert not ServerConfig(ip="127.0.0.1", allow_native=False).native_allowed


def test_arguments_are_checked_when_the_step_is_called(connected) -> None:
    with pytest.raises(TypeError, match=r"shout\(\): missing a required argument: 'text'"):
        shout()
    with pytest.raises(TypeError, match="holds semantic variables inside a list"):
        describe(items=[shout(text="a")])
    with pytest.raises(TypeError, match="cannot be sent to the server"):
        shout(text="x", times=threading.Lock())


def test_a_definition_with_bad_settings_is_refused() -> None:
    with pytest.raises(TypeError, match="every argument must have a name"):
        native(lambda *texts: "")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        native(timeout=0)(lambda text: text)
    with pytest.raises(ValueError, match="memory_mb must be a positive whole number"):
        native(memory_mb=1.5)(lambda text: text)
    assert isinstance(shout, NativeFunction) and shout.fn("a", 1) == "A"


def test_importing_parrot_nb_native_loads_no_torch() -> None:
    import subprocess
    import sys

    code = "import parrot_nb, parrot_nb.native, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_json_results_keep_their_values(connected) -> None:
    @native
    def numbers(n: int) -> dict:
        return {"n": n, "half": n / 2, "ok": True, "none": None, "text": "é"}

    value = numbers(n=3)
    assert value.get(timeout=60) == {"n": 3, "half": 1.5, "ok": True, "none": None, "text": "é"}
    assert json.loads(value.text) == value.get()


class _SlowToPickle:
    def __reduce__(self):
        time.sleep(0.05)
        return (int, ())


def _helper_module(name: str, source: str, tmp_path, monkeypatch) -> ModuleType:
    """A module beside the notebook, imported here: in a temporary directory the server's workers do not see."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # gone again after the test
    spec.loader.exec_module(module)
    return module


def test_a_step_may_use_a_helper_module_the_server_cannot_import(connected, tmp_path, monkeypatch) -> None:
    shop_helpers = _helper_module("shop_helpers", (
        "class Counter:\n"
        "    def __init__(self, text):\n"
        "        self.words = text.split()\n"
        "    def report(self):\n"
        "        return f'{len(self.words)} words, longest {max(self.words, key=len)}'\n"
    ), tmp_path, monkeypatch)  # fmt: skip

    @native
    def count(text: str, pause: object = None) -> str:
        return shop_helpers.Counter(text).report()

    assert count(text="a parrot repeats everything").get(timeout=60) == "4 words, longest everything"
    # Records of a pipeline call steps from several threads at once.
    texts = [" ".join(["word"] * i + ["parrot"]) for i in range(1, 9)]
    values: list = [None] * len(texts)

    def call(i: int) -> None:
        values[i] = count(text=texts[i], pause=_SlowToPickle())  # overlapping calls

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [v.get(timeout=60) for v in values] == [f"{i + 1} words, longest parrot" for i in range(1, 9)]


def test_a_traceback_shows_the_lines_of_a_helper_module_sent_by_value(connected, tmp_path, monkeypatch) -> None:
    broken_helpers = _helper_module("broken_helpers", (
        "def check(text):\n"
        "    if not text.isdigit():\n"
        "        raise ValueError(f'not a number: {text!r}')\n"
        "    return text\n"
    ), tmp_path, monkeypatch)  # fmt: skip

    @native
    def parse(text: str) -> str:
        return broken_helpers.check(text)

    with pytest.raises(SemanticVariableError) as info:
        parse(text="twelve").get(timeout=60)
    message = str(info.value)
    assert "broken_helpers.py\", line 3, in check" in message
    assert "raise ValueError(f'not a number: {text!r}')" in message
    assert "return broken_helpers.check(text)" in message  # the step's own frame, from this file
