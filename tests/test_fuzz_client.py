"""A client facing a misbehaving server: garbage replies and events never kill its I/O thread.

The server here is a ROUTER and a PUB this test binds itself, speaking just enough
of the protocol (Welcome, EventsSynced) for a real ``Client`` to connect.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
from fuzz_strategies import FUZZ, envelopes, messages, msgpack_values, raw_frames, signed, stamped
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_server.protocol import (
    PROTOCOL_VERSION,
    Ack,
    ConnectionInfo,
    EventsSynced,
    Hello,
    Message,
    OpenApp,
    ServerStatus,
    Status,
    SyncEvents,
    VarReady,
    Welcome,
    decode,
    encode,
)
from parrot_nb.client import Client, ServerError

KEY = b"fake-server-key"
CLIENT = settings(FUZZ, max_examples=40, suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.function_scoped_fixture])


class FakeServer:
    """A ROUTER for requests and a PUB for events, driven by the test."""

    def __init__(self, tmp: Path) -> None:
        ctx = zmq.Context.instance()
        self.router, self.pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
        requests = self.router.bind_to_random_port("tcp://127.0.0.1")
        events = self.pub.bind_to_random_port("tcp://127.0.0.1")
        # Our own pid: the client checks that its server process is alive.
        self.info = ConnectionInfo(f"tcp://127.0.0.1:{requests}", f"tcp://127.0.0.1:{events}", KEY.decode(), os.getpid(), "fake")
        self.info.write(tmp / "fake.json")

    def recv(self) -> tuple[bytes, str, Message]:
        assert self.router.poll(5_000), "the client sent nothing"
        identity, *frames = self.router.recv_multipart()
        env = decode(frames, KEY)
        return identity, env.id, env.msg

    def reply(self, identity: bytes, msg: Message, ref: str) -> None:
        self.router.send_multipart([identity, *encode(msg, KEY, ref=ref)])

    def publish(self, msg: Message) -> None:
        self.pub.send_multipart([b"server", *encode(msg, KEY)])

    def connect_client(self) -> Client:
        """A real Client, connected through the handshake this server plays."""
        with ThreadPoolExecutor(1) as pool:
            connecting = pool.submit(Client, self.info, timeout=10)
            while not connecting.done():
                if not self.router.poll(100):
                    continue
                identity, msg_id, msg = self.recv()
                if isinstance(msg, Hello):
                    self.reply(identity, Welcome("c1", "fake", PROTOCOL_VERSION, "fake", 0), msg_id)
                elif isinstance(msg, SyncEvents):
                    self.publish(EventsSynced(msg.token))
                    self.reply(identity, Ack(), msg_id)
            return connecting.result()

    def close(self) -> None:
        self.router.close()
        self.pub.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeServer]:
    server = FakeServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    c = fake.connect_client()
    yield c
    c.close()


def _status() -> ServerStatus:
    return ServerStatus("fake", os.getpid(), 1.0, "fake", "cpu", [], [], 0)


garbage = st.one_of(
    raw_frames,
    msgpack_values.map(lambda v: signed(v, KEY)),
    envelopes().map(lambda e: signed(e, KEY)),
    messages().map(lambda m: encode(m, KEY, ref="not-a-pending-request")),
)


@CLIENT
@given(st.lists(garbage, min_size=1, max_size=4), st.lists(garbage, max_size=4))
def test_garbage_replies_and_events_leave_the_client_working(
    fake: FakeServer, client: Client, replies: list[list[bytes]], events: list[list[bytes]]
) -> None:
    fut = client.request(Status())
    identity, msg_id, _ = fake.recv()
    for frames in replies:
        fake.router.send_multipart([identity, *frames])
    for frames in events:
        fake.pub.send_multipart([b"server", *frames])
    fake.reply(identity, _status(), msg_id)
    assert fut.result(5) == _status(), "a good reply after garbage is still delivered"
    assert client._thread.is_alive()


def test_a_reply_with_a_bytes_field_name_does_not_kill_the_client(fake: FakeServer, client: Client) -> None:
    fut = client.request(Status())
    identity, msg_id, _ = fake.recv()
    bad = stamped({"v": PROTOCOL_VERSION, "type": "ServerStatus", "id": "r", "ref": msg_id, "body": {b"pid": 1, "uptime": 2}})
    fake.router.send_multipart([identity, *signed(bad, KEY)])
    fake.reply(identity, _status(), msg_id)
    assert fut.result(5) == _status()
    assert client._thread.is_alive()


def test_a_reply_of_the_wrong_type_raises_server_error_naming_both(fake: FakeServer, client: Client) -> None:
    result: list[BaseException] = []

    def open_app() -> None:
        try:
            client.app_id("notebook")
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever reaches the user
            result.append(exc)

    thread = threading.Thread(target=open_app)
    thread.start()
    identity, msg_id, msg = fake.recv()
    assert isinstance(msg, OpenApp)
    fake.reply(identity, VarReady("a", "v", "x"), msg_id)
    thread.join(5)
    assert len(result) == 1 and isinstance(result[0], ServerError), result
    assert "answered OpenApp with VarReady, not AppOpened" in str(result[0])
    assert client._thread.is_alive()
