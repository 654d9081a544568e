"""Decode attention that reads a prefix shared by several sequences once.

The engine forks a context by sharing its full KV blocks, so sequences whose block tables start
with the same block ids hold the same KV there. ``plan_shared_prefix`` finds those prefixes (a
trie over leading block ids: every node two or more sequences pass through; nested, as a system
prompt shared by all and a document shared by some) on the host. The kernel then works on
*items*: a range of tokens read by a set of sequences. For a group's prefix the item's M rows are
the group's sequences times the query heads of one KV head, stacked into one tensor-core dot, so
the prefix is read once per tile of up to ``BLOCK_M`` rows instead of once per sequence; each
sequence's own suffix is an item of one sequence. One launch runs every item (group items first,
suffix items filling in behind them); items write partials, and a last kernel merges each
sequence's partials by log-sum-exp (see ``partials``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .paged_decode import multiprocessors
from .partials import LOG2E, attend_paged_range, dot_options, merge_partials

# Tuned on the H200 by benchmarks/kernels_tune.py.
GROUP_BLOCK_M = 64  # rows of a group item: sequences x query heads per KV head
GROUP_WARPS = 4
SUFFIX_BLOCK_M = 16  # rows of a suffix item: the query heads of one KV head (the dot's minimum)
BLOCK_N = 64  # tokens per inner step
STAGES = 3
MIN_CHUNK = 256  # fewest tokens an item is split down to
PROGRAMS_PER_SM = 2  # split ranges until the launch has about this many programs per SM
PREFETCH = True  # load the next step's block ids one step ahead (see partials.attend_paged_range)
MERGE_HEADS = 1  # query heads (of one KV head) one merge program takes (1 measured fastest)
FUSED = True  # group and suffix items in one launch (False: two launches, group items first)


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences (batch rows) that share the KV of tokens ``[start, end)``, a run of whole blocks."""

    seqs: tuple[int, ...]
    start: int
    end: int


