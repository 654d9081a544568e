"""The wire protocol: every message that crosses a socket, defined once.

Frames on every socket are ``[signature, payload]`` (ROUTER sockets add the
peer identity in front; PUB adds a topic). The payload is a msgpack map::

    {"v": PROTOCOL_VERSION, "type": "SubmitCall", "id": "...", "ref": "...",
     "session": "...", "seq": 7, "t": 1718000000.25, "body": {...}}

``id`` names this message; a reply carries the request's id as ``ref``. The
signature is an HMAC-SHA256 (hex) of the payload with the key from the
connection file, as Jupyter signs its messages; an empty key disables signing.

``session``, ``seq`` and ``t`` stop replays: each sending socket (a ``Sender``)
numbers its messages 1, 2, 3 ... under a random session id and stamps its wall
clock, and a receiver's ``ReplayGuard`` refuses a number it has already seen
from that session and a time outside ``REPLAY_WINDOW_S`` of its own clock.

This module is torch-free and imports nothing else of ours, so the notebook
side, the manager and the workers can all share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import numbers
import os
import reprlib
import time
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import msgpack

# 2: payloads carry session, seq and t (replay protection).
PROTOCOL_VERSION = 2
SIGNATURE_SCHEME = "hmac-sha256"
# A message stamped further than this from the receiver's clock, either way, is refused.
REPLAY_WINDOW_S = 300.0

# Limits on what a peer may send. A frame over MAX_MESSAGE_BYTES is dropped by the
# receiving ROUTER socket itself (zmq.MAXMSGSIZE), before it is held in memory; decode
# refuses a larger payload on any socket. MAX_ITEMS bounds one msgpack array or map, so
# a few header bytes cannot claim billions of elements.
MAX_MESSAGE_BYTES = 64 * 2**20
MAX_ITEMS = 1_000_000


class ProtocolError(ValueError):
    """A frame that is not a valid, correctly signed message of this protocol."""


class ReplayError(ProtocolError):
    """A correctly signed message that was received before, or is too old (or too new) to tell."""


# --------------------------------------------------------------------------- #
# Message base and registry
# --------------------------------------------------------------------------- #

_REGISTRY: dict[str, type[Message]] = {}


class Message:
    """Base of every message type; subclasses are dataclasses registered by name."""

    TYPE: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in _REGISTRY:
            # A message's name is its type on the wire: a second class of the same name would
            # silently take the first one's place in decode.
            raise TypeError(f"message type {cls.__name__!r} is already defined ({_REGISTRY[cls.__name__].__module__})")
        cls.TYPE = cls.__name__
        _REGISTRY[cls.__name__] = cls


def message_types() -> dict[str, type[Message]]:
    """All registered message types by name (for docs and tests)."""
    return dict(_REGISTRY)


# --------------------------------------------------------------------------- #
# Shared value types
# --------------------------------------------------------------------------- #

#: The model a server serves when none is named (see engine_server.models).
DEFAULT_MODEL = "smollm2"

Perf = Literal["latency", "throughput"]
VarStateName = Literal["pending", "running", "done", "failed"]


#: The sampling options that constrain an output (engine_server/constraints.py); at most one is set.
CONSTRAINT_OPTIONS: tuple[str, ...] = ("choices", "regex", "json")

#: Seeds are 64-bit signed integers, as every sampler and wire format we meet takes them.
MAX_SEED = 2**63 - 1
# Items one output may be split into (``SamplingSpec.items``).
MAX_ITEMS_PER_OUTPUT = 1024


def check_sampling_option(key: str, value: object) -> object:
    """The one rulebook for a sampling option: check ``value`` and return it normalised.

    The notebook side runs it when a function is defined, the server when it accepts
    a call, and the engine's sampler when it builds its parameters, so the three can
    never disagree. Raises ``TypeError`` (wrong type) or ``ValueError`` (out of range,
    or an unknown key); messages name the option, and callers add where it came from.
    ``temperature`` and ``top_p`` become floats, ``stop`` a tuple of strings.
    """
    if key in ("max_tokens", "top_k", "seed", "items"):
        expected = {
            "max_tokens": "an int >= 1", "top_k": "an int >= 0", "seed": f"an int in 0..{MAX_SEED} (2**63-1)",
            "items": f"an int in 0..{MAX_ITEMS_PER_OUTPUT} (0: the output is not split into items)",
        }[key]  # fmt: skip
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"option {key!r} must be {expected}, got {describe_value(value)}")
        number = int(value)
        low, high = {"max_tokens": (1, None), "top_k": (0, None), "seed": (0, MAX_SEED), "items": (0, MAX_ITEMS_PER_OUTPUT)}[key]
        if number < low or (high is not None and number > high):
            raise ValueError(f"option {key!r} must be {expected}, got {number}")
        return number
    if key in ("temperature", "top_p"):
        expected = "a number >= 0" if key == "temperature" else "a number in (0, 1]"
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"option {key!r} must be {expected}, got {describe_value(value)}")
        number = float(value)
        in_range = number >= 0 if key == "temperature" else 0 < number <= 1
        if not math.isfinite(number) or not in_range:
            raise ValueError(f"option {key!r} must be {expected}, got {value!r}")
        return number
    if key == "ignore_eos":
        if not isinstance(value, bool):
            raise TypeError(f"option 'ignore_eos' must be a bool (true/false), got {describe_value(value)}")
        return value
    if key == "stop":
        expected = "a non-empty string or a list of non-empty strings"
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise TypeError(f"option 'stop' must be {expected}, got {describe_value(value)}")
        # An empty stop string would end generation before the first token.
        if any(s == "" for s in items):
            raise ValueError(f"option 'stop' must be {expected}, got an empty string")
        return tuple(items)
    if key in CONSTRAINT_OPTIONS:
        from engine_server import constraints  # llguidance is imported only when a constraint is used

        return constraints.normalize(key, value)
    raise ValueError(f"unknown sampling option {key!r}; allowed options: {', '.join(sorted(SAMPLING_OPTIONS))}")


def describe_value(value: object) -> str:
    """``repr`` of a value (shortened) plus its type, for messages about wrong types."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


