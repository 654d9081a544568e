"""Semantic functions: prompt templates that are called like Python functions."""

from __future__ import annotations

import dataclasses
import html
import inspect
from functools import cached_property
from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

from engine_server.protocol import (
    CONSTRAINT_OPTIONS,
    ChunkSpec,
    ErrorReply,
    FunctionSpec,
    InputValue,
    SamplingSpec,
    SubmitCall,
    check_sampling_option,
    new_id,
)
from parrot_nb import session
from parrot_nb.app import current_app_name
from parrot_nb.template import (
    FrozenOptions,
    InputChunk,
    NameRef,
    OutputChunk,
    ParsedTemplate,
    RoleChunk,
    TemplateError,
    TextChunk,
    parse_template,
    validate_options,
)
from parrot_nb.variable import SemanticVariable


class SemanticFunction:
    """A prompt template whose ``{{input:x}}`` and ``{{output:y}}`` placeholders are semantic variables.

    Calling it returns immediately: a ``SemanticVariable`` for a single output,
    or a named tuple of them (one attribute per output). Nothing runs until a
    variable downstream is requested.

    A ``chat`` function is a conversation rendered with the served model's chat
    template: ``{{role:system}}`` / ``{{role:user}}`` start messages, and each
    output is a whole assistant reply (see parrot_nb.template).

    A bare name as the value of ``choices``, ``regex`` or ``json`` in a placeholder
    (``{{output:plan json=Plan}}``) is looked up in ``namespace`` when the function is
    defined: the notebook's namespace for a ``%%semantic`` cell, the module's for
    ``@semantic_function``.
    """

    def __init__(
        self,
        name: str,
        template: str,
        *,
        chat: bool = False,
        namespace: Mapping[str, Any] | None = None,
        **defaults: Any,
    ) -> None:
        parsed, self.defaults = check_definition(name, template, chat=chat, defaults=defaults)
        self.name = name
        self.template = template
        self.chat = bool(chat)
        self.parsed: ParsedTemplate = resolve_names(parsed, namespace, name)
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.parsed.inputs]
        )
        self._result_type = namedtuple(f"{name}_outputs", self.parsed.outputs) if len(self.outputs) > 1 else None  # type: ignore[misc]

    @classmethod
    def from_template(
        cls,
        name: str,
        template: str,
        *,
        chat: bool = False,
        namespace: Mapping[str, Any] | None = None,
        **defaults: Any,
    ) -> SemanticFunction:
        """Define a function from a template; ``defaults`` are sampling settings for every output.

        ``namespace`` resolves bare names in constraint options (``json=Plan``); pass ``globals()``.
        """
        return cls(name, template, chat=chat, namespace=namespace, **defaults)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.parsed.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.parsed.outputs

    def sampling(self, output: str) -> SamplingSpec:
        """The sampling settings of ``output``: its placeholder's, else the function's defaults."""
        chunk = next(c for c in self.parsed.chunks if isinstance(c, OutputChunk) and c.name == output)
        defaults = self.defaults
        if any(k in CONSTRAINT_OPTIONS for k in chunk.options):  # the placeholder's constraint replaces the default one
            defaults = {k: v for k, v in defaults.items() if k not in CONSTRAINT_OPTIONS}
        options = {**defaults, **dict(chunk.options)}
        for key in ("stop", "choices"):
            if key in options:
                options[key] = list(options[key])
        return SamplingSpec(**options)

    @cached_property
    def spec(self) -> FunctionSpec:
        """The function as the server sees it (built once: a function does not change after definition)."""
        chunks = []
        for c in self.parsed.chunks:
            if isinstance(c, TextChunk):
                chunks.append(ChunkSpec("text", text=c.text))
            elif isinstance(c, InputChunk):
                chunks.append(ChunkSpec("input", name=c.name))
            elif isinstance(c, RoleChunk):
                chunks.append(ChunkSpec("role", name=c.name))
            else:
                chunks.append(ChunkSpec("output", name=c.name, sampling=self.sampling(c.name)))
        return FunctionSpec(self.name, chunks, chat=self.chat)

    @cached_property
    def _json_outputs(self) -> dict[str, bool]:
        return {out: self.sampling(out).json is not None for out in self.outputs}

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Match a call's arguments to the inputs, as Python does for a function's parameters."""
        try:
            bound = self.__signature__.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        return dict(bound.arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = self.bind(*args, **kwargs)
        client = session.require_client()
        inputs: dict[str, InputValue] = {}
        for name, value in values.items():
            if isinstance(value, SemanticVariable):
                inputs[name] = variable_input(self.name, name, value, client)
            else:
                inputs[name] = InputValue(text=value if isinstance(value, str) else str(value))
        app_id = client.app_id(current_app_name())
        variables = [
            SemanticVariable(client, app_id, new_id(), out, self.name, is_json=self._json_outputs[out])
            for out in self.outputs
        ]
        items: dict[str, list[SemanticVariable]] = {}
        for var in variables:
            if count := self.sampling(var.name).items:
                var.items = tuple(SemanticVariable(client, app_id, new_id(), f"{var.name}[{i}]", self.name) for i in range(count))
                items[var.name] = list(var.items)
        submit(client, app_id, self.spec, inputs, variables, items)
        if self._result_type is None:
            return variables[0]
        return self._result_type(*variables)

    def __repr__(self) -> str:
        if self.chat:
            return f"<SemanticFunction {self.name}({', '.join(self.inputs)}) -> {', '.join(self.outputs)}, chat>"
        return f"<SemanticFunction {self.name}({', '.join(self.inputs)}) -> {', '.join(self.outputs)}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        head = f"semantic function {self.name}({', '.join(self.inputs)}) -> {', '.join(self.outputs)}"
        return {
            "text/plain": head,
            "text/html": f"<code>{html.escape(head)}</code>",
        }


def variable_input(function: str, name: str, value: SemanticVariable, client: Any) -> InputValue:
    """An argument that is a variable becomes a reference to it (on this connection only)."""
    if value._client is not client:
        raise ValueError(
            f"{function}(): input {name!r} is a variable from another engine-server connection; "
            "pass its value (var.get()) instead"
        )
    return InputValue(var_id=value.id)


def submit(
    client: Any, app_id: str, spec: FunctionSpec, inputs: dict[str, InputValue], variables: list[SemanticVariable],
    items: dict[str, list[SemanticVariable]] | None = None,
) -> None:  # fmt: skip
    """Send a call without waiting: a refusal (or a failure to send) reaches the user through its variables.

    ``items``: the item variables of outputs split into items, by output name.
    """
    items = items or {}
    request_id = new_id()
    everything = [*variables, *(v for vs in items.values() for v in vs)]
    client.track(request_id, everything)
    call = SubmitCall(
        app_id, request_id, spec, inputs, {v.name: v.id for v in variables}, {n: [v.id for v in vs] for n, vs in items.items()}
    )

    def on_reply(fut: Any) -> None:
        try:
            reply = fut.result()
        except Exception as exc:
            error: str | None = f"the call could not be sent: {exc}"
        else:
            error = f"the server refused the call: {reply.message}" if isinstance(reply, ErrorReply) else None
        if error is not None:
            for v in everything:
                v._fail(error)

    client.request(call).add_done_callback(on_reply)


def semantic_function(fn: Callable[..., Any] | None = None, /, **defaults: Any) -> Any:
    """Decorator: the function's docstring is the template, its name the function's name.

    ``@semantic_function``, ``@semantic_function(max_tokens=32)`` or ``@semantic_function(chat=True)``.
    """

    def wrap(f: Callable[..., Any]) -> SemanticFunction:
        if not f.__doc__:
            raise ValueError(f"@semantic_function {f.__name__}: the docstring is the template, and it is empty")
        return SemanticFunction(f.__name__, inspect.cleandoc(f.__doc__), namespace=f.__globals__, **defaults)

    return wrap(fn) if fn is not None else wrap


def check_definition(
    name: str, template: str, *, chat: bool = False, defaults: Mapping[str, Any] | None = None
) -> tuple[ParsedTemplate, dict[str, object]]:
    """Parse ``template`` and check the defaults, as defining the function does, without resolving names.

    Raises what defining the function raises: ``TemplateError`` for the template, ``ValueError``
    or ``TypeError`` for the name or a default.
    """
    if not name.isidentifier():
        raise ValueError(f"a semantic function's name must be a Python identifier, not {name!r}")
    parsed = parse_template(template, name=name, chat=bool(chat))
    return parsed, validate_options(defaults or {}, where=f"semantic function {name!r}")


def names_used(parsed: ParsedTemplate) -> list[str]:
    """The Python names that the template's options refer to (``json=Plan`` -> ``Plan``)."""
    return [v.name for c in parsed.chunks if isinstance(c, OutputChunk) for v in c.options.values() if isinstance(v, NameRef)]


