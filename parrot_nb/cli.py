"""The ``parrot-nb`` command."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_side = {"serve": "engine_server", "keys": "engine_server.keys"}
    if argv and argv[0] in server_side:
        # These live in engine_server (the notebook side imports only its protocol); run them as
        # its entry points, so that `parrot-nb serve --help` is the server's own help.
        os.execv(sys.executable, [sys.executable, "-m", server_side[argv[0]], *argv[1:]])
    parser = argparse.ArgumentParser(
        prog="parrot-nb",
        description="parrot-nb: multi-call LLM applications in Jupyter, served by a DAG-aware engine server.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the engine server in the foreground (see `parrot-nb serve --help`)")
    sub.add_parser(
        "keys", help="create the CurveZMQ keys a server needs to listen beyond loopback (`parrot-nb keys --help`)"
    )
    for name, text in (("status", "show a running server's engines and applications"), ("stop", "stop a running server")):
        p = sub.add_parser(name, help=text)
        p.add_argument("connection_file", nargs="?", help="the server's connection file (default: the newest running one)")
    args = parser.parse_args(argv)

    from parrot_nb import session

    try:
        session.connect(args.connection_file)
        if args.command == "status":
            print(session.format_status(session.status()))
        else:
            session.stop()
            print("engine server stopped")
    except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"parrot-nb {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        session.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
