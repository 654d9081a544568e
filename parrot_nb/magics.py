"""``%%semantic`` and ``%parrot``: define semantic functions and drive the engine server from a notebook."""

from __future__ import annotations

import re
import shlex
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from engine_server.protocol import DEFAULT_MODEL
from parrot_nb import session
from parrot_nb.function import SemanticFunction
from parrot_nb.template import TemplateError

PARROT_USAGE = """\
%parrot start [--model smollm2|tiny|FILE.gguf|DIR] [--device cpu|cuda] [--port P] [--engines N]
              [--ip ADDRESS] [--max-running N] [--token-budget N] [--kv-cache-mb N]
              [--gpu-memory-utilization F]
                          start an engine server in the background and connect; beyond loopback
                          (--ip 0.0.0.0) it needs the CurveZMQ keys `parrot-nb keys` writes
%parrot connect [CONNECTION_FILE]
                          attach to a running server (default: the newest one)
%parrot status            show the server's engines and applications
%parrot dag [APP]         a live widget of the DAG of application APP (default: every application);
                          click a node for its prompt, output and timings
%parrot stats             a live dashboard: latency of each .get, queueing vs execution, time to first
                          token, prefix-cache hits, tokens/s per application; load and KV use per engine
%parrot stop              stop the server and disconnect
%parrot disconnect        disconnect, leaving the server running"""


@magics_class
class ParrotMagics(Magics):
    @no_var_expand
    @magic_arguments()
    @argument("name", help="name of the semantic function to define in the user namespace")
    @argument("--max-tokens", type=int, default=None, help="default max tokens of each output")
    @argument("--temperature", type=float, default=None, help="default sampling temperature (0 = greedy)")
    @argument("--top-p", type=float, default=None, help="default nucleus sampling threshold")
    @argument("--top-k", type=int, default=None, help="default top-k (0 = off)")
    @argument("--seed", type=int, default=None, help="default sampling seed")
    @argument("--stop", action="append", default=None, help="default stop string (repeatable)")
    @argument(
        "--chat", action="store_true",
        help="a chat function: rendered with the served model's chat template; {{role:system}} and "
        "{{role:user}} start messages, each output is an assistant reply",
    )  # fmt: skip
    @cell_magic
    def semantic(self, line: str, cell: str) -> Any:
        """Define a semantic function: the cell body is its template.

        Placeholders: ``{{input:name}}`` and ``{{output:name key=value ...}}``;
        everything else is literal text (JSON and code included).
        """
        args = self.semantic.parser.parse_args(_split(line))
        defaults = {
            key: value
            for key, value in (
                ("max_tokens", args.max_tokens),
                ("temperature", args.temperature),
                ("top_p", args.top_p),
                ("top_k", args.top_k),
                ("seed", args.seed),
                ("stop", tuple(_unescape(s) for s in args.stop) if args.stop else None),
            )
            if value is not None
        }
        if cell.endswith("\n"):  # the cell's last newline is the editor's, not the prompt's
            cell = cell[:-1]
        try:
            fn = SemanticFunction.from_template(args.name, cell, chat=args.chat, **defaults)
        except TemplateError as exc:
            # Show the error without a traceback through IPython internals: it is about the cell.
            print(f"TemplateError: {exc}")
            raise
        self.shell.user_ns[args.name] = fn
        return fn

    @no_var_expand
    @line_magic
    def parrot(self, line: str) -> Any:
        """Start, connect to, inspect or stop the engine server."""
        words = shlex.split(line)
        if not words or words[0] in ("-h", "--help", "help"):
            print(PARROT_USAGE)
            return None
        command, rest = words[0], words[1:]
        if command == "start":
            return self._start(rest)
        if command == "connect":
            if len(rest) > 1:
                raise ValueError("usage: %parrot connect [CONNECTION_FILE]")
            client = session.connect(rest[0] if rest else None)
            print(f"connected to the engine server (pid {client.info.pid}, model {client.info.model}) at {client.info.requests}")
            return None
        if command == "status":
            return _Status(session.format_status(session.status()))
        if command == "dag":
            if len(rest) > 1:
                raise ValueError("usage: %parrot dag [APP]")
            from widgets.dag import show_dag

            return show_dag(rest[0] if rest else None)
        if command == "stats":
            if rest:
                raise ValueError("usage: %parrot stats")
            from widgets.dashboard import show_stats

            return show_stats()
        if command == "stop":
            session.stop()
            print("engine server stopped")
            return None
        if command == "disconnect":
            session.disconnect()
            print("disconnected; the engine server keeps running")
            return None
        raise ValueError(f"unknown %parrot command {command!r}\n{PARROT_USAGE}")

    def _start(self, words: list[str]) -> None:
        import argparse

        parser = argparse.ArgumentParser(prog="%parrot start", add_help=False, exit_on_error=False)
        parser.add_argument("--model", default=DEFAULT_MODEL)
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--port", type=int, default=None)
        parser.add_argument("--engines", type=int, default=1)
        parser.add_argument("--ip", default=None)
        parser.add_argument("--max-running", type=int, default=None)
        parser.add_argument("--token-budget", type=int, default=None)
        parser.add_argument("--kv-cache-mb", type=int, default=None)
        parser.add_argument("--gpu-memory-utilization", type=float, default=None)
        try:
            args, unknown = parser.parse_known_args(words)
        except argparse.ArgumentError as exc:
            raise ValueError(f"%parrot start: {exc}\n{PARROT_USAGE}") from None
        if unknown:
            raise ValueError(f"%parrot start: unknown argument(s) {' '.join(unknown)}\n{PARROT_USAGE}")
        sizing = {name: getattr(args, name) for name in session.ENGINE_SIZING}
        client = session.start(model=args.model, device=args.device, port=args.port, engines=args.engines, ip=args.ip, **sizing)
        print(
            f"engine server started (pid {client.info.pid}, model {client.info.model}, device {args.device}, "
            f"{args.engines} engine{'s' if args.engines != 1 else ''}); log: {session.server_log()}"
        )


class _Status:
    """``%parrot status`` output, shown as plain text (not as a quoted string)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _split(line: str) -> list[str]:
    """Split a magic line like a shell does, quotes removed, but keep backslashes.

    Backslashes stay so that `--stop \\n` and `--stop "\\n\\n"` both reach
    ``_unescape`` intact.
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise ValueError(f"cannot parse the magic line {line!r}: {exc}") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _unescape(s: str) -> str:
    """Turn the escapes \\n \\t \\r \\\\ \\" \\' of a magic-line stop string into characters."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), s)
