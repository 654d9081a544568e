"""Shared fixtures: real engine servers on loopback, in a private Jupyter runtime dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every server the tests start writes its connection file here, never into the user's runtime dir,
# and `connect()` without a file finds only these.
os.environ["JUPYTER_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="parrot-nb-test-runtime-")
# Every process the run starts inherits this mark, so the run can find any it left behind.
RUN_MARK = f"PARROT_NB_TEST_RUN={uuid.uuid4().hex}"
os.environ["PARROT_NB_TEST_RUN"] = RUN_MARK.split("=", 1)[1]

import parrot_nb  # noqa: E402
from engine_server.protocol import ConnectionInfo  # noqa: E402
from parrot_nb.client import Client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """An engine server started with ``python -m engine_server`` for one test (or module)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.connection_file = tmp / "server.json"
        self.event_log = tmp / "events.jsonl"
        self.log = tmp / "server.log"
        cmd = [sys.executable, "-m", "engine_server", "--connection-file", str(self.connection_file)]
        # The seeded tiny model unless a test names another: it starts in seconds.
        model = [] if "--model" in args else ["--model", "tiny"]
        cmd += ["--event-log", str(self.event_log), *model, *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while not self.connection_file.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
                time.sleep(0.05)
            self.info = ConnectionInfo.read(self.connection_file)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise

    def client(self) -> Client:
        return Client(self.info)

    def events(self) -> list[dict]:
        """The server's event log so far. The server appends while this reads, so a last line
        without its newline is still being written: it is left for the next read."""
        import json

        text = self.event_log.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def crash_until_dead(engine_id: int) -> float:
    """Kill engine ``engine_id`` of the connected server each time it is restarted, until the
    server gives it up (as a GPU that fails every start would); return when the first kill was.
    Each new worker is killed as soon as it exists, so the crashes come well inside the restart
    window however slowly this machine starts one."""
    from engine_server.server import MAX_RESTARTS

    killed: list[int] = []
    started = time.monotonic()
    for _ in range(MAX_RESTARTS + 1):
        deadline = time.monotonic() + 60
        while (engine := parrot_nb.status().engines[engine_id]).pid in killed:
            assert time.monotonic() < deadline, f"engine {engine_id} was not restarted: {engine}"
            time.sleep(0.02)
        os.kill(engine.pid, signal.SIGKILL)
        killed.append(engine.pid)
    deadline = time.monotonic() + 60
    while (engine := parrot_nb.status().engines[engine_id]).state != "dead":
        assert time.monotonic() < deadline, f"engine {engine_id} was not given up: {engine}"
        time.sleep(0.05)
    return started


def wait_http_healthy(server: ServerProcess) -> ServerProcess:
    """Wait until the server's OpenAI-compatible API (--http-port) says its engines are ready."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.info.http}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{server.info.http}/health never said ok:\n{server.log.read_text()[-2000:]}")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A fresh server for one test (for tests that crash or stop it)."""
    server = ServerProcess(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a whole test module, started with the module's ``SERVER_ARGS`` if it has them."""
    server = ServerProcess(tmp_path_factory.mktemp("server"), *getattr(request.module, "SERVER_ARGS", ()))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def connected(shared_server: ServerProcess) -> Iterator[ServerProcess]:
    """This process's parrot_nb session connected to the module's server."""
    parrot_nb.connect(shared_server.connection_file)
    try:
        yield shared_server
    finally:
        parrot_nb.disconnect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test that used an engine server shows the end of that server's log."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for server in {id(v): v for v in getattr(item, "funcargs", {}).values() if isinstance(v, ServerProcess)}.values():
        try:
            tail = server.log.read_text(errors="replace")[-8000:]
        except OSError as exc:
            tail = f"(cannot read it: {exc})"
        report.sections.append((f"engine server log {server.log}", tail))


def _processes_of_this_run() -> dict[int, str]:
    """Live processes (not zombies) other than this one that carry this run's mark: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if RUN_MARK.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any server, engine worker or kernel it started is still running (and end them)."""
    if not Path("/proc").is_dir():
        return
    parrot_nb.disconnect()
    deadline = time.monotonic() + 15  # servers told to stop may take a moment to exit
    while (left := _processes_of_this_run()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    message = f"FAILED: the test run left {len(left)} process(es) running (now killed):\n{lines}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n" + message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def ipython_shell():
    """IPython's test shell with the extension loaded (a singleton: one per test run)."""
    import IPython
    from IPython.testing.globalipapp import start_ipython

    start_ipython()  # returns the shell only on its first call; get it through IPython afterwards
    shell = IPython.get_ipython()
    shell.run_line_magic("load_ext", "parrot_nb")
    return shell
