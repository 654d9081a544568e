"""The engine server over real sockets, with real engine worker processes."""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest
import zmq

from engine_server.protocol import (
    PROTOCOL_VERSION,
    Activate,
    ChunkSpec,
    ErrorReply,
    FunctionSpec,
    InputValue,
    OpenApp,
    SamplingSpec,
    ServerStatus,
    Status,
    SubmitCall,
    VarReady,
    decode,
    encode,
    new_id,
    pid_alive,
    sign,
)
from parrot_nb.client import ServerError
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError

import parrot_nb


def _raw_request(server, frames: list[bytes]) -> list[bytes]:
    """Send raw frames on a fresh DEALER and return the raw reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.info.requests)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "the server did not answer"
        return sock.recv_multipart()
    finally:
        sock.close()


def _error(server, frames: list[bytes]) -> ErrorReply:
    reply = decode(_raw_request(server, frames), server.info.key_bytes).msg
    assert isinstance(reply, ErrorReply)
    return reply


def _server_alive(server) -> bool:
    reply = decode(_raw_request(server, encode(Status(), server.info.key_bytes)), server.info.key_bytes).msg
    return isinstance(reply, ServerStatus)


# ---------------------------------------------------------------- malformed input never kills the server


def test_garbage_frames_get_an_error_reply_and_the_server_stays_up(shared_server) -> None:
    reply = _error(shared_server, [b"not", b"a", b"message"])
    assert reply.code == "malformed" and "expected 2 frames" in reply.message
    assert _server_alive(shared_server)


def test_a_refusal_of_an_undecodable_request_still_names_its_id(shared_server) -> None:
    import msgpack

    payload = msgpack.packb({"v": 999, "type": "Status", "id": "req-42", "body": {}})
    key = shared_server.info.key_bytes
    env = decode(_raw_request(shared_server, [sign(key, payload), payload]), key)
    assert isinstance(env.msg, ErrorReply) and "version 999" in env.msg.message
    assert env.ref == "req-42"


def test_message_signed_with_the_wrong_key_is_refused(shared_server) -> None:
    reply = _error(shared_server, encode(Status(), b"wrong-key"))
    assert "bad signature" in reply.message
    assert _server_alive(shared_server)


def test_a_message_that_is_not_a_request_is_refused_by_name(shared_server) -> None:
    reply = _error(shared_server, encode(VarReady("a", "v", "x"), shared_server.info.key_bytes))
    assert reply.code == "unexpected" and "VarReady" in reply.message


def test_call_reading_an_unknown_variable_is_refused_with_its_name(shared_server) -> None:
    client = shared_server.client()
    try:
        app_id = client.call(OpenApp("t")).app_id
        chunks = [ChunkSpec("input", name="x"), ChunkSpec("output", name="y", sampling=SamplingSpec())]
        call = SubmitCall(app_id, new_id(), FunctionSpec("f", chunks), {"x": InputValue(var_id="nope")}, {"y": new_id()})
        with pytest.raises(ServerError, match="input 'x' refers to unknown variable 'nope'"):
            client.call(call)
    finally:
        client.close()


def test_activating_an_unknown_variable_is_refused(shared_server) -> None:
    client = shared_server.client()
    try:
        with pytest.raises(ServerError, match="unknown variable 'ghost'"):
            client.call(Activate("app", "ghost"))
    finally:
        client.close()


def test_connection_file_is_private(shared_server) -> None:
    assert stat.S_IMODE(shared_server.connection_file.stat().st_mode) == 0o600


# ---------------------------------------------------------------- replay protection


def _apps_named(client, name: str) -> int:
    return sum(a.name == name for a in client.call(Status()).apps)


def test_a_replayed_request_is_refused_and_does_not_run_again(shared_server) -> None:
    client = shared_server.client()
    try:
        sent: list[list[bytes]] = []
        encode_one = client._sender.encode  # capture what the client puts on the wire

        def recording(msg, **kwargs):
            frames = encode_one(msg, **kwargs)
            sent.append(frames)
            return frames

        client._sender.encode = recording
        client.call(OpenApp("replay-me"))
        (captured,) = [f for f in sent if isinstance(decode(f, shared_server.info.key_bytes).msg, OpenApp)]
        reply = _error(shared_server, captured)  # the same bytes again, from another socket
        assert reply.code == "replayed" and "replayed message" in reply.message
        assert _apps_named(client, "replay-me") == 1
    finally:
        client.close()


def test_a_request_with_a_stale_timestamp_is_refused(shared_server) -> None:
    import msgpack

    key = shared_server.info.key_bytes
    payload = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "OpenApp", "id": new_id(), "ref": None, "session": new_id(), "seq": 1,
         "t": time.time() - 3600, "body": {"name": "stale"}}  # fmt: skip
    )
    reply = _error(shared_server, [sign(key, payload), payload])
    assert reply.code == "replayed" and "outside the accepted window" in reply.message
    assert "check the clocks" in reply.message
    client = shared_server.client()
    try:
        assert _apps_named(client, "stale") == 0
    finally:
        client.close()


# ---------------------------------------------------------------- DAG execution


def _chain(prefix: str = "") -> tuple[SemanticFunction, SemanticFunction]:
    write = SemanticFunction.from_template("write_code", prefix + "Task: {{input:task}}\nCode: {{output:code}}", max_tokens=6)
    test = SemanticFunction.from_template("write_tests", "Code: {{input:code}}\nTests: {{output:tests}}", max_tokens=6)
    return write, test


def test_consumer_starts_on_the_server_when_its_producer_finishes(connected) -> None:
    write, test = _chain("dependency ")
    code = write(task="add two numbers")
    tests = test(code=code)
    assert isinstance(tests.get(timeout=120), str)

    events = connected.events()
    producer_done = next(i for i, e in enumerate(events) if e["type"] == "WorkerDone" and code.id in e["outputs"])
    consumer_queued = next(
        i for i, e in enumerate(events) if e["type"] == "RequestQueued" and e["function"] == "write_tests" and i > producer_done
    )
    between = events[producer_done + 1 : consumer_queued + 1]
    # Nothing came from a client between the producer's result and the consumer's start.
    assert [e for e in between if e["dir"] == "in"] == []
    # Only what the producer's result publishes lies between: its totals and value, then the consumer's start.
    assert {e["type"] for e in between} <= {"RequestFinished", "AppStats", "VarReady", "ActivationDone", "RequestQueued"}
    assert code.get() != "" or code.state == "done"


def test_consumer_receives_the_producers_text_as_its_input(connected) -> None:
    write, test = _chain("prompt-check ")
    code = write(task="sort a list")
    tests = test(code=code)
    tests.get(timeout=120)
    dispatched = [e for e in connected.events() if e["type"] == "RequestFinished"]
    assert dispatched  # both ran
    # The consumer's prompt is "Code: <producer output>\nTests: ", so its prompt token count is exact.
    consumer = SemanticFunction.from_template("echo", "Code: {{input:code}}\nTests: {{output:tests}}", max_tokens=6)
    direct = consumer(code=code.get())
    direct.get(timeout=120)
    finished = {e["request_id"]: e for e in connected.events() if e["type"] == "RequestFinished"}
    queued = {e["request_id"]: e["function"] for e in connected.events() if e["type"] == "RequestQueued"}
    chained = [r for r, f in queued.items() if f == "write_tests" and r in finished][-1]
    echoed = [r for r, f in queued.items() if f == "echo" and r in finished][-1]
    assert finished[chained]["prompt_tokens"] == finished[echoed]["prompt_tokens"]
    assert tests.get() == direct.get()  # greedy on the same prompt: the same text


def test_nothing_runs_until_a_variable_is_requested(connected) -> None:
    write, test = _chain("lazy ")
    code = write(task="never requested")
    tests = test(code=code)
    parrot_nb.status()  # a full round trip after both submissions
    events = connected.events()
    ours = {v.id for v in (code, tests)}
    submitted = {e["request_id"] for e in events if e["type"] == "SubmitCall" and set(e["outputs"].values()) & ours}
    assert len(submitted) == 2
    assert not [e for e in events if e["type"] == "RequestQueued" and e["request_id"] in submitted]
    assert (code.state, tests.state) == ("pending", "pending")


def test_requesting_the_middle_of_a_chain_runs_only_what_it_needs(connected) -> None:
    write, test = _chain("middle ")
    code = write(task="x")
    tests = test(code=code)
    code.get(timeout=120)
    parrot_nb.status()
    assert tests.state == "pending"
    assert tests.get(timeout=120) is not None


def test_two_outputs_of_one_call_resolve_separately(connected) -> None:
    fn = SemanticFunction.from_template("two", "A: {{output:a max_tokens=3}}\nB: {{output:b max_tokens=4}}")
    a, b = fn()
    assert (a.get(timeout=120), b.get(timeout=120)) == (a.get(), b.get())
    assert a.id != b.id


def test_an_engine_error_fails_the_variable_and_everything_downstream(connected) -> None:
    write, test = _chain("too-long ")
    code = write(task="x" * 5000)  # longer than the tiny model's 4096-token context
    tests = test(code=code)
    with pytest.raises(SemanticVariableError, match="too long"):
        code.get(timeout=120)
    with pytest.raises(SemanticVariableError, match="input variable 'code' failed"):
        tests.get(timeout=120)


def test_a_call_on_a_failed_variable_fails_at_once(connected) -> None:
    write, test = _chain("after-fail ")
    code = write(task="y" * 5000)
    with pytest.raises(SemanticVariableError):
        code.get(timeout=120)
    late = test(code=code)
    with pytest.raises(SemanticVariableError, match="input variable 'code' failed"):
        late.get(timeout=30)


# ---------------------------------------------------------------- crashes lose nothing


def _running_request(max_tokens: int):
    """A long request that is running on an engine when this returns."""
    slow = SemanticFunction.from_template("slow", "Go: {{output:o}}", max_tokens=max_tokens, ignore_eos=True)
    out = slow()
    out.activate()
    deadline = time.monotonic() + 60
    while out.state != "running":
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    return out


def test_a_killed_engine_worker_is_restarted_and_its_request_still_completes(server_process) -> None:
    parrot_nb.connect(server_process.connection_file)
    try:
        out = _running_request(400)
        engine_pid = parrot_nb.status().engines[0].pid
        os.kill(engine_pid, signal.SIGKILL)
        text = out.get(timeout=180)
        assert len(text) > 0
        st = parrot_nb.status()
        assert st.engines[0].pid != engine_pid and st.engines[0].state == "ready"
        changes = [e for e in server_process.events() if e["type"] == "EngineChanged"]
        assert any(e["state"] == "restarting" and str(engine_pid) in e["detail"] for e in changes)
        dispatches = [e for e in server_process.events() if e["type"] == "RequestDispatched"]
        assert len(dispatches) == 2  # the first attempt, and the retry on the restarted engine
    finally:
        parrot_nb.disconnect()


def test_a_dead_server_fails_waiting_variables_with_a_clear_error(server_process) -> None:
    parrot_nb.connect(server_process.connection_file)
    try:
        out = _running_request(2000)
        server_process.proc.kill()
        server_process.proc.wait()
        with pytest.raises(SemanticVariableError, match="engine server .* has exited"):
            out.get(timeout=60)
        assert parrot_nb.session.current_client() is None  # so `%parrot start` may start a new one
        with pytest.raises(parrot_nb.NotConnectedError):
            SemanticFunction.from_template("after", "{{output:o}}")()
    finally:
        parrot_nb.disconnect()


def test_engine_workers_die_with_a_killed_server_even_mid_request(server_process) -> None:
    parrot_nb.connect(server_process.connection_file)
    try:
        _running_request(2000)
        engine_pid = parrot_nb.status().engines[0].pid
        server_process.proc.kill()
        server_process.proc.wait()
    finally:
        parrot_nb.disconnect()
    deadline = time.monotonic() + 30
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine_pid)


def test_shutdown_removes_the_connection_file_and_stops_the_engines(server_process) -> None:
    parrot_nb.connect(server_process.connection_file)
    engine_pid = parrot_nb.status().engines[0].pid
    parrot_nb.stop()
    server_process.proc.wait(30)
    assert not server_process.connection_file.exists()
    deadline = time.monotonic() + 30
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine_pid)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_engine_that_cannot_start_fails_requests_with_its_reason(tmp_path) -> None:
    from conftest import ServerProcess

    server = ServerProcess(tmp_path, "--device", "cuda")
    try:
        parrot_nb.connect(server.connection_file)
        fn = SemanticFunction.from_template("f", "X: {{output:o max_tokens=2}}")
        with pytest.raises(SemanticVariableError, match="engine 0 could not start: RuntimeError: --device cuda, but torch"):
            fn().get(timeout=120)
        assert parrot_nb.status().engines[0].state == "dead"
        restarts = [e for e in server.events() if e["type"] == "EngineChanged" and e["state"] == "restarting"]
        assert restarts == []  # it would fail the same way again
    finally:
        parrot_nb.disconnect()
        server.stop()
