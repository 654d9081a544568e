"""AutoTQA over held-out questions: execution accuracy, and a question's latency with the agents'
calls executed on the server vs the same agents issuing one request at a time.

Runs the exported notebook (demos/autotqa.py): planner, engineer, executor (read-only SQL, a
native step), critic, at most three rounds.

    accuracy    every held-out question, 8 at a time, each an application of its own; a question
                is right when its final result has the reference query's rows (execution accuracy)
    latency     the first --latency-questions questions one after another, each in both modes in
                turn (the order alternating), per simulated round trip (--rtt-ms, through
                benchmarks/netdelay.py):
                  server-side     a round's calls are submitted at once; the notebook waits once,
                                  for the critic's verdict
                  one at a time   each call's value is waited for before the next call is sent

    python benchmarks/autotqa_app.py                                   # CPU, SmolLM2-135M
    python benchmarks/autotqa_app.py --rtt-ms 0 250 --out benchmarks/results/autotqa_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from servers import Server  # noqa: E402

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
    result: dict = {"command": " ".join(["python", "benchmarks/autotqa_app.py", *sys.argv[1:]])}
    result["commit"] = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="autotqa-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        server = Server(tmp, "autotqa", args.model, args.device, "--tool-workers", "4")
        try:
            server.use()
            loaded = pipeline.load(PIPELINE, {"seed": str(args.seed)})
            answer, db_path = loaded.run.__globals__["answer"], loaded.run.__globals__["db_path"]
            questions = tables.make_questions(db_path, seed=args.seed, n=args.questions)
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
            result["critic_rejected_right_first_time"] = sum(a["rounds"] > 1 and a["correct"] for a in answers)
            result["sql_failed_to_run"] = sum(not a["ok"] for a in answers)
            result["answers"] = answers
            result["latency_s"] = {}
            for rtt in args.rtt_ms:
                server.use(rtt)
                runs: dict[str, list[dict]] = {"server-side": [], "one at a time": []}
                for i, q in enumerate(questions[: args.latency_questions]):
                    order = [False, True] if i % 2 == 0 else [True, False]
                    for one in order:
                        mode = "one at a time" if one else "server-side"
                        runs[mode].append(ask(answer, q, f"latency-{rtt:g}-{q.id}-{int(one)}", one_at_a_time=one))
                same = all(a["sql"] == b["sql"] for a, b in zip(runs["server-side"], runs["one at a time"]))
                medians = {mode: statistics.median(r["seconds"] for r in rs) for mode, rs in runs.items()}
                result["latency_s"][f"rtt {rtt:g} ms"] = {
                    **{mode: {"median": round(m, 3), "runs": [r["seconds"] for r in runs[mode]],
                              "rounds": [r["rounds"] for r in runs[mode]]} for mode, m in medians.items()},
                    "speedup": round(medians["one at a time"] / medians["server-side"], 3),
                    "same_queries_in_both_modes": same,
                }  # fmt: skip
            result["model"] = parrot_nb.status().model
            result["device"] = args.device
        finally:
            parrot_nb.disconnect()
            server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
