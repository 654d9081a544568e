"""An engine worker process: owns an engine and runs request programs, batched.

The engine is the builtin one (``BuiltinBackend``: our model on this machine) or, with
``--remote URL``, an outside OpenAI-compatible server (``remote.RemoteBackend``); the worker
drives either through the ``backend.EngineBackend`` interface.

Started by the server (``python -m engine_server.engine.worker``), it connects a
DEALER to the server's ``workers`` ROUTER, says ``WorkerHello`` (with its batch
capacity and KV pool size) and then runs the engine loop: take every
``RunRequest`` that has arrived, run one engine step over all admitted requests,
stream ``WorkerDelta`` messages, end each request with ``WorkerDone`` or
``WorkerFailed``, and report ``WorkerLoad`` when the load changes. If it
crashes, the server notices the exit and runs its requests again on a fresh
worker (up to the executor's ``MAX_ATTEMPTS`` in all).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING

import zmq

from engine_server.models import resolve_model
from engine_server.protocol import (
    AbortRequest,
    ExtendPrefill,
    ProtocolError,
    ReleaseContexts,
    ReplayGuard,
    RunRequest,
    SamplingSpec,
    Sender,
    SegmentSpec,
    StopWorker,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
    WorkerHello,
    WorkerLoad,
    WorkerStartFailed,
    decode,
)

from engine_server.engine.backend import BackendInfo, Delta, EngineBackend, Failed, Finished

if TYPE_CHECKING:
    from engine_server.engine.engine import Engine, GenSegment, TextSegment

# torch and the model code are imported inside the functions below, so that main() can
# tie this process to its server before spending seconds on those imports.

log = logging.getLogger("engine_server.worker")

LOAD_INTERVAL_S = 0.2  # at most this often a WorkerLoad, unless contexts were evicted


def to_engine_segments(segments: list[SegmentSpec]) -> list[TextSegment | GenSegment]:
    from engine_server.engine.engine import GenSegment, TextSegment
    from engine_server.engine.sampler import SamplingParams

    # SamplingSpec (the wire form) and SamplingParams (the engine's) share their field names.
    return [
        TextSegment(seg.text, seg.key, seg.blocks)
        if seg.kind == "text"
        else GenSegment(seg.var_id, SamplingParams(**dataclasses.asdict(seg.sampling or SamplingSpec())))
        for seg in segments
    ]


def build_engine(model: str, device: str, **engine_options) -> Engine:
    """The model on its device inside an engine; raises with a reason when it cannot be.

    `model` is "tiny" (the seeded random model), a .gguf file or a local Hugging Face directory
    (the server resolves names such as the default "smollm2" to a path first).
    """
    import torch

    from engine_server.chat import ChatTemplateError, end_of_turn
    from engine_server.engine.engine import Engine, EngineConfig
    from engine_server.engine.model import build_tiny_model
    from engine_server.engine.tokenizer import ByteTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {device}, but torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA: {torch.version.cuda or 'no'}); use --device cpu"
        )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    source = resolve_model(model)
    if source.kind == "tiny":
        net, tokenizer = build_tiny_model(seed=0, device=device, dtype=dtype), ByteTokenizer()
    else:
        if source.kind == "gguf":
            from engine_server.engine.gguf_loader import load_gguf as load
        else:
            from engine_server.engine.loader import load_model as load
        loaded = load(source.path, device=device, dtype=dtype)
        net, tokenizer = loaded.model, loaded.tokenizer
        if device == "cpu":
            net.use_half_matrices()  # decode reads half the bytes (see LlamaModel.use_half_matrices)
        fmt = loaded.chat_format
        if fmt is not None:
            # A chat reply ends at the template's end-of-turn token even where the files do not
            # list it as an end of sequence (a token decodes to no text, so no stop string sees it).
            try:
                tokenizer.add_eos_token(end_of_turn(fmt))
            except ChatTemplateError as exc:  # plain completions still work; chat calls will say why
                log.warning("engine: %s", exc)
    if device.startswith("cuda"):
        defaults = {"max_running": 256, "token_budget": 8192}
    else:
        defaults = {"max_running": 16, "token_budget": 512}
    engine = Engine(net, tokenizer, EngineConfig(**{**defaults, **engine_options}))
    engine.warmup()
    return engine


class BuiltinBackend:
    """``EngineBackend`` over the builtin ``Engine``: our model on this machine's device."""

    def __init__(self, engine: Engine, model: str, device: str) -> None:
        self.engine, self.model, self.device = engine, model, device

    def describe(self) -> BackendInfo:
        e = self.engine
        return BackendInfo(self.model, e.config.max_running, e.pool.num_blocks, e.pool.block_size, e.model.config.max_seq_len)

    def add(self, request_id: str, segments, *, prefill_only: bool = False, adopt: str = "") -> None:
        self.engine.add(request_id, to_engine_segments(segments), prefill_only=prefill_only, adopt=adopt)

    def extend(self, request_id: str, pieces) -> bool:
        return self.engine.extend(request_id, pieces)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def release_contexts(self, keys) -> None:
        self.engine.release_contexts(keys)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self):
        return self.engine.step()

    def reset(self) -> list[str]:
        return self.engine.reset()

    def load(self) -> dict[str, int]:
        return self.engine.load()

    def take_evicted(self) -> list[str]:
        return self.engine.cache.take_evicted()

    def has_evicted(self) -> bool:
        return bool(self.engine.cache.evicted)

    def cached_blocks(self) -> int:
        return self.engine.cached_blocks()

    def usable(self) -> bool:
        return device_usable(self.device)

    def close(self) -> None:
        pass


