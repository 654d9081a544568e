"""AutoTQA over held-out questions: execution accuracy, and a question's latency with the agents'
calls executed on the server vs the same agents issuing one request at a time.

Runs the exported notebook (demos/autotqa.py): planner, engineer, executor (read-only SQL, a
native step), critic, at most three rounds.

    accuracy    every held-out question, 8 at a time, each an application of its own; a question
                is right when its final result has the reference query's rows (execution accuracy)
    latency     --latency-questions questions (other ones for each --rtt-ms, the simulated round
                trip through benchmarks/netdelay.py) one after another, each in both modes in turn
                (the order rotating), each mode on a server of its own so that no mode finds
                another's prompts cached:
                  server-side     a round's calls are submitted at once; the notebook waits once,
                                  for the critic's verdict
                  one at a time   each call's value is waited for before the next call is sent
                  server-side, no early prefill   the first, the server started with --no-early-prefill

    python benchmarks/autotqa_app.py                                   # CPU, SmolLM2-135M
    python benchmarks/autotqa_app.py --rtt-ms 0 250 --out benchmarks/results/autotqa_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "demos"))

import tables  # noqa: E402

import parrot_nb  # noqa: E402
from parrot_nb import pipeline  # noqa: E402
from servers import Server, emit, new_result  # noqa: E402

PIPELINE = REPO / "demos" / "autotqa.py"


def ask(answer, question: tables.Question, app: str, one_at_a_time: bool = False) -> dict:
    t = time.perf_counter()
    with parrot_nb.app(app):
        out = answer(question.question, one_at_a_time=one_at_a_time)
        value = lambda v: v.get() if hasattr(v, "get") and not isinstance(v, dict) else v  # noqa: E731
        sql, result, verdict = value(out["sql"]), value(out["result"]), value(out["verdict"])
    seconds = time.perf_counter() - t
    correct = bool(result["ok"]) and tables.answers_match(result["rows"], question.answer)
    return {"id": question.id, "template": question.template, "kind": question.kind, "sql": sql,
            "ok": result["ok"], "rounds": out["rounds"], "verdict": verdict, "correct": correct,
            "seconds": round(seconds, 3)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="the model to serve (default: smollm2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-n", "--questions", type=int, default=60, help="held-out questions scored (default: 60)")
    ap.add_argument("--latency-questions", type=int, default=8, help="questions timed in both modes (default: 8)")
    ap.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0], help="simulated round trips (default: 0)")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    result = new_result("autotqa_app.py")
    with tempfile.TemporaryDirectory(prefix="autotqa-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        # One server per mode, each asked the same questions in the same order, so that no mode finds
        # another's prompts cached; all on the same cores, one busy at a time.
        modes = {"server-side": ("server_side",), "one at a time": ("one_at_a_time",),
                 "server-side, no early prefill": ("no_early", "--no-early-prefill")}  # fmt: skip
        servers = {mode: Server(tmp, name, args.model, args.device, "--tool-workers", "4", *flags)
                   for mode, (name, *flags) in modes.items()}  # fmt: skip
        try:
            servers["server-side"].use()
            loaded = pipeline.load(PIPELINE, {"seed": str(args.seed)})
            answer, db_path = loaded.run.__globals__["answer"], loaded.run.__globals__["db_path"]
            questions = tables.make_questions(db_path, seed=args.seed, n=args.questions)
            warm_up = tables.make_questions(db_path, seed=args.seed + 2, n=1)[0]
            for mode, server in servers.items():  # the first request on a server loads its tool workers too
                server.use()
                ask(answer, warm_up, f"warm-up-{mode}", one_at_a_time=mode == "one at a time")
            result["latency_s"] = {}
            n = args.latency_questions
            for r, rtt in enumerate(args.rtt_ms):
                runs: dict[str, list[dict]] = {mode: [] for mode in servers}
                for i, q in enumerate(questions[r * n : (r + 1) * n]):  # other questions for each rtt
                    for mode in list(servers)[i % 3 :] + list(servers)[: i % 3]:  # rotated
                        servers[mode].use(rtt)
                        runs[mode].append(ask(answer, q, f"latency-{q.id}", one_at_a_time=mode == "one at a time"))
                same = all(len({r["sql"] for r in group}) == 1 for group in zip(*runs.values()))
                medians = {mode: statistics.median(r["seconds"] for r in rs) for mode, rs in runs.items()}
                result["latency_s"][f"rtt {rtt:g} ms"] = {
                    **{mode: {"median": round(m, 3), "runs": [r["seconds"] for r in runs[mode]],
                              "rounds": [r["rounds"] for r in runs[mode]]} for mode, m in medians.items()},
                    "speedup": round(medians["one at a time"] / medians["server-side"], 3),
                    "speedup_without_early_prefill": round(
                        medians["one at a time"] / medians["server-side, no early prefill"], 3
                    ),
                    "total_s": {mode: round(sum(r["seconds"] for r in rs), 2) for mode, rs in runs.items()},
                    "geomean_speedup_per_question": {
                        mode: round(statistics.geometric_mean(
                            b["seconds"] / a["seconds"] for a, b in zip(rs, runs["one at a time"])), 3)
                        for mode, rs in runs.items() if mode != "one at a time"
                    },  # fmt: skip
                    "same_queries_in_every_mode": same,
                }  # fmt: skip
            servers["server-side"].use()
            t = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda q: ask(answer, q, f"accuracy-{q.id}"), questions))
            result["accuracy_run_s"] = round(time.perf_counter() - t, 1)
            n = len(answers)
            result["execution_accuracy"] = round(sum(a["correct"] for a in answers) / n, 3)
            result["by_kind"] = {
                kind: f"{sum(a['correct'] for a in answers if a['kind'] == kind)}/{sum(a['kind'] == kind for a in answers)}"
                for kind in ("single", "multi")
            }  # fmt: skip
            result["by_template"] = {
                t: f"{sum(a['correct'] for a in answers if a['template'] == t)}/{sum(a['template'] == t for a in answers)}"
                for t in sorted({a["template"] for a in answers})
            }  # fmt: skip
            result["rounds"] = dict(sorted(Counter(a["rounds"] for a in answers).items()))
            result["critic_accepted_wrong"] = sum(a["verdict"] == "accept" and not a["correct"] for a in answers)
            result["right_after_a_revision"] = sum(a["rounds"] > 1 and a["correct"] for a in answers)
            result["sql_failed_to_run"] = sum(not a["ok"] for a in answers)
            result["answers"] = answers
            result["model"] = parrot_nb.status().model
            result["device"] = args.device
        finally:
            parrot_nb.disconnect()
            for server in servers.values():
                server.stop()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
