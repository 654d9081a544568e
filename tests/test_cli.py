"""The parrot-nb command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parrot_nb.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_serve_help_describes_the_server_options() -> None:
    out = _cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--device", "--engines", "--port", "--connection-file", "--event-log"):
        assert flag in out.stdout


def test_serve_refuses_a_model_it_cannot_load_with_a_reason() -> None:
    out = _cli("serve", "--model", "/nonexistent/model")
    assert out.returncode == 2
    assert "no config.json there" in out.stderr and "'tiny'" in out.stderr


def test_status_prints_engines_and_apps_of_a_running_server(shared_server) -> None:
    out = _cli("status", str(shared_server.connection_file))
    assert out.returncode == 0, out.stderr
    assert f"pid {shared_server.info.pid}" in out.stdout
    assert "engine 0:" in out.stdout


def test_status_without_a_server_fails_with_a_hint(tmp_path) -> None:
    out = _cli("status", str(tmp_path / "missing.json"))
    assert out.returncode == 1
    assert "does not exist" in out.stderr


@pytest.mark.slow
def test_stop_ends_the_server(server_process) -> None:
    out = _cli("stop", str(server_process.connection_file))
    assert out.returncode == 0, out.stderr
    assert server_process.proc.wait(30) == 0
