"""Pick the block sizes of the shared-prefix decode and prefill kernels on this GPU, then benchmark.

Run on a CUDA machine: ``python benchmarks/kernels_tune.py --out benchmarks/results/kernels_decode.md``.
Each candidate is timed on a few representative shapes; the one with the best geometric mean is
set and ``kernels_decode`` runs the full benchmark with it (the report lists the values in use,
which are then written into the kernels' module constants).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_decode as bench  # noqa: E402

from kernels import prefill, shared_prefix  # noqa: E402

SHARED_SHAPES = [  # (groups, suffix, kv heads)
    ([(16384, [(0, 64)])], 256, 8),
    ([(16384, [(0, 64)])], 256, 32),
    ([(4096, [(0, 16)])], 256, 8),
    ([(1024, [(0, 64)])], 128, 8),
    ([(4096, [(0, 256)])], 256, 32),
    ([(1024, [(4096, 16)] * 4)], 256, 8),
]
SHARED_GRID = {
    "GROUP_BLOCK_M": [64, 128],
    "GROUP_WARPS": [4, 8],
    "GROUP_BLOCK_N": [64, 128],
    "GROUP_STAGES": [2, 3],
    "PROGRAMS_PER_SM": [2, 4],
}
PREFILL_GRID = {"BLOCK_M": [64, 128], "BLOCK_N": [64], "WARPS": [4, 8], "STAGES": [2, 3]}


def tune_shared(gen: torch.Generator) -> dict:
    batches = [bench.Batch(groups, suffix, n_kv, gen) for groups, suffix, n_kv in SHARED_SHAPES]
    best, best_score = None, math.inf
    for values in itertools.product(*SHARED_GRID.values()):
        config = dict(zip(SHARED_GRID, values))
        if config["GROUP_BLOCK_M"] == 128 and config["GROUP_WARPS"] == 4:
            continue  # 128 rows of fp32 accumulators do not fit four warps' registers
        for name, value in config.items():
            setattr(shared_prefix, name, value)
        times = []
        for b in batches:
            b.plan._launches.clear()
            args = (b.q, b.k, b.v, b.block_tables, b.context_lens, b.plan)
            try:
                times.append(bench.bench(lambda: shared_prefix.shared_prefix_decode_attention(*args)))
            except Exception as exc:  # a config the compiler rejects (shared memory, registers)
                print(f"shared {config}: {type(exc).__name__}", flush=True)
                times = None
                break
        if times is None:
            continue
        score = math.exp(sum(math.log(t) for t in times) / len(times))
        print(f"shared {config}: {' '.join(f'{t:.1f}' for t in times)} us, geomean {score:.1f}", flush=True)
        if score < best_score:
            best, best_score = config, score
    for b in batches:
        b.plan._launches.clear()
    del batches
    torch.cuda.empty_cache()
    return best


def tune_prefill(gen: torch.Generator) -> dict:
    n_kv, n_seqs, length = 8, 4, 4096
    blocks = n_seqs * length // bench.PAGE
    k = torch.randn(blocks, bench.PAGE, n_kv, bench.DIM, generator=gen).to(bench.DTYPE).cuda()
    v = torch.randn_like(k)
    tables = torch.arange(blocks, dtype=torch.int32).view(n_seqs, -1).cuda()
    q = torch.randn(n_seqs * length, bench.HEADS, bench.DIM, generator=gen).to(bench.DTYPE).cuda()
    starts = torch.arange(0, n_seqs + 1, dtype=torch.int32).cuda() * length
    lens = torch.full((n_seqs,), length, dtype=torch.int32).cuda()
    best, best_time = None, math.inf
    for values in itertools.product(*PREFILL_GRID.values()):
        config = dict(zip(PREFILL_GRID, values))
        for name, value in config.items():
            setattr(prefill, name, value)
        try:
            t = bench.bench(lambda: prefill.paged_prefill_attention(q, k, v, tables, starts, lens))
        except Exception as exc:
            print(f"prefill {config}: {type(exc).__name__}", flush=True)
            continue
        print(f"prefill {config}: {t:.1f} us", flush=True)
        if t < best_time:
            best, best_time = config, t
    return best


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    shared = tune_shared(gen)
    for name, value in shared.items():
        setattr(shared_prefix, name, value)
    pre = tune_prefill(gen)
    for name, value in pre.items():
        setattr(prefill, name, value)
    print(f"best shared: {shared}\nbest prefill: {pre}", flush=True)
    bench.main()


if __name__ == "__main__":
    main()
