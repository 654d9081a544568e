"""The engine server: a ZMQ front for clients, a PUB for events, engine workers behind.

Sockets (all on loopback):
- ``requests`` ROUTER: clients' DEALERs send protocol requests; every one is
  answered, a malformed one with ``ErrorReply`` (never fatal). A frame over
  ``MAX_MESSAGE_BYTES`` cannot be answered: zmq drops it, and its connection.
- ``events`` PUB: everything that happens (``protocol`` events), topic
  ``app.<app_id>`` or ``server``.
- ``workers`` ROUTER: engine worker processes connect DEALERs to it.

One thread runs the loop; the manager's executor is called from it, so the
DAG needs no locks.
"""

from __future__ import annotations

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
from engine_server.manager.executor import Executor
from engine_server.manager.graph import Graph, GraphError
from engine_server.manager.scheduler import Scheduler
from engine_server.models import DEFAULT_MODEL, chat_format, resolve_model
from engine_server.protocol import (
    CONNECTION_PREFIX,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Activate,
    AppInfo,
    AppOpened,
    ConnectionInfo,
    EngineChanged,
    EngineInfo,
    ErrorReply,
    EventsSynced,
    Hello,
    Message,
    OpenApp,
    ProtocolError,
    ServerStatus,
    Shutdown,
    Status,
    StopWorker,
    SubmitCall,
    SyncEvents,
    Welcome,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
    WorkerHello,
    WorkerLoad,
    WorkerStartFailed,
    decode,
    encode,
    new_id,
    peek_id,
    runtime_dir,
    to_dict,
)

log = logging.getLogger("engine_server")

LOOPBACK = "127.0.0.1"
# An engine that dies more often than this within RESTART_WINDOW_S is left dead.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL  # see engine_server.models.resolve_model
    device: str = "cpu"
    engines: int = 1
    port: int | None = None  # requests on port, events on port + 1; random when None
    connection_file: Path | None = None
    event_log: Path | None = None
    # Requests handed to one engine at a time; None: what the engine says it batches (max_running).
    engine_capacity: int | None = None
    # Sizing passed to every worker as --name value (max_running, token_budget, kv_cache_mb,
    # gpu_memory_utilization); see `parrot-nb serve --help`.
    engine_options: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineProcess:
    """One engine worker process as the server supervises it."""

    engine_id: int
    popen: subprocess.Popen[bytes]
    identity: bytes | None = None
    state: str = "starting"  # starting | ready | dead | stopped
    restarts: list[float] = field(default_factory=list)
    detail: str = ""  # why it is dead, once it is


