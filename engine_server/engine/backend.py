"""What an engine worker drives: the engine interface, and the events and results it reports.

Two engines implement ``EngineBackend``: the builtin one (``worker.BuiltinBackend`` over
``engine.Engine``: our model, paged KV, the context tree, the Triton kernels) and
``remote.RemoteBackend``, which forwards each request to an outside OpenAI-compatible server
(vLLM, SGLang, or another parrot-nb server's ``--http-port``). The worker process speaks the
protocol to the server and calls only this interface, so the manager's DAG execution,
objectives and app-centric scheduling work the same over either.

Torch-free: a worker over outside servers never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from engine_server.protocol import SegmentSpec

FinishReason = Literal["length", "stop", "eos"]


@dataclass
class Timings:
    """Wall-clock seconds of one request, from when the engine received it."""

    queue_s: float = 0.0  # until first scheduled
    prefill_s: float = 0.0  # first scheduled until its first token
    decode_s: float = 0.0  # first token until done
    ttft_s: float | None = None  # received until first sampled token; None if nothing was generated


@dataclass
class RunResult:
    """What a program produced, per output key."""

    outputs: dict[str, str]
    output_tokens: dict[str, int]
    finish_reasons: dict[str, FinishReason]
    prompt_tokens: int  # tokens of the prompt text (and BOS), outputs excluded
    cached_tokens: int  # of those, how many came from a forked context
    timings: Timings


@dataclass
class Delta:
    request_id: str
    key: str
    text: str


@dataclass
class Finished:
    request_id: str
    result: RunResult


@dataclass
class Failed:
    request_id: str
    error: str


Event = Delta | Finished | Failed


@dataclass
class BackendInfo:
    """What the worker tells the server in its ``WorkerHello``."""

    model: str
    max_running: int  # requests it takes at once
    kv_blocks: int = 0  # KV pool size in blocks; 0: not known here (an outside server's own)
    block_size: int = 0
    max_context: int = 0  # prompt + outputs, in tokens; 0: unknown


class EngineBackend(Protocol):
    """The engine interface an engine worker runs requests through."""

    def describe(self) -> BackendInfo: ...

    def add(self, request_id: str, segments: Sequence[SegmentSpec], *, prefill_only: bool = False, adopt: str = "") -> None:
        """Queue a request program; raise ValueError (queueing nothing) when it can never run."""

    def extend(self, request_id: str, pieces: Sequence[str]) -> bool:
        """Append streamed text to a prefill-only request; False when it is not here."""

    def abort(self, request_id: str) -> bool:
        """Drop a request and free what it holds; nothing more is reported for it."""

    def release_contexts(self, keys: Sequence[str]) -> None:
        """No queued request needs these cached contexts any more."""

    def has_work(self) -> bool: ...

    def step(self) -> list[Event]:
        """Advance the work in flight; return what happened. May block briefly when nothing is ready."""

    def reset(self) -> list[str]:
        """After a failed step: drop everything running; return the ids of the requests dropped."""

    def load(self) -> dict[str, int]:
        """running, waiting, kv_blocks_used, kv_blocks_total and cached_keys (``WorkerLoad``'s fields)."""

    def take_evicted(self) -> list[str]:
        """Context keys dropped since the last call."""

    def has_evicted(self) -> bool: ...

    def cached_blocks(self) -> int:
        """KV blocks that only cached contexts hold (eviction would free them)."""

    def usable(self) -> bool:
        """Whether steps can still run (after a CUDA error they cannot)."""

    def close(self) -> None: ...
