"""Shared fixtures: real engine servers on loopback, in a private Jupyter runtime dir."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every server the tests start writes its connection file here, never into the user's runtime dir,
# and `connect()` without a file finds only these.
os.environ["JUPYTER_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="parrot-nb-test-runtime-")

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
        deadline = time.monotonic() + 120
        while not self.connection_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.info = ConnectionInfo.read(self.connection_file)

    def client(self) -> Client:
        return Client(self.info)

    def events(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.event_log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A fresh server for one test (for tests that crash or stop it)."""
    server = ServerProcess(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a whole test module."""
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture
def connected(shared_server: ServerProcess) -> Iterator[ServerProcess]:
    """This process's parrot_nb session connected to the module's server."""
    parrot_nb.connect(shared_server.connection_file)
    yield shared_server
    parrot_nb.disconnect()


@pytest.fixture(scope="session")
def ipython_shell():
    """IPython's test shell with the extension loaded (a singleton: one per test run)."""
    import IPython
    from IPython.testing.globalipapp import start_ipython

    start_ipython()  # returns the shell only on its first call; get it through IPython afterwards
    shell = IPython.get_ipython()
    shell.run_line_magic("load_ext", "parrot_nb")
    return shell