class Worker:
    def __init__(
        self, endpoint: str, engine_id: int, model: str, device: str, key: bytes, server_pid: int,
        engine_options: dict | None = None, remote: str | None = None,
    ) -> None:  # fmt: skip
        self.engine_id, self.key, self.model_name, self.device = engine_id, key, model, device
        self.engine_options = engine_options or {}
        self.remote = remote  # an outside OpenAI-compatible server's URL, instead of the builtin engine
        self.server_pid = server_pid
        self.engine: EngineBackend | None = None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(endpoint)
        self.sender = Sender(key)
        self.guard = ReplayGuard()
        self._last_load: tuple | None = None
        self._last_load_t = 0.0

    def send(self, msg) -> None:
        self.sock.send_multipart(self.sender.encode(msg))

    def load(self) -> bool:
        """Build the engine; on failure tell the server why (it will not restart us) and return False."""
        try:
            if self.remote is not None:
                from engine_server.engine.remote import RemoteBackend

                self.engine = RemoteBackend(
                    self.remote, os.environ.get("PARROT_NB_ENGINE_API_KEY") or None, **self.engine_options
                )
            else:
                engine = build_engine(self.model_name, self.device, **self.engine_options)
                self.engine = BuiltinBackend(engine, self.model_name, self.device)
        except Exception as exc:
            log.error("engine %d could not start:\n%s", self.engine_id, traceback.format_exc())
            self.send(WorkerStartFailed(self.engine_id, os.getpid(), f"{type(exc).__name__}: {exc}"))
            return False
        return True

    def run(self) -> None:
        engine = self.engine
        assert engine is not None, "load() first"
        info = engine.describe()
        self.send(
            WorkerHello(
                self.engine_id, os.getpid(), info.model, self.device if self.remote is None else self.remote,
                max_running=info.max_running, kv_blocks=info.kv_blocks, block_size=info.block_size,
                max_context=info.max_context,
            )
        )  # fmt: skip
        report_owed = False
        while True:
            busy = engine.has_work()
            # Idle: sleep until a message comes, or until a throttled load report is due.
            idle_wait = int(LOAD_INTERVAL_S * 1000) if report_owed else 1000
            if self.sock.poll(0 if busy else idle_wait):
                if not self.receive():
                    return
            elif not busy and os.getppid() != self.server_pid:  # the server died without stopping us
                log.error("engine %d: server process is gone; exiting", self.engine_id)
                return
            if engine.has_work():
                self.step()
            report_owed = self.report_load()

    def receive(self) -> bool:
        """Handle every message that has arrived; False when told to stop."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                env = decode(frames, self.key)
                self.guard.check(env)
            except ProtocolError as exc:
                log.error("engine %d: refused a message from the server: %s", self.engine_id, exc)
                continue
            msg = env.msg
            if isinstance(msg, StopWorker):
                return False
            if isinstance(msg, RunRequest):
                self.submit(msg)
            elif isinstance(msg, ReleaseContexts):
                self.engine.release_contexts(msg.keys)
            elif isinstance(msg, AbortRequest):
                self.engine.abort(msg.request_id)
            elif isinstance(msg, ExtendPrefill):
                self.engine.extend(msg.request_id, msg.pieces)

    def submit(self, req: RunRequest) -> None:
        try:
            self.engine.add(req.request_id, req.segments, prefill_only=req.prefill_only, adopt=req.adopt)
        except Exception as exc:  # a request that can never run fails alone
            self.send(WorkerFailed(req.request_id, f"{type(exc).__name__}: {exc}"))

    def step(self) -> None:
        engine = self.engine
        try:
            events = engine.step()
        except Exception as exc:
            # A failed forward leaves no trustworthy state: fail what was running, clear the
            # cache, and carry on (queued requests stay queued).
            log.error("engine %d: step failed:\n%s", self.engine_id, traceback.format_exc())
            error = f"engine step failed: {type(exc).__name__}: {exc}"
            for rid in engine.reset():
                self.send(WorkerFailed(rid, error))
            if not engine.usable():
                # A CUDA error is sticky: every later step would fail too. Exit, so the
                # server restarts this engine and requeues its requests.
                log.error("engine %d: the device is unusable after that error; exiting", self.engine_id)
                raise SystemExit(1) from exc
            return
        for ev in events:
            if isinstance(ev, Delta):
                self.send(WorkerDelta(ev.request_id, ev.key, ev.text))
            elif isinstance(ev, Finished):
                r = ev.result
                self.send(
                    WorkerDone(
                        ev.request_id, dict(r.outputs), r.prompt_tokens, sum(r.output_tokens.values()),
                        r.timings.prefill_s, r.timings.decode_s, r.timings.ttft_s or 0.0,
                        cached_tokens=r.cached_tokens,
                    )
                )  # fmt: skip
            elif isinstance(ev, Failed):
                self.send(WorkerFailed(ev.request_id, ev.error))

    def report_load(self) -> bool:
        """Send WorkerLoad when the load changed (throttled) or contexts were evicted.

        Returns whether a changed load is still unreported (held back by the throttle).
        """
        engine = self.engine
        load = engine.load()
        state = tuple(load.values())
        now = time.monotonic()
        evicted = engine.has_evicted()
        if state == self._last_load and not evicted:
            return False
        if not evicted and now - self._last_load_t < LOAD_INTERVAL_S:
            return True
        # The cached-block count is a scan of the cache: made only for a report that goes out.
        cached = engine.cached_blocks()
        self.send(WorkerLoad(self.engine_id, evicted_keys=engine.take_evicted(), kv_blocks_cached=cached, **load))
        self._last_load, self._last_load_t = state, now
        return False

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.ctx.destroy(linger=1000)


def device_usable(device: str) -> bool:
    """Whether the device still runs work (after a CUDA error it may not)."""
    if not device.startswith("cuda"):
        return True
    import torch

    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=device).add_(1).item()
    except Exception:
        return False
    return True


def die_with_parent() -> None:
    """Have the kernel kill this process when the server dies, even mid-request.

    A worker blocked in a long generation, or in a send to a server that is gone,
    would otherwise never notice; the idle-time parent check in ``Worker.run``
    covers systems without prctl.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    # The server's pid comes from the server itself: if it died before prctl took effect,
    # getppid() already names another process, and comparing with it would prove nothing.
    server_pid = int(os.environ.get("PARROT_NB_SERVER_PID", os.getppid()))
    if os.getppid() != server_pid:
        return 1
    parser = argparse.ArgumentParser(prog="python -m engine_server.engine.worker")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--engine-id", type=int, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-running", type=int)
    parser.add_argument("--token-budget", type=int)
    parser.add_argument("--kv-cache-mb", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--background-chunk", type=int)
    parser.add_argument("--shared-prefix-kernel", choices=["auto", "on", "off"])
    # An outside OpenAI-compatible server instead of the builtin engine; its API key comes
    # in PARROT_NB_ENGINE_API_KEY (the environment, not argv, so `ps` does not show it).
    parser.add_argument("--remote", default=None, metavar="URL")
    args = parser.parse_args(argv)
    options = {
        name: getattr(args, name)
        for name in ("max_running", "token_budget", "gpu_memory_utilization", "background_chunk")
        if getattr(args, name) is not None
    }
    if args.kv_cache_mb is not None:
        options["kv_cache_bytes"] = args.kv_cache_mb * 2**20
    if args.shared_prefix_kernel is not None:
        options["shared_prefix_kernel"] = {"auto": None, "on": True, "off": False}[args.shared_prefix_kernel]
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    key = os.environ.get("PARROT_NB_KEY", "").encode()
    if args.remote is not None:  # the sizing flags of the builtin engine mean nothing there
        options = {"max_running": args.max_running} if args.max_running is not None else {}
    worker = Worker(args.endpoint, args.engine_id, args.model, args.device, key, server_pid, options, args.remote)
    try:
        if not worker.load():
            return 1
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
