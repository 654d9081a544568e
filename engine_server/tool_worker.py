"""A tool worker: runs native steps (notebook Python functions) for the engine server.

``python -m engine_server.tool_worker --endpoint E --worker-id N``, started by the
server's ``ToolPool`` (engine_server/tools.py), with the connection key in
``PARROT_NB_KEY``. It connects a DEALER to the server's ``tools`` socket, says
``ToolHello``, and then runs one ``RunNative`` at a time: it unpickles the function
with cloudpickle, calls it with the variable arguments (JSON ones parsed) and its
constant ones, and answers ``NativeDone`` (a str as is, anything else as JSON text)
or ``NativeFailed`` (with the traceback). The server enforces the time limit by
killing the process; the memory limit is an address-space limit (``RLIMIT_AS``) set
around each call, so a call that allocates too much gets a ``MemoryError``.

It imports no torch: it starts in a fraction of a second, and a user's function
imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from types import CodeType
from typing import Any

import zmq

from engine_server.protocol import (
    NativeDone,
    NativeFailed,
    ProtocolError,
    ReplayGuard,
    RunNative,
    Sender,
    StopWorker,
    ToolHello,
    decode,
    pid_alive,
)

#: What the parent process's death is checked for, between calls (seconds).
POLL_MS = 500


def run_call(call: RunNative) -> NativeDone | NativeFailed:
    """Run one native step; every failure becomes a ``NativeFailed`` that says what went wrong."""
    import cloudpickle

    try:
        fn, constants, source = cloudpickle.loads(call.function)
    except Exception as exc:
        return NativeFailed(
            call.request_id,
            f"native step {call.name!r} could not be unpickled on the server ({type(exc).__name__}: {exc}); "
            "a function from a module the server cannot import must be defined in the notebook, "
            "or its module installed where the server runs",
        )
    try:
        args: dict[str, Any] = {
            name: json.loads(text) if name in call.json_args else text for name, text in call.args.items()
        }
    except json.JSONDecodeError as exc:
        return NativeFailed(call.request_id, f"native step {call.name!r}: an input is not valid JSON: {exc}")
    started = time.monotonic()
    limit = _limit_memory(call.memory_mb)
    try:
        result = fn(**constants, **args)
    except MemoryError:
        _restore_memory(limit)
        return NativeFailed(
            call.request_id,
            f"native step {call.name!r} ran out of memory: it may allocate at most {call.memory_mb} MB "
            f"(raise it with @parrot_nb.native(memory_mb=...), or the server's --tool-memory-mb)\n"
            + _user_traceback(source),
        )
    except BaseException as exc:  # noqa: BLE001 - the user's code may raise anything, SystemExit included
        _restore_memory(limit)
        return NativeFailed(
            call.request_id,
            f"native step {call.name!r} raised {type(exc).__name__}: {exc}\n" + _user_traceback(source),
        )
    _restore_memory(limit)
    run_s = time.monotonic() - started
    if isinstance(result, str):
        return NativeDone(call.request_id, result, False, run_s)
    try:
        text = json.dumps(result, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return NativeFailed(
            call.request_id,
            f"native step {call.name!r} returned a {type(result).__name__}, which is neither a str nor "
            f"JSON ({exc}); return a str, or a dict, list, number, bool or None",
        )
    return NativeDone(call.request_id, text, True, run_s)


#: The file name cloudpickle gives the code it sends by value.
DYNAMIC = "<dynamic-code>"


def _user_traceback(source: dict[str, Any]) -> str:
    """The traceback of the user's code, without this module's frame.

    Code sent by value has lost its file name (cloudpickle names it ``<dynamic-code>``);
    the notebook sent the source of the step's file or cell along, and of the local
    modules it names, so frames of functions defined there show their file and lines again.
    """
    exc_type, exc, tb = sys.exc_info()
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    files = source.get("files", {})
    frames = []
    for frame, lineno in traceback.walk_tb(tb):
        code = frame.f_code
        filename = _defining_file(files, code) if code.co_filename == DYNAMIC else None
        if filename is not None:
            lines = files[filename]
            line = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else None
            frames.append(traceback.FrameSummary(filename, lineno, code.co_name, line=line))
        else:
            frames.append(traceback.FrameSummary(code.co_filename, lineno, code.co_name))
    text = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    text += traceback.format_exception_only(exc_type, exc)
    return "".join(text).rstrip()


def _defining_file(files: dict[str, list[str]], code: CodeType) -> str | None:
    """The first of ``files`` (the step's own file comes first) where ``code``'s function is defined."""
    return next((f for f, lines in files.items() if _defined_in(lines, code.co_name, code.co_firstlineno)), None)


def _defined_in(lines: list[str], name: str, first: int) -> bool:
    """Whether ``def name`` starts at line ``first`` of ``lines`` (after its decorators)."""
    window = lines[max(first - 1, 0) : first + 20]
    return any(line.lstrip().startswith((f"def {name}(", f"async def {name}(")) for line in window)


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(memory_mb: int) -> tuple[int, int] | None:
    """Let the call allocate at most ``memory_mb`` more address space; returns the limits to restore."""
    if memory_mb <= 0:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + memory_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return soft, hard


def _restore_memory(limits: tuple[int, int] | None) -> None:
    if limits is not None:
        resource.setrlimit(resource.RLIMIT_AS, limits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine_server.tool_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the server's tools socket (loopback)")
    parser.add_argument("--worker-id", type=int, required=True)
    args = parser.parse_args(argv)
    key = os.environ.get("PARROT_NB_KEY", "").encode()
    server_pid = int(os.environ.get("PARROT_NB_SERVER_PID", "0") or 0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(args.endpoint)
    sender, guard = Sender(key), ReplayGuard()
    sock.send_multipart(sender.encode(ToolHello(args.worker_id, os.getpid())))
    try:
        while True:
            if not sock.poll(POLL_MS):
                if server_pid and not pid_alive(server_pid):
                    return 0  # the server is gone: nobody will read an answer
                continue
            frames = sock.recv_multipart()
            try:
                env = decode(frames, key)
                guard.check(env)
            except ProtocolError as exc:
                print(f"tool worker {args.worker_id}: refused a message: {exc}", file=sys.stderr, flush=True)
                continue
            if isinstance(env.msg, StopWorker):
                return 0
            if isinstance(env.msg, RunNative):
                sock.send_multipart(sender.encode(run_call(env.msg)))
    finally:
        sock.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
