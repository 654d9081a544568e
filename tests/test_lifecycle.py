"""Lifecycle on a real server: cancel, forget, liveness, ownership, back-pressure, one sampling rulebook."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

import parrot_nb
from conftest import ServerProcess
from engine_server.protocol import (
    Activate,
    Cancel,
    Cancelled,
    ChunkSpec,
    CloseApp,
    ErrorReply,
    FunctionSpec,
    Heartbeat,
    Hello,
    Message,
    OpenApp,
    SamplingSpec,
    ServerStatus,
    Status,
    SubmitCall,
    decode,
    encode,
    new_id,
    pid_alive,
)
from parrot_nb.function import SemanticFunction
from parrot_nb.variable import SemanticVariableError

pytestmark = pytest.mark.slow


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _events(server: ServerProcess, kind: str) -> list[dict]:
    return [e for e in server.events() if e["type"] == kind]


def _running(max_tokens: int = 3000, name: str = "slow"):
    """A long request that is running on an engine when this returns."""
    slow = SemanticFunction.from_template(name, "Go: {{output:o}}", max_tokens=max_tokens, ignore_eos=True)
    out = slow()
    out.activate()
    _wait_for(lambda: out.state == "running", "the request to start")
    return out


class RawClient:
    """A bare DEALER speaking the protocol, for clients that misbehave (go silent, replay, ...)."""

    def __init__(self, server: ServerProcess) -> None:
        self.key = server.info.key_bytes
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(server.info.requests)

    def call(self, msg: Message) -> Message:
        self.sock.send_multipart(encode(msg, self.key))
        assert self.sock.poll(10_000), f"no reply to {msg.TYPE}"
        return decode(self.sock.recv_multipart(), self.key).msg

    def close(self) -> None:
        self.sock.close()


def _spec(name: str = "f", **sampling) -> FunctionSpec:
    return FunctionSpec(name, [ChunkSpec("text", text="Q: "), ChunkSpec("output", name="y", sampling=SamplingSpec(**sampling))])


# The module's server (conftest's shared_server): a silent client is dead after 2 s.
SERVER_ARGS = ("--client-timeout", "2")


def _status() -> ServerStatus:
    return parrot_nb.status()


# --------------------------------------------------------------------------- one rulebook


def test_server_refuses_sampling_that_breaks_the_rules_naming_the_placeholder(shared_server) -> None:
    raw = RawClient(shared_server)
    try:
        app = raw.call(OpenApp("raw")).app_id  # type: ignore[attr-defined]
        call = SubmitCall(app, new_id(), _spec(seed=2**63), {}, {"y": new_id()})
        reply = raw.call(call)
        assert isinstance(reply, ErrorReply) and reply.code == "invalid"
        assert "{{output:y}}" in reply.message and "seed" in reply.message and "2**63-1" in reply.message
    finally:
        raw.close()


def test_more_output_than_the_models_context_fails_naming_the_placeholder(connected) -> None:
    _wait_for(lambda: _status().engines[0].state == "ready", "the engine")
    greedy = SemanticFunction.from_template("greedy", "Q: {{output:answer max_tokens=100000}}")
    with pytest.raises(SemanticVariableError, match=r"\{\{output:answer\}\}: max_tokens=100000 .*\(4096 tokens"):
        greedy().get(timeout=30)


def test_a_message_that_cannot_be_encoded_fails_its_call_and_nothing_else(connected) -> None:
    client = parrot_nb.session.require_client()
    app = client.app_id("encode")
    unsendable = SubmitCall(app, new_id(), _spec(seed=2**70), {}, {"y": new_id()})  # past msgpack's 64 bits
    with pytest.raises(ValueError, match="SubmitCall could not be encoded"):
        client.call(unsendable)
    ok = SemanticFunction.from_template("after_bad", "Q: {{output:y max_tokens=2}}")
    assert isinstance(ok().get(timeout=60), str)


# --------------------------------------------------------------------------- cancel


def test_cancel_fails_the_variable_and_frees_its_engine(connected) -> None:
    out = _running()
    assert out.cancel() is True
    with pytest.raises(SemanticVariableError, match=r"slow\.o: cancelled"):
        out.get(timeout=5)
    _wait_for(lambda: _status().unfinished == 0 and _status().engines[0].running == 0, "the engine to be free")
    cancelled = _events(connected, "RequestCancelled")
    assert cancelled and "cancelled with .cancel()" in cancelled[-1]["reason"]
    # The engine stopped generating it, and says so in its load reports.
    assert cancelled[-1]["request_id"] not in {e["request_id"] for e in _events(connected, "RequestFinished")}
    _wait_for(lambda: _events(connected, "EngineLoad")[-1]["running"] == 0, "the engine to report it idle")


def test_cancel_keeps_the_requests_another_waiting_variable_needs(connected) -> None:
    base = SemanticFunction.from_template("base", "Go: {{output:o}}", max_tokens=400, ignore_eos=True)
    left = SemanticFunction.from_template("left", "L {{input:x}} {{output:y max_tokens=2}}")
    right = SemanticFunction.from_template("right", "R {{input:x}} {{output:y max_tokens=2}}")
    shared = base()
    a, b = left(x=shared), right(x=shared)
    a.activate()
    b.activate()
    _wait_for(lambda: shared.state == "running", "the shared producer to start")
    a.cancel()
    assert isinstance(b.get(timeout=120), str)  # the shared producer kept running for b
    assert shared.get(timeout=5)
    with pytest.raises(SemanticVariableError, match="cancelled"):
        a.get(timeout=5)
    cancelled = {e["request_id"] for e in _events(connected, "RequestCancelled")}
    finished = {e["request_id"] for e in _events(connected, "RequestFinished")}
    queued = {e["request_id"]: e["function"] for e in _events(connected, "RequestQueued")}
    assert {queued[r] for r in finished if r in queued} >= {"base", "right"}
    assert "left" not in {queued.get(r) for r in finished}
    assert not {r for r in cancelled if queued.get(r) in ("base", "right")}


def test_cancel_reply_names_what_it_stopped(shared_server) -> None:
    raw = RawClient(shared_server)
    try:
        app = raw.call(OpenApp("raw-cancel")).app_id  # type: ignore[attr-defined]
        var = new_id()
        request = new_id()
        raw.call(SubmitCall(app, request, _spec(max_tokens=3000, ignore_eos=True), {}, {"y": var}))
        raw.call(Activate(app, var))
        reply = raw.call(Cancel(app, [var], "test"))
        assert isinstance(reply, Cancelled)
        assert (reply.var_ids, reply.request_ids) == ([var], [request])
    finally:
        raw.close()


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal or a kernel, even where this run was started
    with SIGINT ignored (a job started in the background by a shell inherits that)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_interrupting_get_cancels_the_variable(connected, sigint_raises) -> None:
    out = _running(name="interrupted")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            out.get(timeout=60)
    finally:
        timer.cancel()
    with pytest.raises(SemanticVariableError, match=r"cancelled \(interrupted while waiting in \.get\(\)\)"):
        out.get(timeout=5)
    _wait_for(lambda: _status().unfinished == 0, "the server to cancel it")


def test_cancelling_an_awaiting_task_cancels_the_variable(connected) -> None:
    out = _running(name="awaited")

    async def main() -> None:
        task = asyncio.ensure_future(_await(out))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    with pytest.raises(SemanticVariableError, match="awaiting task was cancelled"):
        out.get(timeout=5)
    _wait_for(lambda: _status().unfinished == 0, "the server to cancel it")


async def _await(var) -> str:
    return await var


def test_interrupting_a_cell_that_displays_a_variable_cancels_it(connected, ipython_shell, sigint_raises) -> None:
    out = _running(name="displayed")
    ipython_shell.user_ns["displayed_var"] = out
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        ipython_shell.run_cell("displayed_var")  # streams until done, or until interrupted
    finally:
        timer.cancel()
    with pytest.raises(SemanticVariableError, match=r"cancelled \(the cell displaying it was interrupted\)"):
        out.get(timeout=5)
    _wait_for(lambda: _status().unfinished == 0, "the server to cancel it")


# --------------------------------------------------------------------------- forgetting


def test_dropped_variables_are_freed_on_the_server(tmp_path) -> None:
    server = ServerProcess(tmp_path)
    try:
        parrot_nb.connect(server.connection_file)
        fn = SemanticFunction.from_template("dropped", "Q: {{output:y max_tokens=1}}")
        held = fn()
        held.get(timeout=60)
        for _ in range(30):
            fn().get(timeout=60)  # each result is dropped at once
        gc.collect()
        _wait_for(lambda: _status().requests == 1, "the server to free dropped variables", timeout=20)
        st = _status()
        assert st.variables == 1  # the one still held
        assert st.apps[0].requests == 31 and st.apps[0].done == 31  # the totals stay
        assert held.get() is not None
    finally:
        parrot_nb.disconnect()
        server.stop()


def test_a_dropped_input_of_a_waiting_call_is_kept_until_that_call_runs(connected) -> None:
    produce = SemanticFunction.from_template("produce", "P: {{output:y max_tokens=2}}")
    consume = SemanticFunction.from_template("consume", "C {{input:x}} {{output:y max_tokens=2}}")
    x = produce()
    expected = x.get(timeout=60)
    later = consume(x=x)
    del x
    gc.collect()
    time.sleep(1.5)  # several collections
    direct = consume(x=expected)
    assert later.get(timeout=60) == direct.get(timeout=60)  # the same prompt: its input survived


def test_an_app_block_closes_its_app_once_its_variables_are_done(connected) -> None:
    fn = SemanticFunction.from_template("in_block", "Q: {{output:y max_tokens=3}}")
    with parrot_nb.app("block"):
        v = fn()
        app_id = v.app_id
        assert not [e for e in _events(connected, "AppClosed") if e["app_id"] == app_id]
    # It closes only when its variable settles.
    time.sleep(0.5)
    assert not [e for e in connected.events() if e["type"] == "CloseApp" and e["app_id"] == app_id]
    v.get(timeout=60)
    _wait_for(lambda: [e for e in _events(connected, "AppClosed") if e["app_id"] == app_id], "the app to close")
    with parrot_nb.app("block"):
        again = fn()
    assert again.app_id != app_id  # a new block opens a new application
    assert isinstance(again.get(timeout=60), str)


def test_a_closed_app_refuses_calls(shared_server) -> None:
    raw = RawClient(shared_server)
    try:
        app = raw.call(OpenApp("to-close")).app_id  # type: ignore[attr-defined]
        raw.call(CloseApp(app))
        reply = raw.call(SubmitCall(app, new_id(), _spec(), {}, {"y": new_id()}))
        assert isinstance(reply, ErrorReply) and "is closed" in reply.message
    finally:
        raw.close()


def test_disconnecting_cancels_the_clients_work_and_closes_its_apps(shared_server) -> None:
    parrot_nb.connect(shared_server.connection_file)
    out = _running(name="left_behind")
    app_id = out.app_id
    parrot_nb.disconnect()
    _wait_for(lambda: [e for e in _events(shared_server, "AppClosed") if e["app_id"] == app_id], "the app to close")
    cancelled = [e for e in _events(shared_server, "RequestCancelled") if e["app_id"] == app_id]
    assert cancelled and "disconnected" in cancelled[0]["reason"]


# --------------------------------------------------------------------------- liveness


def test_a_silent_client_is_taken_as_dead_and_its_work_cancelled(shared_server) -> None:
    raw = RawClient(shared_server)
    try:
        client_id = raw.call(Hello("silent")).client_id  # type: ignore[attr-defined]
        app = raw.call(OpenApp("silent-app")).app_id  # type: ignore[attr-defined]
        var = new_id()
        raw.call(SubmitCall(app, new_id(), _spec(max_tokens=3000, ignore_eos=True), {}, {"y": var}))
        raw.call(Activate(app, var))
        _wait_for(lambda: [e for e in _events(shared_server, "ClientGone") if e["client_id"] == client_id], "the client to be dropped", 20)
        gone = [e for e in _events(shared_server, "ClientGone") if e["client_id"] == client_id][0]
        assert "no message from it for more than 2 s" in gone["reason"]
        assert [e for e in _events(shared_server, "RequestCancelled") if e["app_id"] == app]
        # When it speaks again, it is told what happened.
        reply = raw.call(Heartbeat())
        assert isinstance(reply, ErrorReply) and reply.code == "gone" and "%parrot connect" in reply.message
    finally:
        raw.close()


def test_heartbeats_keep_an_idle_client_alive(connected) -> None:
    client = parrot_nb.session.require_client()
    time.sleep(5)  # more than twice the server's 2 s client timeout
    assert not [e for e in _events(connected, "ClientGone") if e["client_id"] == client.client_id]
    fn = SemanticFunction.from_template("after_idle", "Q: {{output:y max_tokens=2}}")
    assert isinstance(fn().get(timeout=60), str)


def _owned_server(tmp_path, owner: int, *args: str) -> ServerProcess:
    return ServerProcess(tmp_path, "--owner-pid", str(owner), "--client-timeout", "2", *args)


def test_a_server_stops_when_its_owner_has_exited_and_no_client_is_left(tmp_path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    server = _owned_server(tmp_path, owner.pid)
    try:
        parrot_nb.connect(server.connection_file)
        owner.kill()
        owner.wait()
        time.sleep(2)
        assert server.proc.poll() is None  # a client is still attached
        parrot_nb.disconnect()
        server.proc.wait(30)
        assert not server.connection_file.exists()
    finally:
        parrot_nb.disconnect()
        owner.kill()
        owner.wait()
        server.stop()


def test_a_server_started_from_a_kernel_goes_with_that_kernel(tmp_path) -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    printed: list[str] = []
    server_pid = None
    try:
        reply = kc.execute_interactive(
            "import os, parrot_nb; print(os.getpid(), parrot_nb.start(model='tiny').info.pid)",
            timeout=180,
            output_hook=lambda msg: printed.append(msg["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        kernel_pid, server_pid = map(int, "".join(printed).split()[-2:])
        assert pid_alive(server_pid)
        os.kill(kernel_pid, signal.SIGKILL)  # the kernel dies without stopping anything
        _wait_for(lambda: not pid_alive(server_pid), "the server to stop", timeout=40)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        if server_pid is not None and pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


# --------------------------------------------------------------------------- back-pressure


def test_calls_past_the_per_app_and_global_limits_are_refused_naming_the_flag(tmp_path) -> None:
    server = ServerProcess(tmp_path, "--max-pending-per-app", "3", "--max-pending", "5")
    raw = RawClient(server)
    try:
        first = raw.call(OpenApp("a")).app_id  # type: ignore[attr-defined]
        second = raw.call(OpenApp("b")).app_id  # type: ignore[attr-defined]
        for _ in range(3):
            assert not isinstance(raw.call(SubmitCall(first, new_id(), _spec(), {}, {"y": new_id()})), ErrorReply)
        refused = raw.call(SubmitCall(first, new_id(), _spec(), {}, {"y": new_id()}))
        assert isinstance(refused, ErrorReply) and refused.code == "overloaded"
        assert "3 unfinished requests" in refused.message and "--max-pending-per-app 3" in refused.message
        for _ in range(2):
            assert not isinstance(raw.call(SubmitCall(second, new_id(), _spec(), {}, {"y": new_id()})), ErrorReply)
        refused = raw.call(SubmitCall(second, new_id(), _spec(), {}, {"y": new_id()}))
        assert isinstance(refused, ErrorReply) and "--max-pending 5" in refused.message
        st = raw.call(Status())
        assert isinstance(st, ServerStatus) and st.unfinished == 5 and st.requests == 5
    finally:
        raw.close()
        server.stop()


def test_stop_ends_a_server_it_started_even_when_that_server_does_not_answer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    client = parrot_nb.start(model="tiny")
    pid = client.info.pid
    try:
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
        parrot_nb.stop(timeout=2)
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_client_reads_a_flood_in_bounded_bites_so_it_keeps_sending_heartbeats() -> None:
    from parrot_nb.client import Client

    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        for i in range(10):
            push.send_multipart([str(i).encode()])
        seen: list[list[bytes]] = []
        _wait_for(lambda: pull.poll(100), "the messages")
        time.sleep(0.2)  # all ten queued at the receiver
        Client._drain(pull, seen.append, limit=3)
        assert [f[0] for f in seen] == [b"0", b"1", b"2"]  # back to the loop, the rest still waiting
        Client._drain(pull, seen.append, limit=100)
        assert len(seen) == 10
    finally:
        push.close(0)
        pull.close(0)