@dataclass
class SamplingSpec:
    """Sampling settings of one output variable, fully resolved by the client.

    ``check()`` applies the rulebook (``check_sampling_option``) to every field.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    # At most one constraint (engine_server/constraints.py): the output is one of `choices`,
    # matches `regex`, or is JSON valid under the schema `json` (canonical JSON text).
    choices: list[str] = field(default_factory=list)
    regex: str | None = None
    json: str | None = None
    # The output is a list, one item per line: `items` variables resolve one by one as their
    # lines complete, so calls mapped over them start while the output is still generated.
    # The manager splits the text; engines ignore it.
    items: int = 0

    def check(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first option that breaks the rules."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not is_unset(f.name, value):
                check_sampling_option(f.name, value)
        check_one_constraint({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def is_unset(key: str, value: object) -> bool:
    """Whether sampling option ``key`` holds its "not set" value (no stop strings, no seed, no constraint)."""
    if key in ("seed", "regex", "json"):
        return value is None
    return key in ("stop", "choices") and isinstance(value, (list, tuple)) and len(value) == 0


def check_one_constraint(options: dict[str, object]) -> None:
    """Raise ``ValueError`` when more than one of choices, regex and json is set."""
    given = [k for k in CONSTRAINT_OPTIONS if k in options and not is_unset(k, options[k])]
    if len(given) > 1:
        raise ValueError(
            f"options {given[0]!r} and {given[1]!r} both constrain the output; give one of choices, regex and json"
        )


#: The options a placeholder may set, with their defaults (``SamplingSpec``'s fields).
SAMPLING_OPTIONS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SamplingSpec))


@dataclass
class ChunkSpec:
    """One piece of a semantic function's template.

    ``kind`` is ``text`` (literal ``text``), ``input`` or ``output`` (``name``;
    outputs carry their ``sampling``), or, in a chat function, ``role`` (``name``
    is ``system`` or ``user``: a new message starts here).
    """

    kind: Literal["text", "input", "output", "role"]
    text: str = ""
    name: str = ""
    sampling: SamplingSpec | None = None


@dataclass
class FunctionSpec:
    """A semantic function as the server sees it: a name and its chunks.

    A ``chat`` function is a conversation that the server renders with the
    served model's chat template (see engine_server/chat.py).
    """

    name: str
    chunks: list[ChunkSpec]
    chat: bool = False
    # A native step (``@parrot_nb.native``): the Python function, its constant arguments and its
    # source lines, cloudpickled; its chunks are one input per variable argument and one output, ``value``.
    # It runs in one of the server's tool workers (engine_server/tools.py), not on an engine.
    native: bytes = b""
    native_timeout_s: float = 0.0  # per-call limits; 0: the server's defaults
    native_memory_mb: int = 0
    # Cache its prompt at every full KV block too (``SegmentSpec.blocks``): set for requests
    # that come as plain prompts (the OpenAI-compatible endpoint), with no variable boundaries.
    block_cache: bool = False


@dataclass
class InputValue:
    """An input of a call: literal ``text`` or a reference to a variable ``var_id``."""

    text: str | None = None
    var_id: str | None = None


@dataclass
class SegmentSpec:
    """One step of a request program run by an engine: prefill ``text`` or generate ``var_id``."""

    kind: Literal["text", "gen"]
    text: str = ""
    var_id: str = ""
    sampling: SamplingSpec | None = None
    # Context key of the prompt up to and including this text segment (a hash chain
    # computed by the manager at variable boundaries). An engine that holds a context
    # under this key may fork it instead of prefilling; "" means "do not cache here".
    key: str = ""
    # Also cache the prompt at every full KV block of this text, keyed by its tokens (automatic
    # prefix caching, as vLLM's, for prompts that have no variable boundaries to key).
    blocks: bool = False


@dataclass
class EngineInfo:
    engine_id: int
    pid: int
    model: str
    device: str
    state: str
    running: int  # requests the manager has dispatched to it and not yet seen finish
    finished: int
    capacity: int = 0  # requests it takes at once (its max_running)
    waiting: int = 0  # from its last WorkerLoad: admitted, not yet scheduled
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    cached_keys: int = 0
    gpu: str = ""  # the GPU it is pinned to, as the server's CUDA_VISIBLE_DEVICES names it (cuda only)


@dataclass
class AppInfo:
    app_id: str
    name: str
    requests: int
    done: int
    failed: int
    prompt_tokens: int = 0  # over its finished requests
    cached_tokens: int = 0  # of those, served from cached contexts
    cancelled: int = 0
    closed: bool = False


@dataclass
class InputLink:
    """An input of a call that reads a variable: the variable and the request that produces it."""

    var_id: str
    producer: str  # the producing request's id


# --------------------------------------------------------------------------- #
# Client -> server requests (ROUTER "requests" socket); each gets one reply
# --------------------------------------------------------------------------- #


@dataclass
class Hello(Message):
    """First message of a client; the reply is ``Welcome``."""

    client_name: str


@dataclass
class SyncEvents(Message):
    """Ask the server to publish ``EventsSynced(token)``: proves the SUB socket is live."""

    token: str


@dataclass
class OpenApp(Message):
    """Open an application (the unit of scheduling); the reply is ``AppOpened``."""

    name: str


@dataclass
class SubmitCall(Message):
    """One call of a semantic function: a request node of the app's DAG.

    ``outputs`` maps each output name to the variable id the client allocated
    for it, so the call returns without waiting for the server; ``items`` does the
    same for the item variables of outputs split into items (``SamplingSpec.items``).
    """

    app_id: str
    request_id: str
    function: FunctionSpec
    inputs: dict[str, InputValue]
    outputs: dict[str, str]
    items: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Activate(Message):
    """Request a variable's value: runs its producer and everything upstream.

    The reply is ``VarState``; the value itself arrives as a ``VarReady`` event
    (or in the reply, when it is already known).
    """

    app_id: str
    var_id: str
    perf: Perf = "latency"


@dataclass
class Cancel(Message):
    """Stop waiting for these variables: they fail as cancelled, with the requests only they needed.

    A request that another requested variable still waits on keeps running. Running
    requests are aborted on their engine, which frees their KV cache. The reply is
    ``Cancelled``.
    """

    app_id: str
    var_ids: list[str]
    reason: str = "cancelled"


@dataclass
class Forget(Message):
    """The client dropped these variables: the server may free them once nothing else needs them."""

    var_ids: list[str]


@dataclass
class CloseApp(Message):
    """The application takes no more calls; its finished work is freed.

    Requests of it that a variable of another application still needs keep running.
    """

    app_id: str


@dataclass
class Heartbeat(Message):
    """A client is alive. One that sends nothing for the server's client timeout is taken as dead."""


