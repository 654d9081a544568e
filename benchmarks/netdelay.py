"""A simulated network between notebooks and an engine server: every message is delayed.

    python benchmarks/netdelay.py --server server.json --out delayed.json --one-way-ms 125

reads a server's connection file and writes another whose endpoints are this proxy's; a client
that connects through it sees every request, reply and event ``--one-way-ms`` later, in order,
as over a network with that one-way latency (the round trip is twice it). Frames pass through
unchanged (signed by the client, checked by the server). Each client gets its own connection to
the server, so the server still tells clients apart. Benchmarks use it to give both sides of a
comparison the same round trip; it runs until terminated.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import signal
import sys
import time
from pathlib import Path

import zmq


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, required=True, help="the server's connection file")
    ap.add_argument("--out", type=Path, required=True, help="where to write the proxy's connection file")
    ap.add_argument("--one-way-ms", type=float, required=True, help="delay of every message, each way")
    args = ap.parse_args(argv)
    info = json.loads(args.server.read_text())
    if info.get("curve_server_key"):
        print("netdelay: a CurveZMQ server is not supported", file=sys.stderr)
        return 2
    delay = args.one_way_ms / 1000
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)  # clients' DEALERs
    pub = ctx.socket(zmq.PUB)  # clients' SUBs
    sub = ctx.socket(zmq.SUB)  # the server's events
    for sock in (front, pub, sub):
        sock.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(info["events"])
    pub.setsockopt(zmq.SNDHWM, 0)
    front_port = front.bind_to_random_port("tcp://127.0.0.1")
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    backs: dict[bytes, zmq.Socket] = {}  # client identity -> its own DEALER to the server
    owner: dict[zmq.Socket, bytes] = {}
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    due: list[tuple[float, int, zmq.Socket, list[bytes]]] = []  # (when, order, where to send, frames)
    order = itertools.count()
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "requests": f"tcp://127.0.0.1:{front_port}", "events": f"tcp://127.0.0.1:{pub_port}"}))
    tmp.rename(args.out)
    try:
        while running:
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, sock, frames = heapq.heappop(due)
                sock.send_multipart(frames)
            timeout = max(0.0, (due[0][0] - now) * 1000) if due else 100
            for sock, _ in poller.poll(timeout):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    when = time.monotonic() + delay
                    if sock is front:  # a client's request: on to the server from its own DEALER
                        identity, rest = frames[0], frames[1:]
                        back = backs.get(identity)
                        if back is None:
                            back = backs[identity] = ctx.socket(zmq.DEALER)
                            back.setsockopt(zmq.LINGER, 0)
                            back.connect(info["requests"])
                            owner[back] = identity
                            poller.register(back, zmq.POLLIN)
                        heapq.heappush(due, (when, next(order), back, rest))
                    elif sock is sub:  # an event: on to every client
                        heapq.heappush(due, (when, next(order), pub, frames))
                    else:  # a reply from the server: back to the client it answers
                        heapq.heappush(due, (when, next(order), front, [owner[sock], *frames]))
    finally:
        args.out.unlink(missing_ok=True)
        ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