@dataclass
class SharedPrefixPlan:
    """Which prefixes a decode batch shares, found by ``plan_shared_prefix``.

    ``groups`` may nest: a sequence reads every group on its path, then its own tokens from
    ``suffix_start[s]`` to ``context_lens[s]`` (possibly none).
    """

    block_size: int
    context_lens: list[int]
    groups: list[PrefixGroup]
    suffix_start: list[int]
    _launches: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def paged_tokens(self) -> int:
        """Tokens per KV head that paged decode reads: every sequence's whole context."""
        return sum(self.context_lens)

    @property
    def shared_tokens(self) -> int:
        """Tokens per KV head the shared kernel must read: each group's range once, plus the suffixes."""
        suffixes = sum(n - s for n, s in zip(self.context_lens, self.suffix_start))
        return sum(g.end - g.start for g in self.groups) + suffixes

    def to(self, device: torch.device | str, queries_per_kv: int, n_kv_heads: int = 1) -> SharedPrefixLaunch:
        """The work items as tensors on ``device`` (cached: the engine calls once per layer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, queries_per_kv, n_kv_heads)
        if key not in self._launches:
            self._launches[key] = _build_launch(self, device, queries_per_kv, n_kv_heads)
        return self._launches[key]


def plan_shared_prefix(
    block_tables: list[list[int]], context_lens: list[int], block_size: int, min_shared_tokens: int = 1
) -> SharedPrefixPlan | None:
    """Find the prefixes a decode batch shares, or None when it shares none.

    Only full blocks count (``context_lens[s] // block_size`` of them): the engine copies a partial
    last block per sequence, so identical ids there would not mean identical KV. Groups shorter
    than ``min_shared_tokens`` are dropped (their sequences read those tokens as suffix).
    """
    n_seqs = len(context_lens)
    full = [min(n // block_size, len(t)) for n, t in zip(context_lens, block_tables)]
    suffix_start = [0] * n_seqs
    groups: list[PrefixGroup] = []
    # Depth-first over trie nodes where the set of sequences changes; each stack entry is a set of
    # >= 2 sequences that share blocks [0, depth) and whose nearest enclosing group ends at `since`.
    stack: list[tuple[list[int], int, int]] = [(list(range(n_seqs)), 0, 0)] if n_seqs >= 2 else []
    while stack:
        seqs, depth, since = stack.pop()
        first = block_tables[seqs[0]]
        while all(full[s] > depth for s in seqs) and all(block_tables[s][depth] == first[depth] for s in seqs):
            depth += 1
        if (depth - since) * block_size >= min_shared_tokens and depth > since:
            groups.append(PrefixGroup(tuple(seqs), since * block_size, depth * block_size))
            since = depth
        by_block: dict[int, list[int]] = {}
        for s in seqs:
            suffix_start[s] = since * block_size
            if full[s] > depth:
                by_block.setdefault(block_tables[s][depth], []).append(s)
        stack.extend((sub, depth, since) for sub in by_block.values() if len(sub) >= 2)
    if not groups:
        return None
    groups.sort(key=lambda g: (g.start, g.seqs))
    return SharedPrefixPlan(block_size, list(context_lens), groups, suffix_start)


@dataclass
class SharedPrefixLaunch:
    """A plan's work items on the device.

    ``items`` ``[n, 5]`` int32 rows: offset into ``item_seqs``/``item_slots``, number of
    sequences, first token, end token, and the batch row whose block table the item reads.
    Group items come first (``n_group_items``), then suffix items. Each (item, sequence) writes
    its partial to its slot; sequence b's slots are ``slot_offsets[b] ... slot_offsets[b+1]``.
    """

    items: torch.Tensor
    item_seqs: torch.Tensor
    item_slots: torch.Tensor
    slot_offsets: torch.Tensor
    n_group_items: int
    n_suffix_items: int
    n_slots: int
    max_slots: int = 16  # the most slots one sequence owns


def _chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, end)) for a in range(start, end, chunk)]


def _build_launch(plan: SharedPrefixPlan, device: torch.device, queries_per_kv: int, n_kv_heads: int) -> SharedPrefixLaunch:
    seqs_per_tile = max(1, GROUP_BLOCK_M // queries_per_kv)
    tiles = [(g, g.seqs[i : i + seqs_per_tile]) for g in plan.groups for i in range(0, len(g.seqs), seqs_per_tile)]
    suffixes = [(s, plan.suffix_start[s], n) for s, n in enumerate(plan.context_lens) if n > plan.suffix_start[s]]
    # Split long ranges so that the launch has enough programs; a tile's chunks of one group are
    # neighbours in the grid, so tiles of the same chunk run together and share it through L2.
    work = sum(g.end - g.start for g, _ in tiles) + sum(n - a for _, a, n in suffixes)
    target = max(1, PROGRAMS_PER_SM * multiprocessors(device) // n_kv_heads)
    chunk = max(MIN_CHUNK, triton.cdiv(triton.cdiv(work, target), BLOCK_N) * BLOCK_N)
    items: list[tuple[tuple[int, ...], int, int]] = []
    for g in plan.groups:
        group_tiles = [t for gg, t in tiles if gg is g]
        for a, b in _chunks(g.start, g.end, chunk):
            items.extend((t, a, b) for t in group_tiles)
    n_group_items = len(items)
    for s, a, n in suffixes:
        items.extend(((s,), lo, hi) for lo, hi in _chunks(a, n, chunk))
    per_seq: list[list[int]] = [[] for _ in plan.context_lens]
    rows, item_seqs, where = [], [], []
    for seqs, a, b in items:
        rows.append([len(item_seqs), len(seqs), a, b, seqs[0]])
        for s in seqs:
            where.append((s, len(per_seq[s])))
            per_seq[s].append(len(item_seqs))
            item_seqs.append(s)
    offsets = [0]
    for slots in per_seq:
        offsets.append(offsets[-1] + len(slots))
    item_slots = [offsets[s] + k for s, k in where]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
    return SharedPrefixLaunch(
        items=as_tensor(rows).reshape(-1, 5),
        item_seqs=as_tensor(item_seqs),
        item_slots=as_tensor(item_slots),
        slot_offsets=as_tensor(offsets),
        n_group_items=n_group_items,
        n_suffix_items=len(items) - n_group_items,
        n_slots=offsets[-1],
        max_slots=max(len(slots) for slots in per_seq),
    )


@triton.jit
def _item_partial(
    item, kv_head, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, items_ptr, item_seqs_ptr, item_slots_ptr,
    m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb,
    stride_ms, stride_as, stride_ah, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PREFETCH: tl.constexpr,
):
    seq_offset = tl.load(items_ptr + item * 5)
    n_seqs = tl.load(items_ptr + item * 5 + 1)
    start = tl.load(items_ptr + item * 5 + 2)
    end = tl.load(items_ptr + item * 5 + 3)
    table_row = tl.load(items_ptr + item * 5 + 4).to(tl.int64)
    # Row r is query head r % GROUP (of this KV head) of the item's sequence r // GROUP.
    rows = tl.arange(0, BLOCK_M)
    member = rows // GROUP
    live = member < n_seqs
    seq = tl.load(item_seqs_ptr + seq_offset + member, mask=live, other=0).to(tl.int64)
    slot = tl.load(item_slots_ptr + seq_offset + member, mask=live, other=0).to(tl.int64)
    heads = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=live[:, None], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m, l, acc = attend_paged_range(
        q, m, l, acc, k_cache_ptr, v_cache_ptr, tables_ptr + table_row * stride_tb, start, end, kv_head,
        stride_kb, stride_ko, stride_kh, qk_scale,
        PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        PREFETCH=PREFETCH,
    )
    tl.store(m_ptr + slot * stride_ms + heads, m, mask=live)
    tl.store(l_ptr + slot * stride_ms + heads, l, mask=live)
    tl.store(acc_ptr + slot[:, None] * stride_as + heads[:, None] * stride_ah + offs_d[None, :], acc, mask=live[:, None])


# The counts change with every batch's make-up; specialised (Triton compiles a variant for 1 and for
# multiples of 16), each new make-up could cost a compile in the middle of serving, and these steps
# run eagerly, outside CUDA graphs.
@triton.jit(do_not_specialize=["first_program", "n_group_items", "n_suffix_items"])
def _shared_prefix_items_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, items_ptr, item_seqs_ptr, item_slots_ptr,
    m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb,
    stride_ms, stride_as, stride_ah,
    qk_scale, first_program, n_group_items, n_suffix_items, n_kv_heads,
    GROUP: tl.constexpr, GROUP_M: tl.constexpr, SUFFIX_M: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Programs ``[0, n_group_items * Hkv)`` take group items (KV head-major), the rest suffix
    items, so the long group items start first and the short suffix items fill in behind them."""
    pid = first_program + tl.program_id(0)
    n_group_programs = n_group_items * n_kv_heads
    if pid < n_group_programs:
        _item_partial(
            pid % n_group_items, pid // n_group_items, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, items_ptr,
            item_seqs_ptr, item_slots_ptr, m_ptr, l_ptr, acc_ptr,
            stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, stride_ms, stride_as, stride_ah, qk_scale,
            GROUP=GROUP, BLOCK_M=GROUP_M, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, PREFETCH=PREFETCH,
        )
    else:
        r = pid - n_group_programs
        _item_partial(
            n_group_items + r % n_suffix_items, r // n_suffix_items, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr,
            items_ptr, item_seqs_ptr, item_slots_ptr, m_ptr, l_ptr, acc_ptr,
            stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, stride_ms, stride_as, stride_ah, qk_scale,
            GROUP=GROUP, BLOCK_M=SUFFIX_M, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, PREFETCH=PREFETCH,
        )


def shared_prefix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    plan: SharedPrefixPlan | SharedPrefixLaunch,
    scale: float | None = None,
) -> torch.Tensor:
    """Same result as ``paged_decode_attention``, reading each shared prefix once per group.

    ``plan`` comes from ``plan_shared_prefix`` over this batch's block tables and context lengths
    (``context_lens`` itself is not read here: the plan holds the lengths).
    """
    batch, n_heads, head_dim = q.shape
    _, page, n_kv_heads, _ = k_cache.shape
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    launch = plan.to(q.device, group, n_kv_heads) if isinstance(plan, SharedPrefixPlan) else plan
    m = torch.empty(launch.n_slots, n_heads, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(launch.n_slots, n_heads, head_dim, device=q.device, dtype=torch.float32)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    common = (
        q, k_cache, v_cache, block_tables, launch.items, launch.item_seqs, launch.item_slots, m, l, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        m.stride(0), acc.stride(0), acc.stride(1), scale * LOG2E,
    )
    options = dict(
        GROUP=group, GROUP_M=max(GROUP_BLOCK_M, triton.next_power_of_2(group)),
        SUFFIX_M=max(SUFFIX_BLOCK_M, triton.next_power_of_2(group)), PAGE=page, HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N, PREFETCH=PREFETCH, **dot_options(k_cache), num_warps=GROUP_WARPS, num_stages=STAGES,
    )
    n_group_programs = launch.n_group_items * n_kv_heads
    n_programs = n_group_programs + launch.n_suffix_items * n_kv_heads
    counts = (launch.n_group_items, launch.n_suffix_items, n_kv_heads)
    if FUSED or not n_group_programs or n_programs == n_group_programs:
        _shared_prefix_items_kernel[(n_programs,)](*common, 0, *counts, **options)
    else:
        _shared_prefix_items_kernel[(n_group_programs,)](*common, 0, *counts, **options)
        _shared_prefix_items_kernel[(n_programs - n_group_programs,)](*common, n_group_programs, *counts, **options)
    out = torch.empty_like(q)
    merge_partials(m, l, acc, out, slot_offsets=launch.slot_offsets, max_slots=launch.max_slots,
                   heads_per_program=math.gcd(group, MERGE_HEADS))
    return out


# Calibrated on the H200 (benchmarks/results/kernels_decode.md): the shared kernel pays off once
# paged decode would read this many times the tokens it reads, and the reads it saves outweigh
# its fixed cost (two launches, about 20 us against paged decode's 14). Over the 56 measured
# batches a read ratio of 4 picks shared exactly where it ran at >= 0.95x of paged (every pick
# ran at >= 1.1x); the least saving among those picks was 63 MB, so 50 MB keeps smaller batches,
# which the benchmark did not measure, on paged decode.
MIN_READ_RATIO = 4.0
MIN_SAVED_BYTES = 50e6


def choose_decode_kernel(
    plan: SharedPrefixPlan | None,
    n_kv_heads: int,
    head_dim: int = 128,
    dtype_bytes: int = 2,
    *,
    min_read_ratio: float | None = None,
    min_saved_bytes: float | None = None,
) -> str:
    """``"shared"`` when reading shared prefixes once saves enough for this batch (per layer), else ``"paged"``."""
    if plan is None:
        return "paged"
    ratio = MIN_READ_RATIO if min_read_ratio is None else min_read_ratio
    saved = MIN_SAVED_BYTES if min_saved_bytes is None else min_saved_bytes
    saved_bytes = 2 * (plan.paged_tokens - plan.shared_tokens) * n_kv_heads * head_dim * dtype_bytes
    if plan.paged_tokens >= ratio * plan.shared_tokens and saved_bytes >= saved:
        return "shared"
    return "paged"
