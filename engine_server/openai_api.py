"""The OpenAI-compatible HTTP face of the engine server (``--http-port``).

``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and ``/health``, served by
Starlette under uvicorn in a thread of the server process, with streaming as server-sent
events (sse-starlette). Every HTTP request becomes a one-call application of the same
manager and engines that notebooks use: its prompt is one text segment (a chat request is
rendered with the model's chat template first), cached at every full KV block (automatic
prefix caching, keyed by the tokens: ``SegmentSpec.blocks``), and its output is one variable.
The application is named ``openai/<kind>``, or ``openai/<kind>/<user>`` when the body names a
``user``, so that the event log and the history tell clients apart.

Threads. The manager is single-threaded (the server loop). The HTTP thread never touches it:
it puts a command on ``HttpFront.commands`` and wakes the loop through an inproc ZMQ socket;
the loop answers by ``HttpCall.send``, which hands items to the call's asyncio queue with
``call_soon_threadsafe``. Items: ``("delta", text)``, ``("done", text, usage, finish_reason)``
and ``("error", status, message)``.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with the
matching status, and inside a stream an event holding that object, then ``data: [DONE]``.
A client that disconnects has its request cancelled (the engine drops its sequence and KV).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
import zmq
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine_server import chat
from engine_server.models import ChatFormat
from engine_server.protocol import SamplingSpec

log = logging.getLogger("engine_server.http")

WAKE_ENDPOINT = "inproc://parrot-nb-http-wake"
# Chat requests that give no max_tokens generate up to this many tokens (the end of turn stops them first).
CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """A request the API refuses: the HTTP status, an OpenAI error type, the parameter at fault."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_for(status: int, message: str) -> ApiError:
    types = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_exceeded", 503: "service_unavailable"}  # fmt: skip
    return ApiError(status, message, types.get(status, "server_error"))


# ----------------------------------------------------------------------------- requests


@dataclass
class HttpCall:
    """One HTTP request on its way through the manager, as both threads see it."""

    kind: str  # "completion" or "chat"
    texts: list[str]  # the prompt: text pieces to prefill, in order
    sampling: SamplingSpec
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    app_id: str = ""  # set by the server loop when it opens the call's application
    var_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    usage: tuple[int, int, int] = (0, 0, 0)  # prompt, output and cached tokens, once finished
    ended: bool = False  # the loop sent "done" or "error"
    user: str = ""  # the body's `user`: the application is openai/<kind>/<user>, or openai/<kind> without one

    def send(self, item: tuple) -> None:
        """Hand an item to the HTTP thread (called from the server loop)."""
        if item[0] != "delta":
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the HTTP thread's loop is closed: the server is stopping
            pass


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    return value


def sampling_from(body: dict, default_max_tokens: int) -> SamplingSpec:
    """The request's sampling options as a ``SamplingSpec``; raises ApiError naming the bad one."""
    for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)), ("suffix", (None, ""))):
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported: send one request per completion", param=name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    max_tokens = _integer(body, "max_tokens", _integer(body, "max_completion_tokens", default_max_tokens))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", param="stop")
    spec = SamplingSpec(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(0, _integer(body, "top_k", 0) or 0),  # vLLM's extension; -1 means off there
        stop=list(stop),
        seed=_integer(body, "seed", None),
        ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM's extension: equal work in benchmarks
    )
    _constraint(body, spec)
    try:
        spec.check()
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    return spec


