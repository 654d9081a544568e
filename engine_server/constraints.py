"""Output constraints: one of a fixed set of choices, a regular expression, or a JSON schema.

An output placeholder may carry one constraint (``choices=``, ``regex=`` or ``json=``); the
engine then masks the logits before each sampled token so that only tokens that keep the
output inside the constraint can be drawn (engine/grammar.py).

The grammar engine is llguidance: a maintained Rust library (used by llama.cpp, vLLM and
Guidance) that compiles regular expressions, Lark grammars and JSON schemas against a
tokenizer and computes a token mask in tens of microseconds, with rollback. It ships as one
abi3 wheel without dependencies, so it installs on every machine we run on; xgrammar, the
other candidate, pulls in torch, transformers and a compiler toolchain, which the notebook
side and the manager must not need.

This module is torch-free: the notebook checks a constraint when a function is defined, the
manager when it accepts a call, with the same rules (``normalize``), and both ask llguidance
whether the constraint compiles, without a tokenizer. Engine workers build the token masks.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from engine_server.protocol import CONSTRAINT_OPTIONS, describe_value

#: How a JSON output is written: separators as people write JSON, no free whitespace (a small
#: model given free whitespace spends its tokens on it).
JSON_COMPILE_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint that cannot be used: the message says what is wrong and how to fix it."""


def normalize(key: str, value: object) -> Any:
    """The checked, normal form of constraint ``key``'s ``value``.

    - ``choices``: a tuple of non-empty, distinct strings (a string is split at ``|``);
    - ``regex``: the pattern string;
    - ``json``: the schema as canonical JSON text (a dict, a JSON string, ``True`` for any JSON
      value, or a class with ``model_json_schema()`` such as a pydantic model).

    Raises ``TypeError`` for a value of the wrong type and ``ConstraintError`` (a ValueError)
    for one that does not compile.
    """
    if key == "choices":
        items = value.split("|") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise TypeError(
                "option 'choices' must be a string of choices separated by '|' (\"yes|no\") or a list of "
                f"strings, got {describe_value(value)}"
            )
        if len(items) == 0:
            return ()  # no constraint, as an empty stop list is no stop string
        if any(s == "" for s in items):
            raise ConstraintError(f"option 'choices' needs non-empty choices, got {list(items)!r}")
        repeated = sorted({s for s in items if items.count(s) > 1})
        if repeated:
            raise ConstraintError(f"option 'choices' lists {repeated[0]!r} twice; give each choice once")
        return tuple(items)
    if key == "regex":
        if not isinstance(value, str):
            raise TypeError(f"option 'regex' must be a string (a regular expression), got {describe_value(value)}")
        if value == "":
            raise ConstraintError("option 'regex' is empty; give a pattern such as \"[0-9]+\"")
        _check_compiles("regex", value)
        return value
    if key == "json":
        schema = _schema_text(value)
        _check_compiles("json", schema)
        return schema
    raise ValueError(f"unknown constraint {key!r}; constraints are {', '.join(CONSTRAINT_OPTIONS)}")


def grammar(key: str, value: Any, prefix: str = "") -> str:
    """llguidance's grammar for a normalised constraint, after the forced text ``prefix`` (spaces, or "")."""
    from llguidance import LLMatcher

    if prefix.strip(" "):
        raise ValueError(f"a constraint's prefix is spaces moved out of the prompt, got {prefix!r}")
    if key == "choices":
        # Lark string literals take JSON's escapes; each choice is matched as written.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(prefix + c, ensure_ascii=False) for c in value))
    if key == "regex":
        return LLMatcher.grammar_from_regex(f"{prefix}(?:{value})" if prefix else value)
    if key == "json":
        if not prefix:
            return LLMatcher.grammar_from_json_schema(value, defaults=JSON_COMPILE_OPTIONS)
        schema = json.loads(value)
        schema["x-guidance"] = {**JSON_COMPILE_OPTIONS, **schema.get("x-guidance", {})}
        return LLMatcher.grammar_from_lark(f"start: {json.dumps(prefix)} value\nvalue: %json {json.dumps(schema)}")
    raise ValueError(f"unknown constraint {key!r}")


def describe(key: str, value: Any) -> str:
    """A short human form, for error messages: ``choices 'a|b'``, ``regex '[0-9]+'``, ``JSON schema``."""
    if key == "choices":
        return f"choices {'|'.join(value)!r}"
    if key == "regex":
        return f"regex {value!r}"
    return "JSON schema"


@functools.lru_cache(maxsize=512)
def _check_compiles(key: str, value: str) -> None:
    try:
        text = grammar(key, value)
    except ValueError as exc:  # grammar_from_json_schema: not a JSON object
        raise ConstraintError(f"option {key!r}: {exc}") from None
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(text)
    if not error:
        return
    if key == "regex":
        raise ConstraintError(f"option 'regex' is not a regular expression this engine can match: {_regex_error(error)}")
    raise ConstraintError(f"option {key!r} does not compile: {_first_lines(error)}")


def _regex_error(message: str) -> str:
    """The reason and the pointer from llguidance's message, without the grammar it wrapped the regex in."""
    lines = message.splitlines()
    reason = next((line.strip()[len("error: "):] for line in lines if line.strip().startswith("error: ")), None)
    start = next((i + 1 for i, line in enumerate(lines) if line.rstrip().endswith("regex parse error:")), None)
    if reason is None or start is None:
        return _first_lines(message)
    pointer = [line for line in lines[start:] if not line.strip().startswith("error:")][:2]
    return reason + "\n" + "\n".join(pointer)


def _schema_text(value: object) -> str:
    if isinstance(value, type) and callable(getattr(value, "model_json_schema", None)):
        value = value.model_json_schema()  # a pydantic model
    if value is True:
        value = {}  # any JSON value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"option 'json': the schema is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TypeError(
            "option 'json' must be a JSON schema: a dict, its JSON text, true (any JSON value) or a "
            f"pydantic model class, got {describe_value(value)}"
        )
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order kept: it is the output's order
    except (TypeError, ValueError) as exc:
        raise TypeError(f"option 'json': the schema must hold only JSON values ({exc})") from None


def _first_lines(message: str, limit: int = 6) -> str:
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    return "\n".join(lines[:limit])

