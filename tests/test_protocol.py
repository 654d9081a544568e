"""The wire protocol: every message round-trips, and bad frames are refused with a reason."""

from __future__ import annotations

import os
import stat
import threading
import time

import msgpack
import pytest

from engine_server.protocol import (
    PROTOCOL_VERSION,
    REPLAY_WINDOW_S,
    Activate,
    ChunkSpec,
    ConnectionInfo,
    FunctionSpec,
    InputValue,
    ProtocolError,
    ReplayError,
    ReplayGuard,
    SamplingSpec,
    Sender,
    Status,
    SubmitCall,
    VarReady,
    decode,
    encode,
    message_types,
    sign,
)

KEY = b"secret-key"


def _submit() -> SubmitCall:
    chunks = [
        ChunkSpec("text", text="Q: "),
        ChunkSpec("input", name="q"),
        ChunkSpec("output", name="a", sampling=SamplingSpec(max_tokens=8, stop=["\n"], seed=3)),
    ]
    return SubmitCall("app1", "req1", FunctionSpec("ask", chunks), {"q": InputValue(var_id="v0")}, {"a": "v1"})


def test_nested_message_round_trips_with_id_and_ref() -> None:
    msg = _submit()
    env = decode(encode(msg, KEY, msg_id="m1", ref="r0"), KEY)
    assert env.msg == msg
    assert (env.id, env.ref) == ("m1", "r0")


def test_every_message_type_is_registered_under_its_class_name() -> None:
    types = message_types()
    assert "SubmitCall" in types and "WorkerDone" in types
    assert all(cls.TYPE == name for name, cls in types.items())


def test_a_second_message_type_of_the_same_name_is_refused() -> None:
    from engine_server.protocol import Message

    before = message_types()
    with pytest.raises(TypeError, match="message type 'Status' is already defined"):

        class Status(Message):  # noqa: F811 (the clash is the point)
            pass

    assert message_types() == before and message_types()["Status"] is before["Status"]


def test_signature_from_another_key_is_refused() -> None:
    frames = encode(VarReady("a", "v", "text"), b"other-key")
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(frames, KEY)


def test_tampered_payload_is_refused() -> None:
    sig, payload = encode(VarReady("a", "v", "text"), KEY)
    with pytest.raises(ProtocolError, match="bad signature"):
        decode([sig, payload.replace(b"text", b"TEXT")], KEY)


def _frames(body: object) -> list[bytes]:
    """Signed frames of a hand-made payload; a map gets a valid sender stamp unless it has its own."""
    if isinstance(body, dict):
        body = {"session": "s1", "seq": 1, "t": time.time(), **body}
    payload = msgpack.packb(body, use_bin_type=True)
    return [sign(KEY, payload), payload]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"v": 99, "type": "Ack", "id": "x", "body": {}}, "version 99"),
        ({"v": PROTOCOL_VERSION, "type": "Nope", "id": "x", "body": {}}, "unknown message type 'Nope'"),
        ({"v": PROTOCOL_VERSION, "type": "Activate", "id": "x", "body": {"app_id": "a"}}, "missing field 'var_id'"),
        ({"v": PROTOCOL_VERSION, "type": "Activate", "id": "x", "body": {"app_id": "a", "var_id": 3}}, "var_id: expected str"),
        ({"v": PROTOCOL_VERSION, "type": "Activate", "id": "x", "body": {"app_id": "a", "var_id": "v", "perf": "fast"}}, "'fast' is not one of"),
        ({"v": PROTOCOL_VERSION, "type": "Ack", "id": "x", "body": {"extra": 1}}, "unknown field"),
        ([1, 2], "must be a msgpack map"),
    ],
)
def test_malformed_payload_names_what_is_wrong(raw: object, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(_frames(raw), KEY)


def test_a_message_from_the_previous_protocol_version_is_refused_with_what_to_do() -> None:
    frames = _frames({"v": 1, "type": "Status", "id": "x", "ref": None, "body": {}})
    with pytest.raises(ProtocolError, match="version 1 is not supported .* same parrot-nb installation"):
        decode(frames, KEY)


@pytest.mark.parametrize(
    ("stamp", "reason"),
    [
        ({"session": ""}, "'session'"),
        ({"seq": 0}, "'seq' must be a whole number from 1"),
        ({"seq": "7"}, "'seq' must be a whole number from 1"),
        ({"t": None}, "'t' must be the send time"),
        ({"t": float("nan")}, "'t' must be the send time"),
    ],
)
def test_a_message_without_a_valid_sender_stamp_is_refused(stamp: dict, reason: str) -> None:
    frames = _frames({"v": PROTOCOL_VERSION, "type": "Status", "id": "x", "body": {}, **stamp})
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, KEY)


def test_a_sender_numbers_its_messages_under_one_session_and_stamps_the_time() -> None:
    sender = Sender(KEY)
    before = time.time()
    envs = [decode(sender.encode(Status()), KEY) for _ in range(3)]
    assert [e.seq for e in envs] == [1, 2, 3]
    assert {e.session for e in envs} == {sender.session}
    assert all(before <= e.t <= time.time() for e in envs)
    assert decode(Sender(KEY).encode(Status()), KEY).session != sender.session


