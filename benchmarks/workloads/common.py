"""What the workload scripts share: checkpoints, documents of exact token counts, the two sides, the run.

The two sides run the same engine, kernels and model, so only the API and the scheduling differ
(../../shared/BENCHMARKS.md, "Our baseline"):

- ``parrot``: the application as a notebook writes it, through ``parrot_nb``: every call submitted
  at once, the DAG executed on the server, objectives deduced from it, prefix sharing at variable
  boundaries, the shared-prefix decode kernel where the engine's chooser picks it.
- ``baseline``: the same server process started with ``--http-port 0 --shared-prefix-kernel off``,
  driven the way request-centric apps are today: OpenAI ``/v1/completions`` calls, client-side
  orchestration (a dependent call waits for the previous answer; independent ones are issued
  concurrently), FIFO (each HTTP request is its own one-call application, queued by arrival),
  block prefix caching on (like vLLM's APC), no shared-prefix kernel, no DAG, no objectives.
- ``baseline-latency``: the baseline with ``--max-running 4``, the paper's "latency-tuned vLLM"
  (small batches: each request decodes faster, fewer run at once). Only multi-agent uses it.

Both sides get the same simulated round trip per client-server message: the parrot side through
``benchmarks/netdelay.py`` (every ZMQ message delayed by half the round trip, each way), the
baseline by sleeping half the round trip before each HTTP request and after its answer.

Documents are words ``w<id>`` of a word-level tokenizer (``make_checkpoint``), one token each,
so prompt lengths are exact; outputs ignore EOS and have fixed lengths, so both sides do equal work.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import parrot_nb  # noqa: E402
from checkpoints import write_word_checkpoint  # noqa: E402
from servers import Server, new_result  # noqa: E402

from placement import placement  # noqa: E402

VOCAB_FIRST = 100  # word ids below this are left alone (specials and the unknown word)

SHAPES: dict[str, dict] = {
    # Llama-2-7B (MHA: 32 KV heads); its context is raised to 8,192 so that Copilot-length prompts fit.
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                      max_seq_len=8192, rope_theta=10000.0, norm_eps=1e-5),
    # Llama-3-8B (GQA: 8 KV heads).
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                      max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5),
    # A small model for a dry run on a CPU (the same code paths, sizes scaled down).
    "tiny-words": dict(vocab_size=8000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                       max_seq_len=16384, rope_theta=10000.0, norm_eps=1e-5),
}  # fmt: skip


def make_checkpoint(path: Path, shape: str, device: str) -> Path:
    """Random weights of ``shape`` with the word-level tokenizer of ``benchmarks/checkpoints.py``
    (``w<id>`` is token ``id``); kept if already written for this shape."""
    spec = SHAPES[shape]
    done = path / "shape.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        return path
    write_word_checkpoint(path, spec, device)
    done.write_text(json.dumps(spec))
    return path


class Words:
    """Texts of exact token counts (one word, one token), drawn from a seeded generator."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.rng = vocab, random.Random(seed)

    def __call__(self, n: int) -> str:
        return " ".join(f"w{self.rng.randrange(VOCAB_FIRST, self.vocab)}" for _ in range(n))


# ----------------------------------------------------------------------------- the sides


class Baseline:
    """A request-centric client: ``/v1/completions`` calls, each delayed by the round trip."""

    def __init__(self, url: str, rtt_ms: float) -> None:
        self.url, self.half = f"{url}/v1/completions", rtt_ms / 2000

    async def __aenter__(self) -> Baseline:
        limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(1800.0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def complete(self, prompt: str, max_tokens: int, user: str = "") -> str:
        """One call, answered whole: the request and the answer each cross the network once.
        ``user`` names the call's client in the server's event log (as a notebook names its app)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if user:
            body["user"] = user
        await asyncio.sleep(self.half)
        r = await self.http.post(self.url, json=body)
        await asyncio.sleep(self.half)
        if r.status_code != 200:
            raise RuntimeError(f"baseline call failed: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["text"]


@dataclass
class Side:
    name: str  # a key of SIDE_FLAGS
    server: Server
    http: str = ""  # the baseline server's HTTP API, from its connection file
    rtt_ms: float = 0.0

    def use(self, rtt_ms: float) -> None:
        self.rtt_ms = rtt_ms
        if self.name.startswith("parrot"):
            self.server.use(rtt_ms)

    def baseline(self) -> Baseline:
        return Baseline(self.http, self.rtt_ms)


SIDE_FLAGS = {
    "parrot": (),
    # Diagnostic sides: parrot-nb with one feature off, to say where a difference comes from.
    "parrot-paged": ("--shared-prefix-kernel", "off"),
    "parrot-no-early": ("--no-early-prefill",),
    "baseline": ("--http-port", "0", "--shared-prefix-kernel", "off"),
    "baseline-latency": ("--http-port", "0", "--shared-prefix-kernel", "off", "--max-running", "4"),
}


def start_side(name: str, tmp: Path, model: str, device: str, engines: int | None = None) -> Side:
    """A side's server: ``engines`` workers, or the server's default (one per visible GPU on cuda)."""
    flags = (*SIDE_FLAGS[name], *(("--engines", str(engines)) if engines else ()))
    server = Server(tmp, name, model, device, *flags)
    try:
        deadline = time.monotonic() + 600
        url = json.loads(server.connection_file.read_text())["http"]
        server.use(0.0)  # every engine ready
        if not name.startswith("parrot"):
            parrot_nb.disconnect()
            while True:  # the HTTP front answers too
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.proc.poll() is not None:
                    raise RuntimeError(f"{name} server did not become ready; see {server.log.name}")
                time.sleep(0.2)
    except BaseException:
        parrot_nb.disconnect()
        server.stop()  # no server left behind
        raise
    return Side(name, server, url)


def latency_ratios(cfgs: list[dict]) -> dict:
    """baseline / parrot-nb end-to-end latency, by output length and round trip."""
    return {
        f"out{c['params']['output_tokens']}_rtt{c['params']['rtt_ms']:g}": round(c["baseline"]["latency_s"] / c["parrot"]["latency_s"], 3)
        for c in cfgs if "parrot" in c and "baseline" in c
    }  # fmt: skip


def in_threads(calls: list[Callable[[], None]]) -> None:
    """Run each call in its own thread (a user who sleeps until their arrival, then waits on their
    answers) and return when all have; the first error is raised."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def open_apps(*names: str) -> None:
    """Open the parrot side's applications before the clock starts: a notebook opens its application
    once (a round trip, made on the first call otherwise), as an HTTP client opens its connection."""
    from parrot_nb import session

    client = session.require_client()
    for name in names:
        client.app_id(name)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(round(q * (len(ys) - 1))))] if ys else float("nan")


