"""The engine server over real sockets, with real engine worker processes."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

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
from tests.tiny_oracle import expected, expected_text

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
    assert code.get() == expected_text(write, task="add two numbers")


def test_consumer_receives_the_producers_text_as_its_input(connected) -> None:
    write, test = _chain("prompt-check ")
    code = write(task="sort a list")
    tests = test(code=code)
    tests.get(timeout=120)
    assert code.get() == expected_text(write, task="sort a list")
    assert tests.get() == expected_text(test, code=code.get())
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


def _queued_functions(server) -> list[str]:
    return [e["function"] for e in server.events() if e["type"] == "RequestQueued"]


def test_requesting_the_middle_of_a_chain_runs_only_what_it_needs(connected) -> None:
    write = SemanticFunction.from_template("middle_code", "Task: {{input:task}}\nCode: {{output:code}}", max_tokens=6)
    test = SemanticFunction.from_template("middle_tests", "Code: {{input:code}}\nTests: {{output:tests}}", max_tokens=6)
    code = write(task="x")
    tests = test(code=code)
    code.get(timeout=120)
    parrot_nb.status()  # a full round trip: anything the server started would be in its log by now
    assert _queued_functions(connected).count("middle_tests") == 0  # the server's own record, not the client's
    assert tests.get(timeout=120) == expected_text(test, code=expected_text(write, task="x"))
    assert _queued_functions(connected).count("middle_tests") == 1


def test_two_outputs_of_one_call_resolve_separately(connected) -> None:
    fn = SemanticFunction.from_template("two", "A: {{output:a max_tokens=3}}\nB: {{output:b max_tokens=4}}")
    a, b = fn()
    want = expected(fn)
    assert a.get(timeout=120) == want["a"]
    assert b.get(timeout=120) == want["b"]
    ready = {e["var_id"]: e["value"] for e in connected.events() if e["type"] == "VarReady"}
    assert (ready[a.id], ready[b.id]) == (want["a"], want["b"])  # each variable got its own output


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
        out = _running_request(1000)  # seconds of decoding: still running when the kill lands
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
        assert out.get() == expected_text(SemanticFunction.from_template("slow", "Go: {{output:o}}", max_tokens=1000, ignore_eos=True))
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
def test_serve_on_cuda_runs_one_engine_per_visible_gpu_each_pinned_to_its_own(tmp_path, monkeypatch) -> None:
    from conftest import ServerProcess

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    server = ServerProcess(tmp_path, "--device", "cuda")
    try:
        parrot_nb.connect(server.connection_file)
        assert [(e.engine_id, e.gpu) for e in parrot_nb.status().engines] == [(0, "3"), (1, "5")]
    finally:
        parrot_nb.disconnect()
        server.stop()


def test_cpu_engines_split_the_cores_between_them_unless_the_user_set_omp_num_threads(tmp_path, monkeypatch) -> None:
    from conftest import ServerProcess

    def engine_threads(*args: str) -> list[str]:
        server = ServerProcess(tmp_path, "--engines", "2", *args)
        try:
            parrot_nb.connect(server.connection_file)
            pids = [e.pid for e in parrot_nb.status().engines]
            environs = [dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x) for pid in pids]
            return [env.get("OMP_NUM_THREADS", "") for env in environs]
        finally:
            parrot_nb.disconnect()
            server.stop()

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert engine_threads() == [share, share]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads() == ["3", "3"]


def test_gpus_hidden_by_cuda_visible_devices_stay_hidden_from_engines(monkeypatch) -> None:
    from engine_server.server import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []  # set but empty: no GPU at all, not GPU 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1, 3")
    assert visible_gpus() == ["1", "3"]


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


# ---------------------------------------------------------------- what the docs promise, each held by a test


def test_an_engine_that_keeps_crashing_is_left_dead_and_calls_fail_with_the_reason(server_process) -> None:
    from engine_server.server import MAX_RESTARTS, RESTART_WINDOW_S

    from conftest import crash_until_dead

    parrot_nb.connect(server_process.connection_file)
    try:
        started = crash_until_dead(0)
        assert time.monotonic() - started < RESTART_WINDOW_S, "too slow to test the cap: the window slid"
        changes = [e for e in server_process.events() if e["type"] == "EngineChanged" and e["engine_id"] == 0]
        assert [e["state"] for e in changes].count("restarting") == MAX_RESTARTS
        assert changes[-1]["state"] == "dead" and "crashed too often" in changes[-1]["detail"]
        fn = SemanticFunction.from_template("after_crashes", "X: {{output:o max_tokens=2}}")
        with pytest.raises(SemanticVariableError, match="no engine can run requests .*crashed too often"):
            fn().get(timeout=60)
    finally:
        parrot_nb.disconnect()


def _listening(port: int) -> list[str]:
    """The local addresses of this machine's TCP sockets listening on ``port`` (from /proc/net/tcp*)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, _, state = line.split()[1:4]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the socket table of Linux's /proc")
