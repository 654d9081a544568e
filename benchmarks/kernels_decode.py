"""Decode attention over shared prefixes: the shared-prefix kernel against paged decode and naive SDPA.

Run on a CUDA machine: ``python benchmarks/kernels_decode.py --out benchmarks/results/kernels_decode.md``.
Per layer, bf16, 32 query heads of 128, KV heads 8 or 32. "Must-read bytes" are what any kernel
has to read: 2 (K, V) x tokens x kv_heads x head_dim x 2 bytes, each shared prefix counted once.
Naive is torch SDPA over KV materialised per sequence (the layout of an engine without prefix
sharing), timed without the materialisation. Times are medians of CUDA-event timings after warmup
(triton.testing.do_bench). A last section times chunked prefill against SDPA.
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

PAGE = 16
HEADS = 32
DIM = 128
DTYPE = torch.bfloat16
NAIVE_LIMIT_BYTES = 80 * 2**30  # materialised K+V above this is skipped (the GPU has about 139 GiB)


def bench(fn) -> float:
    """Median microseconds."""
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


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


def run_case(name: str, groups, suffix: int, n_kv: int, gen: torch.Generator) -> dict:
    b = Batch(groups, suffix, n_kv, gen)
    args = (b.q, b.k, b.v, b.block_tables, b.context_lens)
    paged_out = kernels.paged_decode_attention(*args)
    shared_out = kernels.shared_prefix_decode_attention(*args, b.plan)
    error = (paged_out.float() - shared_out.float()).abs().max().item()
    row = {
        "case": name, "batch": len(b.context), "kv_heads": n_kv, "suffix": suffix,
        "read_ratio": b.plan.paged_tokens / b.plan.shared_tokens,
        "must_read_mb": b.token_bytes(b.plan.shared_tokens) / 1e6,
        "paged_us": bench(lambda: kernels.paged_decode_attention(*args)),
        "shared_us": bench(lambda: kernels.shared_prefix_decode_attention(*args, b.plan)),
        "saved_bytes": b.token_bytes(b.plan.paged_tokens - b.plan.shared_tokens),
        "max_diff": error,
    }
    naive_bytes = b.token_bytes(b.plan.paged_tokens)
    if naive_bytes <= NAIVE_LIMIT_BYTES:
        k, v = b.materialised()
        # Decode has one query: the query heads of a KV head are its rows, with no mask (exact GQA).
        q = b.q.view(len(b.context), n_kv, HEADS // n_kv, DIM)
        row["naive_us"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        row["naive_tbs"] = naive_bytes / row["naive_us"] / 1e6
        del k, v
    else:
        row["naive_us"] = None
    del b
    torch.cuda.empty_cache()
    return row


def decode_cases():
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


def calibrate(results: list[dict]) -> tuple[float, float]:
    """Thresholds (read ratio, saved bytes) that never pick a losing shared run and save the most time."""
    best, best_gain = (math.inf, math.inf), 0.0
    for ratio in sorted({r["read_ratio"] for r in results}):
        for saved in sorted({r["saved_bytes"] for r in results}):
            chosen = [r for r in results if r["read_ratio"] >= ratio and r["saved_bytes"] >= saved]
            if any(r["shared_us"] > r["paged_us"] / 0.95 for r in chosen):
                continue
            gain = sum(r["paged_us"] - r["shared_us"] for r in chosen)
            if gain > best_gain:
                best, best_gain = (ratio, saved), gain
    return best


def constants() -> str:
    from kernels import prefill, shared_prefix

    names = {shared_prefix: ("GROUP_BLOCK_M", "GROUP_WARPS", "SUFFIX_BLOCK_M", "BLOCK_N", "STAGES", "MIN_CHUNK", "PROGRAMS_PER_SM",
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
        f"Commit: {commit or 'unknown'}; dtype bf16; {HEADS} query heads x {DIM}; block size {PAGE}; "
        "times are medians (us) of CUDA-event timings after warmup.  ",
        f"Kernel constants: {constants()}.",
        "",
        "Must-read MB: 2 x tokens x kv_heads x 128 x 2 bytes, shared prefixes counted once. Read ratio: "
        "tokens paged decode reads / tokens the shared kernel must read. TB/s: must-read bytes / time. "
        "Naive: SDPA over per-sequence materialised KV ('-': the materialised KV would exceed "
        f"{NAIVE_LIMIT_BYTES / 2**30:.0f} GiB). Choice: what `choose_decode_kernel` picks.",
        "",
        "| case | batch | kv heads | suffix | read ratio | must-read MB | shared us | shared TB/s | paged us | naive us "
        "| shared vs paged | shared vs naive | choice | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = [run_case(name, groups, suffix, n_kv, gen) for name, groups, suffix, n_kv in decode_cases()]
    ratio, saved = calibrate(results)
    for r in results:
        shared = r["read_ratio"] >= ratio and r["saved_bytes"] >= saved
        r["choice"] = "shared" if shared else "paged"
    for r in results:
        n_kv, suffix = r["kv_heads"], r["suffix"]
        vs_naive = None if r["naive_us"] is None else r["naive_us"] / r["shared_us"]
        line = (
            f"| {r['case']} | {r['batch']} | {n_kv} | {suffix} | {r['read_ratio']:.1f} | {r['must_read_mb']:.1f} "
            f"| {r['shared_us']:.1f} | {r['must_read_mb'] / r['shared_us']:.2f} | {r['paged_us']:.1f} "
            f"| {fmt(r['naive_us'], '.1f')} | {r['paged_us'] / r['shared_us']:.2f}x | {fmt(vs_naive, '.1f')}x "
            f"| {r['choice']} | {r['max_diff']:.1e} |"
        )
        lines.append(line)
        print(line, flush=True)
    losing = [r for r in results if r["shared_us"] > r["paged_us"] / 0.95]
    lines += [
        "",
        "## Calibration of `choose_decode_kernel`",
        "",
        "Shared is chosen when read ratio >= MIN_READ_RATIO and the bytes it saves >= MIN_SAVED_BYTES. "
        "The thresholds below are the pair (from the measured values) under which no chosen case runs "
        "below 0.95x of paged and the total time saved is largest.",
        "",
        f"- MIN_READ_RATIO = {ratio:.2f}, MIN_SAVED_BYTES = {saved:.3g}",
        "- cases where shared ran below 0.95x of paged (read ratio, saved MB): "
        + (", ".join(f"({r['read_ratio']:.1f}, {r['saved_bytes'] / 1e6:.0f})" for r in losing) or "none"),
        f"- chosen shared yet below 0.95x of paged: "
        f"{sum(1 for r in results if r['choice'] == 'shared' and r['shared_us'] > r['paged_us'] / 0.95)}",
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
