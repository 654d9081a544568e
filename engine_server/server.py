"""The engine server: a ZMQ front for clients, a PUB for events, engine workers behind.

Sockets:
- ``requests`` ROUTER: clients' DEALERs send protocol requests; every one is
  answered, a malformed one with ``ErrorReply`` (never fatal). A frame over
  ``MAX_MESSAGE_BYTES`` cannot be answered: zmq drops it, and its connection.
- ``events`` PUB: everything that happens (``protocol`` events), topic
  ``app.<app_id>`` or ``server``.
- ``workers`` ROUTER: engine worker processes connect DEALERs to it.
- ``tools`` ROUTER: tool worker processes, which run native steps, connect DEALERs
  to it (engine_server/tools.py).

``requests`` and ``events`` bind to ``--ip`` (loopback by default); beyond
loopback they are CurveZMQ servers (see engine_server/keys.py). ``workers``
and ``tools`` always stay on loopback.

One thread runs the loop; the manager's executor is called from it, so the
DAG needs no locks.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zmq

from engine_server import __version__
from engine_server.history import EventHistory
from engine_server.keys import CurveKeys, KeysError, load_keys
from engine_server.manager.executor import Executor
from engine_server.manager.graph import Graph, GraphError
from engine_server.manager.scheduler import Scheduler
from engine_server.models import DEFAULT_MODEL, chat_format, resolve_model
from engine_server.openai_api import HttpCall, HttpFront
from engine_server.tools import ToolPool
from engine_server.protocol import (
    CONNECTION_PREFIX,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Activate,
    AppClosed,
    AppInfo,
    AppOpened,
    Cancel,
    Cancelled,
    ChunkSpec,
    ClientGone,
    CloseApp,
    ConnectionInfo,
    EngineChanged,
    EngineInfo,
    ErrorReply,
    EventsSynced,
    Forget,
    FunctionSpec,
    GetHistory,
    GetRequestDetail,
    Goodbye,
    NativeDone,
    NativeFailed,
    Heartbeat,
    Hello,
    Message,
    OpenApp,
    ProtocolError,
    ReplayError,
    ReplayGuard,
    RequestFinished,
    Sender,
    ServerStatus,
    Shutdown,
    Status,
    StopWorker,
    SubmitCall,
    SyncEvents,
    TokenDelta,
    ToolHello,
    Welcome,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
    WorkerHello,
    WorkerLoad,
    VarFailed,
    VarReady,
    WorkerStartFailed,
    decode,
    new_id,
    peek_id,
    pid_alive,
    runtime_dir,
    to_dict,
)

log = logging.getLogger("engine_server")

LOOPBACK = "127.0.0.1"
# An engine that dies more often than this within RESTART_WINDOW_S is left dead.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# How often the loop checks clients' liveness and its owner, and frees what nothing reaches.
HOUSEKEEPING_S = 0.5


class Overloaded(GraphError):
    """A call past a limit on unfinished requests; the message names the limit and its flag."""


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL  # see engine_server.models.resolve_model
    device: str = "cpu"
    engines: int = 1
    ip: str = LOOPBACK  # where requests and events listen; beyond loopback needs CURVE keys
    curve: bool = False  # encrypt with CurveZMQ on loopback too (always on beyond loopback)
    keys_dir: Path | None = None  # where the CURVE keys are; None: the runtime dir
    port: int | None = None  # requests on port, events on port + 1; random when None
    connection_file: Path | None = None
    event_log: Path | None = None
    # Requests handed to one engine at a time; None: what the engine says it batches (max_running).
    engine_capacity: int | None = None
    # Sizing passed to every worker as --name value (max_running, token_budget, kv_cache_mb,
    # gpu_memory_utilization); see `parrot-nb serve --help`.
    engine_options: dict[str, str] = field(default_factory=dict)
    # A client silent for this long is dead: its requests are cancelled and its apps closed.
    client_timeout_s: float = 10.0
    # The process that owns this server (a notebook kernel): once it has exited and no client
    # is left, the server stops. None: it runs until stopped (`parrot-nb serve`).
    owner_pid: int | None = None
    # Back-pressure: calls past these many unfinished requests are refused.
    max_pending_per_app: int = 10_000
    max_pending: int = 50_000
    # Native steps (engine_server/tools.py): tool worker processes, and each call's default limits.
    tool_workers: int = 2
    tool_timeout_s: float = 60.0
    tool_memory_mb: int = 4096
    # Whether calls may run notebook code here. None: yes on loopback, no beyond it.
    allow_native: bool | None = None
    # Prefill the known start of a requested call while its inputs are still being computed.
    early_prefill: bool = True
    # The OpenAI-compatible HTTP endpoint (engine_server/openai_api.py): off when http_port is None
    # (0: any free port). Beyond loopback it requires api_key.
    http_port: int | None = None
    http_host: str = LOOPBACK
    api_key: str | None = None
    # Engines over outside OpenAI-compatible servers (engine_server/engine/remote.py), one per URL,
    # instead of builtin ones; engine_api_key is what they expect (sent as a bearer token).
    engine_urls: list[str] = field(default_factory=list)
    engine_api_key: str | None = None

    @property
    def native_allowed(self) -> bool:
        return self.allow_native if self.allow_native is not None else is_loopback(self.ip)


@dataclass
class ClientRecord:
    """A client that said Hello, known by its socket identity."""

    client_id: str
    name: str
    last_seen: float  # monotonic time of its last message
    apps: set[str] = field(default_factory=set)


@dataclass
class EngineProcess:
    """One engine worker process as the server supervises it."""

    engine_id: int
    popen: subprocess.Popen[bytes]
    identity: bytes | None = None
    state: str = "starting"  # starting | ready | dead | stopped
    restarts: list[float] = field(default_factory=list)
    detail: str = ""  # why it is dead, once it is
    model: str = ""  # what it serves and where, from its WorkerHello (an outside server's own model and URL)
    device: str = ""
    gpu: str = ""  # the GPU it is pinned to (its CUDA_VISIBLE_DEVICES), with --device cuda


class EngineServer:
    def __init__(self, config: ServerConfig) -> None:
        """Raises models.ModelNotFoundError or gguf_file.GGUFError when ``config.model`` cannot be served,
        and keys.KeysError when it must encrypt and cannot (no keys, unsafe keys, no CURVE in libzmq)."""
        self.config = config
        if config.http_port is not None and not config.api_key and not is_loopback(config.http_host):
            raise KeysError(
                f"--http-host {config.http_host} is beyond loopback: give an API key (--api-key KEY, or the "
                "PARROT_NB_API_KEY environment variable) that HTTP clients must send"
            )
        self.curve_keys = self._curve_keys(config)
        self.model = resolve_model(config.model)
        self.key = secrets.token_hex(32).encode()
        self.started = time.monotonic()
        self.ctx = zmq.Context()
        self.requests = self.ctx.socket(zmq.ROUTER)
        self.events = self.ctx.socket(zmq.PUB)
        self.workers = self.ctx.socket(zmq.ROUTER)
        self.tool_socket = self.ctx.socket(zmq.ROUTER)
        sockets = (self.requests, self.events, self.workers, self.tool_socket)
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
        # One numbering per socket (each delivers in order); one guard for all that arrives.
        self._senders = {sock: Sender(self.key) for sock in sockets}
        self.guard = ReplayGuard()
        for sock in (self.requests, self.workers, self.tool_socket):
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a huge frame must not exhaust memory
        self.events.setsockopt(zmq.SNDHWM, 100_000)  # token streams are bursty; don't drop events
        self.graph = Graph(chat_format(self.model))
        self.scheduler = Scheduler()
        self.tools: ToolPool | None = None  # made in bind(), once its socket has an address
        self.executor = Executor(
            self.graph, self.scheduler, self.publish, self.send_to_engine, early_prefill=config.early_prefill
        )
        self.history = EventHistory()  # what widgets opened late draw from (GetHistory)
        self.engines: dict[int, EngineProcess] = {}
        self.connection_file: Path | None = None
        self._event_log: IO[str] | None = None
        self._running = False
        self.clients: dict[bytes, ClientRecord] = {}  # by socket identity
        self._identity: bytes = b""  # of the client whose request is being handled
        self._housekept = 0.0
        self.http: HttpFront | None = None  # with --http-port: listening now (a taken port fails here), started in bind()
        if config.http_port is not None:
            self.http = HttpFront(
                config.http_host, config.http_port, self.model.name, self.graph.chat_format, config.api_key or None,
                self.ctx, self._engine_status,
            )  # fmt: skip
        self.http_calls: dict[str, HttpCall] = {}  # by app id: HTTP requests not yet answered
        self._http_answered: list[str] = []  # their apps, to close once the handler that answered returns
        self._handlers = {
            Hello: self._on_hello,
            SyncEvents: self._on_sync,
            OpenApp: self._on_open_app,
            SubmitCall: self._on_submit,
            Activate: self._on_activate,
            Cancel: self._on_cancel,
            Forget: self._on_forget,
            CloseApp: self._on_close_app,
            Heartbeat: self._on_heartbeat,
            Goodbye: self._on_goodbye,
            Status: self._on_status,
            GetHistory: self._on_get_history,
            GetRequestDetail: self._on_get_request_detail,
            Shutdown: self._on_shutdown,
        }

    # ----------------------------------------------------------------- lifecycle

    @staticmethod
    def _curve_keys(config: ServerConfig) -> CurveKeys | None:
        if config.curve or not is_loopback(config.ip):
            why = "--curve" if is_loopback(config.ip) else f"listening on {config.ip}, beyond loopback,"
            try:
                return load_keys(config.keys_dir)
            except KeysError as exc:
                raise KeysError(f"{why} requires CurveZMQ keys, so that the traffic is encrypted: {exc}") from None
        return None

    def bind(self) -> ConnectionInfo:
        ip = self.config.ip
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 address goes in brackets in an endpoint
        for sock in (self.requests, self.events):
            if ":" in ip:
                sock.setsockopt(zmq.IPV6, 1)
            if self.curve_keys is not None:  # options of a listening socket are set before it binds
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve_keys.secret)
        port = self.config.port
        if port is None:
            req_port = self.requests.bind_to_random_port(f"tcp://{host}")
            ev_port = self.events.bind_to_random_port(f"tcp://{host}")
        else:
            req_port, ev_port = port, port + 1
            self.requests.bind(f"tcp://{host}:{req_port}")
            self.events.bind(f"tcp://{host}:{ev_port}")
        self.worker_endpoint = f"tcp://{LOOPBACK}:{self.workers.bind_to_random_port(f'tcp://{LOOPBACK}')}"
        tool_endpoint = f"tcp://{LOOPBACK}:{self.tool_socket.bind_to_random_port(f'tcp://{LOOPBACK}')}"
        self.tools = ToolPool(
            self.config.tool_workers, tool_endpoint, self._worker_env(),
            lambda identity, msg: self._send_frames(self.tool_socket, [identity], msg),
            self.executor.on_native_result,
            timeout_s=self.config.tool_timeout_s, memory_mb=self.config.tool_memory_mb,
        )  # fmt: skip
        self.executor.tools = self.tools
        info = ConnectionInfo(
            requests=f"tcp://{host}:{req_port}",
            events=f"tcp://{host}:{ev_port}",
            key=self.key.decode(),
            pid=os.getpid(),
            model=self.model.name,
            curve_server_key=self.curve_keys.public.decode() if self.curve_keys is not None else "",
        )
        if self.http is not None:
            self.http.start()
            info.http = self.http.url
        path = self.config.connection_file or runtime_dir() / f"{CONNECTION_PREFIX}{os.getpid()}.json"
        self.connection_file = info.write(path)
        if self.config.event_log is not None:
            self._event_log = open(self.config.event_log, "a", buffering=1)
        return info

    def serve_forever(self) -> None:
        """Bind, start the engines, and run the loop until ``Shutdown`` or a signal."""
        info = self.bind()
        for i in range(len(self.config.engine_urls) or self.config.engines):
            self.scheduler.add_engine(i, self.config.engine_capacity or 1)
            self.engines[i] = EngineProcess(i, self._spawn_engine(i), gpu=self._gpu_of(i) or "")
        log.info("parrot-nb engine server %s: requests %s, events %s", __version__, info.requests, info.events)
        if self.curve_keys is not None:
            log.info("traffic is encrypted with CurveZMQ (server public key %s)", info.curve_server_key)
        if self.http is not None:
            log.info("OpenAI-compatible API: %s/v1", self.http.url)
        log.info("connection file: %s", self.connection_file)
        self._running = True
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        poller = zmq.Poller()
        poller.register(self.requests, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        poller.register(self.tool_socket, zmq.POLLIN)
        if self.http is not None:
            poller.register(self.http.wake, zmq.POLLIN)
        try:
            while self._running:
                ready = dict(poller.poll(100))
                if self.workers in ready:
                    self._drain(self.workers, self._on_worker_frames)
                if self.tool_socket in ready:
                    self._drain(self.tool_socket, self._on_tool_frames)
                if self.requests in ready:
                    self._drain(self.requests, self._on_client_frames)
                if self.http is not None and (self.http.wake in ready or self._http_answered):
                    try:
                        self._http_pump()
                    except Exception:
                        log.exception("error handling HTTP requests")
                try:
                    self._supervise_engines()
                    self._supervise_tools()
                    if time.monotonic() - self._housekept >= HOUSEKEEPING_S:
                        self._housekeeping()
                except Exception:  # a bug here must not take every notebook's server down
                    log.exception("error supervising engines and clients")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.close()

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.tools is not None:
            self.tools.close()
        for proc in self.engines.values():
            if proc.popen.poll() is not None:
                continue
            if proc.identity is not None:
                self._send_frames(self.workers, [proc.identity], StopWorker())
            else:  # still starting: it cannot hear StopWorker yet
                proc.popen.terminate()
        deadline = time.monotonic() + 5
        for proc in self.engines.values():
            proc.state = "stopped"
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if self.connection_file is not None:
            self.connection_file.unlink(missing_ok=True)
        if self._event_log is not None:
            self._event_log.close()
        self.ctx.destroy(linger=0)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._running = False

    # ----------------------------------------------------------------- sockets

    def _drain(self, sock: zmq.Socket, handle: Any) -> None:
        # Handle everything already waiting, so one busy socket cannot starve the other.
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # client handlers reply with their own errors; this is the last guard
                log.exception("error handling a message")

    def _send_frames(self, sock: zmq.Socket, prefix: list[bytes], msg: Message, ref: str | None = None) -> None:
        sock.send_multipart(prefix + self._senders[sock].encode(msg, ref=ref))

    def publish(self, event: Message) -> None:
        app_id = getattr(event, "app_id", None)
        topic = f"app.{app_id}" if app_id else "server"
        # Logged and kept first: whoever reads the log, or asks for the history, after seeing
        # the event finds it there.
        self._log("event", event)
        self.history.record(event)
        self._send_frames(self.events, [topic.encode()], event)
        if app_id in self.http_calls:
            self._http_event(self.http_calls[app_id], event)

    def send_to_engine(self, engine_id: int, msg: Message) -> None:
        proc = self.engines[engine_id]
        if proc.identity is None:  # the scheduler only picks ready engines
            raise RuntimeError(f"engine {engine_id} has not registered")
        self._send_frames(self.workers, [proc.identity], msg)

    def _log(self, direction: str, msg: Message) -> None:
        if self._event_log is not None:
            self._event_log.write(json.dumps({"t": time.time(), "dir": direction, **to_dict(msg)}) + "\n")

    # ----------------------------------------------------------------- clients

    def _on_client_frames(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        try:
            env = decode(rest, self.key)
            self.guard.check(env)
        except ProtocolError as exc:
            # A replay is answered too: the answer goes to whoever resent it, not to the original sender.
            code = "replayed" if isinstance(exc, ReplayError) else "malformed"
            log.warning("%s request: %s", code, exc)
            reply = ErrorReply(code, f"{code} request: {exc}")
            self._send_frames(self.requests, [identity], reply, ref=peek_id(rest) if rest else None)
            return
        if not isinstance(env.msg, Heartbeat):
            self._log("in", env.msg)
        client = self.clients.get(identity)
        if client is not None:
            client.last_seen = time.monotonic()
        self._identity = identity
        handler = self._handlers.get(type(env.msg))
        if handler is None:
            log.warning("refused %s: not a request", env.msg.TYPE)
            reply: Message = ErrorReply("unexpected", f"{env.msg.TYPE} is not a request this server accepts")
        else:
            try:
                reply = handler(env.msg)
            except Overloaded as exc:
                reply = ErrorReply("overloaded", str(exc))
            except (GraphError, ValueError) as exc:
                log.info("refused %s: %.300s", env.msg.TYPE, exc)
                reply = ErrorReply("invalid", str(exc))
            except Exception as exc:  # a bug must not take the server (and every notebook) down
                log.exception("error handling %s", env.msg.TYPE)
                reply = ErrorReply("internal", f"internal server error handling {env.msg.TYPE}: {exc!r}")
        self._send_frames(self.requests, [identity], reply, ref=env.id)

    def _on_hello(self, msg: Hello) -> Message:
        client = self.clients.get(self._identity)
        if client is None:
            client = self.clients[self._identity] = ClientRecord(new_id(), msg.client_name, time.monotonic())
        return Welcome(
            client.client_id, __version__, PROTOCOL_VERSION, self.model.name, len(self.engines),
            self.config.client_timeout_s,
        )  # fmt: skip

    def _on_sync(self, msg: SyncEvents) -> Message:
        self.publish(EventsSynced(msg.token))
        return Ack()

    def _on_open_app(self, msg: OpenApp) -> Message:
        client = self.clients.get(self._identity)
        app = self.graph.open_app(new_id(), msg.name, client.client_id if client else None)
        if client is not None:
            client.apps.add(app.id)
        return AppOpened(app.id, app.name)

    def _on_submit(self, msg: SubmitCall) -> Message:
        app = self.graph.apps.get(msg.app_id)
        limit = self.config.max_pending_per_app
        if app is not None and app.unfinished >= limit:
            raise Overloaded(
                f"application {app.name!r} already has {app.unfinished} unfinished requests, its limit "
                f"(--max-pending-per-app {limit}); wait for some to finish (.get() them), then call again"
            )
        if msg.function.native and not self.config.native_allowed:
            why = (
                "this server was started with --no-native"
                if self.config.allow_native is False
                else f"this server listens on {self.config.ip}, beyond loopback, so they are off; start it with "
                "--allow-native if everyone who holds its connection file may run code there"
            )
            raise GraphError(f"call of {msg.function.name!r}: native steps run Python code on the server as its user, and {why}")
        if self.graph.unfinished >= self.config.max_pending:
            raise Overloaded(
                f"the server already has {self.graph.unfinished} unfinished requests, its limit "
                f"(--max-pending {self.config.max_pending}); wait for some to finish, then call again"
            )
        self.executor.submit(msg)
        return Ack()

    def _on_activate(self, msg: Activate) -> Message:
        if msg.var_id not in self.graph.variables:
            raise GraphError(f"unknown variable {msg.var_id!r}: it was never submitted to this server")
        self.executor.activate(msg.var_id, msg.perf)
        self._fail_if_no_engine_left()
        return self.executor.var_state(msg.var_id)

    def _on_cancel(self, msg: Cancel) -> Message:
        var_ids, request_ids = self.executor.cancel(msg.var_ids, msg.reason)
        return Cancelled(var_ids, request_ids)

    def _on_forget(self, msg: Forget) -> Message:
        self.graph.forget(msg.var_ids)
        return Ack()

    def _on_close_app(self, msg: CloseApp) -> Message:
        if msg.app_id not in self.graph.apps:
            raise GraphError(f"unknown application {msg.app_id!r}")
        if not self.graph.apps[msg.app_id].closed:
            self.executor.close_app(msg.app_id, "closed by its client")
            self.publish(AppClosed(msg.app_id, "closed by its client", time.time()))
        return Ack()

    def _on_heartbeat(self, msg: Heartbeat) -> Message:
        if self._identity not in self.clients:
            return ErrorReply(
                "gone",
                f"this server dropped the connection after more than {self.config.client_timeout_s:g} s of silence "
                "and cancelled its requests; reconnect with `%parrot connect` (parrot_nb.connect())",
            )
        return Ack()

    def _on_goodbye(self, msg: Goodbye) -> Message:
        client = self.clients.pop(self._identity, None)
        if client is not None:
            self._client_gone(client, "it disconnected")
        return Ack()

    def _client_gone(self, client: ClientRecord, reason: str) -> None:
        """A client left or died: what only it waited for is cancelled, and its apps are closed."""
        for app_id in sorted(client.apps):
            if app_id in self.graph.apps and not self.graph.apps[app_id].closed:
                why = f"its client {client.name!r} is gone: {reason}"
                self.executor.close_app(app_id, why, forget=True)
                self.publish(AppClosed(app_id, why, time.time()))
        self.publish(ClientGone(client.client_id, client.name, reason, time.time()))
        log.info("client %s (%s) is gone: %s", client.client_id, client.name, reason)

    def _housekeeping(self) -> None:
        """Drop silent clients, stop when the owner is gone, free what nothing reaches."""
        now = self._housekept = time.monotonic()
        timeout = self.config.client_timeout_s
        if any(now - client.last_seen > timeout for client in self.clients.values()):
            # A busy loop may not have read their latest messages yet: read them before judging.
            self._drain(self.requests, self._on_client_frames)
            now = time.monotonic()
        for identity, client in list(self.clients.items()):
            if now - client.last_seen > timeout:
                del self.clients[identity]
                self._client_gone(client, f"no message from it for more than {timeout:g} s")
        owner = self.config.owner_pid
        if owner is not None and not self.clients and not pid_alive(owner):
            log.info("the process that started this server (pid %d) has exited and no client is left: stopping", owner)
            self._running = False
        if self.executor.collect():
            self.history.retain(self.graph.requests, self.graph.apps)

    def _on_status(self, msg: Status) -> Message:
        engines = []
        for p in self.engines.values():
            slot = self.scheduler.engines[p.engine_id]
            engines.append(
                EngineInfo(
                    p.engine_id, p.popen.pid, p.model or self.model.name, p.device or self.config.device, p.state, len(slot.running),
                    slot.finished, slot.capacity, slot.engine_waiting, slot.kv_blocks_used, slot.kv_blocks_total,
                    slot.cached_keys, p.gpu,
                )  # fmt: skip
            )
        apps = [
            AppInfo(
                app.id, app.name, app.submitted, app.done, app.failed, app.prompt_tokens, app.cached_tokens,
                app.cancelled, bool(app.closed),
            )  # fmt: skip
            for app in self.graph.apps.values()
        ]
        return ServerStatus(
            __version__,
            os.getpid(),
            time.monotonic() - self.started,
            self.model.name,
            self.config.device,
            engines,
            apps,
            len(self.scheduler),
            clients=len(self.clients),
            requests=len(self.graph.requests),
            variables=len(self.graph.variables),
            unfinished=self.graph.unfinished,
        )

    def _on_get_history(self, msg: GetHistory) -> Message:
        return self.history.reply(msg.app_name)

    def _on_get_request_detail(self, msg: GetRequestDetail) -> Message:
        return self.executor.detail(msg.request_id)

    def _on_shutdown(self, msg: Shutdown) -> Message:
        self._running = False
        return Ack()

    # ----------------------------------------------------------------- HTTP (openai_api.py)

    def _http_pump(self) -> None:
        """Take the HTTP thread's commands; close the applications of answered HTTP requests."""
        assert self.http is not None
        for what, call in self.http.take_commands():
            if what == "submit":
                self._http_submit(call)
            elif call.app_id in self.http_calls:  # cancel: its client went away
                self._http_close(call.app_id, "its HTTP client disconnected")
        while self._http_answered:
            self._http_close(self._http_answered.pop(), "answered")

    def _engine_status(self) -> tuple[int, int]:
        """Engines ready and the model's context length, for /health and /v1/models (the HTTP thread)."""
        return sum(1 for p in list(self.engines.values()) if p.state == "ready"), self.graph.max_context

    def _http_submit(self, call: HttpCall) -> None:
        """An HTTP request is a one-call application whose one output is requested at once."""
        if self.graph.unfinished >= self.config.max_pending:
            call.send(("error", 429, f"the server already has {self.graph.unfinished} unfinished requests, its "
                                     f"limit (--max-pending {self.config.max_pending}); retry later"))  # fmt: skip
            return
        app = self.graph.open_app(new_id(), f"openai/{call.kind}" + (f"/{call.user}" if call.user else ""))
        call.app_id = app.id
        function = FunctionSpec(
            "chat.completions" if call.kind == "chat" else "completions",
            [ChunkSpec("text", text=t) for t in call.texts] + [ChunkSpec("output", name="text", sampling=call.sampling)],
            block_cache=True,
        )  # fmt: skip
        self.http_calls[app.id] = call
        try:
            self.executor.submit(SubmitCall(app.id, new_id(), function, {}, {"text": call.var_id}))
            self.executor.activate(call.var_id, "latency")
            self._fail_if_no_engine_left()
        except (GraphError, ValueError) as exc:
            self.http_calls.pop(app.id, None)
            self.executor.close_app(app.id, "refused", forget=True)
            call.send(("error", 400, str(exc)))

    def _http_event(self, call: HttpCall, event: Message) -> None:
        """Events of an HTTP request's application, turned into what its HTTP handler sends."""
        if isinstance(event, TokenDelta):
            call.send(("delta", event.text))
        elif isinstance(event, RequestFinished):
            call.usage = (event.prompt_tokens, event.output_tokens, event.cached_tokens)
        elif isinstance(event, VarReady) and not call.ended:
            reason = "length" if call.usage[1] >= call.sampling.max_tokens else "stop"
            call.send(("done", event.value, call.usage, reason))
            self._http_answered.append(call.app_id)
        elif isinstance(event, VarFailed) and not call.ended:
            # The engine refuses a program it can never run (too long) with a ValueError: the caller's fault.
            status = 400 if "ValueError:" in event.error or "program too long" in event.error else 500
            call.send(("error", status, event.error))
            self._http_answered.append(call.app_id)

    def _http_close(self, app_id: str, reason: str) -> None:
        """Close an HTTP request's application; an unfinished request is cancelled and its KV freed."""
        self.http_calls.pop(app_id, None)
        if app_id in self.graph.apps and not self.graph.apps[app_id].closed:
            self.executor.close_app(app_id, reason, forget=True)
            self.publish(AppClosed(app_id, reason, time.time()))

    # ----------------------------------------------------------------- engines

    def _worker_env(self) -> dict[str, str]:
        """An engine or tool worker's environment: the key travels here, not in argv, so `ps` does not show it."""
        return {**os.environ, "PARROT_NB_KEY": self.key.decode(), "PARROT_NB_SERVER_PID": str(os.getpid())}

    def _spawn_engine(self, engine_id: int) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "engine_server.engine.worker",
            "--endpoint", self.worker_endpoint,
            "--engine-id", str(engine_id),
            "--model", self.model.spec,
            "--device", self.config.device,
        ]  # fmt: skip
        env = self._worker_env()
        if self.config.engine_urls:  # an engine over an outside server: only its batch size applies
            cmd += ["--remote", self.config.engine_urls[engine_id]]
            if "max_running" in self.config.engine_options:
                cmd += ["--max-running", self.config.engine_options["max_running"]]
            if self.config.engine_api_key:
                env["PARROT_NB_ENGINE_API_KEY"] = self.config.engine_api_key
            return subprocess.Popen(cmd, env=env)
        for name, value in sorted(self.config.engine_options.items()):
            cmd += [f"--{name.replace('_', '-')}", value]
        gpu = self._gpu_of(engine_id)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.config.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Several CPU engines share the cores: each would start a thread per core, and their
            # spinning threads would slow every engine (oversubscription). Give each its share.
            env["OMP_NUM_THREADS"] = str(cpu_threads_per_engine(self.config.engines))
        return subprocess.Popen(cmd, env=env)

    def _gpu_of(self, engine_id: int) -> str | None:
        """The one GPU an engine sees with --device cuda (None on cpu): one engine per GPU, round
        robin when there are more engines than GPUs. With none visible (CUDA_VISIBLE_DEVICES set
        empty) the engine sees none either, and its start fails saying so, rather than taking a GPU
        the user hid."""
        if self.config.device != "cuda" or self.config.engine_urls:
            return None
        gpus = visible_gpus()
        return gpus[engine_id % len(gpus)] if gpus else ""

    def _receive(self, frames: list[bytes], socket_name: str) -> tuple[bytes, Message] | None:
        """A worker's message and who sent it; None (logged) when it does not decode or is a replay."""
        identity, rest = frames[0], frames[1:]
        try:
            env = decode(rest, self.key)
            self.guard.check(env)
        except ProtocolError as exc:
            log.error("refused a message on the %s socket: %s", socket_name, exc)
            return None
        return identity, env.msg

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        received = self._receive(frames, "workers")
        if received is None:
            return
        identity, msg = received
        if isinstance(msg, WorkerHello):
            proc = self.engines.get(msg.engine_id)
            if proc is None or proc.popen.pid != msg.pid:
                log.error("unexpected worker hello from engine %s pid %s", msg.engine_id, msg.pid)
                return
            proc.identity, proc.state, proc.model, proc.device = identity, "ready", msg.model, msg.device
            detail = f"pid {msg.pid}, {msg.model} on {msg.device}, batches {msg.max_running}"
            self.publish(EngineChanged(msg.engine_id, "ready", detail, time.time()))
            self._send_frames(self.workers, [identity], Ack())
            self.executor.on_engine_ready(msg, self.config.engine_capacity)
            return
        if isinstance(msg, WorkerStartFailed):
            proc = self.engines.get(msg.engine_id)
            if proc is not None and proc.state != "dead":
                # Restarting would fail the same way: the engine stays down, and says why. If the
                # exit was seen first and a new worker already started, that one goes too.
                if proc.popen.poll() is None and proc.popen.pid != msg.pid:
                    proc.popen.terminate()
                proc.state, proc.detail = "dead", f"engine {msg.engine_id} could not start: {msg.error}"
                self.scheduler.engines[msg.engine_id].alive = False
                log.error("%s", proc.detail)
                self.publish(EngineChanged(msg.engine_id, "dead", proc.detail, time.time()))
                self._fail_if_no_engine_left()
            return
        engine_id = next((p.engine_id for p in self.engines.values() if p.identity == identity), None)
        if engine_id is None:
            log.error("message from an unregistered engine worker: %s", msg.TYPE)
        elif isinstance(msg, (WorkerDelta, WorkerDone, WorkerFailed)):
            if not isinstance(msg, WorkerDelta):
                self._log("engine", msg)
            self.executor.on_worker_message(engine_id, msg)
        elif isinstance(msg, WorkerLoad):
            msg.engine_id = engine_id  # the socket identity says which engine this is
            self._log("engine", msg)
            self.executor.on_engine_load(msg)

    def _supervise_engines(self) -> None:
        """Notice dead engine processes: move their work, restart them (within limits)."""
        for proc in self.engines.values():
            if proc.state in ("dead", "stopped") or proc.popen.poll() is None:
                continue
            # Results it sent just before exiting may still be unread: take them first, so a
            # finished request is not run again.
            self._drain(self.workers, self._on_worker_frames)
            code = proc.popen.returncode
            reason = f"engine worker process {proc.popen.pid} exited with code {code}"
            log.error("%s", reason)
            proc.identity = None
            self.executor.on_engine_lost(proc.engine_id, reason)
            now = time.monotonic()
            proc.restarts = [t for t in proc.restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(proc.restarts) > MAX_RESTARTS:
                proc.state, proc.detail = "dead", f"{reason}; not restarted (crashed too often)"
                self.publish(EngineChanged(proc.engine_id, "dead", proc.detail, time.time()))
                self._fail_if_no_engine_left()
                continue
            proc.popen, proc.state = self._spawn_engine(proc.engine_id), "starting"
            self.publish(EngineChanged(proc.engine_id, "restarting", reason, time.time()))

    # ----------------------------------------------------------------- tool workers

    def _on_tool_frames(self, frames: list[bytes]) -> None:
        received = self._receive(frames, "tools")
        if received is None:
            return
        identity, msg = received
        assert self.tools is not None  # the socket is bound in bind(), with the pool
        if isinstance(msg, ToolHello):
            self.tools.on_hello(identity, msg.worker_id, msg.pid)
        elif isinstance(msg, (NativeDone, NativeFailed)):
            self._log("engine", msg)
            self.tools.on_result(identity, msg)
        else:
            log.error("unexpected %s on the tools socket", msg.TYPE)

    def _supervise_tools(self) -> None:
        if self.tools is None or not self.tools.workers:
            return
        if any(w.popen.poll() is not None for w in self.tools.workers.values()):
            # Results sent just before a worker exited are read before its death is judged.
            self._drain(self.tool_socket, self._on_tool_frames)
        self.tools.supervise()

    def _fail_if_no_engine_left(self) -> None:
        if all(p.state == "dead" for p in self.engines.values()):
            reasons = "; ".join(sorted({p.detail for p in self.engines.values() if p.detail})) or "see the server log"
            self.executor.fail_queued(f"no engine can run requests ({reasons}); fix that, then restart the server")


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (an address, as ``--ip`` takes it) reaches only this machine."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def default_engines(device: str) -> int:
    """How many engines a server starts when not told: one per visible GPU on cuda (with none
    visible, one, which says why it cannot start), one on cpu. `parrot-nb serve`, `%parrot start`
    and `parrot-nb run` all leave the count to this rule."""
    return max(len(visible_gpus()), 1) if device == "cuda" else 1


def cpu_threads_per_engine(engines: int) -> int:
    """Each CPU engine's share of the cores this server may use (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, engines))


def visible_gpus() -> list[str]:
    """The GPUs engines may use, without importing torch: CUDA_VISIBLE_DEVICES (set but empty: none),
    else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        driver = Path("/proc/driver/nvidia/gpus")
        ids = [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []
    return ids