def test_by_default_the_server_listens_on_loopback_only(shared_server) -> None:
    for endpoint in (shared_server.info.requests, shared_server.info.events):
        assert endpoint.startswith("tcp://127.0.0.1:")
        port = int(endpoint.rsplit(":", 1)[1])
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, and no other address or IPv6 socket


def _free_port_pair() -> int:
    import socket

    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two free consecutive ports")


def test_port_sets_the_requests_port_and_events_take_the_next(tmp_path) -> None:
    from conftest import ServerProcess

    port = _free_port_pair()
    server = ServerProcess(tmp_path, "--port", str(port))
    try:
        assert (server.info.requests, server.info.events) == (f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}")
        parrot_nb.connect(server.connection_file)
        fn = SemanticFunction.from_template("on_port", "Port {{input:p}}: {{output:o max_tokens=3}}")
        assert fn(p=port).get(timeout=120) == expected_text(fn, p=port)
    finally:
        parrot_nb.disconnect()
        server.stop()


NOTEBOOK = """
import json, os, sys
import parrot_nb
parrot_nb.connect(sys.argv[1])
fn = parrot_nb.SemanticFunction.from_template("nb_call", "Notebook {{input:who}} asks: {{output:o max_tokens=5}}")
texts = [fn(who=sys.argv[2] + str(i)).get(timeout=120) for i in range(3)]
names = sorted(a.name for a in parrot_nb.status().apps)
print(json.dumps({"pid": os.getpid(), "texts": texts, "apps": names}))
parrot_nb.disconnect()
"""


def test_two_notebooks_on_one_server_each_get_their_own_results(shared_server, tmp_path) -> None:
    import json
    import subprocess
    import sys

    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    procs = {
        who: subprocess.Popen([sys.executable, str(script), str(shared_server.connection_file), who], stdout=subprocess.PIPE, text=True)
        for who in ("alice", "bob")
    }
    outs = {}
    try:
        for who, proc in procs.items():
            stdout, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0
            outs[who] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    fn = SemanticFunction.from_template("nb_call", "Notebook {{input:who}} asks: {{output:o max_tokens=5}}")
    for who, out in outs.items():
        assert out["texts"] == [expected_text(fn, who=f"{who}{i}") for i in range(3)]
    assert outs["alice"]["texts"] != outs["bob"]["texts"]
    # Each process had its own application on the server (named after its pid).
    for out in outs.values():
        assert f"notebook-{out['pid']}" in out["apps"]


def test_a_refused_call_fails_each_of_its_variables_and_their_consumers(connected) -> None:
    # 4096 tokens is the tiny model's context: the server refuses the call when it arrives.
    fn = SemanticFunction.from_template("refused", "A: {{output:a max_tokens=5000}} B: {{output:b max_tokens=2}}")
    a, b = fn()
    after = SemanticFunction.from_template("after_refused", "{{input:x}} {{output:y max_tokens=2}}")(x=b)
    for var in (a, b):
        with pytest.raises(SemanticVariableError, match=r"the server refused the call: .*\{\{output:a\}\}: max_tokens=5000"):
            var.get(timeout=30)
    with pytest.raises(SemanticVariableError):
        after.get(timeout=30)
    assert after.state == "failed"


def test_stop_fails_the_variables_still_waiting_with_the_reason(server_process) -> None:
    parrot_nb.connect(server_process.connection_file)
    try:
        running = _running_request(2000)
        waiting = SemanticFunction.from_template("waits", "{{input:x}} {{output:y max_tokens=2}}")(x=running)
        parrot_nb.stop()
        for var in (running, waiting):
            with pytest.raises(SemanticVariableError, match=r"the engine server \(pid \d+\) was stopped before this finished"):
                var.get(timeout=30)
            assert var.state == "failed"
        assert server_process.proc.wait(30) == 0
    finally:
        parrot_nb.disconnect()


def test_events_report_queueing_execution_first_token_and_latency_consistently(connected) -> None:
    fn = SemanticFunction.from_template("timed", "Timed {{input:i}}: {{output:o max_tokens=24 ignore_eos=true}}")
    var = fn(i=1)
    started = time.monotonic()
    var.get("latency", timeout=120)
    elapsed = time.monotonic() - started
    parrot_nb.status()  # ActivationDone follows the value the client already has: a round trip later it is logged
    events = connected.events()
    (request_id,) = {e["request_id"] for e in events if e["type"] == "RequestQueued" and e["function"] == "timed"}
    finished = next(e for e in events if e["type"] == "RequestFinished" and e["request_id"] == request_id)
    done = next(e for e in events if e["type"] == "ActivationDone" and e["var_id"] == var.id)
    assert finished["output_tokens"] == 24
    assert finished["queue_s"] >= 0
    # The engine's first token comes after it received the request and before it finished it.
    assert 0 < finished["ttft_s"] <= finished["exec_s"]
    # What the user waited for covers the queue and the run, and no more than the client saw.
    assert (done["state"], done["perf"]) == ("done", "latency")
    assert finished["queue_s"] + finished["exec_s"] <= done["latency_s"] + 1e-3
    assert done["latency_s"] <= elapsed
