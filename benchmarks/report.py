"""The workloads' report: a markdown table of parrot-nb against the request-centric baseline, and plots.

    python benchmarks/report.py                       # reads benchmarks/results/workloads/*.json
    python benchmarks/report.py --results DIR --out DIR

Writes ``workloads.md`` (the table, the goals, every run's command and commit) and
``workloads_latency_vs_output.png`` / ``workloads_latency_vs_rate.png`` (matplotlib) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# The goals of issue 13 (ratios, baseline / parrot-nb, same run).
GOALS = {
    "chain_summary": ("latency at 250 ms round trip", 1.4),
    "map_reduce": ("latency at 100 output tokens", 2.4),
    "copilot": ("mean request latency", 2.4),
    "gpts": ("sustainable request rate", 12.0),
    "multi_agent": ("JCT vs the latency-tuned baseline", 11.7),
    "mixed": ("chat latency per output token", 5.5),  # and map-reduce JCT 3.7x (issue 17; MIXED_JCT_GOAL)
}
MIXED_JCT_GOAL = 3.7


def load(results: Path) -> dict[str, dict[str, dict]]:
    """Results by workload, then by shape."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if "workload" in data and "shape" in data:
            out[data["workload"]][data["shape"]] = data
    return out


def _seconds(v: float) -> str:
    return f"{v:.3f} s"


def _ms(v: float) -> str:
    return f"{v * 1e3:.1f} ms"


# Each workload's rows: the row's label from a configuration, the metric's key, how a value prints.
ROWS = {
    "chain_summary": [(lambda p: f"{p['output_tokens']} out, RTT {p['rtt_ms']:g} ms", "latency_s", _seconds)],
    "map_reduce": [(lambda p: f"{p['output_tokens']} out, RTT {p['rtt_ms']:g} ms", "latency_s", _seconds)],
    "copilot": [(lambda p: f"{p['requests']} requests, mean latency", "mean_latency_s", _seconds),
                (lambda p: "per output token", "mean_s_per_output_token", _ms)],
    "gpts": [(lambda p: f"{p['rate']:g} req/s: mean per output token", "mean_s_per_output_token", _ms)],
    "multi_agent": [(lambda p: f"{p['files']} files, JCT", "jct_s", _seconds)],
    "mixed": [(lambda p: f"chat {p['chat_rate']:g} req/s: chat per output token", "chat_mean_s_per_output_token", _ms),
              (lambda p: f"chat {p['chat_rate']:g} req/s: map-reduce JCT", "job_mean_jct_s", _seconds)],
}  # fmt: skip


def rows(runs: dict[str, dict[str, dict]]) -> list[tuple[str, ...]]:
    """(workload, shape, configuration, parrot-nb, baseline, ratio, parrot-nb with the shared-prefix kernel
    off) for every measured configuration; "-" where a side did not run."""
    table: list[tuple[str, ...]] = []
    for name, metrics in ROWS.items():
        for shape, data in sorted(runs.get(name, {}).items()):
            for c in data["configs"]:
                if "parrot" not in c and "baseline" not in c:
                    continue

                def cell(side: str, key: str, fmt) -> str:
                    if side in c:
                        return fmt(c[side][key])
                    return "not run: over the target at a lower rate" if side in c.get("skipped", {}) else "-"

                for label, key, fmt in metrics:
                    both = "parrot" in c and "baseline" in c
                    ratio = f"{c['baseline'][key] / c['parrot'][key]:.2f}x" if both else "-"
                    base = cell("baseline", key, fmt)
                    lat = c.get("baseline-latency")
                    if lat is not None and "parrot" in c:
                        base += f" (latency-tuned {fmt(lat[key])}: {lat[key] / c['parrot'][key]:.2f}x)"
                    table.append((name, shape, label(c["params"]), cell("parrot", key, fmt), base, ratio,
                                  cell("parrot-paged", key, fmt)))  # fmt: skip
            if name == "gpts":
                (p, p_rate), (b, b_rate), (pp, _) = (_sustainable(data["configs"], side) for side in ("parrot", "baseline", "parrot-paged"))
                ratio = f"{p_rate / b_rate:.2f}x" if p_rate is not None and b_rate else "-"
                table.append((name, shape, "sustainable rate at the target", p, b, ratio, pp))
    return table


