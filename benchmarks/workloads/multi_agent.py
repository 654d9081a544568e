"""Multi-agent coding, MetaGPT-like: roles working over a shared, growing codebase.

    python benchmarks/workloads/multi_agent.py --shape llama2-7b --device cuda --scale full --out-dir benchmarks/results/workloads

An architect writes the design; an engineer per file writes it from the design (all files at once);
a reviewer per file reviews it reading the whole codebase; an engineer per file revises it from the
codebase and its review. Every reviewer and reviser reads the same design and code, so their prompts
share a long prefix that grows with the codebase. Metric: job completion time (the paper: 11.7x over
a latency-tuned vLLM, 2.45x over a throughput-tuned one, 4-16 files). The request-centric client runs
the stages one after another, each stage's calls concurrently: against the baseline server
(throughput-tuned: the engine's default batch) and the latency-tuned one (--max-running 4).
"""

from __future__ import annotations

import asyncio
import sys
import time

from common import Side, Words, Workload, cli, open_apps

import parrot_nb
from parrot_nb import SemanticFunction


def configs(scale: str) -> list[dict]:
    if scale == "full":
        return [dict(files=f, role_tokens=400, task_tokens=200, design_tokens=200, code_tokens=200, review_tokens=50,
                     rtt_ms=0.0) for f in (4, 8)]  # fmt: skip
    return [dict(files=3, role_tokens=40, task_tokens=20, design_tokens=6, code_tokens=6, review_tokens=3, rtt_ms=0.0)]


def _texts(p: dict, words: Words) -> dict[str, str]:
    return {"task": words(p["task_tokens"]), "architect": words(p["role_tokens"]), "engineer": words(p["role_tokens"]),
            "reviewer": words(p["role_tokens"])}  # fmt: skip


def _gen(name: str, n: int) -> str:
    return f"{{{{output:{name} max_tokens={n} ignore_eos=true}}}}"


def parrot(p: dict, words: Words) -> dict:
    t, files = _texts(p, words), p["files"]
    code_inputs = " ".join(f"File {i}: {{{{input:c{i}}}}}" for i in range(files))
    architect = SemanticFunction.from_template(
        "ma_architect", t["architect"] + " Task: {{input:task}} Design: " + _gen("design", p["design_tokens"]))
    engineer = SemanticFunction.from_template(
        "ma_engineer", t["engineer"] + " Design: {{input:design}} Write file {{input:i}}: " + _gen("code", p["code_tokens"]))
    reviewer = SemanticFunction.from_template(
        f"ma_reviewer_{files}", t["reviewer"] + " Design: {{input:design}} " + code_inputs
        + " Review file {{input:i}}: " + _gen("review", p["review_tokens"]))
    reviser = SemanticFunction.from_template(
        f"ma_reviser_{files}", t["engineer"] + " Design: {{input:design}} " + code_inputs
        + " Review: {{input:review}} Revise file {{input:i}}: " + _gen("fixed", p["code_tokens"]))  # fmt: skip
    open_apps("multi-agent")
    start = time.perf_counter()
    with parrot_nb.app("multi-agent"):
        design = architect(task=t["task"])
        code = [engineer(design=design, i=str(i)) for i in range(files)]
        codebase = {f"c{i}": c for i, c in enumerate(code)}
        reviews = [reviewer(design=design, i=str(i), **codebase) for i in range(files)]
        fixed = [reviser(design=design, review=reviews[i], i=str(i), **codebase) for i in range(files)]
        for f in fixed:
            f.activate()
        for f in fixed:
            f.get(timeout=1800)
    return {"jct_s": round(time.perf_counter() - start, 4)}


def baseline(side: Side, p: dict, words: Words) -> dict:
    t, files = _texts(p, words), p["files"]

    async def go() -> float:
        async with side.baseline() as b:
            start = time.perf_counter()
            design = await b.complete(t["architect"] + f" Task: {t['task']} Design: ", p["design_tokens"])
            code = await asyncio.gather(*(b.complete(t["engineer"] + f" Design: {design} Write file {i}: ", p["code_tokens"])
                                          for i in range(files)))  # fmt: skip
            codebase = " ".join(f"File {i}: {c}" for i, c in enumerate(code))
            reviews = await asyncio.gather(*(
                b.complete(t["reviewer"] + f" Design: {design} {codebase} Review file {i}: ", p["review_tokens"])
                for i in range(files)))  # fmt: skip
            await asyncio.gather(*(
                b.complete(t["engineer"] + f" Design: {design} {codebase} Review: {reviews[i]} Revise file {i}: ", p["code_tokens"])
                for i in range(files)))  # fmt: skip
            return time.perf_counter() - start

    return {"jct_s": round(asyncio.run(go()), 4)}


def summary(cfgs: list[dict]) -> dict:
    out = {}
    for c in cfgs:
        f = c["params"]["files"]
        if "parrot" in c and "baseline" in c:
            out[f"files{f}_vs_throughput_tuned"] = round(c["baseline"]["jct_s"] / c["parrot"]["jct_s"], 3)
        if "parrot" in c and "baseline-latency" in c:
            out[f"files{f}_vs_latency_tuned"] = round(c["baseline-latency"]["jct_s"] / c["parrot"]["jct_s"], 3)
    return out


WORKLOAD = Workload("multi_agent", configs, parrot, baseline, sides=("parrot", "baseline", "baseline-latency"), summary=summary)

if __name__ == "__main__":
    sys.exit(cli([WORKLOAD], "workloads/multi_agent.py"))
