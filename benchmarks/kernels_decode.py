"""Decode attention over shared prefixes: the shared-prefix kernel against paged decode and naive SDPA.

Run on a CUDA machine: ``python benchmarks/kernels_decode.py --out benchmarks/results/kernels_decode.md``.
Per layer, bf16, 32 query heads of 128, KV heads 8 or 32. "Must-read bytes" are what any kernel
has to read: 2 (K, V) x tokens x kv_heads x head_dim x 2 bytes, each shared prefix counted once.
Naive is torch SDPA over KV materialised per sequence (the layout of an engine without prefix
sharing), timed without the materialisation. GPU times are CUDA-graph replays of the call with L2
flushed before each (what a graphed decode step pays per layer); eager times are
``triton.testing.do_bench`` medians of plain calls (host launch cost included where it dominates).
The calibration section fits ``choose_decode_kernel``'s cost model to the GPU times. A last section
times chunked prefill against SDPA.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from kernels.paged_decode import multiprocessors  # noqa: E402

PAGE = 16
HEADS = 32
DIM = 128
DTYPE = torch.bfloat16
NAIVE_LIMIT_BYTES = 80 * 2**30  # materialised K+V above this is skipped (the GPU has about 139 GiB)


def bench(fn) -> float:
    """Median microseconds of eager calls."""
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


_FLUSH: list[torch.Tensor] = []


def gpu_us(fn, calls: int = 8) -> float:
    """GPU microseconds per call: ``calls`` calls captured in a CUDA graph, each after an L2 flush,
    less the same graph of flushes alone (medians of replays)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    flush = _FLUSH[0]
    fn()
    torch.cuda.synchronize()

    def replay_us(body) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                body()
        graph.replay()
        torch.cuda.synchronize()
        t = do_bench(graph.replay, warmup=3, rep=40, return_mode="median") * 1e3
        del graph
        return t

    return max(0.0, (replay_us(fn) - replay_us(lambda: None)) / calls)


