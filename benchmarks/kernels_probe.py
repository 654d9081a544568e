"""Focused timings of the decode kernels: a few shapes, kernel variants side by side.

Run on a CUDA machine: ``python benchmarks/kernels_probe.py [--base DIR] [--part shared|paged|all]``.
``--base`` names a directory holding an older copy of the kernels as a package ``kernels_base``
(for before/after in one run). Shared-prefix decode: the module constants of ``kernels.shared_prefix``
swept on the shapes the goals name. Paged decode: latency per call at short contexts with the
block table padded to 256 blocks (as in a CUDA graph of max_seq_len 4096), eager and captured.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels_decode as bench  # noqa: E402

import kernels  # noqa: E402
from kernels import paged_decode, reference, shared_prefix  # noqa: E402
from kernels.partials import merge_partials  # noqa: E402

SHARED_SHAPES = [  # (name, groups, suffix, kv heads)
    ("8B B128 8k s64 H8", [(8192, [(0, 128)])], 64, 8),
    ("B64 16k s256 H8", [(16384, [(0, 64)])], 256, 8),
    ("nested 1k+3x10kx32 s64 H8", [(1024, [(10240, 32)] * 3)], 64, 8),
    ("B64 16k s256 H32", [(16384, [(0, 64)])], 256, 32),
    ("B8 2k s64 H8", [(2048, [(0, 8)])], 64, 8),
    ("B4 4k s64 H32", [(4096, [(0, 4)])], 64, 32),
    ("B256 128 s128 H32", [(128, [(0, 256)])], 128, 32),
]
# Group-item variants tried against the committed constants: (group rows, warps, stages, BLOCK_N),
# fused with the suffix items or in a launch of their own, and programs per SM.
SHARED_VARIANTS = [
    {},
    {"PROGRAMS_PER_SM": 1},
    {"PROGRAMS_PER_SM": 4},
    {"FUSED": False},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 8},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 8, "PROGRAMS_PER_SM": 1},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 8, "GROUP_STAGES": 2},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 8, "GROUP_BLOCK_N": 32},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 4, "GROUP_BLOCK_N": 32},
    {"FUSED": False, "GROUP_BLOCK_M": 64, "GROUP_WARPS": 4, "GROUP_STAGES": 4, "GROUP_BLOCK_N": 32},
    {"FUSED": False, "GROUP_BLOCK_M": 256, "GROUP_WARPS": 8, "GROUP_STAGES": 2, "GROUP_BLOCK_N": 32},
    {"FUSED": False, "GROUP_BLOCK_M": 128, "GROUP_WARPS": 8, "SUFFIX_BLOCK_N": 32, "SUFFIX_STAGES": 4},
]


def us(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def graph_us(fn, calls: int = 32) -> float:
    """Microseconds per call of ``fn`` replayed ``calls`` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=5, rep=60, return_mode="median") * 1e3 / calls


def set_consts(module, config: dict) -> None:
    for name, value in config.items():
        setattr(module, name, value)