@dataclass
class Goodbye(Message):
    """The client is disconnecting: cancel what only it waited for and close its applications."""


@dataclass
class Status(Message):
    """Ask for ``ServerStatus``."""


@dataclass
class GetHistory(Message):
    """Ask for the past events that pictures draw (the reply is ``History``).

    A widget opened late, or in another notebook, draws the present from them and then
    follows live events. ``app_name`` "" means every application.
    """

    app_name: str = ""


@dataclass
class GetRequestDetail(Message):
    """Ask for one request's detail (the reply is ``RequestDetail``): filled prompt, output so far, timings."""

    request_id: str


@dataclass
class Shutdown(Message):
    """Stop the server (after replying)."""


# --------------------------------------------------------------------------- #
# Replies
# --------------------------------------------------------------------------- #


@dataclass
class Ack(Message):
    pass


@dataclass
class ErrorReply(Message):
    """The request could not be carried out; ``message`` says why and what to do."""

    code: str
    message: str


@dataclass
class Welcome(Message):
    client_id: str
    server_version: str
    protocol_version: int
    model: str
    engines: int
    # A client that sends nothing for this long is taken as dead: heartbeat well within it.
    client_timeout_s: float = 10.0


@dataclass
class Cancelled(Message):
    """The reply to ``Cancel``: the variables that failed as cancelled and the requests stopped."""

    var_ids: list[str]
    request_ids: list[str]


