"""An engine over an outside OpenAI-compatible server: vLLM, SGLang, or another parrot-nb.

``parrot-nb serve --engine-url URL`` starts one engine worker per URL with this backend. The
manager does what it always does (server-side DAG execution, objectives, app-centric
scheduling, prefix affinity: requests that share a prefix go to the server already holding
it in its own prefix cache); each request program becomes streamed ``/v1/completions`` calls,
one per output, each prompt being the program's text so far (outputs included).

What the outside server cannot do is said here rather than faked: it holds no prefill for
a request still waiting on its inputs, so a prefill-only program finishes at once with
nothing computed; KV figures are the outside server's own business, so the load reports
none. Structured outputs go as ``response_format`` (JSON schema, the OpenAI form) and
``structured_outputs`` (choice, regex: vLLM's form, which parrot-nb's endpoint accepts too).

One asyncio loop in a thread drives every request through one ``httpx.AsyncClient``;
``step`` hands the worker what happened. Aborting a request closes its HTTP stream, which
the outside server takes as a cancellation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import httpx

from engine_server.engine.backend import BackendInfo, Delta, Event, Failed, Finished, RunResult, Timings
from engine_server.protocol import SamplingSpec, SegmentSpec

log = logging.getLogger("engine_server.remote")

STEP_WAIT_S = 0.005  # how long an idle step waits for the outside server before the worker checks its socket


class RemoteError(RuntimeError):
    """The outside server refused or broke off a request; the message says which and why."""


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> the ``/v1`` base the API lives under."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def completion_body(model: str, prompt: str, sampling: SamplingSpec) -> dict:
    """A streamed /v1/completions request for one output."""
    body: dict = {
        "model": model, "prompt": prompt, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
        "top_p": sampling.top_p, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.top_k:
        body["top_k"] = sampling.top_k  # vLLM's and SGLang's extension, as is ignore_eos
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.json is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": json.loads(sampling.json)}}
    elif sampling.choices:
        body["structured_outputs"] = {"choice": list(sampling.choices)}
    elif sampling.regex is not None:
        body["structured_outputs"] = {"regex": sampling.regex}
    return body


class RemoteBackend:
    """``EngineBackend`` that forwards request programs to an OpenAI-compatible server."""

    def __init__(self, url: str, api_key: str | None = None, max_running: int = 256, timeout_s: float = 600.0) -> None:
        """Raises RemoteError when the server cannot be reached or refuses us, saying what to do."""
        self.url, self.base = url, api_base(url)
        self.max_running = max_running
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.max_context = self._probe(headers)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.tasks: dict[str, Future] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="remote-engine", daemon=True)
        self.thread.start()
        limits = httpx.Limits(max_connections=max_running, max_keepalive_connections=max_running)
        timeout = httpx.Timeout(timeout_s, connect=10.0)

        async def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=self.base, headers=headers, limits=limits, timeout=timeout)

        self.client = asyncio.run_coroutine_threadsafe(make_client(), self.loop).result()

    def _probe(self, headers: dict) -> tuple[str, int]:
        """The served model and its context length, from ``/v1/models``."""
        try:
            r = httpx.get(f"{self.base}/models", headers=headers, timeout=10.0)
        except httpx.HTTPError as exc:
            raise RemoteError(
                f"cannot reach an OpenAI-compatible server at {self.url} ({exc}); start it first, or fix --engine-url"
            ) from None
        if r.status_code == 401:
            raise RemoteError(f"{self.url} refused the API key (HTTP 401): give the right one with --engine-api-key")
        try:
            r.raise_for_status()
            card = r.json()["data"][0]
            return str(card["id"]), int(card.get("max_model_len") or 0)
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteError(
                f"{self.base}/models did not list a model (HTTP {r.status_code}: {r.text[:200]!r}; {exc}): "
                "is this an OpenAI-compatible server?"
            ) from None

    # ------------------------------------------------------------------ EngineBackend

    def describe(self) -> BackendInfo:
        return BackendInfo(self.model, self.max_running, max_context=self.max_context)

    def add(self, request_id: str, segments: Sequence[SegmentSpec], *, prefill_only: bool = False, adopt: str = "") -> None:
        if request_id in self.tasks:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if prefill_only or not any(s.kind == "gen" for s in segments):
            # Nothing to generate, and no prefill to hold it in: report it done, computed nothing.
            self.events.put(Finished(request_id, RunResult({}, {}, {}, 0, 0, Timings())))
            return
        future = asyncio.run_coroutine_threadsafe(self._run(request_id, list(segments)), self.loop)
        self.tasks[request_id] = future
        future.add_done_callback(lambda _: self.tasks.pop(request_id, None) if self.tasks.get(request_id) is future else None)

    def extend(self, request_id: str, pieces: Sequence[str]) -> bool:
        return False  # no prefill is held here (see add)

    def abort(self, request_id: str) -> bool:
        future = self.tasks.pop(request_id, None)
        if future is None:
            return False
        future.cancel()  # cancels the task in the loop: its stream is closed
        return True

    def release_contexts(self, keys: Sequence[str]) -> None:
        pass  # the outside server's prefix cache manages itself

    def has_work(self) -> bool:
        return bool(self.tasks) or not self.events.empty()

    def step(self) -> list[Event]:
        out: list[Event] = []
        try:
            out.append(self.events.get(timeout=STEP_WAIT_S))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def reset(self) -> list[str]:
        ids = list(self.tasks)
        for request_id in ids:
            self.abort(request_id)
        return ids

    def load(self) -> dict[str, int]:
        return {"running": len(self.tasks), "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "cached_keys": 0}

    def take_evicted(self) -> list[str]:
        return []

    def has_evicted(self) -> bool:
        return False

    def cached_blocks(self) -> int:
        return 0

    def usable(self) -> bool:
        return True

    def close(self) -> None:
        self.reset()
        try:
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(timeout=5)
        except Exception:  # closing is best effort: the process is ending
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    # ------------------------------------------------------------------ one request

    async def _run(self, request_id: str, segments: list[SegmentSpec]) -> None:
        received = time.perf_counter()
        prompt = ""
        outputs: dict[str, str] = {}
        output_tokens: dict[str, int] = {}
        reasons: dict = {}
        prompt_tokens = cached = 0
        first_token: float | None = None
        try:
            for seg in segments:
                if seg.kind == "text":
                    prompt += seg.text
                    continue
                parts: list[str] = []
                usage: dict = {}
                reason = None
                body = completion_body(self.model, prompt, seg.sampling or SamplingSpec())
                async with self.client.stream("POST", "/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RemoteError(f"{self.url} answered HTTP {r.status_code}: {_message(await r.aread())}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise RemoteError(f"{self.url}: {_message(chunk)}")
                        for choice in chunk.get("choices") or ():
                            if choice.get("text"):
                                first_token = first_token or time.perf_counter()
                                parts.append(choice["text"])
                                self.events.put(Delta(request_id, seg.var_id, choice["text"]))
                            reason = choice.get("finish_reason") or reason
                        usage = chunk.get("usage") or usage
                text = "".join(parts)
                if not outputs:  # the program's own prompt; later calls' prompts hold earlier outputs
                    prompt_tokens = int(usage.get("prompt_tokens", 0))
                    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                outputs[seg.var_id] = text
                output_tokens[seg.var_id] = int(usage.get("completion_tokens", 0))
                reasons[seg.var_id] = "length" if reason == "length" else "stop"
                prompt += text
        except asyncio.CancelledError:
            raise  # aborted: nothing more is reported
        except (RemoteError, httpx.HTTPError, ValueError) as exc:
            error = str(exc) if isinstance(exc, RemoteError) else f"{self.url}: {type(exc).__name__}: {exc}"
            self.events.put(Failed(request_id, error))
            return
        now = time.perf_counter()
        timings = Timings(
            prefill_s=(first_token or now) - received, decode_s=now - (first_token or now),
            ttft_s=(first_token - received) if first_token else None,
        )  # fmt: skip
        self.events.put(Finished(request_id, RunResult(outputs, output_tokens, reasons, prompt_tokens, cached, timings)))


def _message(raw: bytes | dict) -> str:
    """The error message of an OpenAI-shaped error body, else the body itself (shortened)."""
    try:
        data = json.loads(raw) if isinstance(raw, bytes) else raw
        return str(data["error"]["message"] if isinstance(data.get("error"), dict) else data["error"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))[:300]
