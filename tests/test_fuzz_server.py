"""A live server under fuzzing: every bad frame is answered with ErrorReply (or dropped), logged, and survived.

One real server (``--model tiny``) for the module; a raw DEALER sends what no
client would. After each example the server must have answered exactly once
(a request socket never leaves a caller waiting), said what was wrong, logged
the refusal, and still answer a normal request.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from fuzz_strategies import FUZZ, envelopes, messages, msgpack_values, raw_frames, signed, stamped, value_of, wrong_bodies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_server.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Activate,
    AppOpened,
    Cancel,
    CloseApp,
    ErrorReply,
    Forget,
    GetHistory,
    GetRequestDetail,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    OpenApp,
    ServerStatus,
    Shutdown,
    Status,
    SubmitCall,
    SyncEvents,
    Welcome,
    WorkerStartFailed,
    decode,
    encode,
    message_types,
    sign,
)

pytestmark = pytest.mark.slow  # a server start, then a few hundred round trips

REPLY_TIMEOUT_MS = 5_000
REQUESTS = (
    Hello, SyncEvents, OpenApp, SubmitCall, Activate, Cancel, Forget, CloseApp, Heartbeat, Goodbye, Status, GetHistory,
    GetRequestDetail,
)  # all but Shutdown
NOT_REQUESTS = [cls for cls in message_types().values() if cls not in (*REQUESTS, Shutdown)]
# One socket serves all of a test's examples: the function-scoped fixture is meant to be shared.
LIVE = settings(FUZZ, max_examples=60, suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.function_scoped_fixture])


class Raw:
    """A DEALER that sends raw frames to a server and reads its log."""

    def __init__(self, server, endpoint: str) -> None:
        self.server = server
        self.key = server.info.key_bytes
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.log_seen = server.log.stat().st_size

    def ask(self, frames: list[bytes]) -> Message:
        """Send frames; the server's one reply, decoded."""
        self.sock.send_multipart(frames)
        assert self.sock.poll(REPLY_TIMEOUT_MS), f"the server did not answer {_brief(frames)}"
        reply = decode(self.sock.recv_multipart(), self.key).msg
        assert not self.sock.poll(0), "the server answered more than once"
        return reply

    def refused(self, frames: list[bytes], code: str) -> ErrorReply:
        reply = self.ask(frames)
        assert isinstance(reply, ErrorReply), f"{_brief(frames)} was accepted: {reply}"
        assert reply.code == code, reply
        return reply

    def new_log(self) -> str:
        """What the server logged since the last call."""
        with open(self.server.log, "rb") as f:
            f.seek(self.log_seen)
            text = f.read().decode(errors="replace")
        self.log_seen += len(text.encode(errors="replace"))
        return text

    def close(self) -> None:
        self.sock.close()


def _brief(frames: list[bytes]) -> str:
    return repr([f[:60] for f in frames])[:300]


@pytest.fixture
def raw(shared_server) -> Iterator[Raw]:
    client = Raw(shared_server, shared_server.info.requests)
    yield client
    client.close()
    assert_alive(shared_server)
    assert "Traceback" not in shared_server.log.read_text(), "a bad frame reached the last-resort handler"


def assert_alive(server) -> None:
    assert server.proc.poll() is None, "the server exited"
    fresh = Raw(server, server.info.requests)
    try:
        assert isinstance(fresh.ask(encode(Status(), fresh.key)), ServerStatus)
    finally:
        fresh.close()


# ---------------------------------------------------------------- (a) random frames


@LIVE
@given(raw_frames)
def test_random_frames_are_refused_and_logged(raw: Raw, frames: list[bytes]) -> None:
    if not frames:
        frames = [b""]  # a DEALER cannot send zero frames
    reply = raw.refused(frames, "malformed")
    assert reply.message.startswith("malformed request: ")
    assert "malformed request" in raw.new_log()


@LIVE
@given(msgpack_values)
def test_random_signed_payloads_are_refused_and_logged(raw: Raw, value: object) -> None:
    reply = raw.refused(signed(value, raw.key), "malformed")
    assert re.search("must be a msgpack map|protocol version", reply.message)
    assert "malformed request" in raw.new_log()


@LIVE
@given(envelopes())
def test_random_envelopes_are_refused_or_answered(raw: Raw, envelope: dict) -> None:
    reply = raw.ask(signed(envelope, raw.key))
    if isinstance(reply, ErrorReply):
        assert reply.code in ("malformed", "unexpected", "invalid"), reply
        assert re.search(r"refused|malformed", raw.new_log())


# ---------------------------------------------------------------- (b) signed but wrong


@LIVE
@given(messages(NOT_REQUESTS))
def test_messages_that_are_not_requests_are_refused_by_name(raw: Raw, msg: Message) -> None:
    reply = raw.refused(encode(msg, raw.key), "unexpected")
    assert f"{msg.TYPE} is not a request" in reply.message
    assert f"refused {msg.TYPE}: not a request" in raw.new_log()


@LIVE
@given(st.sampled_from(REQUESTS).flatmap(lambda cls: st.tuples(st.just(cls), wrong_bodies(cls))))
def test_requests_with_wrong_bodies_are_refused_by_field(raw: Raw, case: tuple[type[Message], dict]) -> None:
    cls, body = case
    reply = raw.ask(signed(stamped({"v": PROTOCOL_VERSION, "type": cls.TYPE, "id": "x", "body": body}), raw.key))
    if isinstance(reply, ErrorReply):
        assert reply.code in ("malformed", "invalid"), reply  # never "internal": that would be a server bug
        if reply.code == "malformed":
            assert reply.message.startswith(f"malformed request: {cls.TYPE}")
        assert f"{cls.TYPE}" in raw.new_log()


