"""Attention backends: how a forward reads and writes K/V.

``CausalAttention`` attends within the tokens of one forward (no cache): it scores
whole prompts, as a Hugging Face forward does. ``PagedAttention`` is the engine's:
new K/V go into the paged pool and each sequence attends over its own blocks, with
the Triton kernels on CUDA. Without them (on the CPU) it gathers each sequence's whole blocks
(one copy per block, not per token) and runs PyTorch's fused CPU attention
(``scaled_dot_product_attention``, grouped-query heads without repeating K/V);
the torch references in ``kernels.reference`` are the specification both are
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq, D]."""
        ...


class CausalAttention:
    """Plain causal self-attention over the forward's own tokens, as one sequence."""

    def attend(self, layer, q, k, v, meta=None) -> torch.Tensor:
        n_rep = q.shape[1] // k.shape[1]
        keys = k.transpose(0, 1).repeat_interleave(n_rep, dim=0)
        values = v.transpose(0, 1).repeat_interleave(n_rep, dim=0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True)
        return out.transpose(0, 1)


@dataclass
class AttentionMetadata:
    """Where a batch's tokens sit in the paged pool.

    Tokens are packed decode-first: the first `num_decode` tokens are one query
    each of `num_decode` sequences; the rest are prefill chunks of the others.
    """

    slot_mapping: torch.Tensor  # [T] int64: pool slot each new token's K/V goes to
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [num_decode] int32, including the new token
    prefill_block_tables: torch.Tensor | None  # [S, max_blocks] int32
    prefill_query_start_loc: torch.Tensor | None  # [S + 1] int32, offsets within the prefill tokens
    prefill_context_lens: torch.Tensor | None  # [S] int32, including the new tokens
    shared_plan: Any = None  # a kernels.SharedPrefixPlan when decode should read shared prefixes once


class PagedAttention:
    """Attention over a paged KV pool of shape [layers, blocks, block_size, Hkv, D]."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, use_triton: bool) -> None:
        import kernels

        self.k_pool, self.v_pool = k_pool, v_pool
        self.use_triton = use_triton
        if use_triton:
            self._write = kernels.write_kv_cache
            self._decode = kernels.paged_decode_attention
            self._shared = kernels.shared_prefix_decode_attention
            self._prefill = kernels.paged_prefill_attention
        else:
            self._write = cpu_write_kv_cache
            self._decode = cpu_paged_decode_attention
            self._shared = None
            self._prefill = cpu_paged_prefill_attention

    def attend(self, layer, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = self.k_pool[layer], self.v_pool[layer]
        self._write(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode
        if nd == q.shape[0]:
            return self._decode_part(q, k_cache, v_cache, meta)
        if nd == 0:
            return self._prefill_part(q, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        out[:nd] = self._decode_part(q[:nd], k_cache, v_cache, meta)
        out[nd:] = self._prefill_part(q[nd:], k_cache, v_cache, meta)
        return out

    def _decode_part(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        if meta.shared_plan is not None and self._shared is not None:
            return self._shared(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, meta.shared_plan
            )
        return self._decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens)

    def _prefill_part(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        return self._prefill(
            q,
            k_cache,
            v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_context_lens,
        )


def cpu_write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store ``k``, ``v`` ``[T, Hkv, D]`` at ``slot_mapping`` (every slot real: no padded rows on a CPU)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of the sequences whose block tables are given: [S, Hkv, length, D]."""
    n = -(-length // cache.shape[1])
    blocks = cache[block_table[:, :n].long()]  # [S, n, block, Hkv, D]
    return blocks.flatten(1, 2)[:, :length].transpose(1, 2)


def cpu_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens) -> torch.Tensor:
    """One query per sequence ``q [S, Hq, D]`` over its cached tokens (kernels.reference's contract)."""
    lens = context_lens.tolist()
    length = max(lens)
    k = _gather_blocks(k_cache, block_tables, length)
    v = _gather_blocks(v_cache, block_tables, length)
    mask = None
    if min(lens) != length:  # shorter sequences see only their own tokens
        mask = (torch.arange(length, device=q.device) < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None].to(k.dtype), k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0].to(q.dtype)


def cpu_paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens) -> torch.Tensor:
    """New tokens ``q [T, Hq, D]`` of packed sequences over their cached prefix and, causally, themselves."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, length in enumerate(context_lens.tolist()):
        a, b = starts[s], starts[s + 1]
        n = b - a
        if n == 0:
            continue
        k = _gather_blocks(k_cache, block_tables[s : s + 1], length)
        v = _gather_blocks(v_cache, block_tables[s : s + 1], length)
        qs = q[a:b].transpose(0, 1)[None].to(k.dtype)  # [1, Hq, n, D]
        if n == length:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
        else:  # query i sits at position length - n + i and sees every key up to it
            mask = torch.arange(length, device=q.device)[None, :] <= torch.arange(length - n, length, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out
