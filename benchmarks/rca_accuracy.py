"""RCACopilot over a stream of held-out incidents: the LLM's category next to the neighbours' vote.

Runs the exported notebook (demos/rca_copilot.py) with ``parrot-nb run``'s runner over the
incidents of the last ``--held-out-days`` days, each incident an application of its own, and
scores each record's two answers against its label:

    llm             the chain-of-thought prompt's category (summary + nearest past incidents)
    neighbour vote  the nearest-neighbour baseline: the category with the most decayed similarity
                    among the k nearest past incidents (FastText over the handlers' diagnostics)
    majority        the most frequent category of the history, for scale

With --neighbours-only, no LLM runs: the neighbour vote's accuracy for several k and time decays
(the handler and the embedding of the notebook, loaded from its pipeline, scored in this process).

    python benchmarks/rca_accuracy.py                         # CPU, SmolLM2-135M, 400 incidents
    python benchmarks/rca_accuracy.py --neighbours-only
    python benchmarks/rca_accuracy.py --model /path/to/hf-dir --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "demos"))

import incidents  # noqa: E402

import parrot_nb  # noqa: E402
from parrot_nb.results import read_results  # noqa: E402
from parrot_nb.runner import run_pipeline  # noqa: E402
from servers import Server, emit, new_result  # noqa: E402

PIPELINE = REPO / "demos" / "rca_copilot.py"


def score(records: list[dict], results: list[dict], majority: str) -> dict:
    by_index = {line["record"]: line for line in results}
    answered = [(r, by_index[i]["output"]) for i, r in enumerate(records) if "output" in by_index.get(i, {})]
    n = len(answered)
    llm = sum(out["category"] == r["category"] for r, out in answered)
    vote = sum(out["neighbour_vote"] == r["category"] for r, out in answered)
    per_category: dict[str, dict] = {}
    for r, out in answered:
        row = per_category.setdefault(r["category"], {"incidents": 0, "llm": 0, "neighbour_vote": 0})
        row["incidents"] += 1
        row["llm"] += out["category"] == r["category"]
        row["neighbour_vote"] += out["neighbour_vote"] == r["category"]
    return {
        "incidents": len(records), "answered": n, "failed": len(records) - n,
        "accuracy": {"llm": round(llm / n, 3), "neighbour_vote": round(vote / n, 3),
                     "majority": round(sum(r["category"] == majority for r, _ in answered) / n, 3)},
        "llm_agrees_with_vote": round(sum(out["category"] == out["neighbour_vote"] for _, out in answered) / n, 3),
        "llm_answers": dict(Counter(out["category"] for _, out in answered).most_common()),
        "per_category": dict(sorted(per_category.items())),
    }  # fmt: skip


def neighbour_sweep(records: list[dict], params: dict[str, str], ks=(1, 3, 5, 9), decays=(0.0, 0.01, 0.02, 0.05)) -> dict:
    """The vote's accuracy for each k and decay, with the notebook's own handler and embedding."""
    from parrot_nb import pipeline

    loaded = pipeline.load(PIPELINE, params)
    notebook = loaded.run.__globals__
    nearest, vote = notebook["nearest"].fn, notebook["vote"].fn
    index = notebook["index_dir"].name
    diagnostics = [notebook["handle"]({k: v for k, v in r.items() if k != "category"}) for r in records]
    table = {}
    for decay in decays:
        # The k nearest are the first k of the max(ks) nearest: one search per record and decay.
        found = [nearest(d, r["day"], index, max(ks), decay) for d, r in zip(diagnostics, records)]
        for k in ks:
            right = sum(vote(neighbours[:k]) == r["category"] for neighbours, r in zip(found, records))
            table[f"k={k}, decay={decay:g}/day"] = round(right / len(records), 3)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="the model to serve (default: smollm2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("-n", "--incidents", type=int, default=400, help="incidents in the timeline (default: 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out-days", type=float, default=10.0)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N held-out incidents")
    ap.add_argument("--concurrency", type=int, default=16, help="incidents in flight at once (default: 16)")
    ap.add_argument("--neighbours-only", action="store_true", help="only the neighbour vote, for several k and decays")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    result = new_result("rca_accuracy.py")
    history, held_out = incidents.split(incidents.generate(args.incidents, seed=args.seed), held_out_days=args.held_out_days)
    held_out = held_out[: args.limit]
    majority = Counter(i.category for i in history).most_common(1)[0][0]
    records = [i.to_json() for i in held_out]
    params = {"n_incidents": str(args.incidents), "seed": str(args.seed), "held_out_days": str(args.held_out_days)}
    if args.neighbours_only:
        result["incidents"], result["history"] = len(records), len(history)
        with tempfile.TemporaryDirectory(prefix="rca-bench-") as tmp_dir:
            server = Server(Path(tmp_dir), "rca", "tiny", "cpu")  # loading the pipeline starts nothing else
            try:
                server.use()
                result["neighbour_vote_accuracy"] = neighbour_sweep(records, params)
            finally:
                parrot_nb.disconnect()
                server.stop()
        emit(result, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="rca-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        stream, output = tmp / "stream.jsonl", tmp / "results.jsonl"
        stream.write_text("".join(json.dumps(r) + "\n" for r in records))
        server = Server(tmp, "rca", args.model, args.device)
        try:
            server.use()
            summary = run_pipeline(PIPELINE, stream, output, concurrency=args.concurrency, params=params, progress=False)
            result["model"] = parrot_nb.status().model
        finally:
            parrot_nb.disconnect()
            server.stop()
        _, results = read_results(output)
    result.update(score(records, results, majority))
    result["errors"] = sorted({line["error"] for line in results if "error" in line})[:5]
    result["history"] = len(history)
    result["run"] = {"elapsed_s": round(summary.elapsed_s, 1), "incidents_per_s": round(summary.records_per_s, 3),
                     "prompt_tokens": summary.prompt_tokens, "cached_tokens": summary.cached_tokens,
                     "cache_hit_rate": round(summary.cache_hit_rate, 3), "output_tokens": summary.output_tokens}  # fmt: skip
    result["device"] = args.device
    result["examples"] = [
        {"id": r["id"], "alert": r["alert"], "truth": r["category"], **line["output"]}
        for r, line in zip(records, sorted(results, key=lambda line: line["record"]))
        if "output" in line
    ][:3]
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