@dataclass
class AppOpened(Message):
    app_id: str
    name: str


@dataclass
class VarState(Message):
    var_id: str
    state: VarStateName
    value: str | None = None
    error: str | None = None
    json: bool = False  # the value is JSON text (a native step's dict, list or number; a JSON output)


@dataclass
class ServerStatus(Message):
    server_version: str
    pid: int
    uptime_s: float
    model: str
    device: str
    engines: list[EngineInfo]
    apps: list[AppInfo]
    queued: int
    clients: int = 0  # connected clients that said Hello
    requests: int = 0  # requests the server holds (freed once nothing can reach them)
    variables: int = 0
    unfinished: int = 0  # requests not yet done, failed or cancelled


@dataclass
class RequestDetail(Message):
    """One request as the server holds it now (the reply to ``GetRequestDetail``).

    ``prompt`` is the filled prompt: template text and input values, with each output as
    ``{{output:name}}`` and each input not computed yet as ``{{input:name}}`` (a chat
    function's prompt is rendered with the model's chat template once the request is
    queued). ``outputs`` holds each output's text so far, all of it once done. Times
    are seconds: ``queue_s`` until dispatched, then the engine's ``prefill_s``,
    ``decode_s`` and ``ttft_s``; ``exec_s`` from dispatch to the end.
    """

    app_id: str
    request_id: str
    function: str
    state: str  # waiting | queued | running | done | failed | cancelled
    prompt: str
    outputs: dict[str, str]  # output name -> text so far
    engine_id: int = -1  # -1 before it is dispatched
    perf: str = ""
    group: str = ""
    attempts: int = 0
    queue_s: float = 0.0
    exec_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


@dataclass
class History(Message):
    """The reply to ``GetHistory``: past events by type; ``ordered()`` merges them as they happened.

    Bounded (see engine_server/history.py): the lifecycle events of the requests the server
    still holds, the latest finished requests and activations of each application, its
    latest ``AppStats``, and the latest load reports of each engine. An application the
    server has forgotten (closed, and its requests freed) is gone from it.
    """

    submitted: list[RequestSubmitted] = field(default_factory=list)
    queued: list[RequestQueued] = field(default_factory=list)
    dispatched: list[RequestDispatched] = field(default_factory=list)
    first_tokens: list[RequestFirstToken] = field(default_factory=list)
    finished: list[RequestFinished] = field(default_factory=list)
    failed: list[RequestFailed] = field(default_factory=list)
    cancelled: list[RequestCancelled] = field(default_factory=list)
    activations: list[ActivationDone] = field(default_factory=list)
    app_stats: list[AppStats] = field(default_factory=list)
    app_closed: list[AppClosed] = field(default_factory=list)
    engines: list[EngineChanged] = field(default_factory=list)
    loads: list[EngineLoad] = field(default_factory=list)

    def ordered(self) -> list[Message]:
        """Every event, oldest first; of events stamped alike, a request's earlier step first."""
        steps = [f.name for f in dataclasses.fields(self)]
        events = [(e.t, rank, e) for rank, name in enumerate(steps) for e in getattr(self, name)]  # type: ignore[attr-defined]
        events.sort(key=lambda item: item[:2])
        return [e for _, _, e in events]