def _constraint(body: dict, spec: SamplingSpec) -> None:
    """Structured output: OpenAI's ``response_format``, and vLLM's ``guided_*`` / ``structured_outputs``."""
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
            spec.json = json.dumps(schema, sort_keys=True)
        elif kind == "json_object":
            spec.json = json.dumps({"type": "object"})
        elif kind != "text":
            raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                           param="response_format")  # fmt: skip
    guided = body.get("structured_outputs") or {}
    if not isinstance(guided, dict):
        raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
    choice = body.get("guided_choice", guided.get("choice"))
    regex = body.get("guided_regex", guided.get("regex"))
    schema = body.get("guided_json", guided.get("json"))
    if choice is not None:
        spec.choices = choice
    if regex is not None:
        spec.regex = regex
    if schema is not None:
        spec.json = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "prompt must be one string here (token ids and batches of prompts are not supported: "
                            "send one request per prompt)", param="prompt")  # fmt: skip
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"prompt must be a non-empty string, got {prompt!r}", param="prompt")
    return prompt


def chat_prompt(body: dict, fmt: ChatFormat | None) -> list[str]:
    """The conversation rendered with the model's chat template, up to the reply to generate."""
    if fmt is None:
        raise ApiError(400, "the served model has no chat template: use /v1/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    conversation: list[chat.Message] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must have a role (system, user or assistant) and text content, "
                                f"got {m!r:.200}", param="messages")  # fmt: skip
        conversation.append((role, [content]))
    conversation.append(("assistant", [chat.Gen(0)]))
    try:
        program = chat.render_program(fmt, conversation)
    except chat.ChatTemplateError as exc:
        raise ApiError(400, f"the model's chat template refused this conversation: {exc}", param="messages") from None
    return [p for p in program if isinstance(p, str) and p]


# ----------------------------------------------------------------------------- the front