def resolve_names(parsed: ParsedTemplate, namespace: Mapping[str, Any] | None, function: str) -> ParsedTemplate:
    """``parsed`` with each ``NameRef`` option replaced by the checked value of the object it names."""
    if not names_used(parsed):
        return parsed
    chunks = []
    for chunk in parsed.chunks:
        if isinstance(chunk, OutputChunk) and any(isinstance(v, NameRef) for v in chunk.options.values()):
            options = {k: _resolve(k, v, namespace, function) if isinstance(v, NameRef) else v for k, v in chunk.options.items()}
            chunk = OutputChunk(chunk.name, FrozenOptions(options))
        chunks.append(chunk)
    return dataclasses.replace(parsed, chunks=tuple(chunks))


def _resolve(key: str, ref: NameRef, namespace: Mapping[str, Any] | None, function: str) -> object:
    def error(reason: str) -> TemplateError:
        return TemplateError(reason, line=ref.line, column=ref.column, placeholder=ref.placeholder, template_name=function)

    head, *attributes = ref.name.split(".")
    if namespace is None or head not in namespace:
        where = "" if namespace is not None else " (no namespace was given: pass namespace=globals())"
        raise error(
            f"{key}={ref.name} names a Python object, but {head!r} is not defined{where}; define it before "
            f"this function, or quote the value"
        )
    value = namespace[head]
    for attribute in attributes:
        try:
            value = getattr(value, attribute)
        except AttributeError:
            raise error(f"{key}={ref.name}: {type(value).__name__} object has no attribute {attribute!r}") from None
    try:
        return check_sampling_option(key, value)
    except (TypeError, ValueError) as exc:
        raise error(f"{key}={ref.name}: {exc}") from None

