"""Chat and map-reduce together: latency-critical users beside throughput jobs on the same engines.

    python benchmarks/workloads/mixed.py --shape llama3-8b --device cuda --scale full --out-dir benchmarks/results/workloads

Chat users arrive as a Poisson process (a query of 200-400 tokens, an answer of 50-150 tokens, each
its own application); map-reduce jobs arrive as another (a document of 16 chunks of 1,000 tokens,
each chunk summarised in 50 tokens, then one summary of the summaries), for a fixed time. Metrics:
the chat answers' mean latency per output token (and its 90th percentile) and the map-reduce jobs'
mean completion time. The paper (4 GPUs): 5.5x better chat latency, 3.7x better map-reduce
completion than request-centric serving.

On parrot-nb every call here is latency-critical (each job's reduce is awaited, and its map calls
inherit that), but a job's map calls feed one reduce, so they form a task group: batched like
throughput work, under the batch cap, and dispatched together to one engine. The scheduler sends a
chat call to the engine with the least such batched work running. The baseline sends every call as
its own `/v1/completions` request (map calls of a job concurrently, then the reduce): each is a
one-call application in no task group, so each goes to the engine with the fewest requests
running. Each side's placement is read from its event log: `latency_beside_other_work` is the share of chat
dispatches that landed on an engine running map-reduce work at that moment, and
`mean_engines_per_group` the engines a job's calls were spread over. With one engine both sides
share it, and only the batching differs.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import time

from common import Side, Words, Workload, cli, in_threads, mean, open_apps, percentile

import parrot_nb
from parrot_nb import SemanticFunction


def configs(scale: str) -> list[dict]:
    if scale == "full":
        return [dict(chat_rate=r, chat_query_tokens=(200, 400), chat_output_tokens=(50, 150), job_rate=0.25, chunks=16,
                     chunk_tokens=1000, summary_tokens=50, duration_s=20.0) for r in (1.0, 2.0, 4.0)]  # fmt: skip
    return [dict(chat_rate=2.0, chat_query_tokens=(10, 20), chat_output_tokens=(4, 8), job_rate=1.0, chunks=4,
                 chunk_tokens=60, summary_tokens=8, duration_s=3.0)]  # fmt: skip


def _work(p: dict, words: Words) -> tuple[list[tuple[float, str, int]], list[tuple[float, list[str]]]]:
    """Chat arrivals (time, query, answer length) and job arrivals (time, chunks); the first job at 0."""
    rng = random.Random(words.rng.random())
    chats, t = [], rng.expovariate(p["chat_rate"])
    while t < p["duration_s"]:
        chats.append((t, words(rng.randint(*p["chat_query_tokens"])), rng.randint(*p["chat_output_tokens"])))
        t += rng.expovariate(p["chat_rate"])
    jobs, t = [], 0.0
    while t < p["duration_s"]:
        jobs.append((t, [words(p["chunk_tokens"]) for _ in range(p["chunks"])]))
        t += rng.expovariate(p["job_rate"])
    return chats, jobs


def _templates(p: dict) -> tuple[str, str]:
    out = f"max_tokens={p['summary_tokens']} ignore_eos=true"
    mapper = "Summarize this part of the report. Part: {{input:chunk}} Summary: {{output:s " + out + "}}"
    reducer = " ".join(f"Summary {i}: {{{{input:s{i}}}}}" for i in range(p["chunks"]))
    return mapper, reducer + " Overall summary: {{output:o " + out + "}}"


def _metrics(chat_latencies: list[float], outputs: list[int], jcts: list[float]) -> dict:
    per_token = [t / n for t, n in zip(chat_latencies, outputs)]
    return {"chats": len(per_token), "chat_mean_latency_s": round(mean(chat_latencies), 4),
            "chat_mean_s_per_output_token": round(mean(per_token), 5),
            "chat_p90_s_per_output_token": round(percentile(per_token, 0.9), 5),
            "jobs": len(jcts), "job_mean_jct_s": round(mean(jcts), 4)}  # fmt: skip


def group_of(client: str) -> str | None:
    """Chat users are one group; each map-reduce job is its own."""
    if client.startswith("chat-"):
        return "chat"
    return client if client.startswith("job-") else None


def parrot(p: dict, words: Words) -> dict:
    chats, jobs = _work(p, words)
    mapper, reducer = _templates(p)
    fmap = SemanticFunction.from_template(f"mixed_map_{p['summary_tokens']}", mapper)
    freduce = SemanticFunction.from_template(f"mixed_reduce_{p['summary_tokens']}_{p['chunks']}", reducer)
    fchat = {n: SemanticFunction.from_template(f"mixed_chat_{n}", "User: {{input:q}} Assistant: {{output:a max_tokens=%d ignore_eos=true}}" % n)
             for n in {n for *_, n in chats}}  # fmt: skip
    open_apps(*(f"chat-{i}" for i in range(len(chats))), *(f"job-{j}" for j in range(len(jobs))))
    chat_latencies, jcts = [0.0] * len(chats), [0.0] * len(jobs)
    t0 = time.perf_counter()

    def chat(i: int) -> None:
        at, q, n = chats[i]
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        start = time.perf_counter()
        with parrot_nb.app(f"chat-{i}"):
            fchat[n](q=q).get(timeout=1800)
        chat_latencies[i] = time.perf_counter() - start

    def job(j: int) -> None:
        at, chunks = jobs[j]
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        start = time.perf_counter()
        with parrot_nb.app(f"job-{j}"):
            parts = [fmap(chunk=c) for c in chunks]
            freduce(**{f"s{i}": s for i, s in enumerate(parts)}).get(timeout=1800)
        jcts[j] = time.perf_counter() - start

    in_threads([functools.partial(chat, i) for i in range(len(chats))] + [functools.partial(job, j) for j in range(len(jobs))])
    return _metrics(chat_latencies, [n for *_, n in chats], jcts)


def baseline(side: Side, p: dict, words: Words) -> dict:
    chats, jobs = _work(p, words)
    n = p["summary_tokens"]

    async def go() -> tuple[list[float], list[float]]:
        async with side.baseline() as b:
            t0 = time.perf_counter()

            async def chat(i: int, at: float, q: str, out: int) -> float:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                start = time.perf_counter()
                await b.complete(f"User: {q} Assistant: ", out, user=f"chat-{i}")
                return time.perf_counter() - start

            async def job(j: int, at: float, chunks: list[str]) -> float:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                start = time.perf_counter()
                parts = await asyncio.gather(*(b.complete(f"Summarize this part of the report. Part: {c} Summary: ", n, user=f"job-{j}")
                                               for c in chunks))  # fmt: skip
                prompt = " ".join(f"Summary {i}: {s}" for i, s in enumerate(parts)) + " Overall summary: "
                await b.complete(prompt, n, user=f"job-{j}")
                return time.perf_counter() - start

            chat_tasks = [chat(i, *c) for i, c in enumerate(chats)]
            job_tasks = [job(j, *x) for j, x in enumerate(jobs)]
            done = await asyncio.gather(*chat_tasks, *job_tasks)
            return list(done[: len(chats)]), list(done[len(chats) :])

    chat_latencies, jcts = asyncio.run(go())
    return _metrics(chat_latencies, [n for *_, n in chats], jcts)


def summary(cfgs: list[dict]) -> dict:
    """baseline / parrot-nb: chat latency per output token and map-reduce completion time, by chat rate."""
    out = {}
    for c in cfgs:
        if "parrot" in c and "baseline" in c:
            rate = f"{c['params']['chat_rate']:g}"
            out[f"chat{rate}_chat_latency"] = round(c["baseline"]["chat_mean_s_per_output_token"] / c["parrot"]["chat_mean_s_per_output_token"], 3)
            out[f"chat{rate}_job_jct"] = round(c["baseline"]["job_mean_jct_s"] / c["parrot"]["job_mean_jct_s"], 3)
    return out


WORKLOAD = Workload("mixed", configs, parrot, baseline, summary=summary, warm_up=False, group_of=group_of,
                    latency_groups=frozenset({"chat"}))  # fmt: skip

if __name__ == "__main__":
    sys.exit(cli([WORKLOAD], "workloads/mixed.py"))