class HttpFront:
    """The HTTP thread and its bridge to the server loop."""

    def __init__(self, host: str, port: int, model_name: str, chat_format: ChatFormat | None,
                 api_key: str | None, ctx: zmq.Context, engine_status: Callable[[], tuple[int, int]]) -> None:  # fmt: skip
        """``engine_status`` answers (engines ready, the model's context length; 0: not known yet); it is
        called from the HTTP thread, so it only reads plain values the server loop sets."""
        self.host, self.model_name, self.chat_format, self.api_key = host, model_name, chat_format, api_key
        self.engine_status = engine_status
        self.ctx = ctx
        self.commands: queue.SimpleQueue[tuple[str, HttpCall]] = queue.SimpleQueue()
        self.wake = ctx.socket(zmq.PULL)  # the server loop polls it
        self.wake.setsockopt(zmq.LINGER, 0)
        self.wake.bind(WAKE_ENDPOINT)
        self._local = threading.local()
        self.sock = _listen(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start; see the log above")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.sock.close()
        self.wake.close(linger=0)

    def take_commands(self) -> list[tuple[str, HttpCall]]:
        """What the HTTP thread asked for since the last call (server loop)."""
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while True:
            try:
                out.append(self.commands.get_nowait())
            except queue.Empty:
                return out

    def _command(self, what: str, call: HttpCall) -> None:
        """Queue a command for the server loop and wake it (HTTP thread)."""
        self.commands.put((what, call))
        push = getattr(self._local, "push", None)
        if push is None:  # a zmq socket belongs to one thread: this one's
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(WAKE_ENDPOINT)
        push.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------------ the ASGI app

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 500)
            message = f"{request.method} {request.url.path}: " + ("no such endpoint" if status == 404 else str(exc))
            return error_for(status, message).response()

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")  # fmt: skip

    async def health(self, request: Request) -> Response:
        ready, _ = self.engine_status()
        if ready:
            return JSONResponse({"status": "ok", "engines_ready": ready})
        return JSONResponse({"status": "starting", "engines_ready": 0}, status_code=503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            return exc.response()
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "parrot-nb"}
        _, max_context = self.engine_status()
        if max_context:
            card["max_model_len"] = max_context
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def _serve(self, request: Request, kind: str) -> Response:
        try:
            self._authorize(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            model = body.get("model")
            if model not in (None, self.model_name):
                raise ApiError(404, f"the model {model!r} does not exist here: this server serves {self.model_name!r}",
                               "not_found_error", param="model", code="model_not_found")  # fmt: skip
            if kind == "chat":
                texts = chat_prompt(body, self.chat_format)
                sampling = sampling_from(body, CHAT_DEFAULT_MAX_TOKENS)
                eot = chat.end_of_turn(self.chat_format) if self.chat_format is not None else ""
                if eot and eot not in sampling.stop:
                    sampling.stop.append(eot)
            else:
                texts = [completion_prompt(body)]
                sampling = sampling_from(body, COMPLETION_DEFAULT_MAX_TOKENS)
            user = body.get("user") or ""
            if not isinstance(user, str) or len(user) > 256:
                raise ApiError(400, "user must be a string of at most 256 characters (it names the request's "
                               "application in the server's events)", param="user")  # fmt: skip
            stream = bool(body.get("stream", False))
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise ApiError(400, "stream_options must be an object", param="stream_options")
            if options and not stream:
                raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        except ApiError as exc:
            return exc.response()
        call = HttpCall(kind, texts, sampling, stream, bool(options.get("include_usage")), asyncio.get_running_loop(), user=user)
        self._command("submit", call)
        if stream:
            return EventSourceResponse(self._events(call), sep="\n", ping=15)
        return await self._whole(call, request)

    async def _whole(self, call: HttpCall, request: Request) -> Response:
        """Wait for the whole answer; a client that leaves meanwhile has its request cancelled."""
        parts: list[str] = []
        try:
            while True:
                try:
                    item = await asyncio.wait_for(call.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._command("cancel", call)
                        return Response(status_code=499)
                    continue
                if item[0] == "delta":
                    parts.append(item[1])
                elif item[0] == "error":
                    return error_for(item[1], item[2]).response()
                else:
                    _, text, usage, reason = item
                    return JSONResponse(self._body(call, text, reason, usage))
        except asyncio.CancelledError:
            if not call.ended:
                self._command("cancel", call)
            raise

    def _body(self, call: HttpCall, text: str, reason: str, usage: tuple[int, int, int]) -> dict:
        if call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
            return {"id": f"chatcmpl-{call.id}", "object": "chat.completion", "created": call.created,
                    "model": self.model_name, "choices": [choice], "usage": _usage(usage)}  # fmt: skip
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created,
                "model": self.model_name, "choices": [choice], "usage": _usage(usage)}  # fmt: skip

    def _chunk(self, call: HttpCall, text: str | None, reason: str | None, first: bool = False) -> dict:
        if call.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = {"id": f"chatcmpl-{call.id}", "object": "chat.completion.chunk", "created": call.created,
                   "model": self.model_name, "choices": [choice]}  # fmt: skip
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created,
                   "model": self.model_name, "choices": [choice]}  # fmt: skip
        if call.include_usage:
            out["usage"] = None
        return out

    async def _events(self, call: HttpCall) -> AsyncIterator[dict]:
        """The stream: chunks with finish_reason null, the last one with it, usage, then [DONE]."""
        try:
            if call.kind == "chat":
                yield {"data": json.dumps(self._chunk(call, "", None, first=True))}
            while True:
                item = await call.queue.get()
                if item[0] == "delta":
                    if item[1]:
                        yield {"data": json.dumps(self._chunk(call, item[1], None))}
                    continue
                if item[0] == "error":
                    yield {"data": json.dumps(error_for(item[1], item[2]).body())}
                else:
                    _, _, usage, reason = item
                    yield {"data": json.dumps(self._chunk(call, None if call.kind == "chat" else "", reason))}
                    if call.include_usage:
                        last = {**self._chunk(call, None, None), "choices": [], "usage": _usage(usage)}
                        yield {"data": json.dumps(last)}
                break
            yield {"data": "[DONE]"}
        finally:  # the client went away mid-stream (the generator is cancelled), or it ended
            if not call.ended:
                self._command("cancel", call)


def _usage(usage: tuple[int, int, int]) -> dict:
    prompt, output, cached = usage
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is reported clearly (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock
