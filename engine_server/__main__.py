"""``python -m engine_server``: run the engine server in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine_server.server import EngineServer, ServerConfig, visible_gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parrot-nb serve",
        description="Run the parrot-nb engine server in the foreground: a ZMQ front for notebooks and "
        "engine worker processes behind it. It writes a connection file that `%parrot connect` reads.",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="the model to serve: 'tiny' (a seeded tiny Llama built in code) or a local Hugging Face model "
        "directory (config.json, safetensors, tokenizer.json)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where engines run (default: cpu)")
    parser.add_argument(
        "--engines",
        type=int,
        default=None,
        help="number of engine worker processes (default: 1 on cpu, one per visible GPU on cuda; "
        "more engines than GPUs share them round robin)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="requests port; events use PORT+1 (default: random free ports)"
    )
    parser.add_argument(
        "--connection-file",
        type=Path,
        default=None,
        help="where to write the connection file (default: Jupyter's runtime dir, parrot-nb-server-PID.json)",
    )
    parser.add_argument("--event-log", type=Path, default=None, help="append every request and event to this JSONL file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.engines is None:
        args.engines = len(visible_gpus()) if args.device == "cuda" else 1
    if args.engines < 1:
        print("parrot-nb serve: --engines must be at least 1", file=sys.stderr)
        return 2
    if args.model != "tiny" and not (Path(args.model) / "config.json").is_file():
        # Say so here rather than through every engine failing to start.
        print(
            f"parrot-nb serve: --model {args.model!r} is neither 'tiny' nor a local Hugging Face model directory "
            "(no config.json there); nothing is downloaded, so give the path of a directory on this machine.",
            file=sys.stderr,
        )
        return 2
    config = ServerConfig(
        model=args.model,
        device=args.device,
        engines=args.engines,
        port=args.port,
        connection_file=args.connection_file,
        event_log=args.event_log,
    )
    EngineServer(config).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