# ----------------------------------------------------------------------------- the run


@dataclass
class Workload:
    """One workload: its configurations, and how each side runs one (returning its metrics)."""

    name: str
    configs: Callable[[str], list[dict]]  # scale -> parameter sets
    parrot: Callable[[dict, Words], dict]
    baseline: Callable[[Side, dict, Words], dict]  # runs its own asyncio loop
    sides: tuple[str, ...] = ("parrot", "baseline")
    summary: Callable[[list[dict]], dict] | None = None  # the headline numbers, from the finished configs
    # Whether a side may skip a configuration, given that side's results so far (a rate sweep stops
    # above the first rate a side cannot sustain); returns the reason, or "".
    skip: Callable[[str, dict, list[dict]], str] | None = None
    warm_up: bool = True  # run the first configuration once unmeasured with --warm (False: too costly)
    # How its clients group for ``placement`` (client name -> group), and which groups are latency-critical.
    group_of: Callable[[str], str | None] | None = None
    latency_groups: frozenset[str] = frozenset()


def run(workloads: list[Workload], shape: str, device: str, scale: str, out_dir: Path | None, script: str,
        model_dir: Path | None = None, work_dir: Path | None = None, only_sides: list[str] | None = None,
        warm: bool = False, engines: int | None = None) -> dict[str, dict]:  # fmt: skip
    """Run every workload's configurations on each side (one server at a time); return results by name.

    The JSON files are rewritten after every configuration, so a run cut short keeps what it measured."""
    tmp = work_dir or Path(tempfile.mkdtemp(prefix="parrot-workloads-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = make_checkpoint(model_dir or tmp / shape, shape, device)
    checkpoint_s = time.perf_counter() - t
    vocab = SHAPES[shape]["vocab_size"]
    results = {}
    for w in workloads:
        res = new_result(script)
        res.update(workload=w.name, shape=shape, device=device, scale=scale, machine=_machine(device), warm=warm,
                   engines=engines or "default", configs=[])  # fmt: skip
        res["configs"] = [{"params": p} for p in w.configs(scale)]
        results[w.name] = res
    wanted = only_sides or [*SIDE_FLAGS]
    sides = [s for s in SIDE_FLAGS if s in wanted and any(_runs_on(w, s) for w in workloads)]
    timings = {"checkpoint_s": round(checkpoint_s, 1)}
    for side_name in sides:
        t = time.perf_counter()
        side = start_side(side_name, tmp, str(model), device, engines)
        timings[f"{side_name}_start_s"] = round(time.perf_counter() - t, 1)
        try:
            _warm_up(side, vocab)
            for w in workloads:
                if not _runs_on(w, side_name):
                    continue
                if warm and w.warm_up:  # its first configuration once, on other texts, unmeasured
                    first = results[w.name]["configs"][0]["params"]
                    side.use(first.get("rtt_ms", 0.0))
                    words = Words(vocab, seed=zlib.crc32(f"warm/{w.name}".encode()))
                    w.parrot(first, words) if side_name.startswith("parrot") else w.baseline(side, first, words)
                for i, cfg in enumerate(results[w.name]["configs"]):
                    params = cfg["params"]
                    done = [c[side_name] for c in results[w.name]["configs"][:i] if side_name in c]
                    why = w.skip(side_name, params, done) if w.skip is not None else ""
                    if why:
                        cfg.setdefault("skipped", {})[side_name] = why
                        continue
                    side.use(params.get("rtt_ms", 0.0))
                    words = Words(vocab, seed=zlib.crc32(f"{w.name}/{i}".encode()))  # the same texts on every side
                    t, since = time.perf_counter(), time.time()
                    if side_name.startswith("parrot"):
                        metrics = w.parrot(params, words)
                    else:
                        metrics = w.baseline(side, params, words)
                    metrics["wall_s"] = round(time.perf_counter() - t, 3)
                    events = side.server.events()
                    metrics["server"] = server_stats(events, since)
                    if w.group_of is not None:
                        metrics["placement"] = placement(events, since, w.group_of, w.latency_groups)
                    cfg[side_name] = metrics
                    print(f"[{w.name}] {side_name} {params}: {_short(metrics)}", file=sys.stderr, flush=True)
                    _write(results[w.name], w, out_dir, timings)
        finally:
            if side_name.startswith("parrot"):
                parrot_nb.disconnect()
            side.server.stop()
    for w in workloads:
        _write(results[w.name], w, out_dir, timings)
    return results


def _write(res: dict, w: Workload, out_dir: Path | None, timings: dict) -> None:
    res["setup_s"] = timings
    if w.summary is not None:
        try:
            res["summary"] = w.summary(res["configs"])
        except (KeyError, ZeroDivisionError, IndexError):  # a side has not run yet
            res["summary"] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{w.name}_{res['shape']}.json").write_text(json.dumps(res, indent=2) + "\n")


def _runs_on(w: Workload, side: str) -> bool:
    """Diagnostic parrot sides run every workload the parrot side runs."""
    return side in w.sides or (side.startswith("parrot-") and "parrot" in w.sides)


def server_stats(events: list[dict], since: float) -> dict:
    """What the server saw of the requests that finished since ``since`` (its event log): means of
    queue, execution and time to first token, and the tokens prefilled, served from cache and generated."""
    # Requests that generated something: not the warm-up's, nor anything before this configuration.
    done = [e for e in events if e.get("type") == "RequestFinished" and e["t"] >= since and e["output_tokens"] > 0]
    if not done:
        return {}
    return {
        "requests": len(done),
        "mean_queue_s": round(mean([e["queue_s"] for e in done]), 4),
        "mean_exec_s": round(mean([e["exec_s"] for e in done]), 4),
        "mean_ttft_s": round(mean([e["ttft_s"] for e in done]), 4),
        "prompt_tokens": sum(e["prompt_tokens"] for e in done),
        "cached_tokens": sum(e["cached_tokens"] for e in done),
        "output_tokens": sum(e["output_tokens"] for e in done),
    }


def _warm_up(side: Side, vocab: int) -> None:
    """One small call first, so that nothing measured pays for a first use."""
    words = Words(vocab, seed=12345)
    if side.name.startswith("parrot"):
        from parrot_nb import SemanticFunction

        f = SemanticFunction.from_template("warm_up", "{{input:x}} {{output:y max_tokens=8 ignore_eos=true}}")
        with parrot_nb.app("warm-up"):
            f(x=words(300)).get(timeout=600)
    else:

        async def go() -> None:
            async with side.baseline() as b:
                await b.complete(words(300), 8)

        asyncio.run(go())


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _machine(device: str) -> str:
    if device != "cuda":
        return f"{os.cpu_count()}-core CPU"
    import torch

    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def cli(workloads: list[Workload], script: str, argv: list[str] | None = None) -> int:
    """The command line every workload script shares."""
    import argparse

    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny-words", help="the model's shape (random weights)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--scale", choices=["smoke", "full"], default="smoke",
                    help="smoke: small sizes (a CPU dry run); full: the sizes reported on the H200")  # fmt: skip
    ap.add_argument("--model-dir", type=Path, default=None, help="where the checkpoint is written (kept for reuse)")
    ap.add_argument("--out-dir", type=Path, default=None, help="write <workload>_<shape>.json here")
    ap.add_argument("--work-dir", type=Path, default=None, help="servers' logs and event logs (default: a temp dir)")
    ap.add_argument("--engines", type=int, default=None,
                    help="engine workers per server (default: the server's rule, one per visible GPU on cuda, one on cpu)")  # fmt: skip
    ap.add_argument("--sides", default="parrot,baseline,baseline-latency",
                    help=f"comma-separated, of {', '.join(SIDE_FLAGS)} (default: %(default)s)")  # fmt: skip
    ap.add_argument("--warm", action="store_true",
                    help="before measuring a workload on a side, run its first configuration once unmeasured "
                    "(kernels compiled for its shapes beforehand, as on a server that has been serving a while)")  # fmt: skip
    args = ap.parse_args(argv)
    sides = args.sides.split(",")
    if set(sides) - set(SIDE_FLAGS):
        ap.error(f"unknown sides {sorted(set(sides) - set(SIDE_FLAGS))}; they are {', '.join(SIDE_FLAGS)}")
    results = run(workloads, args.shape, args.device, args.scale, args.out_dir, script, args.model_dir, args.work_dir,
                  sides, args.warm, args.engines)  # fmt: skip
    print(json.dumps({name: r.get("summary", {}) for name, r in results.items()}, indent=2))
    return 0
