"""Engine benchmark on a GPU: a Llama-2-7B-shaped model with random bf16 weights.

Measures, in one run:
  1. decode step time at batch 1, 8, 64 (whole engine step: graph replay, sampling,
     bookkeeping), against the weight-read floor (weight bytes / copy bandwidth);
  2. prefill throughput and model FLOP utilisation at 2k and 8k prompt tokens;
  3. 64 sequences forked from one 4k context versus 64 independent copies of it:
     KV memory held and decode tokens/s, side by side;
  4. 64 sequences sharing an 8k prefix: decode tokens/s with the shared-prefix
     kernel on and off.

    python benchmarks/engine_bench.py [--out benchmarks/results/engine_bench.md] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_server.engine.engine import Engine, EngineConfig, GenSegment, TextSegment  # noqa: E402
from engine_server.engine.model import build_random_model, llama2_7b_config  # noqa: E402
from engine_server.engine.sampler import SamplingParams  # noqa: E402


class IdTokenizer:
    """Text of space-separated integers <-> those ids: prompts of exact token counts."""

    bos_id = 1
    eos_id = 2
    eos_ids = frozenset({2})
    add_bos = True
    vocab_size = 32000

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    encode_continuation = encode

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))

    def incremental_decoder(self):
        class D:
            def push(self, t: int) -> str:
                return f" {t}"

            def flush(self) -> str:
                return ""

        return D()


def prompt(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(map(str, torch.randint(3, 32000, (n,), generator=g).tolist()))


def gen(n: int) -> GenSegment:
    return GenSegment("out", SamplingParams(max_tokens=n, ignore_eos=True))


def sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw


def release(engine: Engine) -> None:
    """Give an engine's pool and graphs back before the next one sizes its pool."""
    engine.reset()
    # The caller's name still points at the engine: drop what holds device memory now.
    engine.graphs = engine.attention = None
    engine.pool.k = engine.pool.v = None
    gc.collect()
    torch.cuda.empty_cache()


def until_decoding(engine: Engine) -> None:
    """Step until every running sequence decodes and no waiting one can be admitted."""

    def prefilling() -> bool:
        return any(s.pending > 1 or s.output is None for s in engine.running)

    while True:
        if prefilling():
            engine.step()
            continue
        if not engine.waiting or len(engine.running) >= engine.config.max_running:
            return
        waiting = len(engine.waiting)
        engine.step()
        if len(engine.waiting) == waiting and not prefilling():
            return  # the rest wait for memory


def time_steps(engine: Engine, steps: int) -> float:
    """Seconds per engine step, all running sequences decoding."""
    until_decoding(engine)
    for _ in range(3):
        engine.step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return (time.perf_counter() - t) / steps


def decode_bench(model, rows: list, weight_bytes: int, bw: float, steps: int) -> None:
    kv_per_token = model.config.kv_bytes_per_token(model.dtype)
    for batch in (1, 8, 64):
        engine = Engine(model, IdTokenizer(), EngineConfig(max_running=64, num_blocks=2048, token_budget=8192))
        engine.warmup()
        for i in range(batch):
            engine.add(f"d{i}", [TextSegment(prompt(128, i)), gen(steps + 64)])
        until_decoding(engine)
        before = sum(seq.num_computed + 1 for seq in engine.running)
        s = time_steps(engine, steps)
        after = sum(seq.num_computed for seq in engine.running)
        # Bytes a step must read: every weight once, plus each sequence's K/V (mean over the run).
        floor_ms = (weight_bytes + (before + after) / 2 * kv_per_token) / bw * 1e3
        graph = engine.graphs.graphs[next(b for b in engine.graphs.sizes if b >= batch)]
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        sync()
        replay = (time.perf_counter() - t) / steps
        rows.append((batch, floor_ms, s * 1e3, s * 1e3 / floor_ms, batch / s, replay * 1e3, replay * 1e3 / floor_ms))
        release(engine)


def prefill_bench(model, cfg, rows: list) -> None:
    engine = Engine(model, IdTokenizer(), EngineConfig(max_running=8, num_blocks=4096, token_budget=8192, cuda_graphs=False))
    for n in (2048, 8192):
        for rep in range(3):  # the first pass compiles
            engine.add(f"p{n}-{rep}", [TextSegment(prompt(n - 1, n + rep)), gen(1)])
            sync()
            t = time.perf_counter()
            engine.step()  # one forward: the whole prompt (token budget 8192)
            sync()
            dt = time.perf_counter() - t
            while engine.has_work():
                engine.step()
        params = cfg.num_params() - cfg.vocab_size * cfg.dim  # embeddings are a lookup, not a matmul
        attn = 2 * cfg.n_layers * n * n * cfg.n_heads * cfg.head_dim  # QK^T and PV, causal half of 4*
        flops = 2 * params * n + attn
        rows.append((n, dt * 1e3, n / dt, flops / dt / 1e12))
    release(engine)


