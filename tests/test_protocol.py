"""The wire protocol: every message round-trips, and bad frames are refused with a reason."""

from __future__ import annotations

import os
import stat
import threading

import msgpack
import pytest

from engine_server.protocol import (
    PROTOCOL_VERSION,
    Activate,
    ChunkSpec,
    ConnectionInfo,
    FunctionSpec,
    InputValue,
    ProtocolError,
    SamplingSpec,
    SubmitCall,
    VarReady,
    decode,
    encode,
    message_types,
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


def test_every_message_type_has_a_unique_registered_name() -> None:
    types = message_types()
    assert "SubmitCall" in types and "WorkerDone" in types
    assert all(cls.TYPE == name for name, cls in types.items())


def test_signature_from_another_key_is_refused() -> None:
    frames = encode(VarReady("a", "v", "text"), b"other-key")
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(frames, KEY)


def test_tampered_payload_is_refused() -> None:
    sig, payload = encode(VarReady("a", "v", "text"), KEY)
    with pytest.raises(ProtocolError, match="bad signature"):
        decode([sig, payload.replace(b"text", b"TEXT")], KEY)


def _frames(body: object) -> list[bytes]:
    payload = msgpack.packb(body, use_bin_type=True)
    from engine_server.protocol import sign

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
