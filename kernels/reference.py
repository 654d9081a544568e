"""Torch references for every kernel: the specification the kernels are tested against.

They are vectorised (gather with padding, then one masked matmul-softmax-matmul in fp32), so the
engine also uses them as its attention path where there is no GPU. Shapes follow the kernels':
the KV cache of one layer is ``[num_blocks, block_size, n_kv_heads, head_dim]`` and token ``i`` of
sequence ``s`` lives at slot ``block_tables[s, i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

import math

import torch


def reference_write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``k``, ``v`` ``[T, Hkv, D]`` at ``slot_mapping`` ``[T]`` in place; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of every sequence: ``[S, length, Hkv, D]`` (past the end: padding)."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_tables[:, : (length + block_size - 1) // block_size].long()
    slots = blocks[:, pos // block_size] * block_size + pos % block_size
    return cache.view(-1, *cache.shape[2:])[slots]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[S, Q, Hq, D]``, k/v ``[S, L, Hkv, D]``, allowed ``[S, Q, L]`` -> ``[S, Q, Hq, D]`` in fp32.

    Query heads are grouped over their KV head instead of repeating K/V, so GQA costs no copy.
    """
    n_seqs, n_q, n_heads, dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    qg = q.float().reshape(n_seqs, n_q, n_kv, group, dim)
    scores = torch.einsum("sqhgd,slhd->shgql", qg, k.float()) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("shgql,slhd->sqhgd", probs, v.float())
    return out.reshape(n_seqs, n_q, n_heads, dim)


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per sequence ``q [B, Hq, D]`` over its ``context_lens[s]`` cached tokens."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    length = int(context_lens.max())
    k = _gather_kv(k_cache, block_tables, length)
    v = _gather_kv(v_cache, block_tables, length)
    allowed = torch.arange(length, device=q.device)[None, None, :] < context_lens.long()[:, None, None]
    return _attend(q[:, None], k, v, allowed, scale)[:, 0].to(q.dtype)


def reference_shared_prefix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    plan: object = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same result as paged decode: sharing a prefix changes how KV is read, not the answer."""
    return reference_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def reference_paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """New tokens ``q [T, Hq, D]`` of S packed sequences over their cached prefix and, causally, each other.

    Query ``i`` of sequence ``s`` sits at position ``context_lens[s] - q_len_s + i``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    n_seqs = q_lens.shape[0]
    max_q = int(q_lens.max()) if n_seqs else 0
    if max_q == 0:
        return torch.empty_like(q)
    length = int(context_lens.max())
    # Padded query index per (sequence, row); rows past a sequence's end read its last token and are dropped.
    row = torch.arange(max_q, device=q.device)
    valid = row[None, :] < q_lens[:, None]
    token = torch.where(valid, starts[:-1, None] + row[None, :], starts[:-1, None].clamp(max=q.shape[0] - 1))
    qpad = q[token]  # [S, max_q, Hq, D]
    q_pos = context_lens.long()[:, None] - q_lens[:, None] + row[None, :]
    k_pos = torch.arange(length, device=q.device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < context_lens.long()[:, None, None])
    k = _gather_kv(k_cache, block_tables, length)
    v = _gather_kv(v_cache, block_tables, length)
    out = _attend(qpad, k, v, allowed, scale)
    return out[valid].to(q.dtype)


# --------------------------------------------------------------------------- #
# Layer ops (kernels.fused): the model's CPU path uses these as they are.
# --------------------------------------------------------------------------- #

def reference_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * norm(h), h)`` with ``h = x + residual``: Hugging Face's LlamaRMSNorm, fp32 inside."""
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * normed, h


def reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ``[T, heads, head_dim]`` by position: pairs are (i, i + head_dim/2) (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
