"""Bing-Copilot-like: many users' requests sharing one long preamble (system prompt and few-shot examples).

    python benchmarks/workloads/copilot.py --shape llama2-7b --device cuda --scale full --out-dir benchmarks/results/workloads

Each request is a user's own application: the ~5,000-token shared preamble, the user's query
(500-2,000 tokens) and an answer of 150-400 tokens (the paper: a 5,107-token preamble, 5.5-7k-token
prompts, 183-800 output tokens). All arrive at once. Both sides prefill the preamble once (the
baseline through block prefix caching, parrot-nb through its context key); they differ in decode,
where parrot-nb's engine reads the shared preamble once per step for the whole batch (the
shared-prefix kernel) and the baseline's paged kernel reads it once per request. Metric: mean
request latency and mean latency per output token (the paper: 2.4x; per token 1.37-1.81x).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common import Side, Words, Workload, cli, mean, open_apps

import parrot_nb
from parrot_nb import SemanticFunction


def configs(scale: str) -> list[dict]:
    if scale == "full":
        return [dict(requests=32, preamble_tokens=5000, query_tokens=(500, 2000), output_tokens=(150, 400), rtt_ms=0.0)]
    return [dict(requests=6, preamble_tokens=300, query_tokens=(20, 60), output_tokens=(4, 10), rtt_ms=0.0)]


def _work(p: dict, words: Words) -> tuple[str, list[tuple[str, int]]]:
    rng = random.Random(words.rng.random())
    preamble = words(p["preamble_tokens"])
    reqs = [(words(rng.randint(*p["query_tokens"])), rng.randint(*p["output_tokens"])) for _ in range(p["requests"])]
    return preamble, reqs


def _metrics(latencies: list[float], outputs: list[int]) -> dict:
    return {"mean_latency_s": round(mean(latencies), 4), "max_latency_s": round(max(latencies), 4),
            "mean_s_per_output_token": round(mean([t / n for t, n in zip(latencies, outputs)]), 5)}  # fmt: skip


def parrot(p: dict, words: Words) -> dict:
    preamble, reqs = _work(p, words)
    fns = {n: SemanticFunction.from_template(f"copilot_{n}", preamble + " User: {{input:q}} Assistant: {{output:a max_tokens=%d ignore_eos=true}}" % n)
           for n in {n for _, n in reqs}}  # fmt: skip
    open_apps(*(f"copilot-user-{i}" for i in range(len(reqs))))
    t0 = time.perf_counter()

    def one(i: int) -> float:
        q, n = reqs[i]
        with parrot_nb.app(f"copilot-user-{i}"):
            fns[n](q=q).get(timeout=1800)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(len(reqs)) as pool:
        latencies = list(pool.map(one, range(len(reqs))))
    return _metrics(latencies, [n for _, n in reqs])


def baseline(side: Side, p: dict, words: Words) -> dict:
    preamble, reqs = _work(p, words)

    async def go() -> list[float]:
        async with side.baseline() as b:
            t0 = time.perf_counter()

            async def one(q: str, n: int) -> float:
                await b.complete(f"{preamble} User: {q} Assistant: ", n)
                return time.perf_counter() - t0

            return list(await asyncio.gather(*(one(q, n) for q, n in reqs)))

    return _metrics(asyncio.run(go()), [n for _, n in reqs])


def summary(cfgs: list[dict]) -> dict:
    c = cfgs[0]
    return {
        "mean_latency": round(c["baseline"]["mean_latency_s"] / c["parrot"]["mean_latency_s"], 3),
        "per_output_token": round(c["baseline"]["mean_s_per_output_token"] / c["parrot"]["mean_s_per_output_token"], 3),
    }


WORKLOAD = Workload("copilot", configs, parrot, baseline, summary=summary, warm_up=False)

if __name__ == "__main__":
    sys.exit(cli([WORKLOAD], "workloads/copilot.py"))
