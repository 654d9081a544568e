"""The parrot-nb command line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_server.protocol import Status

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parrot_nb.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_serve_help_describes_the_server_options() -> None:
    out = _cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--device", "--engines", "--port", "--ip", "--curve", "--keys-dir",
                 "--connection-file", "--event-log", "--max-running", "--token-budget", "--kv-cache-mb", "--gpu-memory-utilization",
                 "--background-chunk", "--tool-workers", "--tool-timeout", "--tool-memory-mb", "--allow-native", "--no-native",
                 "--no-early-prefill"):  # fmt: skip
        assert flag in out.stdout


def test_serve_refuses_a_model_it_cannot_load_with_a_reason() -> None:
    out = _cli("serve", "--model", "/nonexistent/model")
    assert out.returncode == 2
    assert "is not 'smollm2', 'tiny', a .gguf file or a model directory" in out.stderr
    assert "nothing is downloaded" in out.stderr


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


def test_serve_rejects_a_bad_engine_size_before_starting() -> None:
    out = _cli("serve", "--max-running", "0")
    assert out.returncode == 2
    assert "--max-running: must be at least 1, got 0" in out.stderr


def test_engine_sizing_flags_reach_every_engine(tmp_path) -> None:
    from tests.conftest import ServerProcess

    server = ServerProcess(tmp_path, "--engines", "2", "--max-running", "3", "--kv-cache-mb", "4")
    try:
        client = server.client()
        try:
            deadline = time.monotonic() + 120
            while True:
                engines = client.call(Status(), timeout=10).engines
                if len(engines) == 2 and all(e.state == "ready" and e.kv_blocks_total for e in engines):
                    break
                assert time.monotonic() < deadline, engines
                time.sleep(0.2)
        finally:
            client.close()
        # The tiny model keeps 2 KiB of K/V per token: 4 MiB hold 128 blocks of 16 tokens.
        assert [(e.capacity, e.kv_blocks_total) for e in engines] == [(3, 128), (3, 128)]
    finally:
        server.stop()
