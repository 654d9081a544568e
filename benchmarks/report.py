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
}


def load(results: Path) -> dict[str, dict[str, dict]]:
    """Results by workload, then by shape."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if "workload" in data and "shape" in data:
            out[data["workload"]][data["shape"]] = data
    return out


def rows(runs: dict[str, dict[str, dict]]) -> list[tuple[str, ...]]:
    """(workload, shape, configuration, parrot-nb, baseline, ratio, parrot-nb with the shared-prefix kernel
    off) for every measured configuration; the last is "-" where that diagnostic side did not run."""
    table: list[tuple[str, ...]] = []
    for name in ("chain_summary", "map_reduce", "copilot", "gpts", "multi_agent"):
        for shape, data in sorted(runs.get(name, {}).items()):
            for c in data["configs"]:
                p, par, base = c["params"], c.get("parrot"), c.get("baseline")
                if name == "gpts" and (par is None) != (base is None):  # one side stopped its sweep lower
                    cell = lambda m: f"{m['mean_s_per_output_token'] * 1e3:.1f}" if m else "not run: over the target at a lower rate"  # noqa: E731
                    table.append((name, shape, f"{p['rate']:g} req/s: mean ms per output token", cell(par), cell(base), "-"))
                    continue
                if par is None or base is None:
                    continue
                if name in ("chain_summary", "map_reduce"):
                    what = f"{p['output_tokens']} out, RTT {p['rtt_ms']:g} ms"
                    table.append((name, shape, what, f"{par['latency_s']:.3f} s", f"{base['latency_s']:.3f} s",
                                  f"{base['latency_s'] / par['latency_s']:.2f}x"))  # fmt: skip
                elif name == "copilot":
                    what = f"{p['requests']} requests, mean latency"
                    table.append((name, shape, what, f"{par['mean_latency_s']:.3f} s", f"{base['mean_latency_s']:.3f} s",
                                  f"{base['mean_latency_s'] / par['mean_latency_s']:.2f}x"))  # fmt: skip
                    what = "per output token"
                    table.append((name, shape, what, f"{par['mean_s_per_output_token'] * 1e3:.1f} ms",
                                  f"{base['mean_s_per_output_token'] * 1e3:.1f} ms",
                                  f"{base['mean_s_per_output_token'] / par['mean_s_per_output_token']:.2f}x"))  # fmt: skip
                elif name == "gpts":
                    what = f"{p['rate']:g} req/s: mean ms per output token"
                    table.append((name, shape, what, f"{par['mean_s_per_output_token'] * 1e3:.1f}",
                                  f"{base['mean_s_per_output_token'] * 1e3:.1f}",
                                  f"{base['mean_s_per_output_token'] / par['mean_s_per_output_token']:.2f}x"))  # fmt: skip
                elif name == "multi_agent":
                    what = f"{p['files']} files, JCT"
                    ratio = f"{base['jct_s'] / par['jct_s']:.2f}x"
                    lat = c.get("baseline-latency")
                    extra = f" (latency-tuned {lat['jct_s']:.3f} s: {lat['jct_s'] / par['jct_s']:.2f}x)" if lat else ""
                    table.append((name, shape, what, f"{par['jct_s']:.3f} s", f"{base['jct_s']:.3f} s{extra}", ratio))
            if name == "gpts" and data.get("summary"):
                s = data["summary"]
                rate = lambda side: f"{s[f'{side}_sustainable_rate']:g} req/s" + (" (top of sweep)" if s[f"{side}_bounded_by_sweep"] else "")  # noqa: E731
                ratio = f"{s['sustainable_rate_ratio']:.2f}x" if "sustainable_rate_ratio" in s else "-"
                table.append((name, shape, "sustainable rate at the target", rate("parrot"), rate("baseline"), ratio))
    return [(*r, _paged(runs, r)) for r in table]


def _paged(runs: dict[str, dict[str, dict]], row: tuple[str, ...]) -> str:
    """The diagnostic side's figure for a table row (same unit as the row's parrot-nb figure)."""
    name, shape, what = row[0], row[1], row[2]
    data = runs.get(name, {}).get(shape)
    if data is None:
        return "-"
    for c in data["configs"]:
        m, p = c.get("parrot-paged"), c["params"]
        if m is None:
            continue
        if name in ("chain_summary", "map_reduce") and what == f"{p['output_tokens']} out, RTT {p['rtt_ms']:g} ms":
            return f"{m['latency_s']:.3f} s"
        if name == "copilot" and what.endswith("mean latency"):
            return f"{m['mean_latency_s']:.3f} s"
        if name == "copilot" and what == "per output token":
            return f"{m['mean_s_per_output_token'] * 1e3:.1f} ms"
        if name == "gpts" and what.startswith(f"{p['rate']:g} req/s"):
            return f"{m['mean_s_per_output_token'] * 1e3:.1f}"
        if name == "multi_agent" and what == f"{p['files']} files, JCT":
            return f"{m['jct_s']:.3f} s"
    if name == "gpts" and what.startswith("sustainable"):
        ok = [c["params"]["rate"] for c in data["configs"] if c.get("parrot-paged", {}).get("meets_target")]
        if any("parrot-paged" in c for c in data["configs"]):
            return f"{max(ok):g} req/s" if ok else "0 req/s"
    return "-"


def goals(runs: dict[str, dict[str, dict]]) -> list[str]:
    """One line per goal and measured setting: the goal, the ratio and the verdict."""
    lines = []
    for name, (metric, goal) in GOALS.items():
        for shape, data in sorted(runs.get(name, {}).items()):
            s = data.get("summary", {})
            measured: list[tuple[str, float | None]] = []
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
            for setting, got in measured:
                if got is None:
                    continue
                if got <= 0:
                    verdict = "missed: parrot-nb met the latency target at no rate of the sweep"
                else:
                    verdict = "met" if got >= goal else f"missed by {goal / got:.1f}x"
                label = f"{metric} ({setting})" if setting else metric
                lines.append(f"| {name} | {shape} | {label} | {goal:g}x | {got:.2f}x | {verdict} |")
    return lines


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
    fig.tight_layout()
    path = out / "workloads_latency_vs_output.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = out / "workloads_latency_vs_rate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    lines += ["", "## Runs", ""]
    for name, by_shape in sorted(runs.items()):
        for shape, data in sorted(by_shape.items()):
            setup = ", ".join(f"{k} {v}" for k, v in data.get("setup_s", {}).items())
            lines.append(f"- {name}, {shape}: `{data['command']}` at commit {data['commit']} on {data.get('machine', '?')} ({setup})")
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