# --------------------------------------------------------------------------- #
# Events (PUB socket); topic is "app.<app_id>" or "server"
#
# One schema for notebooks, widgets and tools (docs/ARCHITECTURE.md, "Events").
# Per request: RequestSubmitted, then once requested RequestQueued ->
# RequestDispatched -> RequestFirstToken ->
# RequestFinished | RequestFailed | RequestCancelled (a retry after an engine
# crash is queued and dispatched again). Per variable: TokenDelta, VarReady |
# VarFailed, and ActivationDone for a requested one. Per application: AppStats,
# AppClosed. Per client: ClientGone. Per engine: EngineChanged, EngineLoad.
# Times ``t`` are Unix seconds at the server; durations (``*_s``) are measured
# on its monotonic clock. Fields are only ever added, with defaults, so
# consumers ignore what they do not know.
# --------------------------------------------------------------------------- #


@dataclass
class EventsSynced(Message):
    token: str


@dataclass
class RequestSubmitted(Message):
    """A call joined its application's DAG: the shape that pictures draw."""

    app_id: str
    request_id: str
    function: str
    inputs: dict[str, InputLink]  # the inputs that read variables, by input name (text inputs are left out)
    outputs: dict[str, str]  # output name -> variable id
    t: float
    app_name: str = ""


@dataclass
class RequestQueued(Message):
    """A requested call whose inputs are all ready waits for an engine."""

    app_id: str
    request_id: str
    function: str
    t: float
    perf: str = ""  # its criterion: "latency" or "throughput"
    group: str = ""  # its task group (the consumer's request id), "" when in none


@dataclass
class RequestDispatched(Message):
    """The request was sent to ``engine_id``."""

    app_id: str
    request_id: str
    engine_id: int
    t: float
    perf: str = ""
    group: str = ""
    attempt: int = 1  # 2 when it is re-run after its first engine died


@dataclass
class RequestFirstToken(Message):
    """The engine streamed the request's first output token."""

    app_id: str
    request_id: str
    engine_id: int
    ttft_s: float  # since dispatch
    t: float


@dataclass
class TokenDelta(Message):
    app_id: str
    var_id: str
    text: str


@dataclass
class VarReady(Message):
    app_id: str
    var_id: str
    value: str
    json: bool = False  # the value is JSON text (a native step's dict, list or number; a JSON output)


@dataclass
class VarFailed(Message):
    app_id: str
    var_id: str
    error: str


@dataclass
class RequestFinished(Message):
    app_id: str
    request_id: str
    engine_id: int
    prompt_tokens: int
    output_tokens: int
    queue_s: float  # queued until dispatched
    exec_s: float  # dispatched until done
    ttft_s: float  # as the engine measured it
    t: float
    cached_tokens: int = 0  # prompt tokens served from a cached context instead of prefilled


@dataclass
class ActivationDone(Message):
    """A requested variable (``.get``, ``await``, display) resolved: the end-to-end latency the user saw."""

    app_id: str
    var_id: str
    perf: str
    state: str  # "done" or "failed"
    latency_s: float  # from its first activation
    t: float


@dataclass
class AppStats(Message):
    """An application's totals, published after each of its requests finishes."""

    app_id: str
    name: str
    requests: int
    done: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    cache_hit_rate: float  # cached_tokens / prompt_tokens
    t: float
    cancelled: int = 0


@dataclass
class RequestFailed(Message):
    app_id: str
    request_id: str
    error: str
    t: float


@dataclass
class RequestCancelled(Message):
    """A request was cancelled (``Cancel``, a closed application, a dead client) before it finished."""

    app_id: str
    request_id: str
    reason: str
    t: float


@dataclass
class AppClosed(Message):
    """An application was closed: by its client, at its client's disconnect, or when its client died."""

    app_id: str
    reason: str
    t: float


@dataclass
class ClientGone(Message):
    """A client said goodbye or went silent past the client timeout."""

    client_id: str
    name: str
    reason: str
    t: float


@dataclass
class EngineChanged(Message):
    """An engine registered, died, or was restarted."""

    engine_id: int
    state: str
    detail: str
    t: float


@dataclass
class EngineLoad(Message):
    """An engine's load, from its ``WorkerLoad`` report."""

    engine_id: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    cached_keys: int
    dispatched: int  # requests the manager has on it
    t: float
    kv_blocks_cached: int = 0  # of kv_blocks_used, blocks only cached contexts hold (freed by eviction)