@pytest.fixture(scope="module")
def app_id(shared_server) -> str:
    client = Raw(shared_server, shared_server.info.requests)
    try:
        reply = client.ask(encode(OpenApp("fuzz"), client.key))
    finally:
        client.close()
    assert isinstance(reply, AppOpened)
    return reply.app_id


@LIVE
@given(value_of(SubmitCall), st.booleans())
def test_random_well_formed_calls_are_accepted_or_refused_as_invalid(
    raw: Raw, app_id: str, call: SubmitCall, in_open_app: bool
) -> None:
    # In an app that exists, so the checks past the app id are reached too. Nothing is
    # activated: the calls only join the DAG, no engine runs them.
    if in_open_app:
        call.app_id = app_id
    reply = raw.ask(encode(call, raw.key))
    if isinstance(reply, ErrorReply):
        assert reply.code == "invalid", reply
        assert "refused SubmitCall" in raw.new_log()


@LIVE
@given(value_of(Activate))
def test_activating_a_random_variable_is_refused_as_invalid(raw: Raw, msg: Activate) -> None:
    reply = raw.refused(encode(msg, raw.key), "invalid")
    assert "unknown variable" in reply.message


# ---------------------------------------------------------------- (c) versions


@LIVE
@given(msgpack_values | st.sampled_from([0, 2, -1, True, 1.0, "1"]), st.text(min_size=1, max_size=12))
def test_other_protocol_versions_are_refused_with_the_request_id(raw: Raw, v: object, msg_id: str) -> None:
    if type(v) is int and v == PROTOCOL_VERSION:
        return
    payload = msgpack.packb({"v": v, "type": "Status", "id": msg_id, "ref": None, "body": {}}, use_bin_type=True)
    raw.sock.send_multipart([encode(Status(), raw.key)[0], payload])  # a signature, but not this payload's
    raw.sock.send_multipart(signed({"v": v, "type": "Status", "id": msg_id, "ref": None, "body": {}}, raw.key))
    for expected in ("bad signature", "protocol version"):
        assert raw.sock.poll(REPLY_TIMEOUT_MS), "the server did not answer"
        env = decode(raw.sock.recv_multipart(), raw.key)
        assert isinstance(env.msg, ErrorReply) and expected in env.msg.message
        assert env.ref == msg_id  # the refusal names the request, so its caller fails at once
    assert raw.new_log().count("malformed request") == 2


# ---------------------------------------------------------------- (d) huge sizes


def test_a_frame_over_the_size_limit_is_dropped_and_the_server_lives(raw: Raw) -> None:
    frames = encode(Hello("x" * (MAX_MESSAGE_BYTES + 1)), raw.key)
    raw.sock.send_multipart(frames)
    assert not raw.sock.poll(2_000), "a frame over MAX_MESSAGE_BYTES reached the server"
    # (The fixture then checks that the server still answers.)


def test_a_large_request_within_the_limit_is_answered(raw: Raw) -> None:
    assert isinstance(raw.ask(encode(Hello("x" * (8 * 2**20)), raw.key)), Welcome)


@pytest.mark.parametrize("field", ["type", "v", "body"])
def test_a_huge_wrong_value_gets_a_short_refusal(raw: Raw, field: str) -> None:
    envelope = {"v": PROTOCOL_VERSION, "type": "Status", "id": "x", "body": {}, field: "z" * (16 * 2**20)}
    reply = raw.refused(signed(envelope, raw.key), "malformed")
    assert len(reply.message) < 400
    assert max(map(len, raw.new_log().splitlines())) < 500


def test_deep_nesting_is_refused_by_name(raw: Raw) -> None:
    payload = b"\x91" * 100_000 + b"\xc0"
    reply = raw.refused([sign(raw.key, payload), payload], "malformed")
    assert "nested too deeply" in reply.message


# ---------------------------------------------------------------- the workers socket


def _worker_endpoint(server) -> str:
    """The workers socket is not in the connection file; its engine's command line names it."""
    client = Raw(server, server.info.requests)
    try:
        status = client.ask(encode(Status(), client.key))
    finally:
        client.close()
    assert isinstance(status, ServerStatus)
    argv = Path(f"/proc/{status.engines[0].pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"--endpoint") + 1].decode()


@pytest.fixture
def worker_socket(shared_server) -> Iterator[Raw]:
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds the workers socket through /proc")
    sock = Raw(shared_server, _worker_endpoint(shared_server))
    yield sock
    sock.close()
    assert_alive(shared_server)
    assert "Traceback" not in shared_server.log.read_text()


def _wait_for_log(sock: Raw, pattern: str) -> str:
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    text = ""
    while time.monotonic() < deadline:
        text += sock.new_log()
        if re.search(pattern, text):
            return text
        time.sleep(0.01)
    raise AssertionError(f"the server did not log {pattern!r}; it logged {text!r}")


# WorkerStartFailed is left out: the server believes it from any peer holding the key (by
# design, since a worker that failed to start never registered), and it takes the engine down.
WORKER_SIDE = [cls for cls in message_types().values() if cls is not WorkerStartFailed]


@settings(LIVE, max_examples=30)
@given(raw_frames.filter(bool) | messages(WORKER_SIDE))
def test_garbage_on_the_workers_socket_is_dropped_and_logged(worker_socket: Raw, sent: list[bytes] | Message) -> None:
    frames = encode(sent, worker_socket.key) if isinstance(sent, Message) else sent
    worker_socket.sock.send_multipart(frames)
    _wait_for_log(worker_socket, r"refused a message on the workers socket|unregistered engine worker|unexpected worker hello")
    assert not worker_socket.sock.poll(0), "nothing is answered on the workers socket"
