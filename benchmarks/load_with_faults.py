"""Load with faults: many applications of chained calls, while an engine worker and a client are killed.

A real engine server (the seeded tiny model, on CPU engines) serves ``--apps`` applications of
``--requests`` calls each, made of chains ``--depth`` calls long, from ``--clients`` client
processes. Once a fifth of the work is done, one engine worker and one client process are
SIGKILLed. Counted from the server's event log afterwards:

- every request of the surviving clients finished exactly once (none lost, none duplicated,
  none failed), and each chain's result arrived;
- every request of the killed client finished once or was cancelled once (the server takes
  the silent client as dead), and nothing is left unfinished on the server;
- no KV block leaked: idle, each engine's used blocks are exactly those its context cache holds;
- throughput, and p50/p99 latency per request (queued to finished) and per chain (first
  call to last value, as the client saw it).

    .venv/bin/python benchmarks/load_with_faults.py --out benchmarks/results/load_with_faults

exits 1 when a check fails. tests/test_load_with_faults.py runs a smaller configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- client process


def run_client(connection_file: str, first_app: int, apps: int, chains: int, depth: int, max_tokens: int, out: str) -> None:
    """One client process: its applications' chains, all in flight at once; writes chain latencies."""
    import parrot_nb
    from parrot_nb.function import SemanticFunction

    parrot_nb.connect(connection_file)
    steps = [
        SemanticFunction.from_template(f"step{i}", f"Step {i} of {{{{input:x}}}} -> {{{{output:y}}}}", max_tokens=max_tokens, ignore_eos=True)
        for i in range(depth)
    ]

    async def application(app: int) -> list[float]:
        # One block per application: each `with parrot_nb.app(...)` block is an application of its own.
        with parrot_nb.app(f"load-{app}"):
            ends = []
            for index in range(chains):
                started, var = time.monotonic(), f"app {app} chain {index}"
                for step in steps:
                    var = step(x=var)
                ends.append((started, var))
        app_ids[ends[0][1].app_id] = f"load-{app}"

        async def wait(started: float, var) -> float:
            await var
            return time.monotonic() - started

        return list(await asyncio.gather(*(wait(t, v) for t, v in ends)))

    async def main() -> list[float]:
        runs = [asyncio.ensure_future(application(app)) for app in range(first_app, first_app + apps)]
        while len(app_ids) < apps:  # every call is submitted: say which applications are ours
            await asyncio.sleep(0.05)
        Path(out + ".apps.tmp").write_text(json.dumps(app_ids))
        os.replace(out + ".apps.tmp", out + ".apps")  # the harness polls for it: never half-written
        return [x for run in await asyncio.gather(*runs) for x in run]

    app_ids: dict[str, str] = {}
    latencies = asyncio.run(main())
    Path(out).write_text(json.dumps({"chain_latency_s": latencies}))
    parrot_nb.disconnect()


