"""Writing new tokens' K and V into the paged cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,  # cache strides per slot and per head (both caches share a layout)
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        mask = (h < N_HEADS)[:, None]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``k``, ``v`` ``[T, Hkv, D]`` at ``slot_mapping`` ``[T]`` (block * block_size + offset) in place.

    A negative slot is skipped (padding tokens of a captured batch).
    """
    n_tokens, n_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == 1
    # One slot is block_size tokens apart from the next block's first slot only if a block's tokens are
    # contiguous, which the [blocks, block_size, heads, dim] layout guarantees.
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
    _write_kv_cache_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        N_HEADS=n_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(n_heads),
    )