def placement_rows(runs: dict[str, dict[str, dict]]) -> list[tuple[str, ...]]:
    """(workload, shape, engines, configuration, side, engines used, affinity hit rate, engines per group,
    latency-critical share beside other work) for every measured side that recorded its placement."""
    table = []
    for name, by_shape in sorted(runs.items()):
        label = ROWS[name][0][0] if name in ROWS else str
        for shape, data in sorted(by_shape.items()):
            for c in data["configs"]:
                for side in ("parrot", "baseline"):
                    p = c.get(side, {}).get("placement")
                    if p is None:
                        continue
                    share = lambda k: f"{p[k]:.0%}" if k in p else "-"  # noqa: E731
                    table.append((name, shape, str(data.get("engines", "default")), label(c["params"]).split(":")[0], side,
                                  ",".join(map(str, p["engines_used"])), share("affinity_hit_rate"),
                                  str(p.get("mean_engines_per_group", "-")), share("latency_beside_other_work")))  # fmt: skip
    return table


def _sustainable(cfgs: list[dict], side: str) -> tuple[str, float | None]:
    """The highest swept rate at which ``side`` met the latency target, printed and as a number."""
    ran = [c for c in cfgs if side in c]
    if not ran:
        return "-", None
    ok = [c["params"]["rate"] for c in ran if c[side]["meets_target"]]
    best = max(ok, default=0.0)
    top = " (top of sweep)" if ok and best == max(c["params"]["rate"] for c in cfgs) else ""
    return f"{best:g} req/s{top}", best