class EngineServer:
    def __init__(self, config: ServerConfig) -> None:
        """Raises models.ModelNotFoundError or gguf_file.GGUFError when ``config.model`` cannot be served."""
        self.config = config
        self.model = resolve_model(config.model)
        self.key = secrets.token_hex(32).encode()
        self.started = time.monotonic()
        self.ctx = zmq.Context()
        self.requests = self.ctx.socket(zmq.ROUTER)
        self.events = self.ctx.socket(zmq.PUB)
        self.workers = self.ctx.socket(zmq.ROUTER)
        for sock in (self.requests, self.events, self.workers):
            sock.setsockopt(zmq.LINGER, 0)
        for sock in (self.requests, self.workers):
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a huge frame must not exhaust memory
        self.events.setsockopt(zmq.SNDHWM, 100_000)  # token streams are bursty; don't drop events
        self.graph = Graph(chat_format(self.model))
        self.scheduler = Scheduler()
        self.executor = Executor(self.graph, self.scheduler, self.publish, self.send_to_engine)
        self.engines: dict[int, EngineProcess] = {}
        self.connection_file: Path | None = None
        self._event_log: IO[str] | None = None
        self._running = False
        self._handlers = {
            Hello: self._on_hello,
            SyncEvents: self._on_sync,
            OpenApp: self._on_open_app,
            SubmitCall: self._on_submit,
            Activate: self._on_activate,
            Status: self._on_status,
            Shutdown: self._on_shutdown,
        }

    # ----------------------------------------------------------------- lifecycle

    def bind(self) -> ConnectionInfo:
        port = self.config.port
        if port is None:
            req_port = self.requests.bind_to_random_port(f"tcp://{LOOPBACK}")
            ev_port = self.events.bind_to_random_port(f"tcp://{LOOPBACK}")
        else:
            req_port, ev_port = port, port + 1
            self.requests.bind(f"tcp://{LOOPBACK}:{req_port}")
            self.events.bind(f"tcp://{LOOPBACK}:{ev_port}")
        self.worker_endpoint = f"tcp://{LOOPBACK}:{self.workers.bind_to_random_port(f'tcp://{LOOPBACK}')}"
        info = ConnectionInfo(
            requests=f"tcp://{LOOPBACK}:{req_port}",
            events=f"tcp://{LOOPBACK}:{ev_port}",
            key=self.key.decode(),
            pid=os.getpid(),
            model=self.model.name,
        )
        path = self.config.connection_file or runtime_dir() / f"{CONNECTION_PREFIX}{os.getpid()}.json"
        self.connection_file = info.write(path)
        if self.config.event_log is not None:
            self._event_log = open(self.config.event_log, "a", buffering=1)
        return info

    def serve_forever(self) -> None:
        """Bind, start the engines, and run the loop until ``Shutdown`` or a signal."""
        info = self.bind()
        for i in range(self.config.engines):
            self.scheduler.add_engine(i, self.config.engine_capacity or 1)
            self.engines[i] = EngineProcess(i, self._spawn_engine(i))
        log.info("parrot-nb engine server %s: requests %s, events %s", __version__, info.requests, info.events)
        log.info("connection file: %s", self.connection_file)
        self._running = True
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        poller = zmq.Poller()
        poller.register(self.requests, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        try:
            while self._running:
                ready = dict(poller.poll(100))
                if self.workers in ready:
                    self._drain(self.workers, self._on_worker_frames)
                if self.requests in ready:
                    self._drain(self.requests, self._on_client_frames)
                try:
                    self._supervise_engines()
                except Exception:  # a bug here must not take every notebook's server down
                    log.exception("error supervising engines")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.close()

    def close(self) -> None:
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
        sock.send_multipart(prefix + encode(msg, self.key, ref=ref))

    def publish(self, event: Message) -> None:
        app_id = getattr(event, "app_id", None)
        topic = f"app.{app_id}" if app_id else "server"
        self._send_frames(self.events, [topic.encode()], event)
        self._log("event", event)

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
        except ProtocolError as exc:
            log.warning("malformed request: %s", exc)
            reply = ErrorReply("malformed", f"malformed request: {exc}")
            self._send_frames(self.requests, [identity], reply, ref=peek_id(rest) if rest else None)
            return
        self._log("in", env.msg)
        handler = self._handlers.get(type(env.msg))
        if handler is None:
            log.warning("refused %s: not a request", env.msg.TYPE)
            reply: Message = ErrorReply("unexpected", f"{env.msg.TYPE} is not a request this server accepts")
        else:
            try:
                reply = handler(env.msg)
            except (GraphError, ValueError) as exc:
                log.info("refused %s: %.300s", env.msg.TYPE, exc)
                reply = ErrorReply("invalid", str(exc))
            except Exception as exc:  # a bug must not take the server (and every notebook) down
                log.exception("error handling %s", env.msg.TYPE)
                reply = ErrorReply("internal", f"internal server error handling {env.msg.TYPE}: {exc!r}")
        self._send_frames(self.requests, [identity], reply, ref=env.id)

    def _on_hello(self, msg: Hello) -> Message:
        return Welcome(new_id(), __version__, PROTOCOL_VERSION, self.model.name, len(self.engines))

    def _on_sync(self, msg: SyncEvents) -> Message:
        self.publish(EventsSynced(msg.token))
        return Ack()

    def _on_open_app(self, msg: OpenApp) -> Message:
        app = self.graph.open_app(new_id(), msg.name)
        return AppOpened(app.id, app.name)

    def _on_submit(self, msg: SubmitCall) -> Message:
        self.executor.submit(msg)
        return Ack()

    def _on_activate(self, msg: Activate) -> Message:
        if msg.var_id not in self.graph.variables:
            raise GraphError(f"unknown variable {msg.var_id!r}: it was never submitted to this server")
        self.executor.activate(msg.var_id, msg.perf)
        self._fail_if_no_engine_left()
        return self.executor.var_state(msg.var_id)

    def _on_status(self, msg: Status) -> Message:
        engines = []
        for p in self.engines.values():
            slot = self.scheduler.engines[p.engine_id]
            engines.append(
                EngineInfo(
                    p.engine_id, p.popen.pid, self.model.name, self.config.device, p.state, len(slot.running),
                    slot.finished, slot.capacity, slot.engine_waiting, slot.kv_blocks_used, slot.kv_blocks_total,
                    slot.cached_keys,
                )  # fmt: skip
            )
        apps = [
            AppInfo(app.id, app.name, len(app.requests), app.done, app.failed, app.prompt_tokens, app.cached_tokens)
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
        )

    def _on_shutdown(self, msg: Shutdown) -> Message:
        self._running = False
        return Ack()

    # ----------------------------------------------------------------- engines

    def _spawn_engine(self, engine_id: int) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "engine_server.engine.worker",
            "--endpoint", self.worker_endpoint,
            "--engine-id", str(engine_id),
            "--model", self.model.spec,
            "--device", self.config.device,
        ]  # fmt: skip
        for name, value in sorted(self.config.engine_options.items()):
            cmd += [f"--{name.replace('_', '-')}", value]
        # The key travels in the environment, not argv, so `ps` does not show it.
        env = {**os.environ, "PARROT_NB_KEY": self.key.decode(), "PARROT_NB_SERVER_PID": str(os.getpid())}
        if self.config.device == "cuda":
            # One engine per GPU, round robin when there are more engines than GPUs (for testing).
            gpus = visible_gpus()
            env["CUDA_VISIBLE_DEVICES"] = gpus[engine_id % len(gpus)]
        return subprocess.Popen(cmd, env=env)

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        try:
            msg = decode(rest, self.key).msg
        except ProtocolError as exc:
            log.error("malformed message from an engine worker: %s", exc)
            return
        if isinstance(msg, WorkerHello):
            proc = self.engines.get(msg.engine_id)
            if proc is None or proc.popen.pid != msg.pid:
                log.error("unexpected worker hello from engine %s pid %s", msg.engine_id, msg.pid)
                return
            proc.identity, proc.state = identity, "ready"
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

    def _fail_if_no_engine_left(self) -> None:
        if all(p.state == "dead" for p in self.engines.values()):
            reasons = "; ".join(sorted({p.detail for p in self.engines.values() if p.detail})) or "see the server log"
            self.executor.fail_queued(f"no engine can run requests ({reasons}); fix that, then restart the server")


def visible_gpus() -> list[str]:
    """The GPUs engines may use, without importing torch: CUDA_VISIBLE_DEVICES, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        driver = Path("/proc/driver/nvidia/gpus")
        ids = [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []
    return ids or ["0"]
