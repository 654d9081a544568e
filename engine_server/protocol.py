"""The wire protocol: every message that crosses a socket, defined once.

Frames on every socket are ``[signature, payload]`` (ROUTER sockets add the
peer identity in front; PUB adds a topic). The payload is a msgpack map::

    {"v": PROTOCOL_VERSION, "type": "SubmitCall", "id": "...", "ref": "...", "body": {...}}

``id`` names this message; a reply carries the request's id as ``ref``. The
signature is an HMAC-SHA256 (hex) of the payload with the key from the
connection file, as Jupyter signs its messages; an empty key disables signing.

This module is torch-free and imports nothing else of ours, so the notebook
side, the manager and the workers can all share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import reprlib
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import msgpack

PROTOCOL_VERSION = 1
SIGNATURE_SCHEME = "hmac-sha256"

# Limits on what a peer may send. A frame over MAX_MESSAGE_BYTES is dropped by the
# receiving ROUTER socket itself (zmq.MAXMSGSIZE), before it is held in memory; decode
# refuses a larger payload on any socket. MAX_ITEMS bounds one msgpack array or map, so
# a few header bytes cannot claim billions of elements.
MAX_MESSAGE_BYTES = 64 * 2**20
MAX_ITEMS = 1_000_000


class ProtocolError(ValueError):
    """A frame that is not a valid, correctly signed message of this protocol."""


# --------------------------------------------------------------------------- #
# Message base and registry
# --------------------------------------------------------------------------- #

_REGISTRY: dict[str, type[Message]] = {}


class Message:
    """Base of every message type; subclasses are dataclasses registered by name."""

    TYPE: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
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


@dataclass
class SamplingSpec:
    """Sampling settings of one output variable, fully resolved by the client."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


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


@dataclass
class AppInfo:
    app_id: str
    name: str
    requests: int
    done: int
    failed: int
    prompt_tokens: int = 0  # over its finished requests
    cached_tokens: int = 0  # of those, served from cached contexts


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
    for it, so the call returns without waiting for the server.
    """

    app_id: str
    request_id: str
    function: FunctionSpec
    inputs: dict[str, InputValue]
    outputs: dict[str, str]


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
class Status(Message):
    """Ask for ``ServerStatus``."""


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


# --------------------------------------------------------------------------- #
# Events (PUB socket); topic is "app.<app_id>" or "server"
#
# One schema for notebooks, widgets and tools (docs/ARCHITECTURE.md, "Events").
# Per request: RequestQueued -> RequestDispatched -> RequestFirstToken ->
# RequestFinished | RequestFailed (a retry after an engine crash is queued and
# dispatched again). Per variable: TokenDelta, VarReady | VarFailed, and
# ActivationDone for a requested one. Per application: AppStats. Per engine:
# EngineChanged, EngineLoad. Times ``t`` are Unix seconds at the server;
# durations (``*_s``) are measured on its monotonic clock. Fields are only ever
# added, with defaults, so consumers ignore what they do not know.
# --------------------------------------------------------------------------- #


@dataclass
class EventsSynced(Message):
    token: str


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


@dataclass
class RequestFailed(Message):
    app_id: str
    request_id: str
    error: str
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


@dataclass
class ReleaseContexts(Message):
    """The manager no longer needs these cached contexts: the engine may drop them first."""

    keys: list[str]


@dataclass
class StopWorker(Message):
    pass


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


@dataclass
class Envelope:
    """A decoded message with its id and, for replies, the id it answers."""

    msg: Message
    id: str
    ref: str | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def sign(key: bytes, payload: bytes) -> bytes:
    if not key:
        return b""
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


def encode(msg: Message, key: bytes, *, msg_id: str | None = None, ref: str | None = None) -> list[bytes]:
    """Serialise ``msg`` to ``[signature, payload]`` frames."""
    payload = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "type": msg.TYPE,
            "id": msg_id or new_id(),
            "ref": ref,
            "body": _unstructure(msg),
        },
        use_bin_type=True,
    )
    return [sign(key, payload), payload]


def peek_id(frames: list[bytes]) -> str | None:
    """The message id of frames that may not decode, so a refusal can still name its request."""
    try:
        raw = _unpack(frames[-1])
    except (IndexError, ProtocolError):
        return None
    msg_id = raw.get("id") if isinstance(raw, dict) else None
    return msg_id if isinstance(msg_id, str) else None


def decode(frames: list[bytes], key: bytes) -> Envelope:
    """Parse and verify ``[signature, payload]`` frames; raise ``ProtocolError`` if they are not a message."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames [signature, payload], got {len(frames)}")
    signature, payload = frames
    if key and not hmac.compare_digest(bytes(signature), sign(key, bytes(payload))):
        raise ProtocolError("bad signature: the message was not signed with this server's key")
    raw = _unpack(payload)
    if not isinstance(raw, dict):
        raise ProtocolError("payload must be a msgpack map")
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise ProtocolError(
            f"protocol version {_show(version)} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    type_name = raw.get("type")
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_show(type_name)}")
    msg_id = raw.get("id")
    ref = raw.get("ref")
    if not isinstance(msg_id, str) or not (ref is None or isinstance(ref, str)):
        raise ProtocolError("message id and ref must be strings")
    return Envelope(_structure(cls, raw.get("body"), type_name), msg_id, ref)


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
    """A JSON-friendly view of a message (for event logs)."""
    return {"type": msg.TYPE, **_unstructure(msg)}


def _unstructure(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _unstructure(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _unstructure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_unstructure(v) for v in obj]
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
    if tp in (int, str, bool):
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
    """What a client needs to reach a server: endpoints and the signing key.

    Written by the server as JSON (mode 0600) in the Jupyter runtime directory.
    """

    requests: str
    events: str
    key: str
    pid: int
    model: str
    signature_scheme: str = SIGNATURE_SCHEME
    protocol_version: int = PROTOCOL_VERSION

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
