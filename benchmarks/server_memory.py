"""Server memory over a long run: RSS of the engine server process across many requests.

One client makes ``--requests`` calls (the seeded tiny model, 1 output token each), ``--window``
at a time, keeping none of the results, as a notebook loop or an exported pipeline does. Every
``--every`` requests it records the server process's resident memory (VmRSS; the engine worker
is a separate process and not counted) and, where the server reports them, the requests and
variables it holds.

    .venv/bin/python benchmarks/server_memory.py --out benchmarks/results/server_memory

Run it against an older checkout to compare (``--label`` names the run in the output), then
``server_memory.py compare A.json B.json > OUT.md`` puts the runs side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(args: argparse.Namespace) -> dict:
    import parrot_nb
    from parrot_nb.function import SemanticFunction

    tmp = Path(tempfile.mkdtemp(prefix="parrot-nb-memory-"))
    connection_file = tmp / "server.json"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "engine_server", "--model", "tiny", "--connection-file", str(connection_file),
            "--log-level", "WARNING", "--max-running", str(args.max_running), "--kv-cache-mb", str(args.kv_cache_mb),
        ],  # fmt: skip
        cwd=args.repo,
    )
    try:
        deadline = time.monotonic() + 120
        while not connection_file.exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        parrot_nb.connect(connection_file)
        fn = SemanticFunction.from_template("one", "Record {{input:i}}: {{output:y}}", max_tokens=1, ignore_eos=True)
        fn(i="warm-up").get(timeout=300)
        samples = []
        t0 = time.monotonic()
        done, next_sample = 0, args.every
        while done < args.requests:
            window = [fn(i=str(done + k)) for k in range(min(args.window, args.requests - done))]
            for v in window:
                v.activate("throughput")  # all at once, so the engine batches them
            for v in window:
                v.get("throughput", timeout=300)
            done += len(window)
            del window, v
            if done >= next_sample or done == args.requests:
                next_sample += args.every
                st = parrot_nb.status()
                samples.append(
                    {
                        "requests_done": done,
                        "server_rss_mib": round(rss_mib(server.pid), 1),
                        "held_requests": getattr(st, "requests", None),
                        "held_variables": getattr(st, "variables", None),
                        "elapsed_s": round(time.monotonic() - t0, 1),
                    }
                )
                print(json.dumps(samples[-1]), flush=True)
        return {
            "label": args.label,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "requests": args.requests,
            "window": args.window,
            "max_running": args.max_running,
            "kv_cache_mb": args.kv_cache_mb,
            "samples": samples,
            "rss_growth_mib": round(samples[-1]["server_rss_mib"] - samples[0]["server_rss_mib"], 1),
        }
    finally:
        parrot_nb.disconnect()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def compare(paths: list[Path]) -> str:
    """A markdown table of runs side by side (RSS and what the server holds at each sample)."""
    runs = [json.loads(p.read_text()) for p in paths]
    lines = [
        "# Server memory over a long run",
        "",
        f"RSS of the engine server process (the engine worker is a separate process, not counted); "
        f"{runs[0]['requests']:,} calls of the tiny model, 1 output token each, {runs[0]['window']} in flight, "
        f"results dropped at once. Machine: {runs[0]['machine']}.",
        "",
        "| requests done | " + " | ".join(f"{r['label']}: RSS MiB (requests held)" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i, sample in enumerate(runs[0]["samples"]):
        cells = []
        for r in runs:
            s = r["samples"][i] if i < len(r["samples"]) else None
            held = "" if s is None or s["held_requests"] is None else f" ({s['held_requests']})"
            cells.append("" if s is None else f"{s['server_rss_mib']}{held}")
        lines.append(f"| {sample['requests_done']:,} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {r['label']}: RSS grew {r['rss_growth_mib']} MiB from the first sample to the last." for r in runs], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compare":  # compare RUN.json ... > OUT.md
        print(compare([Path(p) for p in argv[1:]]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=256, help="calls in flight at once")
    parser.add_argument("--every", type=int, default=10_000, help="sample every this many requests")
    parser.add_argument("--max-running", type=int, default=32, help="the engine's batch (the server's flag)")
    # Small on purpose: every record's prompt is cached, and the engine's eviction scans every cached
    # context, so a big pool full of them makes each request slower (this measures the server, not that).
    parser.add_argument("--kv-cache-mb", type=int, default=16, help="the engine's KV pool (the server's flag)")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="the checkout to serve")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