# ---------------------------------------------------------------- replay protection


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _stamped(session: str, seq: int, t: float) -> list[bytes]:
    return _frames({"v": PROTOCOL_VERSION, "type": "Status", "id": f"{session}-{seq}", "body": {},
                    "session": session, "seq": seq, "t": t})  # fmt: skip


def test_guard_accepts_a_senders_messages_once_each() -> None:
    guard = ReplayGuard()
    sender = Sender(KEY)
    first, second = sender.encode(Status()), sender.encode(Status())
    guard.check(decode(first, KEY))
    guard.check(decode(second, KEY))
    for frames in (second, first):  # the same bytes again, and an earlier message after a later one
        with pytest.raises(ReplayError, match="replayed message"):
            guard.check(decode(frames, KEY))


def test_guard_keeps_senders_apart() -> None:
    guard = ReplayGuard()
    for sender in (Sender(KEY), Sender(KEY)):
        guard.check(decode(sender.encode(Status()), KEY))
    assert len(guard) == 2


@pytest.mark.parametrize("offset", [-(REPLAY_WINDOW_S + 5), REPLAY_WINDOW_S + 5])
def test_guard_refuses_a_timestamp_outside_the_window_and_says_to_check_the_clocks(offset: float) -> None:
    guard = ReplayGuard()
    with pytest.raises(ReplayError, match="outside the accepted window .*check the clocks"):
        guard.check(decode(_stamped("s", 1, time.time() + offset), KEY))
    assert len(guard) == 0  # a refused message is not remembered


def test_guard_memory_is_one_entry_per_sender_whatever_the_message_rate() -> None:
    guard = ReplayGuard()
    sender = Sender(KEY)
    for _ in range(5000):
        guard.check(decode(sender.encode(Status()), KEY))
    assert len(guard) == 1


def test_guard_forgets_silent_senders_and_still_refuses_their_replays() -> None:
    clock = _Clock()
    guard = ReplayGuard(window=10.0, clock=clock)
    old = _stamped("early", 1, clock.now)
    guard.check(decode(old, KEY))
    # A stream of one-message senders over a minute, six windows long: memory stays at about
    # one window's worth of them (plus up to a second between prunings).
    sizes = []
    for i in range(600):
        clock.now += 0.1
        guard.check(decode(_stamped(f"s{i}", 1, clock.now), KEY))
        sizes.append(len(guard))
    assert max(sizes) <= 115
    # A sender heard from within the window is still remembered.
    clock.now += 2.0
    with pytest.raises(ReplayError, match="replayed message"):
        guard.check(decode(_stamped("s599", 1, clock.now - 2.0), KEY))
    # "early" was forgotten, but its message is now too old to be accepted again.
    with pytest.raises(ReplayError, match="outside the accepted window"):
        guard.check(decode(old, KEY))


def test_wrong_number_of_frames_is_refused() -> None:
    with pytest.raises(ProtocolError, match="expected 2 frames"):
        decode([b"only-one"], KEY)


def test_non_msgpack_payload_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not msgpack"):
        decode([b"", b"\xc1"], b"")


def test_defaults_fill_fields_a_sender_left_out() -> None:
    env = decode(_frames({"v": PROTOCOL_VERSION, "type": "Activate", "id": "x", "body": {"app_id": "a", "var_id": "v"}}), KEY)
    assert env.msg == Activate("a", "v", "latency")


def test_connection_file_is_private_and_reads_back(tmp_path) -> None:
    info = ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "k" * 64, pid=os.getpid(), model="tiny")
    path = info.write(tmp_path / "c.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ConnectionInfo.read(path) == info


def test_connection_file_carries_the_servers_curve_key_when_it_has_one(tmp_path) -> None:
    info = ConnectionInfo("tcp://0.0.0.0:1", "tcp://0.0.0.0:2", "k" * 64, pid=1, model="tiny", curve_server_key="c" * 40)
    assert ConnectionInfo.read(info.write(tmp_path / "c.json")).curve_server_key == "c" * 40
    plain = tmp_path / "plain.json"
    plain.write_text('{"requests": "tcp://127.0.0.1:1", "events": "tcp://127.0.0.1:2", "key": "k", "pid": 1, "model": "tiny"}')
    assert ConnectionInfo.read(plain).curve_server_key == ""  # no key: the sockets do not encrypt


def test_connection_file_is_never_seen_half_written(tmp_path) -> None:
    # A client polls for the file while the server writes it: every read that finds the
    # file must find all of it.
    info = ConnectionInfo("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "k" * 64, pid=os.getpid(), model="tiny")
    path = tmp_path / "c.json"
    done = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                ConnectionInfo.read(path)
            except FileNotFoundError:
                pass
            except ValueError as exc:
                bad.append(str(exc))
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(1000):
            info.write(path)
            if bad:
                break
    finally:
        done.set()
        thread.join()
    assert bad == []
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_missing_connection_file_says_how_to_get_one(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="%parrot start"):
        ConnectionInfo.read(tmp_path / "nope.json")


def test_connection_file_missing_a_field_is_named(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"requests": "tcp://127.0.0.1:1", "key": "k", "pid": 1, "model": "tiny"}')
    with pytest.raises(ValueError, match="missing field 'events'"):
        ConnectionInfo.read(path)
