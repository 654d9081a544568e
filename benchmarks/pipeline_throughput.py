"""An exported pipeline at concurrency N against the same records one after another, on the default model.

Both sides run the demo's map-reduce summary (demos/summarize_documents.ipynb: three part summaries
of 16 tokens, then a 24-token summary and an 8-token title) over the same generated documents
(demos/make_documents.py, seed 0, three to five sentences each), each on a fresh engine server (SmolLM2-135M-Instruct on the CPU,
one engine), so that neither side finds the other's prompts in the prefix cache:

- sequential: the notebook's way, through the notebook's functions: ``out = run(document=...)``
  then ``out.summary.get()`` and ``out.title.get()`` (latency-oriented), one record after another,
  all in the kernel's one application;
- pipeline: ``parrot_nb.runner.run_pipeline`` on the exported pipeline, ``--concurrency`` records in
  flight, each its own throughput-oriented application, results appended to a JSONL file.

Records/s is records over the wall time of each side (server start excluded); the cache-hit rate
is prompt tokens served from a cached context over prompt tokens (``RequestFinished`` events).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_throughput.py --records 200 --concurrency 16 \
        --out benchmarks/results/pipeline_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "demos" / "summarize_documents.ipynb"


class Tokens:
    """Prompt, cached and output tokens of every request that finished on the connected server."""

    def __init__(self) -> None:
        self.prompt = self.cached = self.output = self.requests = 0
        self._lock = threading.Lock()

    def on_event(self, event) -> None:
        from engine_server.protocol import RequestFinished

        if isinstance(event, RequestFinished):
            with self._lock:
                self.prompt += event.prompt_tokens
                self.cached += event.cached_tokens
                self.output += event.output_tokens
                self.requests += 1


def side(name: str, model: str, work, kv_cache_mb: int | None = None) -> dict:
    """Start a fresh server, run ``work()`` timed, stop the server; the side's numbers."""
    import parrot_nb

    client = parrot_nb.start(model=model, kv_cache_mb=kv_cache_mb)
    try:
        tokens = Tokens()
        remove = client.add_listener(tokens.on_event)
        t0 = time.monotonic()
        records = work()
        elapsed = time.monotonic() - t0
        remove()
    finally:
        parrot_nb.stop()
    return {
        "side": name,
        "records": records,
        "seconds": round(elapsed, 2),
        "records_per_s": round(records / elapsed, 4),
        "requests": tokens.requests,
        "output_tokens": tokens.output,
        "output_tokens_per_s": round(tokens.output / elapsed, 1),
        "prompt_tokens": tokens.prompt,
        "cached_tokens": tokens.cached,
        "cache_hit_rate": round(tokens.cached / tokens.prompt, 4) if tokens.prompt else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sentences", type=int, nargs=2, default=(3, 5), metavar=("MIN", "MAX"),
                        help="sentences per document (default 3 5: short documents, one or two per part)")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="the engine's KV pool (default: the server's, 256)")
    parser.add_argument("--sides", choices=["both", "pipeline"], default="both",
                        help="'pipeline' runs the pipeline side alone (a diagnostic, not a comparison)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "demos"))
    import make_documents

    from parrot_nb import pipeline
    from parrot_nb.export import export_file
    from parrot_nb.runner import read_records, run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="parrot-nb-pipeline-bench-"))
    os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")  # this run's servers only
    inputs = tmp / "documents.jsonl"
    make_documents.main(["-n", str(args.records), "--sentences", *map(str, args.sentences), "-o", str(inputs)])
    exported = tmp / "summarize_documents.py"
    exported.write_text(export_file(NOTEBOOK))
    documents = [r.fields["document"] for r in read_records(inputs)]
    load_before = os.getloadavg()

    def sequential() -> int:
        run = pipeline.load(exported).run
        for document in documents:
            out = run(document=document)
            out.summary.get()
            out.title.get()
        return len(documents)

    def concurrent() -> int:
        summary = run_pipeline(exported, inputs, tmp / "results.jsonl", concurrency=args.concurrency)
        assert summary.written == len(documents) and summary.failed == 0, summary
        return summary.written

    sides = []
    try:
        if args.sides == "both":
            sides.append(side("sequential (notebook functions, one record after another)", args.model, sequential, args.kv_cache_mb))
            pipeline.release()
        sides.append(side(f"pipeline (parrot-nb run, concurrency {args.concurrency})", args.model, concurrent, args.kv_cache_mb))
    finally:
        pipeline.release()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "records": args.records,
        "concurrency": args.concurrency,
        "kv_cache_mb": args.kv_cache_mb or 256,
        "sentences_per_document": list(args.sentences),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset: torch's default)"),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "sides": sides,
    }
    if len(sides) == 2:
        result["speedup_records_per_s"] = round(sides[1]["records_per_s"] / sides[0]["records_per_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
