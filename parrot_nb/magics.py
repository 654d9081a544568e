"""``%%semantic`` and ``%parrot``: define semantic functions and drive the engine server from a notebook."""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from parrot_nb import session
from parrot_nb.function import SemanticFunction
from parrot_nb.magic_line import USAGE as SEMANTIC_USAGE
from parrot_nb.magic_line import MagicLineError, cell_template, parse_semantic_line, parse_start_words
from parrot_nb.template import TemplateError

PARROT_USAGE = """\
%parrot start [--model smollm2|tiny|FILE.gguf|DIR] [--device cpu|cuda] [--port P] [--engines N]
              [--ip ADDRESS] [--max-running N] [--token-budget N] [--kv-cache-mb N]
              [--gpu-memory-utilization F] [--background-chunk N]
                          start an engine server in the background and connect; --engines defaults
                          to one per visible GPU with --device cuda (each pinned to its GPU), one on
                          cpu; beyond loopback (--ip 0.0.0.0) it needs the CurveZMQ keys
                          `parrot-nb keys` writes
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
    @cell_magic
    def semantic(self, line: str, cell: str) -> Any:
        """Define a semantic function: the cell body is its template.

        Placeholders: ``{{input:name}}`` and ``{{output:name key=value ...}}``;
        everything else is literal text (JSON and code included).
        """
        try:
            parsed = parse_semantic_line(line)
        except MagicLineError as exc:
            raise UsageError(str(exc)) from None
        cell = cell_template(cell)
        try:
            fn = SemanticFunction.from_template(
                parsed.name, cell, chat=parsed.chat, namespace=self.shell.user_ns, **parsed.defaults
            )
        except TemplateError as exc:
            # Show the error without a traceback through IPython internals: it is about the cell.
            print(f"TemplateError: {exc}")
            raise
        self.shell.user_ns[parsed.name] = fn
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
        try:
            options = parse_start_words(words)
        except MagicLineError as exc:
            raise ValueError(f"{exc}\n{PARROT_USAGE}") from None
        client = session.start(**options)
        engines = options["engines"] or len(session.status().engines)
        print(
            f"engine server started (pid {client.info.pid}, model {client.info.model}, device {options['device']}, "
            f"{engines} engine{'s' if engines != 1 else ''}); log: {session.server_log()}"
        )


class _Status:
    """``%parrot status`` output, shown as plain text (not as a quoted string)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


# `%%semantic?` shows the flags too: they are declared once, in parrot_nb.magic_line.
ParrotMagics.semantic.__doc__ += "\n" + SEMANTIC_USAGE
