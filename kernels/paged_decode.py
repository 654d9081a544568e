"""Decode attention over a paged KV cache, split across the context (flash-decoding).

One program reads one KV head of one sequence over one split of its context, for all the query
heads that share that KV head (GQA heads are the M rows of a tensor-core dot), so each KV byte is
read once. Long contexts at small batch are split so the GPU has enough programs; the splits'
partials are merged by log-sum-exp in a second kernel. Everything about the launch depends only
on tensor shapes, so a call can be captured in a CUDA graph. Block sizes are fixed, not
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


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb,
    stride_ms, stride_as, stride_ah, stride_ob, stride_oh,
    qk_scale, split_len,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + b)
    start = split * split_len
    end = tl.minimum(context, start + split_len)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_h
    live = offs_h < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=live[:, None], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    m, l, acc = attend_paged_range(
        q, m, l, acc, k_cache_ptr, v_cache_ptr, tables_ptr + b * stride_tb, start, end, kv_head,
        stride_kb, stride_ko, stride_kh, qk_scale,
        PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
    )
    if SPLITS == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None])
    else:
        slot = b * SPLITS + split
        tl.store(m_ptr + slot * stride_ms + heads, m, mask=live)
        tl.store(l_ptr + slot * stride_ms + heads, l, mask=live)
        tl.store(acc_ptr + slot * stride_as + heads[:, None] * stride_ah + offs_d[None, :], acc, mask=live[:, None])


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
    if splits > 1:
        m = torch.empty(batch * splits, n_heads, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(batch * splits, n_heads, head_dim, device=q.device, dtype=torch.float32)
    else:
        m = l = acc = out  # unused: the kernel writes the output directly
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _paged_decode_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, m, l, acc, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        m.stride(0), acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, split_len,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), SPLITS=splits, PAGE=page,
        HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, **dot_options(k_cache),
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        merge_partials(m, l, acc, out, splits=splits)
    return out
