"""An engine worker process: owns the model and runs request programs.

Started by the server (``python -m engine_server.engine.worker``), it connects a
DEALER to the server's ``workers`` ROUTER, says ``WorkerHello`` and then runs
``RunRequest`` programs one after another, streaming ``WorkerDelta`` messages
and ending each with ``WorkerDone`` or ``WorkerFailed``. If it crashes, the
server notices the exit and runs its request again on a fresh worker (up to
the executor's ``MAX_ATTEMPTS`` in all).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING

import zmq

from engine_server.protocol import (
    ProtocolError,
    RunRequest,
    SamplingSpec,
    SegmentSpec,
    StopWorker,
    WorkerDelta,
    WorkerDone,
    WorkerFailed,
    WorkerHello,
    WorkerStartFailed,
    decode,
    encode,
)

if TYPE_CHECKING:
    from engine_server.engine.runner import GenSegment, ProgramRunner, TextSegment

# torch and the model code are imported inside the functions below, so that main() can
# tie this process to its server before spending seconds on those imports.

log = logging.getLogger("engine_server.worker")


def to_runner_segments(segments: list[SegmentSpec]) -> list[TextSegment | GenSegment]:
    from engine_server.engine.runner import GenSegment, TextSegment
    from engine_server.engine.sampler import SamplingParams

    # SamplingSpec (the wire form) and SamplingParams (the engine's) share their field names.
    return [
        TextSegment(seg.text)
        if seg.kind == "text"
        else GenSegment(seg.var_id, SamplingParams(**dataclasses.asdict(seg.sampling or SamplingSpec())))
        for seg in segments
    ]


def build_runner(model: str, device: str) -> ProgramRunner:
    """The model on its device, ready to run programs; raises with a reason when it cannot be."""
    import torch

    from engine_server.engine.model import build_tiny_model
    from engine_server.engine.runner import ProgramRunner
    from engine_server.engine.tokenizer import ByteTokenizer

    if model != "tiny":
        raise ValueError(f"model {model!r}: this version serves only the embedded 'tiny' model")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA: {torch.version.cuda or 'no'}); use --device cpu"
        )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return ProgramRunner(build_tiny_model(seed=0, device=device, dtype=dtype), ByteTokenizer(), device)


class Worker:
    def __init__(self, endpoint: str, engine_id: int, model: str, device: str, key: bytes, server_pid: int) -> None:
        self.engine_id, self.key, self.model_name, self.device = engine_id, key, model, device
        self.server_pid = server_pid
        self.runner: ProgramRunner | None = None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg, self.key))

    def load(self) -> bool:
        """Build the model; on failure tell the server why (it will not restart us) and return False."""
        try:
            self.runner = build_runner(self.model_name, self.device)
        except Exception as exc:
            log.error("engine %d could not start:\n%s", self.engine_id, traceback.format_exc())
            self.send(WorkerStartFailed(self.engine_id, os.getpid(), f"{type(exc).__name__}: {exc}"))
            return False
        return True

    def run(self) -> None:
        assert self.runner is not None, "load() first"
        self.send(WorkerHello(self.engine_id, os.getpid(), self.model_name, self.device))
        while True:
            if not self.sock.poll(1000):
                if os.getppid() != self.server_pid:  # the server died without stopping us
                    log.error("engine %d: server process is gone; exiting", self.engine_id)
                    return
                continue
            try:
                msg = decode(self.sock.recv_multipart(), self.key).msg
            except ProtocolError as exc:
                log.error("engine %d: malformed message from the server: %s", self.engine_id, exc)
                continue
            if isinstance(msg, StopWorker):
                return
            if isinstance(msg, RunRequest):
                self.handle(msg)

    def handle(self, req: RunRequest) -> None:
        def on_delta(var_id: str, text: str) -> None:
            self.send(WorkerDelta(req.request_id, var_id, text))

        try:
            assert self.runner is not None
            result = self.runner.run(to_runner_segments(req.segments), on_delta=on_delta)
        except Exception as exc:  # report the failure for this request; the worker stays up
            log.error("engine %d: request %s failed:\n%s", self.engine_id, req.request_id, traceback.format_exc())
            self.send(WorkerFailed(req.request_id, f"{type(exc).__name__}: {exc}"))
            return
        self.send(
            WorkerDone(
                req.request_id,
                dict(result.outputs),
                result.prompt_tokens,
                sum(result.output_tokens.values()),
                result.timings.prefill_s,
                result.timings.decode_s,
                result.timings.ttft_s or 0.0,
            )
        )

    def close(self) -> None:
        self.ctx.destroy(linger=1000)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    key = os.environ.get("PARROT_NB_KEY", "").encode()
    worker = Worker(args.endpoint, args.engine_id, args.model, args.device, key, server_pid)
    try:
        if not worker.load():
            return 1
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
