"""Chain summary: a document summarised chunk by chunk, each step reading the previous summary.

    python benchmarks/workloads/chain_summary.py --shape llama2-7b --device cuda --scale full --out-dir benchmarks/results/workloads

Every step depends on the one before, so a request-centric client pays a round trip per step
(it waits for each answer, then sends the next call); parrot-nb submits the whole chain at once
and the server starts each step when its input is ready. Metric: end-to-end latency of the
final summary, per output length and round trip (the paper: 1.38x over vLLM at 25 output tokens).
"""

from __future__ import annotations

import asyncio
import sys

from common import Side, Words, Workload, cli, latency_ratios, open_apps

import parrot_nb
from parrot_nb import SemanticFunction


def configs(scale: str) -> list[dict]:
    chunks, chunk_tokens = (8, 1000) if scale == "full" else (3, 60)
    outs = (25, 50, 100) if scale == "full" else (8,)
    return [dict(chunks=chunks, chunk_tokens=chunk_tokens, output_tokens=o, rtt_ms=r) for r in (0.0, 250.0) for o in outs]


def _chunks(p: dict, words: Words) -> list[str]:
    return [words(p["chunk_tokens"]) for _ in range(p["chunks"])]


def parrot(p: dict, words: Words) -> dict:
    step = SemanticFunction.from_template(
        f"chain_step_{p['output_tokens']}",
        "Summary so far: {{input:prev}} Next part: {{input:chunk}} Updated summary: "
        f"{{{{output:s max_tokens={p['output_tokens']} ignore_eos=true}}}}",
    )
    chunks = _chunks(p, words)
    import time

    open_apps("chain-summary")
    t = time.perf_counter()
    with parrot_nb.app("chain-summary"):
        prev = "none"
        for chunk in chunks:
            prev = step(prev=prev, chunk=chunk)
        prev.get(timeout=1800)
    return {"latency_s": round(time.perf_counter() - t, 4)}


def baseline(side: Side, p: dict, words: Words) -> dict:
    chunks = _chunks(p, words)

    async def go() -> float:
        import time

        async with side.baseline() as b:
            t = time.perf_counter()
            prev = "none"
            for chunk in chunks:
                prev = await b.complete(f"Summary so far: {prev} Next part: {chunk} Updated summary: ", p["output_tokens"])
            return time.perf_counter() - t

    return {"latency_s": round(asyncio.run(go()), 4)}


WORKLOAD = Workload("chain_summary", configs, parrot, baseline, summary=latency_ratios)

if __name__ == "__main__":
    sys.exit(cli([WORKLOAD], "workloads/chain_summary.py"))