def goals(runs: dict[str, dict[str, dict]]) -> list[str]:
    """One line per goal and measured setting: the goal, the ratio and the verdict."""
    lines = []
    for name in GOALS:
        for shape, data in sorted(runs.get(name, {}).items()):
            s = data.get("summary", {})
            measured: list[tuple[str, float | None]] = []
            others: list[tuple[str, float, str, float | None]] = []  # (metric, goal, setting, ratio) of a second goal
            if name == "chain_summary":
                measured = [(f"{k.split('_')[0][3:]} output tokens", v) for k, v in s.items() if k.endswith("_rtt250")]
            elif name == "map_reduce":
                measured = [(f"RTT {k.split('rtt')[1]} ms", v) for k, v in s.items() if k.startswith("out100_")]
            elif name == "copilot":
                measured = [("", s.get("mean_latency"))]
            elif name == "gpts":
                measured = [("", s.get("sustainable_rate_ratio", 0.0 if "parrot_sustainable_rate" in s else None))]
            elif name == "multi_agent":
                measured = [(k.split("_")[0].replace("files", "") + " files", v) for k, v in s.items() if k.endswith("_vs_latency_tuned")]
            elif name == "mixed":
                measured = [(f"chat {k.split('_')[0][4:]} req/s", v) for k, v in s.items() if k.endswith("_chat_latency")]
                others = [("map-reduce JCT", MIXED_JCT_GOAL, f"chat {k.split('_')[0][4:]} req/s", v)
                          for k, v in s.items() if k.endswith("_job_jct")]  # fmt: skip
            for metric, goal, setting, got in [(*GOALS[name], setting, got) for setting, got in measured] + others:
                if got is None:
                    continue
                if got <= 0:
                    verdict = "missed: parrot-nb met the latency target at no rate of the sweep"
                else:
                    verdict = "met" if got >= goal else f"missed by {goal / got:.1f}x"
                label = f"{metric} ({setting})" if setting else metric
                lines.append(f"| {name} | {shape} | {label} | {goal:g}x | {got:.2f}x | {verdict} |")
    return lines


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_output_length(runs: dict[str, dict[str, dict]], out: Path) -> Path | None:
    panels = [(n, s, d) for n in ("chain_summary", "map_reduce") for s, d in sorted(runs.get(n, {}).items())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, shape, data) in zip(axes[0], panels):
        for rtt, style in ((0.0, "-"), (250.0, "--")):
            cfgs = [c for c in data["configs"] if c["params"]["rtt_ms"] == rtt and "parrot" in c and "baseline" in c]
            if not cfgs:
                continue
            xs = [c["params"]["output_tokens"] for c in cfgs]
            ax.plot(xs, [c["parrot"]["latency_s"] for c in cfgs], style + "o", color="tab:blue", label=f"parrot-nb, RTT {rtt:g} ms")
            ax.plot(xs, [c["baseline"]["latency_s"] for c in cfgs], style + "s", color="tab:orange", label=f"baseline, RTT {rtt:g} ms")
        ax.set_title(f"{name} ({shape})")
        ax.set_xlabel("output tokens per call")
        ax.set_ylabel("end-to-end latency (s)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return _save(fig, out / "workloads_latency_vs_output.png")


def plot_rate(runs: dict[str, dict[str, dict]], out: Path) -> Path | None:
    shapes = sorted(runs.get("gpts", {}).items())
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.8 * len(shapes), 3.6), squeeze=False)
    for ax, (shape, data) in zip(axes[0], shapes):
        cfgs = data["configs"]
        labels = {"parrot": "parrot-nb", "baseline": "baseline", "parrot-paged": "parrot-nb, shared-prefix kernel off"}
        for side, color in (("parrot", "tab:blue"), ("baseline", "tab:orange"), ("parrot-paged", "tab:green")):
            ran = [c for c in cfgs if side in c]
            if ran:
                ax.plot([c["params"]["rate"] for c in ran], [c[side]["mean_s_per_output_token"] * 1e3 for c in ran],
                        "--o" if side == "parrot-paged" else "-o", color=color, label=labels[side])  # fmt: skip
        if cfgs:
            ax.axhline(cfgs[0]["params"]["target_s_per_token"] * 1e3, color="grey", ls=":", label="target")
        ax.set_title(f"GPTs-like apps ({shape})")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("mean latency per output token (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return _save(fig, out / "workloads_latency_vs_rate.png")


def render(runs: dict[str, dict[str, dict]], out: Path) -> str:
    lines = ["# Parrot's workloads: parrot-nb against a request-centric baseline on the same engine", ""]
    lines += ["Produced by `python benchmarks/report.py` from the JSON files beside it. Ratios are baseline / parrot-nb, "
              "measured in one run on one machine (higher is better for parrot-nb).", ""]  # fmt: skip
    lines += ["The last column is a diagnostic side: parrot-nb with the shared-prefix decode kernel off "
              "(`--shared-prefix-kernel off`), where it ran.", ""]
    lines += ["| workload | shape | configuration | parrot-nb | baseline | ratio | parrot-nb, kernel off |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {' | '.join(r)} |" for r in rows(runs)]
    lines += ["", "## Goals", "", "| workload | shape | metric | goal | measured | verdict |", "|---|---|---|---|---|---|"]
    lines += goals(runs)
    placed = placement_rows(runs)
    if placed:
        lines += ["", "## Placement", "",
                  "Where each side's scheduler put the requests, from its server's event log (`workloads/placement.py`): "
                  "the engines used; the affinity hit rate (a group's requests after its first that went to an engine "
                  "that had already run the group: one system prompt, one map-reduce job); the engines a group was "
                  "spread over; and the share of latency-critical (chat) requests dispatched to an engine running "
                  "other work at that moment (lower is better isolation).", "",
                  "| workload | shape | engines | configuration | side | engines used | affinity hits | engines per group "
                  "| chat beside other work |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {' | '.join(r)} |" for r in placed]
    lines += ["", "## Runs", ""]
    for name, by_shape in sorted(runs.items()):
        for shape, data in sorted(by_shape.items()):
            setup = ", ".join(f"{k} {v}" for k, v in data.get("setup_s", {}).items())
            engines = f", engines per server: {data['engines']}" if "engines" in data else ""
            lines.append(f"- {name}, {shape}: `{data['command']}` at commit {data['commit']} on {data.get('machine', '?')}{engines} ({setup})")
    for path in (plot_output_length(runs, out), plot_rate(runs, out)):
        if path is not None:
            lines += ["", f"![{path.stem}]({path.name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS / "workloads", help="the workloads' JSON files")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where workloads.md and the plots go")
    args = ap.parse_args(argv)
    runs = load(args.results)
    if not runs:
        print(f"report.py: no workload results in {args.results}; run benchmarks/workloads/run_all.py first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(runs, args.out)
    (args.out / "workloads.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
