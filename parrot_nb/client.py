"""The connection to an engine server: a DEALER for requests, a SUB for events.

ZMQ sockets are not thread-safe, so one I/O thread owns both; other threads
(the notebook's main thread, asyncio) hand it messages through a queue and a
wake-up socketpair, and get ``concurrent.futures.Future`` replies back.
Events resolve the semantic variables this client created.
"""

from __future__ import annotations

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
    CloseApp,
    ConnectionInfo,
    ErrorReply,
    EventsSynced,
    Forget,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    OpenApp,
    ProtocolError,
    ReplayError,
    ReplayGuard,
    RequestDispatched,
    Sender,
    SyncEvents,
    TokenDelta,
    VarFailed,
    VarReady,
    Welcome,
    decode,
    new_id,
    pid_alive,
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
        if info.curve_server_key and not zmq.has("curve"):
            raise ConnectionError(
                f"the engine server at {info.requests} encrypts with CurveZMQ, and this pyzmq's libzmq "
                f"{zmq.zmq_version()} lacks CURVE support: install pyzmq from its wheel "
                "(`pip install --force-reinstall pyzmq`; the wheels bundle libzmq with CURVE)"
            )
        self.info = info
        self._key = info.key_bytes
        # Used only by the I/O thread, which owns the sockets.
        self._sender = Sender(self._key)
        self._guard = ReplayGuard()
        self._ctx = zmq.Context()
        # Messages for the I/O thread to number, sign and send (it alone owns the sockets).
        self._outbox: queue.SimpleQueue[tuple[Message, Future[Message] | None]] = queue.SimpleQueue()
        # (variable id, request id) of variables the user dropped, for the server to free.
        self._forgotten: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.client_timeout = 10.0  # the server's, from Welcome
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._pending: dict[str, Future[Message]] = {}
        # Written by user threads (track), read by the I/O thread: guarded by _vars_lock.
        self._variables: weakref.WeakValueDictionary[str, SemanticVariable] = weakref.WeakValueDictionary()
        self._request_vars: dict[str, list[str]] = {}
        self._app_vars: dict[str, weakref.WeakSet[SemanticVariable]] = {}  # app id -> its variables
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
            self.client_timeout = welcome.client_timeout_s
            self._sync_events(timeout)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- requests

    def request(self, msg: Message, *, reply: bool = True) -> Future[Message]:
        """Send ``msg``; the future resolves to the server's reply message.

        A message that cannot be encoded fails its own future (``ValueError``) and nothing
        else: the connection stays up. With ``reply=False`` the reply is not awaited (the
        future resolves to None once the message is queued).
        """
        fut: Future[Message] = Future()
        if self.gone is not None:
            fut.set_exception(ServerGoneError(self.gone))
            return fut
        if self._closed.is_set():
            fut.set_exception(ConnectionError("this connection to the engine server is closed"))
            return fut
        if not reply:
            fut.set_result(None)  # type: ignore[arg-type]
        self._outbox.put((msg, fut if reply else None))
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

    def close_app_when_settled(self, name: str) -> None:
        """Close the application ``name`` once each of its variables is done, failed or dropped.

        A later call under the same name opens a new application at once.
        """
        with self._apps_lock:
            app_id = self._apps.pop(name, None)
        if app_id is None:
            return
        with self._vars_lock:
            waiting = [v for v in self._app_vars.pop(app_id, ()) if not v.ready]
        remaining = {v.id for v in waiting}
        lock = threading.Lock()

        def settled(var_id: str) -> None:
            with lock:
                if var_id not in remaining:
                    return
                remaining.discard(var_id)
                if remaining:
                    return
            self.request(CloseApp(app_id), reply=False)

        if not remaining:
            self.request(CloseApp(app_id), reply=False)
        for v in waiting:
            v._future.add_done_callback(lambda _, var_id=v.id: settled(var_id))
            weakref.finalize(v, settled, v.id)

    def forget_later(self, var_id: str, request_id: str) -> None:
        """The user dropped a variable: tell the server (batched by the I/O thread) so it can free it.

        Called from finalizers, so it only queues: it takes no lock and sends nothing.
        """
        self._forgotten.put((var_id, request_id))

    # ----------------------------------------------------------------- events

    def track(self, request_id: str, variables: list[SemanticVariable]) -> None:
        """Route events about these variables (outputs of ``request_id``) to them.

        When the user drops a variable, the server is told, so that it can free it.
        """
        with self._vars_lock:
            for v in variables:
                self._variables[v.id] = v
                self._app_vars.setdefault(v.app_id, weakref.WeakSet()).add(v)
                weakref.finalize(v, self.forget_later, v.id, request_id)
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
        """Disconnect: the server cancels what only this client waited for and closes its applications."""
        if self._closed.is_set():
            return
        if self.gone is None and threading.current_thread() is not self._thread:
            try:
                self.request(Goodbye()).result(2.0)
                # Events are ordered: once this marker arrives, so have the cancellations the
                # goodbye caused, and variables fail with that reason rather than "closed".
                self._sync_events(2.0)
            except Exception:
                pass  # the server is gone or slow; it notices the silence within its client timeout
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
        if self.info.curve_server_key:
            # The server proves itself with its key; this side needs a key pair only to
            # encrypt, so a throwaway one will do (the HMAC key authenticates the client).
            public, secret = zmq.curve_keypair()
            for sock in (dealer, sub):
                sock.setsockopt(zmq.CURVE_SERVERKEY, self.info.curve_server_key.encode())
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        for sock, endpoint in ((dealer, self.info.requests), (sub, self.info.events)):
            if endpoint.startswith("tcp://["):  # a server on an IPv6 address
                sock.setsockopt(zmq.IPV6, 1)
        dealer.connect(self.info.requests)
        sub.connect(self.info.events)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        last_liveness = last_sent = last_forget = time.monotonic()
        failure = "the connection to the engine server was closed before this finished; call it again once connected"
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(250))
                if self._wake_recv.fileno() in ready:
                    try:
                        while self._wake_recv.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                now = time.monotonic()
                if now - last_forget > 0.5 or self._forgotten.qsize() > 1000:
                    last_forget = now
                    self._send_forgotten()
                if now - last_sent > self.client_timeout / 4:
                    # The server takes a silent client as dead; say we are alive.
                    beat: Future[Message] = Future()
                    beat.add_done_callback(self._on_heartbeat_reply)
                    self._outbox.put((Heartbeat(), beat))
                while True:
                    try:
                        msg, fut = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    msg_id = new_id()
                    try:
                        frames = self._sender.encode(msg, msg_id=msg_id)
                    except Exception as exc:  # e.g. an int too big for msgpack: that call fails, nothing else
                        if fut is not None and not fut.done():
                            fut.set_exception(ValueError(f"{msg.TYPE} could not be encoded for the engine server: {exc}"))
                        continue
                    if fut is not None:
                        self._pending[msg_id] = fut
                    dealer.send_multipart(frames)
                    last_sent = now
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

    def _send_forgotten(self) -> None:
        var_ids, request_ids = [], set()
        while True:
            try:
                var_id, request_id = self._forgotten.get_nowait()
            except queue.Empty:
                break
            var_ids.append(var_id)
            request_ids.add(request_id)
        if var_ids:
            with self._vars_lock:
                for request_id in request_ids:
                    if not any(v in self._variables for v in self._request_vars.get(request_id, ())):
                        self._request_vars.pop(request_id, None)
            self._outbox.put((Forget(var_ids), None))

    def _on_heartbeat_reply(self, fut: Future[Message]) -> None:
        reply = fut.result() if not fut.exception() else None
        if isinstance(reply, ErrorReply) and reply.code == "gone":
            self.gone = reply.message
            self._fail_everything(reply.message)

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[bytes]], None], limit: int = 1000) -> None:
        # At most ``limit`` at a time: under a flood of events the loop must still come round
        # to sending (heartbeats above all, or the server takes this client as dead).
        for _ in range(limit):
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
        try:
            self._guard.check(env)
        except ReplayError as exc:
            # A resent old reply answers no waiting request (ids are never reused); one that is
            # waited for failed the time check, so the caller learns why instead of timing out.
            fut = self._pending.pop(env.ref or "", None)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"refused the engine server's reply: {exc}"))
            return
        fut = self._pending.pop(env.ref or "", None)
        if fut is not None and not fut.done():
            fut.set_result(env.msg)

    def _on_event(self, frames: list[bytes]) -> None:
        try:
            env = decode(frames[1:], self._key)
            self._guard.check(env)
        except ProtocolError:
            return
        event = env.msg
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
        if self.gone is None and not pid_alive(self.info.pid):
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
