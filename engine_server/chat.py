"""Chat-style semantic functions, rendered with the served model's own chat template.

A chat function is a conversation: system and user messages made of template
text and input values, and outputs that are whole assistant replies. The
server renders it with the model's Jinja chat template (as transformers'
``apply_chat_template`` does), so a notebook never needs to know the model.

The engine caches contexts at variable boundaries, so the rendering must keep
them: every piece (a template text, an input value) is rendered as a unique
marker, the rendered text is cut at the markers, and the template's own text
(role headers, end-of-turn tokens) is attached to the piece that follows it.
Two functions with the same system text thus start with the same segment and
share its cached context. A template that changes message contents (trims
them, say) cannot be cut that way; the program is then rendered from the real
texts and each message is one piece: still right, only coarser for caching.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine_server.models import ChatFormat

ROLES = ("system", "user")


class ChatTemplateError(ValueError):
    """The model's chat template cannot render a conversation; the message says why."""


@dataclass(frozen=True)
class Gen:
    """An assistant reply to generate: the index of the function's output."""

    index: int


# A message is (role, pieces); an assistant message has exactly one Gen as its piece.
Message = tuple[str, Sequence["str | Gen"]]

_RESERVED = "\ue000"
_MARK = re.compile("\ue000([0-9]+)\ue001")


def _mark(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: no template writes them


def render_program(fmt: ChatFormat, messages: Sequence[Message]) -> list[str | Gen]:
    """The conversation as the engine runs it: texts to prefill and replies to generate, in order.

    Texts keep the boundaries of the pieces they came from (see the module docstring).
    """
    pieces: list[str | Gen] = [p for _, ps in messages for p in ps]
    if any(isinstance(p, str) and _RESERVED in p for p in pieces):
        raise ChatTemplateError("a text holds U+E000, a private-use character that chat rendering reserves")
    marked_messages, real_messages = [], []
    i = 0
    for role, ps in messages:
        marks = [_mark(j) for j in range(i, i + len(ps))]
        marked_messages.append((role, "".join(marks)))
        real_messages.append((role, "".join(p if isinstance(p, str) else mark for p, mark in zip(ps, marks))))
        i += len(ps)
    marked, real = _render(fmt, marked_messages), _render(fmt, real_messages)
    program: list[str | Gen] = []
    glue_start = 0
    for match in _MARK.finditer(marked):
        glue = marked[glue_start : match.start()]
        piece = pieces[int(match.group(1))]
        if isinstance(piece, Gen):
            if glue:
                program.append(glue)
            program.append(piece)
        else:
            program.append(glue + piece)
        glue_start = match.end()
    if _join(program) + marked[glue_start:] != _strip_marks(real):
        program = _coarse(real, pieces)
    wanted = sum(isinstance(p, Gen) for p in pieces)
    if sum(isinstance(p, Gen) for p in program) != wanted:
        raise ChatTemplateError("the model's chat template does not write out every assistant reply of the conversation")
    # Text after the last reply conditions nothing, so the program ends there.
    last = max((i for i, p in enumerate(program) if isinstance(p, Gen)), default=-1)
    return program[: last + 1]


@lru_cache(maxsize=8)
def end_of_turn(fmt: ChatFormat) -> str:
    """What the template writes after an assistant reply (``<|im_end|>``, ``<|eot_id|>``), or ""."""
    rendered = _render(fmt, [("user", _mark(0)), ("assistant", _mark(1))])
    after = rendered.split(_mark(1), 1)[-1].strip()
    return after.split()[0] if after else ""


def check(fmt: ChatFormat, messages: Sequence[Message]) -> None:
    """Raise ChatTemplateError if the template rejects this shape of conversation."""
    render_program(fmt, messages)


# ----------------------------------------------------------------------------- internals


def _join(program: list[str | Gen]) -> str:
    return "".join(p if isinstance(p, str) else "\0" for p in program)


def _strip_marks(rendered: str) -> str:
    return _MARK.sub("\0", rendered)


def _coarse(real: str, pieces: list[str | Gen]) -> list[str | Gen]:
    """The real rendering cut only at the replies."""
    program: list[str | Gen] = []
    start = 0
    for match in _MARK.finditer(real):
        if real[start : match.start()]:
            program.append(real[start : match.start()])
        piece = pieces[int(match.group(1))]
        assert isinstance(piece, Gen)
        program.append(piece)
        start = match.end()
    return program


def _render(fmt: ChatFormat, messages: list[tuple[str, str]]) -> str:
    """The template over these messages; a leading BOS is dropped when the engine adds its own."""
    last_is_reply = bool(messages) and messages[-1][0] == "assistant"
    try:
        text = _compile(fmt.template).render(
            messages=[{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=not last_is_reply,
            bos_token=fmt.bos_token,
            eos_token=fmt.eos_token,
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # jinja2 raises many kinds; the template is the model's, not the user's
        raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
    if fmt.add_bos and fmt.bos_token and text.startswith(fmt.bos_token):
        text = text[len(fmt.bos_token) :]
    return text


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """A sandboxed Jinja environment as transformers sets one up for chat templates."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from None


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)
