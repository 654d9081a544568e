"""The tool-worker pool: where native steps run, beside the engines and the manager.

A native step is a Python function from a notebook (``@parrot_nb.native``) that is a
node of the DAG: its inputs are other nodes' outputs, and its value feeds semantic
functions downstream, with no trip through the client. Its code travels cloudpickled
inside the call (``FunctionSpec.native``) and runs in a tool worker process
(engine_server/tool_worker.py), never in the server process: a crash, a hang or a
runaway allocation costs that worker, which is restarted, and fails that node alone.

Limits per call: ``timeout_s`` (the server kills the worker and fails the node) and
``memory_mb`` (an address-space limit in the worker: the call gets a ``MemoryError``).

Trust: a native step runs arbitrary code as the server's user. Whoever holds the
connection file's key may already do that to a Jupyter kernel, and the same key
signs every message here, so on loopback the trust model is a kernel's. A server
listening beyond loopback refuses native steps unless started with ``--allow-native``.

The pool is driven by the server loop (one thread) and starts workers on first use.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_server.protocol import Message, NativeDone, NativeFailed, RunNative, StopWorker

log = logging.getLogger("engine_server.tools")

#: A worker that keeps dying at start (this often within the window) is not restarted again.
MAX_START_FAILURES = 5
START_WINDOW_S = 60.0


@dataclass
class NativeCall:
    """A native step waiting for, or running on, a tool worker."""

    run: RunNative
    timeout_s: float
    started: float = 0.0  # monotonic time it was handed to a worker


@dataclass
class ToolWorker:
    worker_id: int
    popen: subprocess.Popen[bytes]
    identity: bytes | None = None  # set by its ToolHello
    call: NativeCall | None = None
    started: float = field(default_factory=time.monotonic)
    killed: bool = False  # stopped mid-call (timeout, cancel): it takes nothing more

    @property
    def free(self) -> bool:
        return self.identity is not None and self.call is None and not self.killed


Send = Callable[[bytes, Message], None]
Report = Callable[[Message], None]  # NativeDone / NativeFailed to the executor


class ToolPool:
    """Up to ``size`` tool workers; calls wait in FIFO order for a free one."""

    def __init__(
        self, size: int, endpoint: str, env: dict[str, str], send: Send, report: Report,
        *, timeout_s: float, memory_mb: int,
    ) -> None:  # fmt: skip
        self.size = max(1, size)
        self.endpoint = endpoint
        self.env = env
        self.send = send
        self.report = report
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.workers: dict[int, ToolWorker] = {}
        self.queue: deque[NativeCall] = deque()
        self._next_id = 0
        self._start_failures: list[float] = []

    # ----------------------------------------------------------------- executor side

    def submit(self, run: RunNative, timeout_s: float = 0.0, memory_mb: int = 0) -> None:
        """Queue a call; 0 means the pool's default limit."""
        run.memory_mb = memory_mb or self.memory_mb
        self.queue.append(NativeCall(run, timeout_s or self.timeout_s))
        self.pump()

    def cancel(self, request_id: str) -> None:
        """Drop a queued call, or kill the worker running it (a restart replaces it)."""
        self.queue = deque(c for c in self.queue if c.run.request_id != request_id)
        for worker in self.workers.values():
            if worker.call is not None and worker.call.run.request_id == request_id:
                worker.call = None
                self._kill(worker)

    @property
    def running(self) -> int:
        return sum(w.call is not None for w in self.workers.values())

    # ----------------------------------------------------------------- server loop side

    def on_hello(self, identity: bytes, worker_id: int, pid: int) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.popen.pid != pid:
            log.error("unexpected tool worker hello from worker %s pid %s", worker_id, pid)
            return
        worker.identity = identity
        self.pump()

    def on_result(self, identity: bytes, msg: NativeDone | NativeFailed) -> None:
        worker = next((w for w in self.workers.values() if w.identity == identity), None)
        if worker is None or worker.call is None or worker.call.run.request_id != msg.request_id:
            return  # a call that was cancelled or timed out meanwhile
        worker.call = None
        self.report(msg)
        self.pump()

    def supervise(self) -> None:
        """Enforce time limits, notice dead workers (failing their call), and start queued calls."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            call = worker.call
            if call is not None and now - call.started > call.timeout_s:
                worker.call = None
                self._kill(worker)
                self.report(NativeFailed(
                    call.run.request_id,
                    f"native step {call.run.name!r} ran for more than {call.timeout_s:g} s, its time limit, and "
                    "was stopped (raise it with @parrot_nb.native(timeout=...), or the server's --tool-timeout)",
                ))  # fmt: skip
            code = worker.popen.poll()
            if code is None:
                continue
            del self.workers[worker.worker_id]
            if worker.call is not None:
                self.report(NativeFailed(
                    worker.call.run.request_id,
                    f"native step {worker.call.run.name!r}: its tool worker process {worker.popen.pid} died while "
                    f"running it ({_exit_reason(code)}); the worker was restarted. A step that crashes the "
                    "interpreter (or is killed for memory) fails this way: fix it, then call it again",
                ))  # fmt: skip
            elif worker.identity is None:
                self._start_failures = [t for t in self._start_failures if now - t < START_WINDOW_S] + [now]
                log.error("tool worker %d exited before it registered (%s)", worker.worker_id, _exit_reason(code))
        self.pump()

    def pump(self) -> None:
        """Hand queued calls to free workers; start workers (up to ``size``) for the calls still waiting."""
        while self.queue:
            worker = next((w for w in self.workers.values() if w.free), None)
            if worker is None:
                break
            call = self.queue.popleft()
            call.started = time.monotonic()
            worker.call = call
            self.send(worker.identity, call.run)
        starting = sum(w.identity is None for w in self.workers.values())
        alive = sum(not w.killed for w in self.workers.values())  # a killed one is on its way out
        while len(self.queue) > starting and alive < self.size:
            if not self._spawn():
                self._fail_queue()
                return
            starting += 1
            alive += 1

    def close(self, wait_s: float = 5.0) -> None:
        for worker in self.workers.values():
            if worker.popen.poll() is None:
                if worker.identity is not None and worker.call is None:
                    self.send(worker.identity, StopWorker())
                else:
                    worker.popen.kill()  # mid-call: its result is no longer wanted
        deadline = time.monotonic() + wait_s
        for worker in self.workers.values():
            try:
                worker.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.popen.kill()
                worker.popen.wait()
        self.workers.clear()

    # ----------------------------------------------------------------- internals

    def _spawn(self) -> bool:
        """Start one more worker (it registers later); False when workers keep dying at start."""
        if len(self._start_failures) >= MAX_START_FAILURES:
            return False
        worker_id = self._next_id
        self._next_id += 1
        cmd = [sys.executable, "-m", "engine_server.tool_worker", "--endpoint", self.endpoint, "--worker-id", str(worker_id)]
        self.workers[worker_id] = ToolWorker(worker_id, subprocess.Popen(cmd, env=self.env))
        return True

    def _fail_queue(self) -> None:
        while self.queue:
            call = self.queue.popleft()
            self.report(NativeFailed(
                call.run.request_id,
                f"native step {call.run.name!r} cannot run: tool workers keep exiting before they start "
                "(see the server log)",
            ))  # fmt: skip

    @staticmethod
    def _kill(worker: ToolWorker) -> None:
        worker.killed = True
        if worker.popen.poll() is None:
            worker.popen.kill()
        # supervise() sees it exit, removes it, and pump() starts a new one when calls wait.


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

