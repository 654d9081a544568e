"""Decode attention over a paged KV cache, split across the context (flash-decoding).

One program reads one KV head of one sequence over one split of its context, for all the query
heads that share that KV head (GQA heads are the M rows of a tensor-core dot), so each KV byte is
read once. Long contexts at small batch are split so the GPU has enough programs; the splits'
partials are merged by log-sum-exp in the same launch, by whichever live split of a (sequence, KV
head) finishes last (an atomic count that split resets). The split count depends only on tensor
shapes, so a call can be captured in a CUDA graph; at run time a split past the context exits at
once and a context that fits one split writes its output directly, so a block table padded for
the graph costs little at short contexts. Block sizes are fixed, not
autotuned, because autotuning would time kernels (and synchronise) on the first call.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .partials import LOG2E, attend_paged_range, dot_options, merge_partials

BLOCK_N = 64  # tokens per inner step
MIN_SPLIT = 256  # fewest tokens worth a split of their own
PROGRAMS_PER_SM = 2  # split until about this many programs per SM are in flight
PREFETCH = True  # load the next step's block ids one step ahead (see attend_paged_range)
MERGE_IN_KERNEL = True  # the last split of a (sequence, KV head) merges; False: a separate merge launch


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, count_ptr,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb,
    stride_ms, stride_as, stride_ah, stride_ob, stride_oh,
    qk_scale, split_len, n_kv_heads,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_S: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One (sequence, KV head, split). With ``MERGE`` a split past the context does nothing, a
    context that fits one split is written out directly, and otherwise the last live split to
    finish (an atomic count per sequence and KV head, reset by that split) merges the partials."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + b)
    start = split * split_len
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_h
    live = offs_h < GROUP
    if MERGE:
        active = start < context
    else:
        active = start >= 0  # every split writes a partial (empty ones too) for the merge launch
    if active:
        end = tl.minimum(context, start + split_len)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=live[:, None], other=0.0)
        q = q.to(k_cache_ptr.dtype.element_ty)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        m, l, acc = attend_paged_range(
            q, m, l, acc, k_cache_ptr, v_cache_ptr, tables_ptr + b * stride_tb, start, end, kv_head,
            stride_kb, stride_ko, stride_kh, qk_scale,
            PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
            PREFETCH=PREFETCH,
        )
        n_live = tl.cdiv(context, split_len)
        if SPLITS == 1:
            direct = n_live >= 1
        elif MERGE:
            direct = n_live == 1
        else:
            direct = n_live < 0
        if direct:
            out = acc / l[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=live[:, None])
        else:
            slot = b * SPLITS + split
            tl.store(m_ptr + slot * stride_ms + heads, m, mask=live)
            tl.store(l_ptr + slot * stride_ms + heads, l, mask=live)
            tl.store(acc_ptr + slot * stride_as + heads[:, None] * stride_ah + offs_d[None, :], acc, mask=live[:, None])
            if MERGE:
                # Every thread's partial is stored before the count says so (release); the last
                # split reads the others' after its acquire, from L2 (.cg: not a stale L1 line).
                tl.debug_barrier()
                counter = count_ptr + b * n_kv_heads + kv_head
                done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                if done == n_live - 1:
                    tl.store(counter, 0)
                    _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, kv_head, n_live,
                                  stride_ms, stride_as, stride_ah, stride_ob, stride_oh,
                                  GROUP=GROUP, SPLITS=SPLITS, BLOCK_S=BLOCK_S, HEAD_DIM=HEAD_DIM)


@triton.jit
def _merge_splits(
    m_ptr, l_ptr, acc_ptr, out_ptr, b, kv_head, n_live,
    stride_ms, stride_as, stride_ah, stride_ob, stride_oh,
    GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """out for the query heads of one (sequence, KV head) from its first ``n_live`` split partials:
    head by head, all splits of a head in one load (the loads of all heads are independent)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < n_live
    slots = b * SPLITS + offs_s
    for g in tl.static_range(GROUP):
        head = kv_head * GROUP + g
        ms = tl.load(m_ptr + slots * stride_ms + head, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(l_ptr + slots * stride_ms + head, mask=ok, other=0.0, cache_modifier=".cg")
        ac = tl.load(acc_ptr + slots[:, None] * stride_as + head * stride_ah + offs_d[None, :],
                     mask=ok[:, None], other=0.0, cache_modifier=".cg")
        w = tl.exp2(ms - tl.max(ms, 0))
        out = tl.sum(ac * w[:, None], 0) / tl.sum(ls * w, 0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


_COUNTERS: dict = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head); the kernel leaves them zero again.

    Kept per device and reused, so a CUDA graph captures no memset; first made outside a capture
    when possible (a buffer made inside one belongs to that graph and is not kept)."""
    have = _COUNTERS.get(device)
    if have is not None and have.numel() >= n:
        return have
    size = max(n, 4096)
    fresh = torch.zeros(size, dtype=torch.int32, device=device)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _COUNTERS[device] = fresh
    return fresh


@lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (a host-side property: reading it does not synchronise)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, n_kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many splits of the context: enough programs to fill the GPU, each split >= MIN_SPLIT tokens."""
    programs = batch * n_kv_heads
    target = PROGRAMS_PER_SM * multiprocessors(device)
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), max_context // MIN_SPLIT, 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged context.

    q ``[B, Hq, D]`` sits at position ``context_lens[b] - 1`` and attends to all ``context_lens[b]``
    (>= 1) tokens; block_tables ``[B, max_blocks]`` int32; caches ``[blocks, block_size, Hkv, D]``.
    ``num_splits`` overrides the split count (tests use it; by default it follows the shapes).
    Returns ``[B, Hq, D]`` in q's dtype, accumulated in fp32.
    """
    batch, n_heads, head_dim = q.shape
    _, page, n_kv_heads, _ = k_cache.shape
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    max_context = block_tables.shape[1] * page
    splits = num_splits or decode_splits(batch, n_kv_heads, max_context, q.device)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), BLOCK_N) * BLOCK_N
    out = torch.empty_like(q)
    if batch == 0:
        return out
    merge = MERGE_IN_KERNEL and splits > 1
    if splits > 1:
        m = torch.empty(batch * splits, n_heads, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(batch * splits, n_heads, head_dim, device=q.device, dtype=torch.float32)
    else:
        m = l = acc = out  # unused: the kernel writes the output directly
    counters = _split_counters(q.device, batch * n_kv_heads) if merge else m
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    block_h = max(16, triton.next_power_of_2(group))
    block_s = max(2, triton.next_power_of_2(splits))
    _paged_decode_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, m, l, acc, out, counters,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        m.stride(0), acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, split_len, n_kv_heads,
        GROUP=group, BLOCK_H=block_h, SPLITS=splits, MERGE=merge,
        BLOCK_S=block_s, PAGE=page,
        HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, **dot_options(k_cache), PREFETCH=PREFETCH,
        num_warps=4, num_stages=2,
    )
    if splits > 1 and not merge:
        merge_partials(m, l, acc, out, splits=splits)
    return out