def fork_bench(model, cfg, rows: list, context: int, n_seqs: int, decode_steps: int, variants) -> None:
    kv_per_token = cfg.kv_bytes_per_token(model.dtype)
    base = prompt(context, 7)
    for name, keyed, shared in variants:
        engine = Engine(
            model, IdTokenizer(),
            EngineConfig(max_running=n_seqs, token_budget=8192, shared_prefix_kernel=shared),
        )  # fmt: skip
        engine.warmup()
        if keyed:  # one request computes the context and caches it; the others fork it
            engine.run([TextSegment(base, "ctx"), gen(1)])
        for i in range(n_seqs):
            engine.add(f"f{i}", [TextSegment(base, "ctx" if keyed else ""), TextSegment(prompt(16, 100 + i)), gen(decode_steps + 16)])
        sync()
        t0 = time.perf_counter()
        until_decoding(engine)
        sync()
        admit_s = time.perf_counter() - t0
        running = len(engine.running)
        used = engine.pool.num_used * engine.pool.block_size * kv_per_token
        s = time_steps(engine, decode_steps)
        rows.append((name, running, used / 2**30, admit_s, running / s, s * 1e3))
        release(engine)


def measured_commit(given: str | None) -> str:
    """The commit a report names: ``--commit`` when given, else this checkout's HEAD ("unknown" outside git)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return given or head.stdout.strip() or "unknown"


def write_report(text: str, path: str) -> None:
    """Print the report and write it to ``path`` (its folder made if missing)."""
    print(text)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine_bench.md")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--commit", help="the commit being measured (default: git rev-parse HEAD here)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("engine_bench needs a CUDA device", file=sys.stderr)
        return 2
    steps = 20 if args.quick else 100
    # Llama-2-7B's weights; a longer position limit so 8k prompts fit (RoPE needs no table).
    cfg = dataclasses.replace(llama2_7b_config(), max_seq_len=16384)
    t = time.perf_counter()
    model = build_random_model(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    build_s = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth()
    floor_ms = weight_bytes / bw * 1e3

    decode_rows: list = []
    decode_bench(model, decode_rows, weight_bytes, bw, steps)
    prefill_rows: list = []
    prefill_bench(model, cfg, prefill_rows)
    fork_rows: list = []
    fork_bench(model, cfg, fork_rows, 4096, 64, steps // 2,
               [("forked from one 4k context", True, None), ("64 independent copies", False, None)])  # fmt: skip
    shared_rows: list = []
    fork_bench(model, cfg, shared_rows, 8192, 64, steps // 2,
               [("shared-prefix kernel on (engine's choice)", True, None), ("shared-prefix kernel off", True, False)])  # fmt: skip

    commit = measured_commit(args.commit)
    dev = torch.cuda.get_device_name()
    lines = [
        "# Engine benchmark",
        "",
        f"Command: `python benchmarks/engine_bench.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {dev}, torch {torch.__version__}; commit {commit}  ",
        f"Model: Llama-2-7B shape ({cfg.num_params() / 1e9:.2f} B parameters), random bf16 weights "
        f"(built in {build_s:.1f} s); block size 16; CUDA graphs for decode.  ",
        f"Weight bytes {weight_bytes / 1e9:.2f} GB; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
        f"weight-read floor {floor_ms:.2f} ms/step (batch 1 adds only its K/V).",
        "",
        "## Decode step (128-token prompts; whole engine step incl. sampling)",
        "",
        "The floor is the bytes a step must read (all weights, plus every sequence's K/V at its mean",
        "context over the timed steps) over the measured copy bandwidth.",
        "",
        "| batch | floor ms | ms/step | x floor | tokens/s | forward alone (graph replay) ms | x floor |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {b} | {f:.2f} | {ms:.2f} | {x:.2f} | {tps:.0f} | {r:.2f} | {rx:.2f} |"
            for b, f, ms, x, tps, r, rx in decode_rows
        ],
        "",
        "## Prefill (one prompt, one forward)",
        "",
        "| tokens | ms | tokens/s | TFLOP/s | MFU vs 790 TFLOP/s measured matmul | MFU vs 989 peak |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {ms:.1f} | {tps:.0f} | {tf:.0f} | {tf / 790:.0%} | {tf / 989:.0%} |" for n, ms, tps, tf in prefill_rows],
        "",
        "## 64 sequences over one 4k context (16-token own suffix each, then decode)",
        "",
        "| variant | sequences running | KV held (GiB) | prefill/admit s | decode tokens/s | ms/step |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {n} | {r} | {g:.2f} | {a:.2f} | {tps:.0f} | {ms:.2f} |" for n, r, g, a, tps, ms in fork_rows],
        "",
        "## 64 sequences forked from one 8k prefix: shared-prefix decode kernel on vs off",
        "",
        "| variant | sequences running | KV held (GiB) | prefill/admit s | decode tokens/s | ms/step |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {n} | {r} | {g:.2f} | {a:.2f} | {tps:.0f} | {ms:.2f} |" for n, r, g, a, tps, ms in shared_rows],
        "",
    ]
    write_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
