"""Decode attention that reads a prefix shared by several sequences once.

The engine forks a context by sharing its full KV blocks, so sequences whose block tables start
with the same block ids hold the same KV there. ``plan_shared_prefix`` finds those prefixes (a
trie over leading block ids: every node two or more sequences pass through; nested, as a system
prompt shared by all and a document shared by some) on the host. The kernel then works on
*items*: a range of tokens read by a set of sequences. For a group's prefix the item's M rows are
the group's sequences times the query heads of one KV head, stacked into one tensor-core dot, so
the prefix is read once per tile of up to ``GROUP_BLOCK_M`` rows instead of once per sequence;
each sequence's own suffix is an item of one sequence. Items write partials, and a last kernel
merges each sequence's partials by log-sum-exp (see ``partials``).

A launch's items live in one int32 device buffer whose first two entries count the group and
suffix items. ``SharedPrefixLaunch.static`` makes a launch of fixed capacity whose grid never
changes: programs past the counts exit at once, so a CUDA graph captured over it replays any plan
that ``fill`` fits in (the engine captures one per batch-size bucket).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from .paged_decode import multiprocessors
from .partials import LOG2E, attend_paged_range, dot_options, merge_partials

# Tuned on the H200 by benchmarks/kernels_probe.py (benchmarks/results/kernels_decode.md).
GROUP_BLOCK_M = 64  # rows of a group item: sequences x query heads per KV head
GROUP_WARPS = 4
GROUP_STAGES = 3
GROUP_BLOCK_N = 64  # tokens per inner step of a group item
SUFFIX_BLOCK_M = 16  # rows of a suffix item: the query heads of one KV head (the dot's minimum)
SUFFIX_WARPS = 4
SUFFIX_STAGES = 3
SUFFIX_BLOCK_N = 64
MIN_CHUNK = 256  # fewest tokens an item is split down to
PROGRAMS_PER_SM = 2  # split ranges until the launch has about this many programs per SM
PREFETCH = True  # load the next step's block ids one step ahead (see partials.attend_paged_range)
MERGE_HEADS = 1  # query heads (of one KV head) one merge program takes (1 measured fastest)
FUSED = True  # group and suffix items in one launch, with the group items' warps, stages and BLOCK_N
STATIC_MERGE_SLOTS = 16  # slots the merge takes per step in a static launch (it loops over more)


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

    def padded(self, n_seqs: int) -> SharedPrefixPlan:
        """This plan over ``n_seqs`` rows: the extra rows (a CUDA graph's padding) read one token each."""
        pad = n_seqs - len(self.context_lens)
        if pad <= 0:
            return self
        return SharedPrefixPlan(self.block_size, self.context_lens + [1] * pad, self.groups, self.suffix_start + [0] * pad)

    def to(self, device: torch.device | str, queries_per_kv: int, n_kv_heads: int = 1) -> SharedPrefixLaunch:
        """The work items as tensors on ``device`` (cached: the engine calls once per layer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, queries_per_kv, n_kv_heads)
        if key not in self._launches:
            self._launches[key] = SharedPrefixLaunch.build(self, device, queries_per_kv, n_kv_heads)
        return self._launches[key]


def plan_shared_prefix(
    block_tables: list[list[int]] | np.ndarray, context_lens: list[int], block_size: int, min_shared_tokens: int = 1
) -> SharedPrefixPlan | None:
    """Find the prefixes a decode batch shares, or None when it shares none.

    ``block_tables``: one list of block ids per sequence, or a 2-D array of them (rows padded).
    Only full blocks count (``context_lens[s] // block_size`` of them): the engine copies a partial
    last block per sequence, so identical ids there would not mean identical KV. Groups shorter
    than ``min_shared_tokens`` are dropped (their sequences read those tokens as suffix).
    """
    n_seqs = len(context_lens)
    if n_seqs < 2:
        return None
    widths = [len(t) for t in block_tables] if isinstance(block_tables, list) else [block_tables.shape[1]] * n_seqs
    full = [min(n // block_size, w) for n, w in zip(context_lens, widths)]
    width = max(full)
    if width == 0:
        return None
    # Block ids as a matrix; past a sequence's full blocks every entry is its own negative mark, so
    # no two sequences match there (and the last column always differs).
    ids = np.zeros((n_seqs, width + 1), dtype=np.int64)
    if isinstance(block_tables, list):
        for s, (row, n) in enumerate(zip(block_tables, full)):
            ids[s, :n] = row[:n]
    else:
        ids[:, :width] = block_tables[:, :width]
    past = np.arange(width + 1)[None, :] >= np.asarray(full)[:, None]
    ids = np.where(past, -1 - np.arange(n_seqs, dtype=np.int64)[:, None], ids)
    suffix_start = [0] * n_seqs
    groups: list[PrefixGroup] = []
    # Depth-first over trie nodes where the set of sequences changes; each stack entry is a set of
    # >= 2 sequences that share blocks [0, depth) and whose nearest enclosing group ends at `since`.
    stack: list[tuple[list[int], int, int]] = [(list(range(n_seqs)), 0, 0)]
    while stack:
        seqs, depth, since = stack.pop()
        rows = ids[seqs, depth:]
        depth += int(np.argmax((rows != rows[0]).any(axis=0)))  # the first block where they part
        if (depth - since) * block_size >= min_shared_tokens and depth > since:
            groups.append(PrefixGroup(tuple(seqs), since * block_size, depth * block_size))
            since = depth
        by_block: dict[int, list[int]] = {}
        for s in seqs:
            suffix_start[s] = since * block_size
            if full[s] > depth:
                by_block.setdefault(int(ids[s, depth]), []).append(s)
        stack.extend((sub, depth, since) for sub in by_block.values() if len(sub) >= 2)
    if not groups:
        return None
    groups.sort(key=lambda g: (g.start, g.seqs))
    return SharedPrefixPlan(block_size, list(context_lens), groups, suffix_start)


def _chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, end)) for a in range(start, end, chunk)]


def group_block_m(queries_per_kv: int) -> int:
    """Rows of a group item's tile (a power of two that holds at least one sequence's heads)."""
    return max(GROUP_BLOCK_M, triton.next_power_of_2(queries_per_kv))


def suffix_block_m(queries_per_kv: int) -> int:
    """Rows of a suffix item's tile: one sequence's query heads of a KV head, padded to the dot's minimum."""
    return max(SUFFIX_BLOCK_M, triton.next_power_of_2(queries_per_kv))


@dataclass
class _Items:
    """A plan's work items on the host (see ``SharedPrefixLaunch``)."""

    rows: np.ndarray  # [n_items, 5]
    item_seqs: np.ndarray
    item_slots: np.ndarray
    slot_offsets: np.ndarray
    n_group_items: int

    @property
    def n_suffix_items(self) -> int:
        return len(self.rows) - self.n_group_items

    @property
    def max_slots(self) -> int:
        return int(np.diff(self.slot_offsets).max())


def _chunk_size(plan: SharedPrefixPlan, seqs_per_tile: int, n_kv_heads: int, sms: int) -> int:
    """Tokens per item: long ranges are split so that the launch has about ``PROGRAMS_PER_SM``
    programs per SM (never below ``MIN_CHUNK``)."""
    work = sum(-(-len(g.seqs) // seqs_per_tile) * (g.end - g.start) for g in plan.groups)
    work += sum(n - a for a, n in zip(plan.suffix_start, plan.context_lens) if n > a)
    target = max(1, PROGRAMS_PER_SM * sms // n_kv_heads)
    return max(MIN_CHUNK, triton.cdiv(triton.cdiv(work, target), GROUP_BLOCK_N) * GROUP_BLOCK_N)


def _items(plan: SharedPrefixPlan, queries_per_kv: int, n_kv_heads: int, sms: int) -> _Items:
    seqs_per_tile = max(1, group_block_m(queries_per_kv) // queries_per_kv)
    suffixes = [(s, a, n) for s, (a, n) in enumerate(zip(plan.suffix_start, plan.context_lens)) if n > a]
    # A tile's chunks of one group are neighbours in the grid, so tiles of the same chunk run
    # together and share it through L2.
    chunk = _chunk_size(plan, seqs_per_tile, n_kv_heads, sms)
    rows: list[tuple[int, int, int, int, int]] = []
    parts: list[np.ndarray] = []
    offset = 0
    for g in plan.groups:
        spans = _chunks(g.start, g.end, chunk)
        for a, b in spans:
            for i in range(0, len(g.seqs), seqs_per_tile):
                rows.append((offset + i, min(seqs_per_tile, len(g.seqs) - i), a, b, g.seqs[i]))
            offset += len(g.seqs)
        parts.append(np.tile(np.asarray(g.seqs, dtype=np.int32), len(spans)))
    n_group = len(rows)
    own: list[int] = []
    for s, a, n in suffixes:
        for lo, hi in _chunks(a, n, chunk):
            rows.append((offset, 1, lo, hi, s))
            offset += 1
            own.append(s)
    parts.append(np.asarray(own, dtype=np.int32))
    item_seqs = np.concatenate(parts)
    # Sequence s owns slots offsets[s] ... offsets[s + 1], one per item it is in, in item order:
    # exactly the positions of its entries in a stable sort by sequence.
    order = np.argsort(item_seqs, kind="stable")
    item_slots = np.empty_like(item_seqs)
    item_slots[order] = np.arange(len(item_seqs), dtype=np.int32)
    offsets = np.zeros(len(plan.context_lens) + 1, dtype=np.int32)
    np.cumsum(np.bincount(item_seqs, minlength=len(plan.context_lens)), out=offsets[1:])
    return _Items(np.asarray(rows, dtype=np.int32).reshape(-1, 5), item_seqs, item_slots, offsets, n_group)


@dataclass
class SharedPrefixLaunch:
    """A plan's work items on the device, all views of one int32 buffer.

    ``counts`` ``[2]``: group items, suffix items. ``items`` ``[n, 5]`` rows: offset into
    ``item_seqs``/``item_slots``, number of sequences, first token, end token, and the batch row
    whose block table the item reads; group items first, then suffix items. Each (item, sequence)
    writes its partial to its slot; sequence b's slots are ``slot_offsets[b] ... slot_offsets[b+1]``.
    ``group_items``/``suffix_items`` size the launch grid (the counts, or a static launch's
    capacities), ``n_slots`` the partial buffers.
    """

    buffer: torch.Tensor
    counts: torch.Tensor
    items: torch.Tensor
    item_seqs: torch.Tensor
    item_slots: torch.Tensor
    slot_offsets: torch.Tensor
    group_items: int
    suffix_items: int
    n_slots: int
    max_slots: int  # the most slots one sequence owns (sizes the merge's step)
    queries_per_kv: int = 1
    n_kv_heads: int = 1
    host: torch.Tensor | None = None  # a static launch's pinned staging buffer

    @staticmethod
    def _layout(n_items: int, n_slots: int, n_seqs: int) -> dict[str, int]:
        """The buffer's parts, in order, and their lengths in int32s."""
        return {"counts": 2, "items": 5 * n_items, "item_seqs": n_slots, "item_slots": n_slots, "slot_offsets": n_seqs + 1}

    @classmethod
    def _views(cls, buffer, n_items: int, n_slots: int, n_seqs: int) -> dict:
        """The parts of ``buffer`` (a device tensor, or the host array it is packed in) as views."""
        views, at = {}, 0
        for name, size in cls._layout(n_items, n_slots, n_seqs).items():
            views[name] = buffer[at : at + size]
            at += size
        views["items"] = views["items"].reshape(n_items, 5)
        return views

    @classmethod
    def _pack(cls, out: np.ndarray, items: _Items, n_items: int, n_slots: int, n_seqs: int) -> None:
        """Write ``items`` into the host array ``out`` laid out for that many items, slots and rows."""
        views = cls._views(out, n_items, n_slots, n_seqs)
        views["counts"][:] = (items.n_group_items, items.n_suffix_items)
        for name, part in (("items", items.rows), ("item_seqs", items.item_seqs), ("item_slots", items.item_slots),
                           ("slot_offsets", items.slot_offsets)):  # fmt: skip
            views[name][: len(part)] = part

    @classmethod
    def build(cls, plan: SharedPrefixPlan, device: torch.device, queries_per_kv: int, n_kv_heads: int) -> SharedPrefixLaunch:
        """The launch of exactly this plan's items (one host-to-device copy)."""
        items = _items(plan, queries_per_kv, n_kv_heads, multiprocessors(device))
        n_items, n_slots, n_seqs = len(items.rows), len(items.item_seqs), len(plan.context_lens)
        host = np.empty(sum(cls._layout(n_items, n_slots, n_seqs).values()), dtype=np.int32)
        cls._pack(host, items, n_items, n_slots, n_seqs)
        buffer = torch.from_numpy(host).to(device, non_blocking=True)
        return cls(buffer, **cls._views(buffer, n_items, n_slots, n_seqs), group_items=items.n_group_items,
                   suffix_items=items.n_suffix_items, n_slots=n_slots, max_slots=items.max_slots,
                   queries_per_kv=queries_per_kv, n_kv_heads=n_kv_heads)

    @classmethod
    def static(cls, device: torch.device, n_seqs: int, queries_per_kv: int, n_kv_heads: int) -> SharedPrefixLaunch:
        """A launch of fixed capacity for ``n_seqs`` rows, for CUDA graphs; ``fill`` loads a plan.

        Capacities follow from how ``_items`` splits work: at most ``target`` chunks' worth plus one
        partial chunk per range, where a batch has one range per tile and per suffix; a plan
        with more nested groups than that is refused by ``fill`` (the engine then runs it eagerly).
        """
        target = max(1, PROGRAMS_PER_SM * multiprocessors(device) // n_kv_heads)
        group_items, suffix_items = target + 2 * n_seqs, target + n_seqs
        n_slots = n_seqs * (target + 4)
        n_items = group_items + suffix_items
        with torch.inference_mode(False):  # refilled in place every step, whatever mode the step runs in
            buffer = torch.zeros(sum(cls._layout(n_items, n_slots, n_seqs).values()), dtype=torch.int32, device=device)
            host = torch.zeros(buffer.shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        launch = cls(buffer, **cls._views(buffer, n_items, n_slots, n_seqs), group_items=group_items,
                     suffix_items=suffix_items, n_slots=n_slots, max_slots=STATIC_MERGE_SLOTS,
                     queries_per_kv=queries_per_kv, n_kv_heads=n_kv_heads, host=host)
        launch.fill(SharedPrefixPlan(16, [1] * n_seqs, [], [0] * n_seqs))  # every row reads one token
        return launch

    def fill(self, plan: SharedPrefixPlan) -> bool:
        """Load ``plan`` (padded to this launch's rows) into a static launch; False if it does not fit.

        The copy is asynchronous from a pinned buffer that the next ``fill`` rewrites: the caller
        must have synchronised with the stream in between (the engine does, reading back its
        sampled tokens every step).
        """
        n_seqs = len(self.slot_offsets) - 1
        if len(plan.context_lens) > n_seqs:
            return False
        items = _items(plan.padded(n_seqs), self.queries_per_kv, self.n_kv_heads, multiprocessors(self.buffer.device))
        if items.n_group_items > self.group_items or items.n_suffix_items > self.suffix_items or len(items.item_seqs) > self.n_slots:
            return False
        self._pack(self.host.numpy(), items, len(self.items), self.n_slots, n_seqs)
        self.buffer.copy_(self.host, non_blocking=True)
        return True


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


@triton.jit
def _shared_prefix_items_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, counts_ptr, items_ptr, item_seqs_ptr, item_slots_ptr,
    m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb,
    stride_ms, stride_as, stride_ah,
    qk_scale, n_kv_heads,
    KIND: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr, SUFFIX_M: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program per (item, KV head); the item counts are read from ``counts_ptr``, so the grid
    may be larger than the work (a static launch) and the programs past it exit.

    ``KIND`` 0: programs ``[0, n_group_items * Hkv)`` take group items (KV head-major), the next
    ones suffix items, so the long group items start first and the short suffix items fill in
    behind them. ``KIND`` 1: group items only; 2: suffix items only.
    """
    pid = tl.program_id(0)
    n_group_items = tl.load(counts_ptr)
    n_suffix_items = tl.load(counts_ptr + 1)
    if KIND == 2:
        pid += n_group_items * n_kv_heads
    n_group_programs = n_group_items * n_kv_heads
    if pid < n_group_programs:
        if KIND != 2:
            _item_partial(
                pid % n_group_items, pid // n_group_items, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, items_ptr,
                item_seqs_ptr, item_slots_ptr, m_ptr, l_ptr, acc_ptr,
                stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, stride_ms, stride_as, stride_ah,
                qk_scale, GROUP=GROUP, BLOCK_M=GROUP_M, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
                DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, PREFETCH=PREFETCH,
            )
    elif pid < n_group_programs + n_suffix_items * n_kv_heads:
        if KIND != 1:
            r = pid - n_group_programs
            _item_partial(
                n_group_items + r % n_suffix_items, r // n_suffix_items, q_ptr, k_cache_ptr, v_cache_ptr,
                tables_ptr, items_ptr, item_seqs_ptr, item_slots_ptr, m_ptr, l_ptr, acc_ptr,
                stride_qb, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, stride_ms, stride_as, stride_ah,
                qk_scale, GROUP=GROUP, BLOCK_M=SUFFIX_M, PAGE=PAGE, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N,
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
    (``context_lens`` itself is not read here: the plan holds the lengths), or is a launch made
    from one (``SharedPrefixLaunch.static`` filled with it, inside a CUDA graph).
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
        q, k_cache, v_cache, block_tables, launch.counts, launch.items, launch.item_seqs, launch.item_slots, m, l, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        m.stride(0), acc.stride(0), acc.stride(1), scale * LOG2E, n_kv_heads,
    )
    shapes = dict(
        GROUP=group, GROUP_M=group_block_m(group), SUFFIX_M=suffix_block_m(group),
        PAGE=page, HEAD_DIM=head_dim, PREFETCH=PREFETCH, **dot_options(k_cache),
    )
    group_config = dict(BLOCK_N=GROUP_BLOCK_N, num_warps=GROUP_WARPS, num_stages=GROUP_STAGES)
    if FUSED:
        n_programs = (launch.group_items + launch.suffix_items) * n_kv_heads
        if n_programs:
            _shared_prefix_items_kernel[(n_programs,)](*common, KIND=0, **shapes, **group_config)
    else:
        if launch.group_items:
            _shared_prefix_items_kernel[(launch.group_items * n_kv_heads,)](*common, KIND=1, **shapes, **group_config)
        if launch.suffix_items:
            _shared_prefix_items_kernel[(launch.suffix_items * n_kv_heads,)](
                *common, KIND=2, **shapes, BLOCK_N=SUFFIX_BLOCK_N, num_warps=SUFFIX_WARPS, num_stages=SUFFIX_STAGES
            )
    out = torch.empty_like(q)
    merge_partials(m, l, acc, out, slot_offsets=launch.slot_offsets, max_slots=launch.max_slots,
                   heads_per_program=math.gcd(group, MERGE_HEADS))
    return out


# The chooser's cost model: GPU microseconds per layer of each kernel, a fixed cost plus its traffic
# (and, for the shared kernel, its tensor-core work: GQA stacks many rows on each KV tile, padded
# to the tile) over rates fitted to CUDA-graph replays on the H200, L2 flushed
# (benchmarks/kernels_decode.py, 63 batches; each estimate within 0.74-1.30x of the measured time).
PAGED_FIXED_US = 10.5
PAGED_BYTES_PER_US = 4.66e6  # the bytes any kernel must read (HBM)
PAGED_REREAD_BYTES_PER_US = 7.73e6  # the shared blocks read again per sequence (mostly L2 hits)
SHARED_FIXED_US = 9.4
SHARED_BYTES_PER_US = 4.44e6
SHARED_FLOP_PER_US = 5.28e8
PARTIAL_BYTES_PER_US = 1.65e6  # fp32 partials written by the items and read by the merge
# Shared must be estimated at least this much faster, and save this much per layer: its plan is
# built and loaded from the host every step, which a saving of a few microseconds does not repay.
SHARED_MARGIN = 0.95
MIN_SAVED_US = 2.0


@dataclass(frozen=True)
class DecodeCost:
    """What each decode kernel would move and compute for one layer of a batch (see ``decode_cost``)."""

    paged_bytes: float
    shared_bytes: float
    shared_flops: float
    partial_bytes: float

    @property
    def paged_us(self) -> float:
        reread = self.paged_bytes - self.shared_bytes
        return PAGED_FIXED_US + self.shared_bytes / PAGED_BYTES_PER_US + reread / PAGED_REREAD_BYTES_PER_US

    @property
    def shared_us(self) -> float:
        return (SHARED_FIXED_US + self.shared_bytes / SHARED_BYTES_PER_US + self.shared_flops / SHARED_FLOP_PER_US
                + self.partial_bytes / PARTIAL_BYTES_PER_US)

    def pick(self) -> str:
        """The kernel the model expects to be clearly faster: ``"shared"`` or ``"paged"``."""
        paged, shared = self.paged_us, self.shared_us
        return "shared" if shared <= SHARED_MARGIN * paged and paged - shared >= MIN_SAVED_US else "paged"


def decode_cost(
    plan: SharedPrefixPlan, n_heads: int, n_kv_heads: int, head_dim: int = 128, dtype_bytes: int = 2, sms: int = 132
) -> DecodeCost:
    """Bytes and FLOPs of one layer's decode attention over ``plan``'s batch, per kernel.

    Counted in closed form over the groups and suffixes (the items ``_items`` would build, without
    building them: the engine asks every step)."""
    group = n_heads // n_kv_heads
    group_m = group_block_m(group)
    seqs_per_tile = max(1, group_m // group)
    chunk = _chunk_size(plan, seqs_per_tile, n_kv_heads, sms)
    tile_tokens = suffix_tokens = slots = 0  # tokens x tiles of group items; tokens of suffixes; partials
    for g in plan.groups:
        length = g.end - g.start
        tile_tokens += -(-len(g.seqs) // seqs_per_tile) * length
        slots += len(g.seqs) * -(-length // chunk)  # each sequence of the group, once per chunk
    for a, n in zip(plan.suffix_start, plan.context_lens):
        if n > a:
            suffix_tokens += n - a
            slots += -(-(n - a) // chunk)
    suffix_m = suffix_block_m(group)
    token_bytes = 2 * n_kv_heads * head_dim * dtype_bytes
    return DecodeCost(
        paged_bytes=plan.paged_tokens * token_bytes,
        shared_bytes=plan.shared_tokens * token_bytes,
        shared_flops=float(group_m * tile_tokens + suffix_m * suffix_tokens) * 4 * head_dim * n_kv_heads,
        partial_bytes=2.0 * slots * n_heads * (head_dim + 2) * 4,
    )


def choose_decode_kernel(
    plan: SharedPrefixPlan | None,
    n_kv_heads: int,
    head_dim: int = 128,
    dtype_bytes: int = 2,
    *,
    n_heads: int = 32,
    sms: int = 132,
) -> str:
    """``"shared"`` when the cost model puts the shared kernel clearly ahead for this batch, else ``"paged"``."""
    if plan is None:
        return "paged"
    return decode_cost(plan, n_heads, n_kv_heads, head_dim, dtype_bytes, sms).pick()