# --------------------------------------------------------------------------- #
# Server <-> engine worker (ROUTER "workers" socket; workers are DEALERs)
# --------------------------------------------------------------------------- #


@dataclass
class WorkerHello(Message):
    engine_id: int
    pid: int
    model: str
    device: str
    max_running: int = 1  # sequences the engine batches at once
    kv_blocks: int = 0  # KV pool size in blocks
    block_size: int = 0  # tokens per KV block
    max_context: int = 0  # the model's context length in tokens (prompt + outputs); 0: unknown


@dataclass
class WorkerStartFailed(Message):
    """The worker could not load its model or device; it exits after sending this."""

    engine_id: int
    pid: int
    error: str


@dataclass
class RunRequest(Message):
    request_id: str
    segments: list[SegmentSpec]
    # Only compute and cache the keyed text (the known start of a request still waiting on
    # an input): the engine reports it done with no outputs and keeps its KV parked, for
    # ExtendPrefill to grow and for the request to adopt.
    prefill_only: bool = False
    # The id of such a prefill on this engine: start from its KV, as far as the tokens agree.
    adopt: str = ""


@dataclass
class ExtendPrefill(Message):
    """Text streamed into a waiting request's input: append it to its parked prefill.

    ``pieces[0]`` continues the segment being streamed; each later piece starts a new one.
    """

    request_id: str
    pieces: list[str]


@dataclass
class WorkerDelta(Message):
    request_id: str
    var_id: str
    text: str


@dataclass
class WorkerDone(Message):
    request_id: str
    outputs: dict[str, str]
    prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float
    cached_tokens: int = 0  # prompt tokens served from a cached context instead of prefilled


@dataclass
class WorkerFailed(Message):
    request_id: str
    error: str


@dataclass
class WorkerLoad(Message):
    """An engine's load, sent when it changes (at most a few times a second) and with evictions."""

    engine_id: int
    running: int  # sequences decoding or prefilling
    waiting: int  # admitted but not yet scheduled (including preempted ones)
    kv_blocks_used: int  # blocks held by running sequences and cached contexts
    kv_blocks_total: int
    cached_keys: int = 0  # contexts held in the engine's cache
    evicted_keys: list[str] = field(default_factory=list)  # context keys dropped since the last report
    kv_blocks_cached: int = 0  # of kv_blocks_used, blocks only cached contexts hold (idle: all of them)


@dataclass
class ReleaseContexts(Message):
    """The manager no longer needs these cached contexts: the engine may drop them first."""

    keys: list[str]


@dataclass
class AbortRequest(Message):
    """Drop a request wherever it is in the engine and free its KV cache; nothing more is sent for it."""

    request_id: str


@dataclass
class StopWorker(Message):
    pass


# --------------------------------------------------------------------------- #
# Server <-> tool worker (ROUTER "tools" socket on loopback; tool workers are DEALERs)
# --------------------------------------------------------------------------- #


@dataclass
class ToolHello(Message):
    worker_id: int
    pid: int


@dataclass
class RunNative(Message):
    """Run one native step: ``function`` is the cloudpickled (callable, constant kwargs, source) triple.

    ``args`` are the variable arguments' values as text; those named in ``json_args`` are
    JSON text that the worker parses first. ``memory_mb`` bounds what the call may allocate.
    """

    request_id: str
    name: str
    function: bytes
    args: dict[str, str]
    json_args: list[str]
    memory_mb: int


@dataclass
class NativeDone(Message):
    request_id: str
    value: str  # a str result as is; anything else as JSON text (``json``)
    json: bool
    run_s: float


@dataclass
class NativeFailed(Message):
    request_id: str
    error: str  # what went wrong, with the traceback of the user's code


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


@dataclass
class Envelope:
    """A decoded message with its id, the id it answers (replies), and its sender's stamp."""

    msg: Message
    id: str
    ref: str | None = None
    session: str = ""  # the sending socket's random id
    seq: int = 0  # its number among that session's messages, from 1
    t: float = 0.0  # the sender's wall clock (Unix seconds) when it was sent


def new_id() -> str:
    return uuid.uuid4().hex


def sign(key: bytes, payload: bytes) -> bytes:
    if not key:
        return b""
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


