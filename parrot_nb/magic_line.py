"""The magic lines, parsed without IPython: ``%%semantic NAME [flags]`` and ``%parrot start [flags]``.

One parser for the magics (``parrot_nb.magics``) and the exporter (``parrot_nb.export``), which
must not need IPython: an exported pipeline defines the same function the cell defined, and
starts the same server.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from engine_server.protocol import DEFAULT_MODEL


class MagicLineError(ValueError):
    """A ``%%semantic`` line that does not parse; the message says which part and shows the usage."""


@dataclass(frozen=True)
class SemanticLine:
    """What a ``%%semantic`` line says: the function's name, whether it is a chat function, its defaults."""

    name: str
    chat: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print and exit the process
        raise MagicLineError(f"%%semantic: {message}\n{self.format_usage().rstrip()}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%%semantic", add_help=False, exit_on_error=False)
    parser.add_argument("name", help="name of the semantic function to define in the user namespace")
    parser.add_argument("--max-tokens", type=int, default=None, help="default max tokens of each output")
    parser.add_argument("--temperature", type=float, default=None, help="default sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="default nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, default=None, help="default top-k (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="default sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="default stop string (repeatable)")
    parser.add_argument(
        "--chat", action="store_true",
        help="a chat function: rendered with the served model's chat template; {{role:system}} and "
        "{{role:user}} start messages, each output is an assistant reply",
    )  # fmt: skip
    return parser


PARSER = _build_parser()
USAGE = PARSER.format_help()


def parse_semantic_line(line: str) -> SemanticLine:
    """Parse a ``%%semantic`` line; ``MagicLineError`` says what is wrong with it."""
    try:
        args = PARSER.parse_args(split_line(line))
    except argparse.ArgumentError as exc:
        raise MagicLineError(f"%%semantic: {exc}\n{PARSER.format_usage().rstrip()}") from None
    defaults = {
        key: value
        for key, value in (
            ("max_tokens", args.max_tokens),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("top_k", args.top_k),
            ("seed", args.seed),
            ("stop", tuple(unescape(s) for s in args.stop) if args.stop else None),
        )
        if value is not None
    }
    return SemanticLine(args.name, args.chat, defaults)


def _build_start_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="%parrot start", add_help=False, exit_on_error=False)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--engines", type=int, default=None)  # the server's rule: one per visible GPU on cuda
    parser.add_argument("--ip", default=None)
    # The engine sizing flags, named as parrot_nb.session.ENGINE_SIZING names them.
    parser.add_argument("--max-running", type=int, default=None)
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--kv-cache-mb", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--background-chunk", type=int, default=None)
    return parser


START_PARSER = _build_start_parser()


def parse_start_words(words: list[str]) -> dict[str, Any]:
    """The arguments of ``%parrot start`` as ``parrot_nb.start``'s keyword arguments."""
    try:
        args, unknown = START_PARSER.parse_known_args(words)
    except argparse.ArgumentError as exc:
        raise MagicLineError(f"%parrot start: {exc}") from None
    if unknown:
        raise MagicLineError(f"%parrot start: unknown argument(s) {' '.join(unknown)}")
    return vars(args)


def cell_template(body: str) -> str:
    """The template of a ``%%semantic`` cell body: the cell's last newline is the editor's, not the prompt's."""
    return body[:-1] if body.endswith("\n") else body


def split_line(line: str) -> list[str]:
    """Split a magic line like a shell does, quotes removed, but keep backslashes.

    Backslashes stay so that `--stop \\n` and `--stop "\\n\\n"` both reach
    ``unescape`` intact.
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise MagicLineError(f"cannot parse the magic line {line!r}: {exc}") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(s: str) -> str:
    """Turn the escapes \\n \\t \\r \\\\ \\" \\' of a magic-line stop string into characters."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), s)