# --------------------------------------------------------------------------- harness


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def read_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return events


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict:
    if args.apps % args.clients or args.requests % args.depth or args.clients < 2:
        raise ValueError("--apps must divide among --clients (at least 2), and --requests into chains of --depth")
    from engine_server.protocol import ConnectionInfo
    from parrot_nb.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="parrot-nb-load-"))
    connection_file, event_log = tmp / "server.json", tmp / "events.jsonl"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "engine_server", "--model", "tiny", "--engines", str(args.engines),
            "--connection-file", str(connection_file), "--event-log", str(event_log),
            "--client-timeout", str(args.client_timeout), "--log-level", "WARNING",
        ],
        cwd=REPO,
    )  # fmt: skip
    clients: list[subprocess.Popen] = []
    monitor = None
    try:
        wait_for(connection_file.exists, "the server's connection file", 120)
        monitor = Client(ConnectionInfo.read(connection_file), name="load-monitor")
        from engine_server.protocol import Status

        wait_for(lambda: all(e.state == "ready" for e in monitor.call(Status()).engines), "the engines", 180)
        chains = args.requests // args.depth
        per_client = args.apps // args.clients
        t0 = time.monotonic()
        for k in range(args.clients):
            out = tmp / f"client{k}.json"
            cmd = [
                sys.executable, __file__, "client", str(connection_file), str(k * per_client), str(per_client),
                str(chains), str(args.depth), str(args.max_tokens), str(out),
            ]  # fmt: skip
            clients.append(subprocess.Popen(cmd, cwd=REPO))
        total = per_client * args.clients * chains * args.depth
        app_files = [Path(f"{tmp / f'client{k}.json'}.apps") for k in range(args.clients)]
        wait_for(lambda: all(f.exists() for f in app_files), "every client to submit its calls", 300)
        victim_apps = set(json.loads(app_files[-1].read_text()))
        load_apps = {a for f in app_files for a in json.loads(f.read_text())}
        finished = lambda: sum(1 for e in read_events(event_log) if e["type"] == "RequestFinished")  # noqa: E731
        wait_for(lambda: finished() >= total // 5, "a fifth of the work", 600)
        engine_pid = monitor.call(Status()).engines[0].pid
        os.kill(engine_pid, signal.SIGKILL)
        victim = clients[-1]
        victim.kill()
        killed_at = time.monotonic()
        for proc in clients[:-1]:
            if proc.wait(args.timeout) != 0:
                raise RuntimeError(f"a surviving client exited with code {proc.returncode}")
        wall = time.monotonic() - t0
        victim.wait()
        # The killed client is taken as dead after the client timeout; then nothing may be left.
        wait_for(lambda: monitor.call(Status()).unfinished == 0, "the server to settle", args.client_timeout + 120)
        wait_for(lambda: _idle_loads(read_events(event_log), args.engines), "idle load reports from every engine", 30)
        settled_after_kill = time.monotonic() - killed_at
        events = read_events(event_log)
        latencies = [x for proc in range(args.clients - 1) for x in json.loads((tmp / f"client{proc}.json").read_text())["chain_latency_s"]]
        return report(args, events, latencies, load_apps, victim_apps, per_client, chains, wall, settled_after_kill, engine_pid)
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if monitor is not None:
            monitor.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _idle_loads(events: list[dict], engines: int) -> dict[int, dict]:
    """The last load report of each engine, if every engine's last report says it is idle."""
    last: dict[int, dict] = {}
    for e in events:
        if e["type"] == "EngineLoad":
            last[e["engine_id"]] = e
    if len(last) < engines or any(e["running"] or e["waiting"] for e in last.values()):
        return {}
    return last


def report(args, events, chain_latencies, load_apps, victim_apps, per_client, chains, wall, settled_after_kill, engine_pid) -> dict:
    submitted = {e["request_id"]: e["app_id"] for e in events if e["type"] == "SubmitCall" and e["dir"] == "in"}
    finished = Counter(e["request_id"] for e in events if e["type"] == "RequestFinished")
    failed = Counter(e["request_id"] for e in events if e["type"] == "RequestFailed")
    cancelled = Counter(e["request_id"] for e in events if e["type"] == "RequestCancelled")
    queued_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    for e in events:
        if e["type"] == "RequestQueued":
            queued_at.setdefault(e["request_id"], e["t"])
        elif e["type"] == "RequestFinished":
            finished_at[e["request_id"]] = e["t"]
    surviving = [r for r, a in submitted.items() if a in load_apps - victim_apps]
    victims = [r for r, a in submitted.items() if a in victim_apps]
    checks = {
        "surviving requests submitted": len(surviving),
        "expected surviving requests": (args.clients - 1) * per_client * chains * args.depth,
        "surviving requests finished exactly once": sum(1 for r in surviving if finished[r] == 1),
        "surviving requests lost (never finished)": sum(1 for r in surviving if finished[r] == 0),
        "requests finished more than once": sum(1 for r, n in finished.items() if n > 1),
        "surviving requests failed or cancelled": sum(1 for r in surviving if failed[r] or cancelled[r]),
        "killed client's requests": len(victims),
        "killed client's requests finished once": sum(1 for r in victims if finished[r] == 1 and not cancelled[r]),
        "killed client's requests cancelled once": sum(1 for r in victims if cancelled[r] == 1 and not finished[r]),
        "retried after the engine kill": sum(1 for e in events if e["type"] == "RequestDispatched" and e["attempt"] == 2),
        "chains completed by surviving clients": len(chain_latencies),
    }
    loads = _idle_loads(events, args.engines)
    kv = {
        f"engine {i}": {k: loads[i][k] for k in ("kv_blocks_used", "kv_blocks_cached", "kv_blocks_total")} for i in sorted(loads)
    }
    ok = (
        checks["surviving requests submitted"] == checks["expected surviving requests"]
        and checks["surviving requests finished exactly once"] == checks["surviving requests submitted"]
        and checks["requests finished more than once"] == 0
        and checks["surviving requests failed or cancelled"] == 0
        and checks["killed client's requests finished once"] + checks["killed client's requests cancelled once"]
        == checks["killed client's requests"]
        and checks["chains completed by surviving clients"] == (args.clients - 1) * per_client * chains
        and len(kv) == args.engines
        and all(v["kv_blocks_used"] == v["kv_blocks_cached"] for v in kv.values())
    )
    request_latency = [finished_at[r] - queued_at[r] for r in surviving if r in finished_at and r in queued_at]
    done_surviving = checks["surviving requests finished exactly once"]
    return {
        "ok": ok,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "func")},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "killed_engine_pid": engine_pid,
        "checks": checks,
        "kv_when_idle": kv,
        "wall_s": round(wall, 2),
        "throughput_req_s": round(done_surviving / wall, 1),
        "request_latency_s": {"p50": round(percentile(request_latency, 0.5), 3), "p99": round(percentile(request_latency, 0.99), 3)},
        "chain_latency_s": {"p50": round(percentile(chain_latencies, 0.5), 3), "p99": round(percentile(chain_latencies, 0.99), 3)},
        "mean_chain_latency_s": round(statistics.fmean(chain_latencies), 3) if chain_latencies else None,
        "settled_after_kill_s": round(settled_after_kill, 2),
    }