class Sender:
    """The sending end of one socket: signs its messages and numbers them under one session.

    One socket delivers a peer's messages in order, so a receiver need only remember the
    highest number per session (see ``ReplayGuard``). Use one ``Sender`` per socket, from the
    thread that owns it: numbers must leave in the order they were given.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.session = new_id()
        self._seq = 0

    def encode(self, msg: Message, *, msg_id: str | None = None, ref: str | None = None) -> list[bytes]:
        """Serialise ``msg`` to ``[signature, payload]`` frames, stamped with the next number and now."""
        self._seq += 1
        payload = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "type": msg.TYPE,
                "id": msg_id or new_id(),
                "ref": ref,
                "session": self.session,
                "seq": self._seq,
                "t": time.time(),
                "body": _unstructure(msg),
            },
            use_bin_type=True,
        )
        return [sign(self.key, payload), payload]


def encode(msg: Message, key: bytes, *, msg_id: str | None = None, ref: str | None = None) -> list[bytes]:
    """Serialise one message as a session of its own (for one-off senders; sockets use a ``Sender``)."""
    return Sender(key).encode(msg, msg_id=msg_id, ref=ref)


def peek_id(frames: list[bytes]) -> str | None:
    """The message id of frames that may not decode, so a refusal can still name its request."""
    try:
        raw = _unpack(frames[-1])
    except (IndexError, ProtocolError):
        return None
    msg_id = raw.get("id") if isinstance(raw, dict) else None
    return msg_id if isinstance(msg_id, str) else None


def decode(frames: list[bytes], key: bytes) -> Envelope:
    """Parse and verify ``[signature, payload]`` frames; raise ``ProtocolError`` if they are not a message.

    This checks the signature and the shape; whether the message is fresh is a ``ReplayGuard``'s
    question, since only a receiver that keeps state can answer it.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames [signature, payload], got {len(frames)}")
    signature, payload = frames
    if key and not hmac.compare_digest(bytes(signature), sign(key, bytes(payload))):
        raise ProtocolError("bad signature: the message was not signed with this server's key")
    raw = _unpack(payload)
    if not isinstance(raw, dict):
        raise ProtocolError("payload must be a msgpack map")
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 2.0
        raise ProtocolError(
            f"protocol version {_show(version)} is not supported (this side speaks {PROTOCOL_VERSION}): "
            "run the notebook and the engine server from the same parrot-nb installation"
        )
    type_name = raw.get("type")
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_show(type_name)}")
    msg_id = raw.get("id")
    ref = raw.get("ref")
    if not isinstance(msg_id, str) or not (ref is None or isinstance(ref, str)):
        raise ProtocolError("message id and ref must be strings")
    session, seq, t = raw.get("session"), raw.get("seq"), raw.get("t")
    if not isinstance(session, str) or not session:
        raise ProtocolError("missing or empty 'session': every message names its sender's session")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ProtocolError(f"'seq' must be a whole number from 1, got {seq!r}")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise ProtocolError(f"'t' must be the send time in Unix seconds, got {t!r}")
    return Envelope(_structure(cls, raw.get("body"), type_name), msg_id, ref, session, seq, float(t))


