"""Map-reduce summary: every chunk of a document summarised at once, then one summary of the summaries.

    python benchmarks/workloads/map_reduce.py --shape llama2-7b --device cuda --scale full --out-dir benchmarks/results/workloads

The map calls are independent, so the request-centric client issues them concurrently, waits for
all, then sends the reduce; parrot-nb submits the DAG at once, the map calls run as one task group
(a throughput objective deduced from the reduce that waits on all of them) and the reduce starts on
the server when the last one ends. Metric: end-to-end latency per output length and round trip
(the paper: 1.70 / 2.04 / 2.22 / 2.37x at 25 / 50 / 75 / 100 output tokens).
"""

from __future__ import annotations

import asyncio
import sys
import time

from common import Side, Words, Workload, cli, latency_ratios, open_apps

import parrot_nb
from parrot_nb import SemanticFunction


def configs(scale: str) -> list[dict]:
    chunks, chunk_tokens = (16, 1000) if scale == "full" else (4, 60)
    outs = (25, 50, 75, 100) if scale == "full" else (8,)
    return [dict(chunks=chunks, chunk_tokens=chunk_tokens, output_tokens=o, rtt_ms=r) for r in (0.0, 250.0) for o in outs]


def _templates(p: dict) -> tuple[str, str]:
    out = f"max_tokens={p['output_tokens']} ignore_eos=true"
    mapper = "Summarize this part of the report. Part: {{input:chunk}} Summary: {{output:s " + out + "}}"
    reducer = " ".join(f"Summary {i}: {{{{input:s{i}}}}}" for i in range(p["chunks"]))
    return mapper, reducer + " Overall summary: {{output:o " + out + "}}"


def parrot(p: dict, words: Words) -> dict:
    mapper, reducer = _templates(p)
    fmap = SemanticFunction.from_template(f"map_{p['output_tokens']}_{p['chunks']}", mapper)
    freduce = SemanticFunction.from_template(f"reduce_{p['output_tokens']}_{p['chunks']}", reducer)
    chunks = [words(p["chunk_tokens"]) for _ in range(p["chunks"])]
    open_apps("map-reduce")
    t = time.perf_counter()
    with parrot_nb.app("map-reduce"):
        parts = [fmap(chunk=c) for c in chunks]
        freduce(**{f"s{i}": s for i, s in enumerate(parts)}).get(timeout=1800)
    return {"latency_s": round(time.perf_counter() - t, 4)}


def baseline(side: Side, p: dict, words: Words) -> dict:
    chunks = [words(p["chunk_tokens"]) for _ in range(p["chunks"])]
    n = p["output_tokens"]

    async def go() -> float:
        async with side.baseline() as b:
            t = time.perf_counter()
            parts = await asyncio.gather(*(b.complete(f"Summarize this part of the report. Part: {c} Summary: ", n) for c in chunks))
            prompt = " ".join(f"Summary {i}: {s}" for i, s in enumerate(parts)) + " Overall summary: "
            await b.complete(prompt, n)
            return time.perf_counter() - t

    return {"latency_s": round(asyncio.run(go()), 4)}


WORKLOAD = Workload("map_reduce", configs, parrot, baseline, summary=latency_ratios)

if __name__ == "__main__":
    sys.exit(cli([WORKLOAD], "workloads/map_reduce.py"))