def shared_part(base, gen) -> None:
    """Each variant's GPU time (graph replays, L2 flushed) on every shape, against paged decode."""
    names = {n for v in SHARED_VARIANTS for n in v}
    defaults = {n: getattr(shared_prefix, n) for n in names}
    batches = [(name, bench.Batch(groups, suffix, n_kv, gen)) for name, groups, suffix, n_kv in SHARED_SHAPES]
    print("paged GPU us: " + " ".join(
        f"{name} {bench.gpu_us(lambda: kernels.paged_decode_attention(b.q, b.k, b.v, b.block_tables, b.context_lens)):.1f}"
        for name, b in batches), flush=True)
    for variant in SHARED_VARIANTS:
        set_consts(shared_prefix, {**defaults, **variant})
        times = []
        for name, b in batches:
            b.plan._launches.clear()
            args = (b.q, b.k, b.v, b.block_tables, b.context_lens)
            try:
                out = shared_prefix.shared_prefix_decode_attention(*args, b.plan)
                ref = kernels.paged_decode_attention(*args)
                err = (out.float() - ref.float()).abs().max().item()
                t = bench.gpu_us(lambda: shared_prefix.shared_prefix_decode_attention(*args, b.plan))
            except Exception as exc:  # noqa: BLE001 (a variant the compiler rejects: registers, shared memory)
                print(f"{variant}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                times = None
                break
            times.append((t, err))
        if times:
            geo = math.exp(sum(math.log(t) for t, _ in times) / len(times))
            print(f"shared {variant or 'committed'}: " + " ".join(f"{t:.1f}" for t, _ in times)
                  + f" | geomean {geo:.1f} | max err {max(e for _, e in times):.1e}", flush=True)
    set_consts(shared_prefix, defaults)
    # Where the time goes on the first shape: the merge alone.
    name, b = batches[0]
    b.plan._launches.clear()
    launch = b.plan.to(b.q.device, bench.HEADS // b.n_kv, b.n_kv)
    m = torch.zeros(launch.n_slots, bench.HEADS, device="cuda")
    l = torch.ones_like(m)
    acc = torch.zeros(launch.n_slots, bench.HEADS, bench.DIM, device="cuda")
    out = torch.empty_like(b.q)
    t = bench.gpu_us(lambda: merge_partials(m, l, acc, out, slot_offsets=launch.slot_offsets, max_slots=launch.max_slots,
                                            heads_per_program=math.gcd(bench.HEADS // b.n_kv, shared_prefix.MERGE_HEADS)))
    print(f"{name}: merge alone {t:.1f} us over {launch.n_slots} slots; group items {launch.group_items}, "
          f"suffix items {launch.suffix_items} per KV head", flush=True)


def paged_part(base, gen) -> None:
    n_kv, heads, dim, page, width = 32, 32, 128, 16, 256
    print("| batch | context | table width | variant | eager us | graph us/call | max err |", flush=True)
    for batch, context in ((1, 128), (8, 128), (1, 1024), (8, 1024), (1, 4096), (8, 4096), (32, 4096), (64, 1024)):
        blocks = batch * width
        k = torch.randn(blocks, page, n_kv, dim, generator=gen).to(torch.bfloat16).cuda()
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, dim, generator=gen).to(torch.bfloat16).cuda()
        full = torch.randperm(blocks, generator=gen).to(torch.int32).view(batch, width).cuda()
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        need = math.ceil(context / page)
        ref = reference.reference_paged_decode_attention(q, k, v, full, lens).float()
        for w in sorted({need, width}):
            tables = full[:, :w].contiguous()
            variants = []
            if base is not None:
                variants.append(("base", lambda: base.paged_decode_attention(q, k, v, tables, lens)))
            for prefetch, merge in ((True, True), (True, False)):
                def call(prefetch=prefetch, merge=merge):
                    paged_decode.PREFETCH, paged_decode.MERGE_IN_KERNEL = prefetch, merge
                    return paged_decode.paged_decode_attention(q, k, v, tables, lens)
                variants.append((f"prefetch={prefetch} merge_in_kernel={merge}", call))
            for label, fn in variants:
                err = (fn().float() - ref).abs().max().item()
                eager = us(fn)
                graphed = graph_us(fn)
                print(f"| {batch} | {context} | {w} | {label} | {eager:.1f} | {graphed:.2f} | {err:.1e} |", flush=True)
        paged_decode.PREFETCH, paged_decode.MERGE_IN_KERNEL = True, True
        del k, v
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, help="directory holding a package kernels_base")
    parser.add_argument("--part", default="all", choices=("all", "shared", "paged"))
    args = parser.parse_args()
    base = None
    if args.base:
        sys.path.insert(0, str(args.base))
        import kernels_base as base  # noqa: PLC0415
    gen = torch.Generator().manual_seed(0)
    print(torch.cuda.get_device_name(), flush=True)
    if args.part in ("all", "paged"):
        paged_part(base, gen)
    if args.part in ("all", "shared"):
        shared_part(base, gen)


if __name__ == "__main__":
    main()