class ReplayGuard:
    """Refuses a message it has seen before, and one whose time is outside the window.

    It keeps, per sender session, the highest number and the latest time seen: a number not
    above the highest is a replay (one socket delivers a session's messages in order). A
    session silent for longer than the window is forgotten, which is safe: a replay of any of
    its messages is then older than the window and refused for that. So the memory is one
    entry per sender heard from within the window, however many messages they send (engine
    workers send a message per generated token).
    """

    def __init__(self, window: float = REPLAY_WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self._clock = clock
        self._sessions: dict[str, tuple[int, float]] = {}  # session -> (highest seq, latest t)
        self._pruned_at = clock()

    def __len__(self) -> int:
        """Sessions remembered now."""
        return len(self._sessions)

    def check(self, env: Envelope) -> None:
        """Raise ``ReplayError`` unless ``env`` is fresh; remember it if it is."""
        now = self._clock()
        skew = env.t - now
        if abs(skew) > self.window:
            side = "ahead of" if skew > 0 else "behind"
            raise ReplayError(
                f"message timestamp {env.t:.3f} is {abs(skew):.0f} s {side} this side's clock, outside the "
                f"accepted window of {self.window:g} s: check the clocks of the two machines "
                "(or someone resent an old message)"
            )
        if now - self._pruned_at > 1.0:  # at most once a second: the scan is over every session
            self._prune(now)
        last = self._sessions.get(env.session)
        if last is not None and env.seq <= last[0]:
            raise ReplayError(
                f"replayed message: number {env.seq} of sender session {env.session[:8]} was already received "
                f"(the last was {last[0]}); a message is accepted once"
            )
        self._sessions[env.session] = (env.seq, env.t if last is None else max(env.t, last[1]))

    def _prune(self, now: float) -> None:
        self._pruned_at = now
        horizon = now - self.window
        self._sessions = {s: entry for s, entry in self._sessions.items() if entry[1] >= horizon}


def _unpack(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    try:
        return msgpack.unpackb(payload, raw=False, max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS)
    except msgpack.StackError:
        raise ProtocolError("payload is nested too deeply") from None
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"payload is not msgpack: {type(exc).__name__}: {exc}") from None


# Values a peer sent, quoted in error messages: short, however large the value was.
_quote = reprlib.Repr()
_quote.maxlevel, _quote.maxstring, _quote.maxother, _quote.maxlist, _quote.maxdict = 3, 80, 80, 5, 5


def _show(value: Any) -> str:
    return _quote.repr(value)


def to_dict(msg: Message) -> dict[str, Any]:
    """A JSON-friendly view of a message (for event logs): bytes (a native step's code) show as their size."""
    return {"type": msg.TYPE, **_unstructure(msg, readable=True)}


def _unstructure(obj: Any, readable: bool = False) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _unstructure(getattr(obj, f.name), readable) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _unstructure(v, readable) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_unstructure(v, readable) for v in obj]
    if readable and isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _structure(tp: Any, value: Any, where: str) -> Any:
    """Build a value of type ``tp`` from decoded msgpack, checking shapes as it goes."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        if not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{where}: field names must be strings")
        unknown = set(value) - names
        if unknown:
            raise ProtocolError(f"{where}: unknown field(s) {_show(sorted(unknown))}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _structure(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _structure(arg, value, where)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{where}: no alternative matched ({'; '.join(errors)})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ProtocolError(f"{where}: {_show(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        return [_structure(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        _, item = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{where}: map keys must be strings")
            out[k] = _structure(item, v, f"{where}[{_show(k)}]")
        return out
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp in (int, str, bool, bytes):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"protocol field type {tp!r} is not supported")  # a bug in this module, not in a peer


# --------------------------------------------------------------------------- #
# Connection files
# --------------------------------------------------------------------------- #

CONNECTION_PREFIX = "parrot-nb-server-"


@dataclass
class ConnectionInfo:
    """What a client needs to reach a server: endpoints, the signing key, and the server's CURVE key.

    Written by the server as JSON (mode 0600) in the Jupyter runtime directory.
    ``curve_server_key`` is the server's CurveZMQ public key (Z85) when its sockets
    encrypt, "" when they do not (loopback).
    """

    requests: str
    events: str
    key: str
    pid: int
    model: str
    signature_scheme: str = SIGNATURE_SCHEME
    protocol_version: int = PROTOCOL_VERSION
    curve_server_key: str = ""
    http: str = ""  # the OpenAI-compatible endpoint's base URL (``--http-port``), "" when off

    @property
    def key_bytes(self) -> bytes:
        return self.key.encode()

    def write(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a private temporary file (0600 from the start, so the key is never
        # readable by others) and renamed into place: a reader polling for the file sees
        # either nothing or the whole of it, never a half-written one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(self), f, indent=2)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ConnectionInfo:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"connection file {str(path)!r} does not exist: start a server with "
                "`%parrot start` or `parrot-nb serve`, or pass the file it wrote"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"connection file {str(path)!r} is not valid JSON: {exc}") from None
        try:
            info = _structure(cls, data, f"connection file {path}")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        if info.signature_scheme != SIGNATURE_SCHEME:
            raise ValueError(f"connection file {str(path)!r}: unsupported signature scheme {info.signature_scheme!r}")
        return info


def runtime_dir() -> Path:
    """Jupyter's runtime directory (where kernels write their connection files)."""
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:  # jupyter_core ships with ipykernel; plain servers may lack it
        return Path(os.environ.get("JUPYTER_RUNTIME_DIR", Path.home() / ".local/share/jupyter/runtime"))
    return Path(jupyter_runtime_dir())


def find_connection_files(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Server connection files in ``directory`` (default: the runtime dir), newest first."""
    d = Path(directory) if directory is not None else runtime_dir()
    files = list(d.glob(f"{CONNECTION_PREFIX}*.json")) if d.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie is not), without being allowed to signal it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