def markdown(result: dict, command: str) -> str:
    lines = [
        "# Load with faults",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {result['machine']}. Configuration: `{json.dumps(result['config'])}`.",
        "",
        f"**All checks passed: {result['ok']}**",
        "",
        "| check | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result["checks"].items()],
        "",
        "KV blocks per engine when idle (used must equal those held by cached contexts):",
        "",
        "| engine | used | held by cached contexts | total |",
        "|---|---|---|---|",
        *[f"| {k} | {v['kv_blocks_used']} | {v['kv_blocks_cached']} | {v['kv_blocks_total']} |" for k, v in result["kv_when_idle"].items()],
        "",
        f"Throughput: {result['throughput_req_s']} requests/s over {result['wall_s']} s (surviving clients' requests).",
        f"Latency per request (queued to finished): p50 {result['request_latency_s']['p50']} s, p99 {result['request_latency_s']['p99']} s.",
        f"Latency per chain (first call to last value): p50 {result['chain_latency_s']['p50']} s, p99 {result['chain_latency_s']['p99']} s.",
        f"The server had settled (nothing unfinished) {result['settled_after_kill_s']} s after the kills.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200, help="requests per application")
    parser.add_argument("--depth", type=int, default=5, help="calls per chain")
    parser.add_argument("--clients", type=int, default=5, help="client processes; the last one is killed")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--client-timeout", type=float, default=10.0, help="the server's (default: its own default)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds the surviving clients may take")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        conn, first, apps, chains, depth, max_tokens, out = argv[1:]
        run_client(conn, int(first), int(apps), int(chains), int(depth), int(max_tokens), out)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        command = ".venv/bin/python benchmarks/load_with_faults.py " + " ".join(argv)
        args.out.with_suffix(".md").write_text(markdown(result, command))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
