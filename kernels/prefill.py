"""Chunked prefill attention over a paged KV cache (flash attention with a paged K/V side).

New tokens of several sequences come packed; each has a cached prefix (a forked context, or the
earlier chunks of its prompt) whose K/V, like the new tokens', is already in the cache. Query i of
sequence s sits at ``context_lens[s] - q_len_s + i`` and sees every position up to its own. One
program takes ``BLOCK_M`` queries of one sequence and one query head. The grid is an upper bound
on the number of such tiles computed from shapes alone (``T // BLOCK_M + S``), and each program
finds its sequence by binary search, so the launch needs no host-side lengths.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .partials import LOG2E, dot_options

# Tuned on the H200 by benchmarks/kernels_tune.py.
BLOCK_M = 64
BLOCK_N = 64
WARPS = 4
STAGES = 2


@triton.jit
def _prefill_steps(
    q, m, l, acc, k_cache_ptr, v_cache_ptr, table, start, end, q_pos, kv_head,
    stride_kb, stride_ko, stride_kh, qk_scale,
    MASKED: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Fold keys ``[start, end)`` into the rows' running softmax; ``MASKED`` applies causality and the end."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        block = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row = block * stride_kb + (pos % PAGE) * stride_ko + kv_head * stride_kh
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            # Position 0 is visible to every row, so no row's max stays -inf past the first step.
            scores = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit(do_not_specialize=["n_seqs"])  # one compiled variant whatever the batch's sequence count
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, starts_ptr, lens_ptr, out_ptr,
    stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, stride_ot, stride_oh,
    qk_scale, n_seqs,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    # Sequence s owns tiles from starts[s] // BLOCK_M + s on: the last s whose first tile <= this one.
    lo = 0
    hi = n_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(starts_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    s = lo - 1
    q_start = tl.load(starts_ptr + s)
    q_len = tl.load(starts_ptr + s + 1) - q_start
    local = tile - (q_start // BLOCK_M + s)
    if local * BLOCK_M < q_len:
        context = tl.load(lens_ptr + s)
        rows = local * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < q_len
        q_pos = context - q_len + rows
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        q = q.to(k_cache_ptr.dtype.element_ty)
        if DOT_FP32:
            q = q.to(tl.float32)
        table = tables_ptr + s.to(tl.int64) * stride_tb
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # Keys before the tile's first query are visible to all its rows: those steps need no mask.
        first_q = context - q_len + local * BLOCK_M
        unmasked_end = (first_q // BLOCK_N) * BLOCK_N
        end = tl.minimum(context, first_q + BLOCK_M)
        m, l, acc = _prefill_steps(
            q, m, l, acc, k_cache_ptr, v_cache_ptr, table, 0, unmasked_end, q_pos, kv_head,
            stride_kb, stride_ko, stride_kh, qk_scale,
            MASKED=False, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        )
        m, l, acc = _prefill_steps(
            q, m, l, acc, k_cache_ptr, v_cache_ptr, table, unmasked_end, end, q_pos, kv_head,
            stride_kb, stride_ko, stride_kh, qk_scale,
            MASKED=True, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        )
        out = acc / l[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the new tokens ``q [T, Hq, D]`` of S packed sequences over their paged KV.

    ``query_start_loc`` ``[S+1]`` int32 is cumulative; ``context_lens`` ``[S]`` int32 counts each
    sequence's KV including its new tokens (already written with ``write_kv_cache``).
    Returns ``[T, Hq, D]`` in q's dtype.
    """
    n_tokens, n_heads, head_dim = q.shape
    _, page, n_kv_heads, _ = k_cache.shape
    n_seqs = query_start_loc.shape[0] - 1
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    if n_tokens == 0 or n_seqs == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _paged_prefill_kernel[(n_tokens // BLOCK_M + n_seqs, n_heads)](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E, n_seqs,
        GROUP=n_heads // n_kv_heads, PAGE=page, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        **dot_options(k_cache), num_warps=WARPS, num_stages=STAGES,
    )
    return out
