"""Attention over one range of paged tokens as a partial result, and the merge of partials.

A partial is, per query row, the running max ``m`` of its logits, the sum ``l`` of exponentials
below that max, and the unnormalised output ``acc``. Logits are kept in base 2: they are scaled
by ``scale * log2(e)`` so ``exp2`` can be used throughout, and ``m`` stays in those units in the
partial buffers (only the kernels here read them, and they all use ``exp2``). Partials of
disjoint token ranges merge exactly: ``M = max m_i``, ``out = sum(acc_i 2^(m_i-M)) / sum(l_i 2^(m_i-M))``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def attend_paged_range(
    q, m, l, acc,
    k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head,
    stride_kb, stride_ko, stride_kh,
    qk_scale,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Fold tokens ``[start, end)`` of one block table row into the partial ``(m, l, acc)`` of ``q``.

    ``q`` is ``[M, HEAD_DIM]`` (any rows that read the same KV head: the GQA heads of one sequence,
    or those times a group of sequences sharing these blocks); ``qk_scale`` includes ``log2(e)``.
    With ``PREFETCH`` each step loads the next step's block ids, so a step's K/V addresses are
    known when it starts and the K/V loads do not wait behind a block-table round trip.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if DOT_FP32:
        q = q.to(tl.float32)
    if PREFETCH:
        block = tl.load(table_ptr + (start + offs_n) // PAGE, mask=start + offs_n < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        if PREFETCH:
            row = block.to(tl.int64) * stride_kb + (pos % PAGE) * stride_ko + kv_head * stride_kh
            block = tl.load(table_ptr + (pos + BLOCK_N) // PAGE, mask=pos + BLOCK_N < end, other=0)
        else:
            ids = tl.load(table_ptr + pos // PAGE, mask=valid, other=0).to(tl.int64)
            row = ids * stride_kb + (pos % PAGE) * stride_ko + kv_head * stride_kh
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # Rows whose max is still -inf (nothing seen yet) must not turn into NaN: -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _merge_partials_kernel(
    m_ptr, l_ptr, acc_ptr, slot_ptr, out_ptr,
    stride_ms, stride_as, stride_ah, stride_ob, stride_oh,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
):
    """out[b, h] for ``HEADS`` consecutive heads from the partials in slots ``[first, first + n)`` of sequence b.

    With ``SPLITS > 0`` sequence b owns slots ``b * SPLITS ...``; otherwise ``slot_ptr`` holds
    offsets (CSR). One pass over the slots, ``BLOCK_S`` at a time (m, l and acc loaded together),
    rescaling the running sums when the max grows.
    """
    b = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS
    if SPLITS > 0:
        first = b * SPLITS
        count = SPLITS
    else:
        first = tl.load(slot_ptr + b)
        count = tl.load(slot_ptr + b + 1) - first
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    for g in tl.static_range(HEADS):
        h = h0 + g
        top = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for i in range(0, count, BLOCK_S):
            slot = first + i + offs_s
            live = i + offs_s < count
            mi = tl.load(m_ptr + slot * stride_ms + h, mask=live, other=float("-inf"))
            li = tl.load(l_ptr + slot * stride_ms + h, mask=live, other=0.0)
            ai = tl.load(acc_ptr + slot[:, None] * stride_as + h * stride_ah + offs_d[None, :], mask=live[:, None], other=0.0)
            new_top = tl.maximum(top, tl.max(mi, 0))
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            scale = tl.exp2(top - safe)
            w = tl.exp2(mi - safe)  # an empty partial has m = -inf, so weight 0
            l_sum = l_sum * scale + tl.sum(li * w, 0)
            acc = acc * scale + tl.sum(ai * w[:, None], 0)
            top = new_top
        out = acc / l_sum
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def merge_partials(
    m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out: torch.Tensor,
    splits: int = 0, slot_offsets: torch.Tensor | None = None, *,
    max_slots: int = 16, heads_per_program: int = 1,
) -> None:
    """Merge partials ``m``/``l`` ``[slots, H]``, ``acc`` ``[slots, H, D]`` into ``out`` ``[B, H, D]``.

    Either every sequence owns ``splits`` consecutive slots, or ``slot_offsets`` ``[B + 1]`` says
    which (then ``max_slots``, the most any sequence owns, sizes the step). ``heads_per_program``
    (a divisor of H) heads are merged by one program.
    """
    n_seqs, n_heads, head_dim = out.shape
    per_seq = splits if splits > 0 else max_slots
    _merge_partials_kernel[(n_seqs, n_heads // heads_per_program)](
        m, l, acc, slot_offsets if slot_offsets is not None else m, out,
        m.stride(0), acc.stride(0), acc.stride(1), out.stride(0), out.stride(1),
        SPLITS=splits, HEAD_DIM=head_dim, BLOCK_S=min(32, max(2, triton.next_power_of_2(per_seq))),
        HEADS=heads_per_program,
    )


def dot_options(cache: torch.Tensor) -> dict:
    """How the kernels' dots run for this cache: ``DOT_PRECISION`` and ``DOT_FP32`` constexprs.

    fp32 caches get exact fp32 dots (the references are exact). Off the GPU, Triton's interpreter
    multiplies bf16 operands as their raw uint16 bits, so there the operands are widened first.
    """
    fp32 = cache.dtype == torch.float32 or (cache.dtype == torch.bfloat16 and not cache.is_cuda)
    return {"DOT_PRECISION": "ieee" if fp32 else "tf32", "DOT_FP32": fp32}
