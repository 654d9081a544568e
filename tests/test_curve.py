"""Listening beyond loopback: CurveZMQ keys, made by `parrot-nb keys`, required and used."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

import parrot_nb
from engine_server.protocol import ConnectionInfo, ServerStatus, Status, decode, encode
from parrot_nb.function import SemanticFunction
from tests.conftest import ServerProcess

REPO = Path(__file__).resolve().parent.parent
KEY = "parrot-nb-server.key"
SECRET = "parrot-nb-server.key_secret"


def _cli(*args: str, runtime: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ) if runtime is None else {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    cmd = [sys.executable, "-m", "parrot_nb.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def _status_answered(info: ConnectionInfo, *, curve: bool, wait_s: float) -> bool:
    """Send a signed Status on a raw DEALER (encrypting to the server's key or not): is it answered?"""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        public, secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, info.curve_server_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    try:
        sock.connect(info.requests)
        sock.send_multipart(encode(Status(), info.key_bytes))
        if not sock.poll(int(wait_s * 1000)):
            return False
        return isinstance(decode(sock.recv_multipart(), info.key_bytes).msg, ServerStatus)
    finally:
        sock.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    out = _cli("keys", "--dir", str(directory))
    assert out.returncode == 0, out.stderr
    return directory


# ---------------------------------------------------------------- the keys command


def test_keys_command_writes_a_key_pair_only_its_owner_can_read(keys) -> None:
    for name in (KEY, SECRET):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    public, secret = zmq.auth.load_certificate(keys / SECRET)
    assert secret is not None and len(public) == len(secret) == 40
    assert zmq.auth.load_certificate(keys / KEY) == (public, None)
    assert [p.name for p in keys.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_keys_command_writes_into_the_runtime_dir_by_default(tmp_path) -> None:
    out = _cli("keys", runtime=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / SECRET) in out.stdout
    assert (tmp_path / KEY).exists() and (tmp_path / SECRET).exists()


def test_keys_command_does_not_replace_keys_unless_forced(keys) -> None:
    before = (keys / SECRET).read_text()
    out = _cli("keys", "--dir", str(keys))
    assert out.returncode == 1 and "already exists" in out.stderr and "--force" in out.stderr
    assert (keys / SECRET).read_text() == before


def test_keys_command_is_listed_in_the_cli_help() -> None:
    out = _cli("--help")
    assert out.returncode == 0 and "keys" in out.stdout and "beyond loopback" in out.stdout


# ---------------------------------------------------------------- refusing to listen in the clear


def test_serving_beyond_loopback_without_keys_exits_2_and_names_the_command(tmp_path) -> None:
    out = _cli("serve", "--model", "tiny", "--ip", "0.0.0.0", runtime=tmp_path)
    assert out.returncode == 2
    assert "listening on 0.0.0.0, beyond loopback, requires CurveZMQ keys" in out.stderr
    assert out.stderr.rstrip().endswith("Create the keys with:\n    parrot-nb keys")
    assert list(tmp_path.glob("parrot-nb-server-*.json")) == []  # it never listened


def test_serving_with_a_keys_dir_names_the_command_for_that_dir(tmp_path) -> None:
    out = _cli("serve", "--model", "tiny", "--ip", "0.0.0.0", "--keys-dir", str(tmp_path / "k"))
    assert out.returncode == 2
    assert f"parrot-nb keys --dir {tmp_path / 'k'}" in out.stderr


def test_a_secret_key_others_can_read_is_refused(tmp_path, keys) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / SECRET).write_text((keys / SECRET).read_text())
    (loose / SECRET).chmod(0o644)
    out = _cli("serve", "--model", "tiny", "--ip", "0.0.0.0", "--keys-dir", str(loose))
    assert out.returncode == 2
    assert "open to other users (mode 644)" in out.stderr and "chmod 600" in out.stderr


def test_ip_must_be_an_address() -> None:
    out = _cli("serve", "--ip", "example.org")
    assert out.returncode == 2 and "expected an IP address" in out.stderr


# ---------------------------------------------------------------- an encrypted server


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[ServerProcess]:
    """A server listening on every interface, with the keys from `parrot-nb keys`."""
    server = ServerProcess(tmp_path_factory.mktemp("open"), "--ip", "0.0.0.0", "--keys-dir", str(keys))
    yield server
    server.stop()


def test_the_connection_file_carries_the_servers_public_key(open_server, keys) -> None:
    public, _ = zmq.auth.load_certificate(keys / KEY)
    assert open_server.info.curve_server_key == public.decode()
    assert open_server.info.requests.startswith("tcp://0.0.0.0:")


def test_a_server_beyond_loopback_serves_a_notebook_end_to_end(open_server) -> None:
    client = parrot_nb.connect(open_server.connection_file)  # Hello and the events sync, encrypted
    try:
        assert client.server_version
        f = SemanticFunction.from_template("f", "Say something: {{output:a max_tokens=4}}")
        assert isinstance(f().get(timeout=60), str)
    finally:
        parrot_nb.disconnect()


def test_a_plain_zmq_client_gets_no_answer_from_an_encrypted_server(open_server) -> None:
    assert not _status_answered(open_server.info, curve=False, wait_s=2)
    assert _status_answered(open_server.info, curve=True, wait_s=20)  # the same request, encrypted


def test_curve_on_loopback_encrypts_there_too(tmp_path, keys) -> None:
    server = ServerProcess(tmp_path, "--curve", "--keys-dir", str(keys))
    try:
        assert server.info.requests.startswith("tcp://127.0.0.1:") and server.info.curve_server_key
        client = server.client()
        client.close()
        assert not _status_answered(server.info, curve=False, wait_s=2)
    finally:
        server.stop()


def test_parrot_start_beyond_loopback_without_keys_says_how_to_make_them(ipython_shell) -> None:
    with pytest.raises(parrot_nb.ServerStartError, match="requires CurveZMQ keys(.|\n)*parrot-nb keys"):
        ipython_shell.run_line_magic("parrot", "start --model tiny --ip 0.0.0.0")
    assert parrot_nb.session.current_client() is None
