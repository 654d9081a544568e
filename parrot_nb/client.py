"""The connection to an engine server: a DEALER for requests, a SUB for events.

ZMQ sockets are not thread-safe, so one I/O thread owns both; other threads
(the notebook's main thread, asyncio) hand it messages through a queue and a
wake-up socketpair, and get ``concurrent.futures.Future`` replies back.
Events resolve the semantic variables this client created.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import zmq

from engine_server.protocol import (
    Ack,
    AppOpened,
    ConnectionInfo,
    ErrorReply,
    EventsSynced,
    Hello,
    Message,
    OpenApp,
    ProtocolError,
    RequestDispatched,
    SyncEvents,
    TokenDelta,
    VarFailed,
    VarReady,
    Welcome,
    decode,
    encode,
    new_id,
)

if TYPE_CHECKING:
    from parrot_nb.variable import SemanticVariable

EventListener = Callable[[Message], None]


class ServerError(RuntimeError):
    """The server refused a request; the message is the server's explanation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServerGoneError(ConnectionError):
    """The engine server stopped answering (its process exited)."""


class Client:
    """A connection to one engine server. Thread-safe; create it with ``parrot_nb.connect``."""

    def __init__(self, info: ConnectionInfo, *, name: str = "parrot-nb", timeout: float = 10.0) -> None:
        self.info = info
        self._key = info.key_bytes
        self._ctx = zmq.Context()
        self._outbox: queue.SimpleQueue[tuple[Message, Future[Message] | None]] = queue.SimpleQueue()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._pending: dict[str, Future[Message]] = {}
        # Written by user threads (track), read by the I/O thread: guarded by _vars_lock.
        self._variables: weakref.WeakValueDictionary[str, SemanticVariable] = weakref.WeakValueDictionary()
        self._request_vars: dict[str, list[str]] = {}
        self._vars_lock = threading.Lock()
        self._listeners: list[EventListener] = []
        self._apps: dict[str, str] = {}
        self._apps_lock = threading.Lock()
        self._synced: dict[str, threading.Event] = {}
        self._closed = threading.Event()
        self.gone: str | None = None
        self._thread = threading.Thread(target=self._io_loop, name="parrot-nb-client-io", daemon=True)
        self._thread.start()
        try:
            welcome = self.call(Hello(name), timeout=timeout, expect=Welcome)
            self.client_id = welcome.client_id
            self.server_version = welcome.server_version
            self._sync_events(timeout)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- requests

    def request(self, msg: Message) -> Future[Message]:
        """Send ``msg``; the future resolves to the server's reply message."""
        fut: Future[Message] = Future()
        if self.gone is not None:
            fut.set_exception(ServerGoneError(self.gone))
            return fut
        if self._closed.is_set():
            fut.set_exception(ConnectionError("this connection to the engine server is closed"))
            return fut
        self._outbox.put((msg, fut))
        try:
            self._wake_send.send(b"\0")
        except OSError:  # closed between the check above and now; the I/O thread fails what it left
            if not fut.done():
                fut.set_exception(ConnectionError("this connection to the engine server is closed"))
        return fut

    def call(self, msg: Message, timeout: float | None = 10.0, *, expect: type[Message] = Message) -> Message:
        """Send ``msg`` and wait for the reply; ``ErrorReply``, or a reply that is not an ``expect``, raises ``ServerError``."""
        fut = self.request(msg)
        try:
            reply = fut.result(timeout)
        except TimeoutError:
            raise TimeoutError(
                f"the engine server at {self.info.requests} did not answer {msg.TYPE} within {timeout:g} s; "
                "check it with `%parrot status` (or `parrot-nb status`)"
            ) from None
        if isinstance(reply, ErrorReply):
            raise ServerError(reply.code, reply.message)
        if not isinstance(reply, expect):
            raise ServerError(
                "unexpected",
                f"the engine server answered {msg.TYPE} with {reply.TYPE}, not {expect.TYPE}: it does not speak "
                "this client's protocol; restart it with this parrot-nb (`%parrot stop`, then `%parrot start`)",
            )
        return reply

    def app_id(self, name: str) -> str:
        """The server's id for the application called ``name`` (opened on first use)."""
        with self._apps_lock:
            if name not in self._apps:
                reply = self.call(OpenApp(name), expect=AppOpened)
                self._apps[name] = reply.app_id  # type: ignore[attr-defined]
            return self._apps[name]

    # ----------------------------------------------------------------- events

    def track(self, request_id: str, variables: list[SemanticVariable]) -> None:
        """Route events about these variables (outputs of ``request_id``) to them."""
        with self._vars_lock:
            for v in variables:
                self._variables[v.id] = v
            self._request_vars[request_id] = [v.id for v in variables]

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` on the I/O thread for every event; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _sync_events(self, timeout: float) -> None:
        # A SUB socket misses what is published before its subscription reaches the
        # server; ask for a marker event until one arrives, then no event can be lost.
        deadline = time.monotonic() + timeout
        while True:
            token = new_id()
            ready = self._synced[token] = threading.Event()
            self.call(SyncEvents(token), timeout=max(0.1, deadline - time.monotonic()), expect=Ack)
            if ready.wait(0.2):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no events arrived from {self.info.events}; is a firewall in the way?")

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._wake_send.send(b"\0")
        except OSError:
            pass  # the I/O thread has already ended
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ----------------------------------------------------------------- I/O thread

    def _io_loop(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        dealer.connect(self.info.requests)
        sub.connect(self.info.events)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        last_liveness = time.monotonic()
        failure = "the connection to the engine server was closed before this finished; call it again once connected"
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(500))
                if self._wake_recv.fileno() in ready:
                    try:
                        while self._wake_recv.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        msg, fut = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    msg_id = new_id()
                    if fut is not None:
                        self._pending[msg_id] = fut
                    dealer.send_multipart(encode(msg, self._key, msg_id=msg_id))
                if dealer in ready:
                    self._drain(dealer, self._on_reply)
                if sub in ready:
                    self._drain(sub, self._on_event)
                if time.monotonic() - last_liveness > 1.0:
                    last_liveness = time.monotonic()
                    self._check_server_alive()
        except Exception as exc:  # a bug in this thread must not leave callers waiting forever
            failure = f"the client's I/O thread failed ({exc!r}); reconnect with `%parrot connect`"
        finally:
            self._closed.set()
            dealer.close()
            sub.close()
            self._ctx.term()
            self._wake_recv.close()
            self._wake_send.close()
            self._fail_everything(self.gone or failure)

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[bytes]], None]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            env = decode(frames, self._key)
        except ProtocolError:
            return  # nothing waits on a reply we cannot read; its request times out with a clear error
        fut = self._pending.pop(env.ref or "", None)
        if fut is not None and not fut.done():
            fut.set_result(env.msg)

    def _on_event(self, frames: list[bytes]) -> None:
        try:
            event = decode(frames[1:], self._key).msg
        except ProtocolError:
            return
        if isinstance(event, EventsSynced):
            marker = self._synced.pop(event.token, None)
            if marker is not None:
                marker.set()
        elif isinstance(event, (VarReady, VarFailed, TokenDelta)):
            with self._vars_lock:
                var = self._variables.get(event.var_id)
            if var is not None:
                var._on_event(event)
        elif isinstance(event, RequestDispatched):
            with self._vars_lock:
                targets = [self._variables.get(v) for v in self._request_vars.get(event.request_id, ())]
            for var in targets:
                if var is not None:
                    var._on_event(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop event delivery
                pass

    def _check_server_alive(self) -> None:
        if self.gone is None and not _pid_alive(self.info.pid):
            self.gone = f"the engine server (pid {self.info.pid}) has exited; start it again with `%parrot start`"
            self._fail_everything(self.gone)

    def _fail_everything(self, reason: str) -> None:
        """Fail every reply and variable still waiting: nothing will ever resolve them now."""
        error = ServerGoneError(reason) if self.gone else ConnectionError(reason)
        waiting = list(self._pending.values())
        self._pending.clear()
        while True:
            try:
                waiting.append(self._outbox.get_nowait()[1])
            except queue.Empty:
                break
        for fut in waiting:
            if fut is not None and not fut.done():
                fut.set_exception(error)
        with self._vars_lock:
            variables = list(self._variables.values())
        for var in variables:
            var._fail(reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
