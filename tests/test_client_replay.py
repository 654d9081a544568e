"""The client checks what the server sends it, as the server checks requests.

A real server cannot be made to answer from an hour ago or to publish an event
twice, so a stand-in (a ROUTER and a PUB on real sockets) plays the server here.
"""

from __future__ import annotations

import os
import threading
import time

import msgpack
import pytest
import zmq

from engine_server.protocol import (
    PROTOCOL_VERSION,
    Ack,
    ConnectionInfo,
    EventsSynced,
    Hello,
    Sender,
    SyncEvents,
    VarReady,
    Welcome,
    decode,
    new_id,
    sign,
)
from parrot_nb.client import Client

KEY = b"k" * 64


def _sockets() -> tuple[zmq.Socket, zmq.Socket, ConnectionInfo]:
    """A stand-in server's ROUTER and PUB, and the connection info that leads a client to them."""
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    requests = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    events = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    return router, pub, ConnectionInfo(requests, events, KEY.decode(), pid=os.getpid(), model="tiny")


def test_a_reply_from_outside_the_time_window_fails_the_call_with_the_reason() -> None:
    router, pub, info = _sockets()

    def answer_hello_from_the_past() -> None:
        if not router.poll(10_000):
            return
        identity, *frames = router.recv_multipart()
        env = decode(frames, KEY)
        assert isinstance(env.msg, Hello)
        payload = msgpack.packb(
            {"v": PROTOCOL_VERSION, "type": "Welcome", "id": new_id(), "ref": env.id, "session": new_id(),
             "seq": 1, "t": time.time() - 3600,
             "body": {"client_id": "c", "server_version": "0", "protocol_version": PROTOCOL_VERSION,
                      "model": "tiny", "engines": 1}}  # fmt: skip
        )
        router.send_multipart([identity, sign(KEY, payload), payload])

    server = threading.Thread(target=answer_hello_from_the_past)
    server.start()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="refused the engine server's reply.*check the clocks"):
            Client(info, timeout=10)
        assert time.monotonic() - started < 5  # told at once, not after the call's timeout
    finally:
        server.join()
        router.close()
        pub.close()


def test_an_event_published_twice_reaches_the_client_once() -> None:
    router, pub, info = _sockets()
    replies, events = Sender(KEY), Sender(KEY)
    go, stop = threading.Event(), threading.Event()

    def serve() -> None:  # the one thread that uses the stand-in's sockets
        while not stop.is_set():
            if router.poll(50):
                identity, *frames = router.recv_multipart()
                env = decode(frames, KEY)
                if isinstance(env.msg, SyncEvents):
                    pub.send_multipart([b"server", *events.encode(EventsSynced(env.msg.token))])
                reply = Welcome("c", "0", PROTOCOL_VERSION, "tiny", 1) if isinstance(env.msg, Hello) else Ack()
                router.send_multipart([identity, *replies.encode(reply, ref=env.id)])
            if go.is_set():
                go.clear()
                frames = events.encode(VarReady("app", "v1", "hi"))
                pub.send_multipart([b"app.app", *frames])
                pub.send_multipart([b"app.app", *frames])  # the same bytes again
                pub.send_multipart([b"server", *events.encode(EventsSynced("end"))])

    server = threading.Thread(target=serve)
    server.start()
    client = None
    try:
        client = Client(info, timeout=10)
        seen: list = []
        ended = threading.Event()
        client.add_listener(lambda e: ended.set() if e == EventsSynced("end") else seen.append(e))
        go.set()
        assert ended.wait(10)
        assert seen == [VarReady("app", "v1", "hi")]
    finally:
        if client is not None:
            client.close()
        stop.set()
        server.join()
        router.close()
        pub.close()