class Batch:
    """A decode batch whose sequences share prefixes given as a tree of (blocks, children)."""

    def __init__(self, groups: list[tuple[int, list[tuple[int, int]]]], suffix: int, n_kv: int, gen: torch.Generator):
        # groups: [(system prompt tokens, [(document tokens, sequences), ...]), ...]
        spans: list[list[tuple[int, int]]] = []  # per sequence: its shared token spans as (id, tokens)
        next_id = 0
        for system, docs in groups:
            sys_id, next_id = next_id, next_id + 1
            for doc, n in docs:
                doc_id, next_id = next_id, next_id + 1
                spans.extend([[(sys_id, system), (doc_id, doc)] for _ in range(n)])
        n_seqs = len(spans)
        shared_blocks = {sid: tokens // PAGE for s in spans for sid, tokens in s}
        own_blocks = math.ceil(suffix / PAGE)
        n_blocks = sum(shared_blocks.values()) + n_seqs * own_blocks
        ids = torch.randperm(n_blocks, generator=gen).tolist()
        owned: dict[int, list[int]] = {}
        for sid, count in shared_blocks.items():
            owned[sid], ids = ids[:count], ids[count:]
        self.tables = []
        for s in spans:
            row = [b for sid, _ in s for b in owned[sid]]
            mine, ids = ids[:own_blocks], ids[own_blocks:]
            self.tables.append(row + mine)
        self.context = [sum(t for _, t in s) + suffix for s in spans]
        self.k = torch.randn(n_blocks, PAGE, n_kv, DIM, generator=gen).to(DTYPE).cuda()
        self.v = torch.randn(n_blocks, PAGE, n_kv, DIM, generator=gen).to(DTYPE).cuda()
        self.q = torch.randn(n_seqs, HEADS, DIM, generator=gen).to(DTYPE).cuda()
        self.block_tables = torch.tensor(self.tables, dtype=torch.int32).cuda()
        self.context_lens = torch.tensor(self.context, dtype=torch.int32).cuda()
        self.plan = kernels.plan_shared_prefix(self.tables, self.context, PAGE)
        self.n_kv = n_kv

    def token_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.n_kv * DIM * 2

    def materialised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence K, V ``[B, Hkv, L, D]`` (every sequence here has the same length)."""
        n, length = len(self.context), self.context[0]
        out = []
        for cache in (self.k, self.v):
            dense = torch.empty(n, self.n_kv, length, DIM, dtype=DTYPE, device="cuda")
            flat = cache.view(-1, self.n_kv, DIM)
            pos = torch.arange(length, device="cuda")
            for s in range(n):
                slots = self.block_tables[s, pos // PAGE].long() * PAGE + pos % PAGE
                dense[s] = flat[slots].transpose(0, 1)
            out.append(dense)
        return out[0], out[1]


HBM_BYTES_PER_US = 4.8e6  # H200 HBM3e peak
TENSOR_FLOP_PER_US = 989e6  # H200 dense bf16 peak


def run_case(name: str, groups, suffix: int, n_kv: int, gen: torch.Generator) -> dict:
    b = Batch(groups, suffix, n_kv, gen)
    args = (b.q, b.k, b.v, b.block_tables, b.context_lens)
    plan = b.plan
    paged_out = kernels.paged_decode_attention(*args)
    shared_out = kernels.shared_prefix_decode_attention(*args, plan)
    error = (paged_out.float() - shared_out.float()).abs().max().item()
    sms = multiprocessors(torch.device("cuda", 0))
    cost = kernels.decode_cost(plan, HEADS, n_kv, DIM, 2, sms)
    # The least time any kernel could take: the must-read bytes at HBM peak, or the tensor-core
    # work every (sequence, query head) row needs over its own context at peak, whichever is more.
    flops = 4 * HEADS * DIM * b.plan.paged_tokens
    bound_us = max(cost.shared_bytes / HBM_BYTES_PER_US, flops / TENSOR_FLOP_PER_US)
    row = {
        "case": name, "batch": len(b.context), "kv_heads": n_kv, "suffix": suffix,
        "read_ratio": b.plan.paged_tokens / b.plan.shared_tokens,
        "ceiling": cost.paged_bytes / HBM_BYTES_PER_US / bound_us,
        "must_read_mb": cost.shared_bytes / 1e6,
        "paged_us": gpu_us(lambda: kernels.paged_decode_attention(*args)),
        "shared_us": gpu_us(lambda: kernels.shared_prefix_decode_attention(*args, plan)),
        "paged_eager_us": bench(lambda: kernels.paged_decode_attention(*args)),
        "shared_eager_us": bench(lambda: kernels.shared_prefix_decode_attention(*args, plan)),
        "cost": cost,
        "choice": kernels.choose_decode_kernel(plan, n_kv, DIM, 2, n_heads=HEADS, sms=sms),
        "max_diff": error,
    }
    naive_bytes = cost.paged_bytes
    if naive_bytes <= NAIVE_LIMIT_BYTES:
        k, v = b.materialised()
        # Decode has one query: the query heads of a KV head are its rows, with no mask (exact GQA).
        q = b.q.view(len(b.context), n_kv, HEADS // n_kv, DIM)
        row["naive_us"] = gpu_us(lambda: F.scaled_dot_product_attention(q, k, v))
        del k, v
    else:
        row["naive_us"] = None
    del b
    torch.cuda.empty_cache()
    return row


def decode_cases():
    # The shapes the GQA goals name: Llama-3-8B (8 KV heads) at batch 128 / 8k / 64, 64 / 16k / 256,
    # and a nested batch (a 1k system prompt, 3 documents of 10k, 32 sequences each).
    yield "Llama-3-8B: 1 group, prefix 8192", [(8192, [(0, 128)])], 64, 8
    yield "nested: 1024 all, 3 docs x 10240 x 32", [(1024, [(10240, 32)] * 3)], 64, 8
    # Small batches, where the choice is close.
    for n_kv in (8, 32):
        for batch, prefix in ((2, 1024), (4, 4096), (8, 2048), (8, 512)):
            yield f"1 group, prefix {prefix}", [(prefix, [(0, batch)])], 64, n_kv
    for n_kv in (8, 32):
        for batch in (16, 64, 256):
            for prefix in (128, 1024, 4096, 16384):
                for suffix in (128, 256):
                    yield f"1 group, prefix {prefix}", [(prefix, [(0, batch)])], suffix, n_kv
    for n_kv in (8, 32):
        yield "4 groups x 16, prefix 4096", [(4096, [(0, 16)]) for _ in range(4)], 256, n_kv
        yield "16 groups x 16, prefix 4096", [(4096, [(0, 16)]) for _ in range(16)], 256, n_kv
        yield "nested: 1024 all, 4 docs x 4096 x 16", [(1024, [(4096, 16)] * 4)], 256, n_kv
        yield "nested: 4096 all, 8 docs x 8192 x 32", [(4096, [(8192, 32)] * 8)], 256, n_kv


def _nonneg_fit(features: list[list[float]], times: list[float]) -> list[float]:
    """Least squares in relative error (rows scaled by 1/time) with coefficients kept >= 0."""
    import numpy as np

    a = np.asarray(features, dtype=np.float64) / np.asarray(times)[:, None]
    live = list(range(a.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(a[:, live], np.ones(len(times)), rcond=None)
        if (coef >= 0).all():
            out = [0.0] * a.shape[1]
            for i, c in zip(live, coef):
                out[i] = float(c)
            return out
        live.pop(int(np.argmin(coef)))


def calibrate(results: list[dict]) -> dict:
    """The cost model's constants fitted to the measured GPU times (``kernels.shared_prefix`` names)."""
    paged = _nonneg_fit(
        [[1.0, r["cost"].shared_bytes, r["cost"].paged_bytes - r["cost"].shared_bytes] for r in results],
        [r["paged_us"] for r in results],
    )
    shared = _nonneg_fit(
        [[1.0, r["cost"].shared_bytes, r["cost"].shared_flops, r["cost"].partial_bytes] for r in results],
        [r["shared_us"] for r in results],
    )
    rate = lambda c: 1.0 / c if c > 0 else math.inf  # noqa: E731
    return {
        "PAGED_FIXED_US": paged[0], "PAGED_BYTES_PER_US": rate(paged[1]), "PAGED_REREAD_BYTES_PER_US": rate(paged[2]),
        "SHARED_FIXED_US": shared[0], "SHARED_BYTES_PER_US": rate(shared[1]),
        "SHARED_FLOP_PER_US": rate(shared[2]), "PARTIAL_BYTES_PER_US": rate(shared[3]),
    }


def choices_below(results: list[dict], constants: dict, floor: float = 0.95) -> list[dict]:
    """Cases where the model under ``constants`` picks a kernel slower than ``floor`` x the better one."""
    from kernels import shared_prefix

    saved = {n: getattr(shared_prefix, n) for n in constants}
    for n, v in constants.items():
        setattr(shared_prefix, n, v)
    try:
        bad = []
        for r in results:
            pick = r["cost"].pick()
            best = min(r["paged_us"], r["shared_us"])
            if best < floor * r[f"{pick}_us"]:
                bad.append(r)
        return bad
    finally:
        for n, v in saved.items():
            setattr(shared_prefix, n, v)


def constants() -> str:
    from kernels import prefill, shared_prefix

    names = {shared_prefix: ("GROUP_BLOCK_M", "GROUP_WARPS", "GROUP_STAGES", "GROUP_BLOCK_N", "SUFFIX_BLOCK_M",
                             "SUFFIX_WARPS", "SUFFIX_STAGES", "SUFFIX_BLOCK_N", "MIN_CHUNK", "PROGRAMS_PER_SM",
                             "PREFETCH", "FUSED", "MERGE_HEADS"),
             prefill: ("BLOCK_M", "BLOCK_N", "WARPS", "STAGES")}
    return "; ".join(
        f"{module.__name__.split('.')[-1]}: " + ", ".join(f"{n}={getattr(module, n)}" for n in ns) for module, ns in names.items()
    )


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def prefill_rows(gen: torch.Generator) -> list[str]:
    rows = []
    for n_kv in (8, 32):
        for n_seqs, length in ((1, 8192), (8, 2048)):
            blocks = n_seqs * length // PAGE
            k = torch.randn(blocks, PAGE, n_kv, DIM, generator=gen).to(DTYPE).cuda()
            v = torch.randn(blocks, PAGE, n_kv, DIM, generator=gen).to(DTYPE).cuda()
            tables = torch.arange(blocks, dtype=torch.int32).view(n_seqs, -1).cuda()
            q = torch.randn(n_seqs * length, HEADS, DIM, generator=gen).to(DTYPE).cuda()
            starts = torch.arange(0, n_seqs + 1, dtype=torch.int32).cuda() * length
            lens = torch.full((n_seqs,), length, dtype=torch.int32).cuda()
            ours = bench(lambda: kernels.paged_prefill_attention(q, k, v, tables, starts, lens))
            qd = q.view(n_seqs, length, HEADS, DIM).transpose(1, 2)
            kd = k.view(n_seqs, length, n_kv, DIM).transpose(1, 2).repeat_interleave(HEADS // n_kv, 1)
            vd = v.view(n_seqs, length, n_kv, DIM).transpose(1, 2).repeat_interleave(HEADS // n_kv, 1)
            sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))
            flops = 4 * n_seqs * HEADS * DIM * length * length / 2
            rows.append(f"| {n_seqs} x {length} | {n_kv} | {ours:.0f} | {flops / ours / 1e6:.0f} | {sdpa:.0f} | {sdpa / ours:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="write the markdown report here as well")
    parser.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--only", type=int, help="only the first N decode cases (a quick look)")
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill section")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    commit = args.commit or git.stdout.strip()
    lines = [
        "# Decode attention over shared prefixes (per layer)",
        "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} --out benchmarks/results/kernels_decode.md`  ",
        f"Machine: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, Python {platform.python_version()}  ",
        f"Commit: {commit or 'unknown'}; dtype bf16; {HEADS} query heads x {DIM}; block size {PAGE}.  ",
        f"Kernel constants: {constants()}.",
        "",
        "GPU us: CUDA-graph replays, L2 flushed before each call. Eager us: do_bench medians of plain calls. "
        "Must-read MB: 2 x tokens x kv_heads x 128 x 2 bytes, shared prefixes counted once. "
        "Read ratio: tokens paged decode reads / tokens the shared kernel must read (the bytes-bound "
        "ceiling of shared over naive). Ceiling: naive's bytes at HBM peak (4.8 TB/s) over the least time "
        "the shared kernel can take, the larger of its must-read bytes at HBM peak and the tensor-core "
        "work of every query row over its context at 989 TFLOP/s (GQA makes this bound). Naive: SDPA "
        "over per-sequence materialised KV ('-': it would exceed "
        f"{NAIVE_LIMIT_BYTES / 2**30:.0f} GiB). Choice: what `choose_decode_kernel` picks at this commit; "
        "choice vs best: the better kernel's GPU time over the chosen one's.",
        "",
        "| case | batch | kv heads | suffix | read ratio | ceiling | must-read MB | shared GPU us | shared TB/s "
        "| paged GPU us | naive GPU us | shared eager us | paged eager us | shared vs naive | of ceiling "
        "| shared vs paged | choice | choice vs best | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = list(decode_cases())[: args.only]
    results = []
    for name, groups, suffix, n_kv in cases:
        r = run_case(name, groups, suffix, n_kv, gen)
        results.append(r)
        vs_naive = None if r["naive_us"] is None else r["naive_us"] / r["shared_us"]
        of_ceiling = None if vs_naive is None else vs_naive / r["ceiling"]
        best = min(r["paged_us"], r["shared_us"])
        line = (
            f"| {r['case']} | {r['batch']} | {n_kv} | {suffix} | {r['read_ratio']:.1f} | {r['ceiling']:.1f} "
            f"| {r['must_read_mb']:.1f} | {r['shared_us']:.1f} | {r['must_read_mb'] / r['shared_us']:.2f} "
            f"| {r['paged_us']:.1f} | {fmt(r['naive_us'], '.1f')} | {r['shared_eager_us']:.1f} | {r['paged_eager_us']:.1f} "
            f"| {fmt(vs_naive, '.1f')}x | {fmt(of_ceiling, '.0%')} | {r['paged_us'] / r['shared_us']:.2f}x "
            f"| {r['choice']} | {best / r[r['choice'] + '_us']:.2f}x | {r['max_diff']:.1e} |"
        )
        lines.append(line)
        print(line, flush=True)
    from kernels import shared_prefix

    fitted = calibrate(results)
    committed = {n: getattr(shared_prefix, n) for n in fitted}
    lines += [
        "",
        "## Calibration of `choose_decode_kernel`",
        "",
        "The cost model (kernels/shared_prefix.py): paged us = PAGED_FIXED_US + must-read bytes / "
        "PAGED_BYTES_PER_US + bytes read again / PAGED_REREAD_BYTES_PER_US; "
        "shared us = SHARED_FIXED_US + must-read bytes / SHARED_BYTES_PER_US + tile FLOPs / "
        "SHARED_FLOP_PER_US + partial bytes / PARTIAL_BYTES_PER_US; shared is picked when its estimate "
        f"is at most SHARED_MARGIN ({shared_prefix.SHARED_MARGIN}) x paged's and at least MIN_SAVED_US "
        f"({shared_prefix.MIN_SAVED_US}) below it. Fitted here (least squares "
        "in relative error, non-negative) to the GPU times above:",
        "",
        "- fitted: " + ", ".join(f"{n}={v:.3g}" for n, v in fitted.items()),
        "- committed: " + ", ".join(f"{n}={v:.3g}" for n, v in committed.items()),
    ]
    for label, consts in (("committed", committed), ("fitted", fitted)):
        bad = choices_below(results, consts)
        lines.append(
            f"- cases where the {label} constants pick a kernel below 0.95x of the better one: {len(bad)} of {len(results)}"
            + "".join(f"; {r['case']} B{r['batch']} H{r['kv_heads']} s{r['suffix']} "
                      f"(paged {r['paged_us']:.1f}, shared {r['shared_us']:.1f})" for r in bad)
        )
    if not args.no_prefill:
        lines += [
            "",
            "## Chunked prefill (causal, from an empty cache) against SDPA (flash, KV repeated per query head)",
            "",
            "| sequences x tokens | kv heads | ours us | ours TFLOP/s | SDPA us | SDPA / ours |",
            "|---|---|---|---|---|---|",
        ]
        lines += prefill_rows(gen)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
