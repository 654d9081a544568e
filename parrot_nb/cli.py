"""The ``parrot-nb`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine_server.protocol import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_side = {"serve": "engine_server", "keys": "engine_server.keys"}
    if argv and argv[0] in server_side:
        # These live in engine_server (the notebook side imports only its protocol); run them as
        # its entry points, so that `parrot-nb serve --help` is the server's own help.
        os.execv(sys.executable, [sys.executable, "-m", server_side[argv[0]], *argv[1:]])
    parser = argparse.ArgumentParser(
        prog="parrot-nb",
        description="parrot-nb: multi-call LLM applications in Jupyter, served by a DAG-aware engine server.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the engine server in the foreground (see `parrot-nb serve --help`)")
    sub.add_parser(
        "keys", help="create the CurveZMQ keys a server needs to listen beyond loopback (`parrot-nb keys --help`)"
    )
    for name, text in (("status", "show a running server's engines and applications"), ("stop", "stop a running server")):
        p = sub.add_parser(name, help=text)
        p.add_argument("connection_file", nargs="?", help="the server's connection file (default: the newest running one)")
    p = sub.add_parser(
        "export",
        help="turn a notebook into a batch pipeline (plain Python, no IPython)",
        description="Turn a notebook into a batch pipeline: %%semantic cells become SemanticFunction definitions, "
        "code cells stay, the cell tagged 'parameters' becomes the pipeline's parameters, `def run(...)` is the "
        "work for one record, cells tagged 'notebook-only' are left out. The same as "
        "`jupyter nbconvert --to parrot-pipeline`.",
    )
    p.add_argument("notebook", help="the .ipynb file")
    p.add_argument("-o", "--output", help="where to write the pipeline (default: the notebook's name with .py)")
    p = sub.add_parser(
        "run",
        help="run a pipeline over a JSONL file of records, resumably",
        description="Run an exported pipeline's run() over every record of a JSONL file (each a JSON object of "
        "run()'s arguments), one application per record, N records in flight, as throughput work. Each result is "
        "appended to --output as its record finishes and is on the disk before the next is counted; running the "
        "same command again skips the records the file holds, so a killed run loses nothing and duplicates "
        "nothing. A record that fails is written with its error. Ctrl-C cancels the records in flight and keeps "
        "the written ones. Without --server, --model or --engines, the pipeline's own `%parrot start` line "
        "starts the server.",
    )
    p.add_argument("pipeline", help="the pipeline's .py file (from `parrot-nb export`)")
    p.add_argument("--inputs", required=True, help="JSONL file of records, one JSON object per line")
    p.add_argument("--output", required=True, help="JSONL results file: created, or resumed if it holds this pipeline's results")
    p.add_argument("--concurrency", type=int, default=16, help="records in flight at once (default 16)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter of the pipeline (repeatable)")
    server = p.add_mutually_exclusive_group()
    server.add_argument("--server", metavar="CONNECTION_FILE", help="use this running engine server")
    server.add_argument("--model", help="start an engine server with this model for the run (smollm2, tiny, FILE.gguf, DIR)")
    p.add_argument(
        "--engines", type=int, default=None,
        help="engines of the server started for the run (default: one per visible GPU with --device cuda, one on cpu)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the server started for the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "run":
        return _run(args, argv)

    from parrot_nb import session

    try:
        session.connect(args.connection_file)
        if args.command == "status":
            print(session.format_status(session.status()))
        else:
            session.stop()
            print("engine server stopped")
    except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"parrot-nb {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        session.disconnect()
    return 0


def _export(args: argparse.Namespace) -> int:
    from parrot_nb.export import ExportError, export_file

    output = Path(args.output) if args.output else Path(args.notebook).with_suffix(".py")
    try:
        source = export_file(args.notebook)
    except ExportError as exc:
        print(f"parrot-nb export: {exc}", file=sys.stderr)
        return 1
    try:
        output.write_text(source)
    except OSError as exc:
        print(f"parrot-nb export: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import shlex
    import signal

    from parrot_nb import pipeline, session
    from parrot_nb.results import ResultsFileError
    from parrot_nb.runner import run_pipeline

    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            print(f"parrot-nb run: --param {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        params[name] = value
    if args.concurrency < 1:
        print(f"parrot-nb run: --concurrency must be at least 1, not {args.concurrency}", file=sys.stderr)
        return 2
    if not Path(args.inputs).is_file():
        print(f"parrot-nb run: --inputs {args.inputs}: no such file", file=sys.stderr)
        return 2
    # SIGTERM stops a run as Ctrl-C does: in-flight records cancelled, written ones kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = False
    try:
        if args.server:
            session.connect(args.server)
        elif args.model or args.engines:
            session.start(model=args.model or DEFAULT_MODEL, engines=args.engines, device=args.device)
            started = True
        loaded = pipeline.load(args.pipeline, params)
        if session.current_client() is None:
            print(
                f"parrot-nb run: no engine server: {args.pipeline} starts none (its notebook has no `%parrot start`); "
                "pass --server CONNECTION_FILE or --model MODEL",
                file=sys.stderr,
            )
            return 2
        resume = "run the same command again:\n  " + shlex.join(["parrot-nb", *argv])
        summary = run_pipeline(
            loaded, args.inputs, args.output, concurrency=args.concurrency, progress=not args.no_progress, resume_hint=resume
        )
    except (pipeline.PipelineError, ResultsFileError, OSError, RuntimeError, TimeoutError) as exc:
        print(f"parrot-nb run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run started (loading, starting the server)
        print("parrot-nb run: interrupted before any record ran", file=sys.stderr)
        return 130
    finally:
        if (started or pipeline.started_here()) and session.current_client() is not None:
            session.stop()
        else:
            session.disconnect()
        pipeline.release()
    return 130 if summary.interrupted else 0

if __name__ == "__main__":
    sys.exit(main())
