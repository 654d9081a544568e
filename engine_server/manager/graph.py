"""Requests and semantic variables of every application, and the edges between them."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from engine_server import chat
from engine_server.models import ChatFormat
from engine_server.protocol import ChunkSpec, FunctionSpec, InputValue, Perf, SegmentSpec, SubmitCall, WorkerDone


class GraphError(ValueError):
    """A call that cannot become part of the DAG; the message says why."""


@dataclass
class Variable:
    """A semantic variable: produced by at most one request, read by any number."""

    id: str
    app_id: str
    name: str
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)
    state: str = "pending"  # pending | running | done | failed
    value: str | None = None
    json: bool = False  # the value is JSON text: a native step's non-str result, or a JSON-schema output
    error: str | None = None
    forgotten: bool = False  # its client dropped it (or is gone): only other requests may still need it


@dataclass
class RequestNode:
    """One call of a semantic function."""

    id: str
    app_id: str
    function: FunctionSpec
    inputs: dict[str, InputValue]
    outputs: dict[str, str]  # output name -> variable id
    # Output variable id -> the ids of its item variables (an output split into items, one
    # per line: ``SamplingSpec.items``). Each resolves as its line completes.
    items: dict[str, list[str]] = field(default_factory=dict)
    state: str = "waiting"  # waiting | queued | running | lost, then done | failed | cancelled
    perf: Perf | None = None  # set once activated (criteria propagated from a .get)
    depth: int = 0  # longest path from a root of the DAG; FIFO by depth within an app
    group: str | None = None  # task group (the consumer's id) when it is one of several producers feeding one request
    segments: list[SegmentSpec] | None = None  # the program, with context keys, fixed once it is queued
    prefix: dict[str, int] = field(default_factory=dict)  # context key -> prompt bytes up to its boundary
    # While it waits on an input: the contexts prefilled early (the text before that input),
    # the engine that holds that prefill, and the prompt text it holds, as segments (the last
    # one may be the part of an input streamed so far).
    early_prefix: dict[str, int] = field(default_factory=dict)
    early_engine: int | None = None
    early_held: list[str] = field(default_factory=list)
    engine_id: int | None = None
    attempts: int = 0
    t_submitted: float = field(default_factory=time.monotonic)
    t_queued: float = 0.0
    t_dispatched: float = 0.0
    t_first_token: float = 0.0
    t_ended: float = 0.0  # when it finished, failed or was cancelled
    # What a request's detail shows: output streamed by its running attempt (var id -> deltas),
    # the engine's report once done, and why it failed or was cancelled.
    streamed: dict[str, list[str]] = field(default_factory=dict)
    result: WorkerDone | None = None
    error: str = ""

    @property
    def variables(self) -> list[str]:
        """Every variable it produces: its outputs and their items."""
        return [*self.outputs.values(), *(v for ids in self.items.values() for v in ids)]


#: States a request never leaves.
TERMINAL = ("done", "failed", "cancelled")


@dataclass
class App:
    id: str
    name: str
    owner: str | None = None  # the client id that opened it (None: a client that never said Hello)
    requests: set[str] = field(default_factory=set)  # ids of its requests still in the graph
    submitted: int = 0  # requests ever submitted
    unfinished: int = 0  # of those, not yet done, failed or cancelled
    done: int = 0  # requests finished
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0  # over its finished requests
    cached_tokens: int = 0  # of those, served from cached contexts
    closed: str = ""  # why it was closed; a closed app takes no more calls


class Graph:
    """All applications' DAGs. Variables are global ids, so an app may read another's.

    ``chat_format`` is the served model's, for chat functions (None: it has none).
    """

    def __init__(self, chat_format: ChatFormat | None = None) -> None:
        self.chat_format = chat_format
        # The served model's context length in tokens, from the first engine that registers
        # (0 until then): calls asking for more output than that are refused.
        self.max_context = 0
        # Whether something may have become unreachable since the last collect().
        self._garbage = False
        self.apps: dict[str, App] = {}
        self.requests: dict[str, RequestNode] = {}
        self.variables: dict[str, Variable] = {}

    def open_app(self, app_id: str, name: str, owner: str | None = None) -> App:
        app = self.apps[app_id] = App(app_id, name, owner)
        return app

    @property
    def unfinished(self) -> int:
        """Requests of every application not yet done, failed or cancelled."""
        return sum(app.unfinished for app in self.apps.values())

    def add_request(self, call: SubmitCall) -> RequestNode:
        """Add a call as a request node, linked to the producers of its inputs."""
        if call.app_id not in self.apps:
            raise GraphError(f"unknown application {call.app_id!r}: open it with OpenApp first")
        if self.apps[call.app_id].closed:
            app = self.apps[call.app_id]
            raise GraphError(f"application {app.name!r} is closed ({app.closed}); make calls in an open one")
        if call.request_id in self.requests:
            raise GraphError(f"request id {call.request_id!r} was already submitted")
        fn = call.function
        declared_inputs = {c.name for c in fn.chunks if c.kind == "input"}
        declared_outputs = [c.name for c in fn.chunks if c.kind == "output"]
        if not declared_outputs:
            raise GraphError(f"function {fn.name!r} has no output chunk")
        if len(set(declared_outputs)) != len(declared_outputs):
            twice = next(n for n in declared_outputs if declared_outputs.count(n) > 1)
            raise GraphError(f"function {fn.name!r} declares output {twice!r} twice; give each output its own name")
        if len(set(call.outputs.values())) != len(call.outputs):
            raise GraphError(f"call of {fn.name!r}: two outputs were given the same variable id; each needs its own")
        if declared_inputs != set(call.inputs):
            missing = sorted(declared_inputs - set(call.inputs))
            extra = sorted(set(call.inputs) - declared_inputs)
            raise GraphError(f"call of {fn.name!r}: inputs do not match the template (missing {missing}, unexpected {extra})")
        if set(declared_outputs) != set(call.outputs):
            raise GraphError(f"call of {fn.name!r}: outputs {sorted(call.outputs)} do not match the template {declared_outputs}")
        if fn.native:
            self._check_native(fn, declared_outputs)
        for c in fn.chunks:
            if c.kind == "output" and not fn.native:
                self._check_sampling(fn, c)
        if fn.chat:
            self._check_chat(fn)
        elif any(c.kind == "role" for c in fn.chunks):
            raise GraphError(f"call of {fn.name!r}: role markers belong to chat functions (chat=True)")
        for name, value in call.inputs.items():
            if (value.text is None) == (value.var_id is None):
                raise GraphError(f"call of {fn.name!r}: input {name!r} must be either text or a variable reference")
            if value.var_id is not None and value.var_id not in self.variables:
                raise GraphError(f"call of {fn.name!r}: input {name!r} refers to unknown variable {value.var_id!r}")
        items = self._check_items(fn, call)
        for var_id in [*call.outputs.values(), *(v for ids in call.items.values() for v in ids)]:
            if var_id in self.variables:
                raise GraphError(f"variable id {var_id!r} already exists")

        node = RequestNode(call.request_id, call.app_id, fn, dict(call.inputs), dict(call.outputs), items)
        parents = [self.producer(v.var_id) for v in call.inputs.values() if v.var_id is not None]
        node.depth = 1 + max((p.depth for p in parents if p is not None), default=-1)
        self.requests[node.id] = node
        app = self.apps[call.app_id]
        app.requests.add(node.id)
        app.submitted += 1
        app.unfinished += 1
        for name, var_id in call.outputs.items():
            self.variables[var_id] = Variable(var_id, call.app_id, name, producer=node.id)
            for i, item_id in enumerate(items.get(var_id, ())):
                self.variables[item_id] = Variable(item_id, call.app_id, f"{name}[{i}]", producer=node.id)
        for value in call.inputs.values():
            if value.var_id is not None:
                self.variables[value.var_id].consumers.append(node.id)
        return node

    def settle(self, node: RequestNode, state: str) -> None:
        """Move a request to a terminal state (``done``, ``failed`` or ``cancelled``), once."""
        assert state in TERMINAL and node.state not in TERMINAL
        node.state = state
        app = self.apps[node.app_id]
        app.unfinished -= 1
        setattr(app, state, getattr(app, state) + 1)
        if any(self.variables[v].forgotten for v in node.variables):
            self._garbage = True  # dropped while it ran: it can go now

    # ----------------------------------------------------------------- forgetting

    def forget(self, var_ids: list[str]) -> None:
        """The client dropped these variables; unknown ids (already freed) are ignored."""
        for var_id in var_ids:
            var = self.variables.get(var_id)
            if var is not None:
                var.forgotten = self._garbage = True

    def mark_garbage(self) -> None:
        """Something may have become unreachable: the next ``collect`` looks."""
        self._garbage = True

    def forget_app(self, app_id: str) -> None:
        """Every variable of the application is dropped (its client is gone)."""
        for request_id in self.apps[app_id].requests:
            self.forget(self.requests[request_id].variables)

    def collect(self) -> list[RequestNode]:
        """Free what nothing can reach any more; return the requests removed.

        Kept: requests still queued or running, requested ones still waiting, and producers
        of a variable some client still holds; plus, for a waiting request, the producers
        of its inputs (it reads their values when it is queued). A queued request's program
        is fixed, so it no longer needs its inputs. A closed application goes with its last
        request.
        """
        if not self._garbage:
            return []
        self._garbage = False
        keep: set[str] = set()
        stack: list[RequestNode] = []
        for node in self.requests.values():
            if (
                node.state in ("queued", "running", "lost")
                or (node.state == "waiting" and node.perf is not None)
                or any(not self.variables[v].forgotten for v in node.variables)
            ):
                stack.append(node)
        while stack:
            node = stack.pop()
            if node.id in keep:
                continue
            keep.add(node.id)
            if node.state == "waiting":
                stack.extend(p for p in map(self.producer, (v.var_id for v in node.inputs.values() if v.var_id)) if p)
        removed = [node for node in self.requests.values() if node.id not in keep]
        for node in removed:
            self._remove(node)
        for app in [a for a in self.apps.values() if a.closed and not a.requests]:
            del self.apps[app.id]
        return removed

    def _remove(self, node: RequestNode) -> None:
        del self.requests[node.id]
        self.apps[node.app_id].requests.discard(node.id)
        for var_id in node.variables:
            del self.variables[var_id]
        for value in node.inputs.values():
            var = self.variables.get(value.var_id) if value.var_id else None
            if var is not None:
                var.consumers.remove(node.id)

    def producer(self, var_id: str) -> RequestNode | None:
        """GetProducer: the request whose output ``var_id`` is (None for a constant)."""
        producer = self.variables[var_id].producer
        return self.requests[producer] if producer is not None else None

    def consumers(self, var_id: str) -> list[RequestNode]:
        """GetConsumers: the requests that read ``var_id``."""
        return [self.requests[r] for r in self.variables[var_id].consumers]

    def input_variables(self, node: RequestNode) -> list[Variable]:
        return [self.variables[v.var_id] for v in node.inputs.values() if v.var_id is not None]

    def is_ready(self, node: RequestNode) -> bool:
        return all(v.state == "done" for v in self.input_variables(node))

    def program(self, node: RequestNode) -> list[SegmentSpec]:
        """The request with its inputs filled in: text to prefill and outputs to generate.

        Every template text and every input value is a segment of its own, so that each
        variable boundary is a place where a context can be cached and shared
        (``prefix.assign_keys``); empty pieces are left out. A chat function is first
        rendered with the model's chat template, which keeps those boundaries.
        """
        if node.function.chat:
            return self._chat_program(node)
        segments: list[SegmentSpec] = []
        for chunk in node.function.chunks:
            if chunk.kind == "output":
                segments.append(SegmentSpec("gen", var_id=node.outputs[chunk.name], sampling=chunk.sampling))
            elif text := self._text(node, chunk):
                segments.append(SegmentSpec("text", text=text, blocks=node.function.block_cache))
        return segments

    def known_prefix(self, node: RequestNode) -> tuple[list[SegmentSpec], str | None]:
        """The text segments of a waiting request's program up to its first unready input, and
        that input's variable when its producer is running (its text is streaming), else None.

        The segments are exactly the first ones ``program`` will give once every input is
        ready, so their context keys are the request's own. None are known for chat functions
        (the template renders the whole conversation at once) and native steps.
        """
        if node.function.chat or node.function.native:
            return [], None
        segments: list[SegmentSpec] = []
        for chunk in node.function.chunks:
            if chunk.kind == "output":
                break
            if chunk.kind == "input":
                var_id = node.inputs[chunk.name].var_id
                if var_id is not None and self.variables[var_id].state != "done":
                    producer = self.producer(var_id)
                    return segments, var_id if producer is not None and producer.state == "running" else None
            if text := self._text(node, chunk):
                segments.append(SegmentSpec("text", text=text))
        return segments, None

    def prompt(self, node: RequestNode) -> str:
        """The request's prompt as text, for people: its program once queued, else its template filled so far.

        Outputs show as ``{{output:name}}``, inputs not computed yet as ``{{input:name}}``
        and, before a chat function is rendered, role markers as ``{{role:name}}``.
        """
        if node.function.native:  # a Python call: its variable arguments, as far as they are known
            args = []
            for name, value in node.inputs.items():
                var = self.variables.get(value.var_id) if value.var_id else None
                if value.var_id is None:
                    args.append(f"{name}={value.text!r}")
                elif var is not None and var.state == "done":
                    args.append(f"{name}={var.value!r}")
                else:  # not computed yet, or freed once the step started
                    args.append(f"{name}={{{{input:{name}}}}}")
            return f"{node.function.name}({', '.join(args)})"
        names = {var_id: name for name, var_id in node.outputs.items()}
        if node.segments is not None:
            return "".join(s.text if s.kind == "text" else f"{{{{output:{names[s.var_id]}}}}}" for s in node.segments)
        pieces = []
        for chunk in node.function.chunks:
            value = node.inputs.get(chunk.name) if chunk.kind == "input" else None
            if chunk.kind == "text":
                pieces.append(chunk.text)
            elif value is not None and (value.text is not None or self.variables[value.var_id].state == "done"):
                pieces.append(self._text(node, chunk))
            else:
                pieces.append(f"{{{{{chunk.kind}:{chunk.name}}}}}")
        return "".join(pieces)

    def _text(self, node: RequestNode, chunk: ChunkSpec) -> str:
        """A text or input chunk's text (an input's value once its producer is done)."""
        if chunk.kind == "text":
            return chunk.text
        value = node.inputs[chunk.name]
        return value.text if value.text is not None else self.variables[value.var_id].value or ""

    def _chat_program(self, node: RequestNode) -> list[SegmentSpec]:
        fmt = self.chat_format
        assert fmt is not None  # checked when the call was added
        outputs = [c for c in node.function.chunks if c.kind == "output"]
        messages = _messages(node.function, lambda c: self._text(node, c))
        try:
            stop = chat.end_of_turn(fmt)
            program = chat.render_program(fmt, messages)
        except chat.ChatTemplateError as exc:
            raise GraphError(f"call of {node.function.name!r}: {exc}") from None
        segments: list[SegmentSpec] = []
        for piece in program:
            if isinstance(piece, str):
                if piece:
                    segments.append(SegmentSpec("text", text=piece))
                continue
            out = outputs[piece.index]
            sampling = out.sampling
            assert sampling is not None  # checked when the call was added
            if stop and stop not in sampling.stop:
                # Matters where the end-of-turn is plain text; a special token ends generation as EOS.
                sampling = dataclasses.replace(sampling, stop=[*sampling.stop, stop])
            segments.append(SegmentSpec("gen", var_id=node.outputs[out.name], sampling=sampling))
        return segments

    def _check_sampling(self, fn: FunctionSpec, output: ChunkSpec) -> None:
        """The protocol's sampling rulebook, then the served model's limits, for one output."""
        where = f"call of {fn.name!r}: {{{{output:{output.name}}}}}"
        if output.sampling is None:
            raise GraphError(f"{where} has no sampling settings")
        try:
            output.sampling.check()
        except (TypeError, ValueError) as exc:
            raise GraphError(f"{where}: {exc}") from None
        if self.max_context and output.sampling.max_tokens > self.max_context:
            raise GraphError(
                f"{where}: max_tokens={output.sampling.max_tokens} is more than the served model's whole "
                f"context ({self.max_context} tokens, prompt included); lower max_tokens"
            )

    @staticmethod
    def _check_items(fn: FunctionSpec, call: SubmitCall) -> dict[str, list[str]]:
        """Item variables: as many as the output's ``items`` option says, for outputs that have it."""
        wanted = {c.name: c.sampling.items for c in fn.chunks if c.kind == "output" and c.sampling and c.sampling.items}
        if set(call.items) != set(wanted) or any(len(call.items[n]) != k for n, k in wanted.items()):
            raise GraphError(
                f"call of {fn.name!r}: item variables {({n: len(v) for n, v in call.items.items()})} do not match "
                f"the outputs' items option {wanted}"
            )
        ids = [v for vs in call.items.values() for v in vs]
        if len(set(ids)) != len(ids) or set(ids) & set(call.outputs.values()):
            raise GraphError(f"call of {fn.name!r}: each item variable needs an id of its own")
        return {call.outputs[name]: list(vs) for name, vs in call.items.items()}

    @staticmethod
    def _check_native(fn: FunctionSpec, outputs: list[str]) -> None:
        """A native step: inputs and one output, no text, no chat, limits that make sense."""
        if fn.chat or any(c.kind in ("text", "role") for c in fn.chunks) or len(outputs) != 1:
            raise GraphError(f"native step {fn.name!r}: it takes inputs and has exactly one output, and no template text")
        if fn.native_timeout_s < 0 or fn.native_memory_mb < 0:
            raise GraphError(f"native step {fn.name!r}: its timeout and memory limit must be positive (0: the server's default)")

    def check_limits(self, node: RequestNode) -> None:
        """Check a request against the model's limits, once they are known (engines report them)."""
        for c in node.function.chunks:
            if c.kind == "output" and not node.function.native:
                self._check_sampling(node.function, c)

    def _check_chat(self, fn: FunctionSpec) -> None:
        """A chat call needs a model with a chat template that accepts this conversation's shape."""
        if self.chat_format is None:
            raise GraphError(
                f"call of {fn.name!r}: it is a chat function, but the served model has no chat template; "
                "define it without chat (a plain completion), or serve a model that has one"
            )
        bad = [c.name for c in fn.chunks if c.kind == "role" and c.name not in chat.ROLES]
        if bad:
            raise GraphError(f"call of {fn.name!r}: unknown role {bad[0]!r} (roles: {', '.join(chat.ROLES)})")
        try:
            chat.check(self.chat_format, _messages(fn, lambda c: c.text or c.name))
        except chat.ChatTemplateError as exc:
            raise GraphError(f"call of {fn.name!r}: {exc}") from None


def _messages(fn: FunctionSpec, text_of) -> list[chat.Message]:
    """A chat function's chunks as messages: role markers start them, each output is an assistant reply."""
    messages: list[chat.Message] = []
    role, pieces = "user", []
    outputs = 0
    for c in fn.chunks:
        if c.kind in ("role", "output"):
            if pieces or (c.kind == "role" and role != "user"):
                messages.append((role, pieces))
            role, pieces = ("user" if c.kind == "output" else c.name), []
            if c.kind == "output":
                messages.append(("assistant", [chat.Gen(outputs)]))
                outputs += 1
        else:
            pieces.append(text_of(c))
    if pieces:
        messages.append((role, pieces))
    return messages
