"""The engine server's CurveZMQ keys: what it needs to listen beyond loopback.

``parrot-nb keys`` (``python -m engine_server.keys``) writes a server key pair with
pyzmq's ``zmq.auth.create_certificates`` into the Jupyter runtime directory (or
``--dir``), both files mode 0600. A server bound beyond loopback (or started with
``--curve``) makes its requests and events sockets CURVE servers with the secret
key and puts the public key in its connection file; a client encrypts to it with a
throwaway key pair of its own. Who may send requests is still decided by the HMAC
key of the connection file: CURVE keeps the traffic (prompts, outputs, signatures)
from being read or replayed off the network; it does not name clients.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from engine_server.protocol import runtime_dir

KEY_NAME = "parrot-nb-server"
COMMAND = "parrot-nb keys"


class KeysError(RuntimeError):
    """CURVE keys are needed and missing, unsafe or unsupported; the message says what to do."""


@dataclass(frozen=True)
class CurveKeys:
    """A server key pair, Z85-encoded (40 characters each)."""

    public: bytes
    secret: bytes


def key_files(directory: Path) -> tuple[Path, Path]:
    """The public and the secret key file in ``directory``."""
    return directory / f"{KEY_NAME}.key", directory / f"{KEY_NAME}.key_secret"


def make_command(directory: Path | None) -> str:
    """The command that writes keys into ``directory`` (None: the default, the runtime dir)."""
    return COMMAND if directory is None else f"{COMMAND} --dir {directory}"


def require_curve() -> None:
    if not zmq.has("curve"):
        raise KeysError(
            f"this pyzmq's libzmq {zmq.zmq_version()} was built without CURVE support, so traffic cannot be "
            "encrypted: install pyzmq from its wheel (`pip install --force-reinstall pyzmq`; the wheels bundle "
            "libzmq with CURVE), or stay on loopback"
        )


def create_keys(directory: Path | None = None, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new server key pair into ``directory`` (default: the runtime dir); returns both files."""
    require_curve()
    target = Path(directory) if directory is not None else runtime_dir()
    public, secret = key_files(target)
    if not force and (public.exists() or secret.exists()):
        raise KeysError(
            f"{secret} already exists. New keys take effect for servers started afterwards; replace them with "
            f"`{make_command(directory)} --force`"
        )
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written in a private directory and moved into place: the secret key is never readable by
    # anyone else, not even between its creation and a chmod.
    with tempfile.TemporaryDirectory(dir=target, prefix=".parrot-nb-keys-") as tmp:
        for path in zmq.auth.create_certificates(tmp, KEY_NAME):
            os.chmod(path, 0o600)
        os.replace(Path(tmp) / public.name, public)
        os.replace(Path(tmp) / secret.name, secret)
    return public, secret


def load_keys(directory: Path | None = None) -> CurveKeys:
    """The server key pair in ``directory`` (default: the runtime dir); ``KeysError`` says how to fix a problem."""
    require_curve()
    target = Path(directory) if directory is not None else runtime_dir()
    _, secret = key_files(target)
    if not secret.exists():
        raise KeysError(f"there is no {secret.name} in {target}. Create the keys with:\n    {make_command(directory)}")
    mode = stat.S_IMODE(secret.stat().st_mode)
    if mode & 0o077:
        raise KeysError(f"{secret} is open to other users (mode {mode:03o}): `chmod 600 {secret}`, or make new keys")
    remake = f"make new keys with `{make_command(directory)} --force`"
    try:
        public_key, secret_key = zmq.auth.load_certificate(secret)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{secret} is not a CURVE key file ({exc}); {remake}") from None
    if secret_key is None:
        raise KeysError(f"{secret} holds no secret key; {remake}")
    return CurveKeys(public_key, secret_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Create the CurveZMQ key pair that `parrot-nb serve --ip ADDRESS` needs to listen beyond "
        "loopback: its traffic is then encrypted. Clients need no keys of their own: the server's public key "
        "travels in its connection file, and requests are still signed with that file's HMAC key.",
    )
    parser.add_argument(
        "--dir", type=Path, default=None,
        help=f"where to write {KEY_NAME}.key and {KEY_NAME}.key_secret (default: Jupyter's runtime dir, "
        "where the server looks unless given --keys-dir)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    args = parser.parse_args(argv)
    try:
        public, secret = create_keys(args.dir, force=args.force)
    except (KeysError, OSError) as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {secret} (secret, mode 600) and {public} (public)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
