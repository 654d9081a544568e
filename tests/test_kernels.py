"""The Triton kernels give their torch references' answers, and the references give attention's.

Without CUDA the kernels run in Triton's interpreter (on CPU tensors); with CUDA they run compiled
on the GPU. The two cannot share a process (Triton decides per kernel, when its module is imported,
and again when a launch first specialises), so this module picks one mode for the whole process:
``TRITON_INTERPRET=1`` is set here, before any kernel module is imported, when there is no GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
# Interpreted examples take a fraction of a second each (small shapes); compiled ones mostly their compile.
EXAMPLES = 30 if INTERPRETED else 30
examples = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

TOLERANCE = {torch.float32: 2e-4, torch.float16: 6e-3, torch.bfloat16: 4e-2}
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# (query heads, KV heads): plain multi-head, GQA 4:1 and 2:1, all heads on one KV head, and 7:1
# (a group that is not a power of two, as in models with 28 query heads over 4 KV heads).
HEADS = st.sampled_from([(4, 4), (8, 2), (4, 2), (4, 1), (7, 1)])
HEAD_DIMS = st.sampled_from([64, 128])
PAGES = st.sampled_from([16, 32])


def test_kernels_run_in_the_mode_this_module_chose() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import paged_decode

    interpreted = isinstance(paged_decode._paged_decode_kernel, InterpretedFunction)
    assert interpreted == INTERPRETED, "kernels were imported before TRITON_INTERPRET was set: run this module alone"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


class Pool:
    """A random KV cache and a block allocator over it, like the engine's."""

    def __init__(self, n_blocks: int, page: int, n_kv: int, dim: int, dtype: torch.dtype, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.page = page
        shape = (n_blocks, page, n_kv, dim)
        self.k = torch.randn(shape, generator=self.gen).to(dtype).to(DEVICE)
        self.v = torch.randn(shape, generator=self.gen).to(dtype).to(DEVICE)
        self.free = torch.randperm(n_blocks, generator=self.gen).tolist()

    def blocks(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def queries(self, n: int, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(n, heads, dim, generator=self.gen).to(dtype).to(DEVICE)


def table(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)


def lens(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: int, scale: float) -> torch.Tensor:
    """One query ``[Hq, D]`` over the first ``visible`` rows of k/v ``[L, Hkv, D]``, head by head."""
    group = q.shape[0] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[0]):
        keys, values = k[:visible, h // group].double(), v[:visible, h // group].double()
        weights = torch.softmax(keys @ q[h].double() * scale, dim=0)
        out[h] = weights @ values
    return out


def sequence_kv(pool: Pool, blocks: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens 0..n-1 of a sequence, read slot by slot."""
    slots = [blocks[i // pool.page] * pool.page + i % pool.page for i in range(n)]
    flat_k = pool.k.cpu().reshape(-1, *pool.k.shape[2:])
    flat_v = pool.v.cpu().reshape(-1, *pool.v.shape[2:])
    return flat_k[slots], flat_v[slots]


# --- write_kv_cache ---------------------------------------------------------------------------


@examples
@given(n_tokens=st.integers(1, 40), heads=HEADS, dim=HEAD_DIMS, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_write_kv_cache_stores_each_token_at_its_slot_and_skips_negative_slots(n_tokens, heads, dim, dtype, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_kv = heads[1]
    k = torch.randn(n_tokens, n_kv, dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(n_tokens, n_kv, dim, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(4 * 16, generator=gen)[:n_tokens]
    slots[torch.rand(n_tokens, generator=gen) < 0.25] = -1
    k_cache = torch.zeros(4, 16, n_kv, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    kernels.write_kv_cache(k, v, k_cache, v_cache, slots.to(DEVICE))
    reference.reference_write_kv_cache(k, v, expected_k, expected_v, slots.to(DEVICE))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    kept = slots >= 0
    assert torch.equal(k_cache.reshape(-1, n_kv, dim)[slots[kept].to(DEVICE)], k[kept.to(DEVICE)])


# --- the references against attention written out token by token ----------------------------


def test_reference_decode_is_attention_over_each_sequences_own_tokens() -> None:
    pool = Pool(12, 16, 2, 64, torch.float32, seed=1)
    blocks = [pool.blocks(3), pool.blocks(1), pool.blocks(4)]
    context = [40, 1, 64]
    q = pool.queries(3, 8, 64, torch.float32)
    out = reference.reference_paged_decode_attention(q, pool.k, pool.v, table(blocks), lens(context))
    for s in range(3):
        k, v = sequence_kv(pool, blocks[s], context[s])
        expected = oracle_attention(q[s].cpu(), k, v, context[s], 1 / 8)
        torch.testing.assert_close(out[s].cpu().double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_prefill_is_causal_within_new_tokens_and_sees_the_whole_cached_prefix() -> None:
    pool = Pool(12, 16, 1, 64, torch.float32, seed=2)
    blocks = [pool.blocks(3), pool.blocks(2), pool.blocks(2)]
    context, q_lens = [45, 20, 17], [5, 20, 0]
    q = pool.queries(sum(q_lens), 4, 64, torch.float32)
    starts = torch.tensor([0, 5, 25, 25], dtype=torch.int32, device=DEVICE)
    out = reference.reference_paged_prefill_attention(q, pool.k, pool.v, table(blocks), starts, lens(context))
    row = 0
    for s in range(3):
        k, v = sequence_kv(pool, blocks[s], context[s])
        for i in range(q_lens[s]):
            visible = context[s] - q_lens[s] + i + 1
            expected = oracle_attention(q[row].cpu(), k, v, visible, 1 / 8)
            torch.testing.assert_close(out[row].cpu().double(), expected, atol=1e-5, rtol=1e-5)
            row += 1


# --- paged decode -----------------------------------------------------------------------------


@examples
@given(
    context=st.lists(st.integers(1, 150), min_size=1, max_size=4),
    heads=HEADS, dim=HEAD_DIMS, page=PAGES, dtype=DTYPES,
    splits=st.sampled_from([None, 1, 3]), sharp=st.booleans(), seed=st.integers(0, 2**16),
)
def test_paged_decode_matches_reference(context, heads, dim, page, dtype, splits, sharp, seed) -> None:
    n_heads, n_kv = heads
    pool = Pool(48, page, n_kv, dim, dtype, seed)
    blocks = [pool.blocks(math.ceil(n / page)) for n in context]
    q = pool.queries(len(context), n_heads, dim, dtype)
    # A large scale makes softmax peaked: a merge that mixes exp and exp2 is then far off.
    scale = 2.0 / math.sqrt(dim) if sharp else None
    args = (q, pool.k, pool.v, table(blocks), lens(context), scale)
    close(kernels.paged_decode_attention(*args, num_splits=splits), reference.reference_paged_decode_attention(*args))


def test_paged_decode_query_heads_read_their_own_kv_head() -> None:
    """With GQA 4:1, query head h must read KV head h // 4: make every KV head's values a constant."""
    n_kv, dim = 2, 64
    k_cache = torch.randn(4, 16, n_kv, dim, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    v_cache[:, :, 0], v_cache[:, :, 1] = 1.0, -1.0
    q = torch.randn(1, 8, dim, device=DEVICE)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, table([[2, 0]]), lens([20]), num_splits=2)
    assert torch.allclose(out[0, :4].cpu(), torch.ones(4, dim)) and torch.allclose(out[0, 4:].cpu(), -torch.ones(4, dim))


def test_paged_decode_splits_give_the_unsplit_answer() -> None:
    pool = Pool(40, 16, 2, 64, torch.float32, seed=3)
    blocks = [pool.blocks(20), pool.blocks(3)]
    q = pool.queries(2, 4, 64, torch.float32) * 4
    args = (q, pool.k, pool.v, table(blocks), lens([317, 33]))
    whole = kernels.paged_decode_attention(*args, num_splits=1)
    for splits in (2, 5, 8):
        close(kernels.paged_decode_attention(*args, num_splits=splits), whole)


def test_paged_decode_skips_empty_splits_and_leaves_its_split_counters_at_zero() -> None:
    """Splits past a short context do nothing; the last live split merges and resets its count."""
    from kernels import paged_decode

    pool = Pool(48, 16, 2, 64, torch.float32, seed=7)
    blocks = [pool.blocks(24), pool.blocks(24), pool.blocks(1)]
    q = pool.queries(3, 8, 64, torch.float32)
    for context in ([5, 380, 16], [384, 200, 1], [1, 1, 1]):
        args = (q, pool.k, pool.v, table(blocks), lens(context))
        expected = reference.reference_paged_decode_attention(*args)
        for _ in range(2):  # a second call finds the counters as the first left them
            close(kernels.paged_decode_attention(*args, num_splits=6), expected)
    counters = paged_decode._COUNTERS[q.device]
    assert int(counters.abs().sum()) == 0


# --- shared-prefix planning -------------------------------------------------------------------


def test_plan_is_none_when_no_full_block_is_shared() -> None:
    assert kernels.plan_shared_prefix([[1, 2], [3, 4]], [32, 32], 16) is None
    # Same id in a partial last block: the engine copies partial blocks, so this is not sharing.
    assert kernels.plan_shared_prefix([[7], [7]], [10, 12], 16) is None
    assert kernels.plan_shared_prefix([[1, 2]], [32], 16) is None


def test_plan_finds_nested_groups_and_each_sequences_suffix() -> None:
    # 0-3 share a 2-block system prompt; 0 and 1 also share a 2-block document; 4 shares nothing;
    # 5 is exactly the system prompt (its suffix is empty).
    tables = [[0, 1, 2, 3, 10], [0, 1, 2, 3, 11], [0, 1, 4, 12], [0, 1, 5, 13], [6, 7, 8], [0, 1]]
    plan = kernels.plan_shared_prefix(tables, [70, 80, 50, 40, 40, 32], 16)
    assert plan.groups == [kernels.PrefixGroup((0, 1, 2, 3, 5), 0, 32), kernels.PrefixGroup((0, 1), 32, 64)]
    assert plan.suffix_start == [64, 64, 32, 32, 0, 32]
    assert plan.paged_tokens == 312
    assert plan.shared_tokens == 32 + 32 + (6 + 16 + 18 + 8 + 40 + 0)


def test_plan_stops_a_shared_prefix_where_one_sequence_runs_out_of_full_blocks() -> None:
    plan = kernels.plan_shared_prefix([[0, 1, 2], [0, 1, 2], [0, 1, 3]], [48, 47, 48], 16)
    assert plan.groups == [kernels.PrefixGroup((0, 1, 2), 0, 32)]
    assert plan.suffix_start == [32, 32, 32]


def test_plan_drops_groups_shorter_than_asked() -> None:
    tables = [[0, 1, 2, 9], [0, 1, 2, 8], [0, 5, 6, 7]]
    plan = kernels.plan_shared_prefix(tables, [64, 64, 64], 16, min_shared_tokens=32)
    assert plan.groups == [kernels.PrefixGroup((0, 1), 0, 48)]
    assert plan.suffix_start == [48, 48, 0]


def test_choose_decode_kernel_prefers_shared_only_when_it_saves_enough_reads() -> None:
    # 64 sequences over a 4k prefix (8 KV heads): shared reads 1/50 of the bytes.
    big = kernels.plan_shared_prefix([list(range(256)) + [1000 + s] for s in range(64)], [4096 + 10] * 64, 16)
    assert kernels.choose_decode_kernel(big, 8) == "shared"
    # Two sequences sharing one block of ten: nothing to save.
    small = kernels.plan_shared_prefix([[0] + list(range(10 * s + 1, 10 * s + 10)) for s in range(2)], [160] * 2, 16)
    assert kernels.choose_decode_kernel(small, 8) == "paged"
    # A high ratio over few bytes does not pay for the extra launch and the merge.
    tiny = kernels.plan_shared_prefix([[0, 1, 2, 3, 4 + s] for s in range(8)], [80] * 8, 16)
    assert kernels.choose_decode_kernel(tiny, 8) == "paged"


def test_choose_decode_kernel_takes_a_few_sequences_over_a_long_prefix() -> None:
    """Four sequences over 4k tokens with 32 KV heads read 3.3x fewer bytes shared: a win the
    byte-ratio rule of old missed."""
    four = kernels.plan_shared_prefix([list(range(256)) + [1000 + s, 2000 + s] for s in range(4)], [4096 + 20] * 4, 16)
    assert kernels.choose_decode_kernel(four, 32) == "shared"


def test_decode_cost_counts_padded_tile_rows_and_partials() -> None:
    # 8 sequences x 4 query heads per KV head = 32 rows of a 64-row tile; 1 KV head, head_dim 128.
    plan = kernels.plan_shared_prefix([[0, 1, 2, 3, 10 + s] for s in range(8)], [64 + 5] * 8, 16)
    cost = kernels.decode_cost(plan, n_heads=4, n_kv_heads=1, head_dim=128, dtype_bytes=2, sms=4)
    assert cost.paged_bytes == 8 * 69 * 2 * 128 * 2
    assert cost.shared_bytes == (64 + 8 * 5) * 2 * 128 * 2
    # One group item (64 rows x 64 tokens) and eight suffix items (16 rows x 5 tokens), 4 FLOPs per row, token, dim.
    assert cost.shared_flops == (64 * 64 + 8 * 16 * 5) * 4 * 128
    # Each sequence owns two partials (its group item's and its suffix's), written and read once.
    assert cost.partial_bytes == 2 * 16 * 4 * (128 + 2) * 4


# --- shared-prefix decode ---------------------------------------------------------------------


@st.composite
def forked_batches(draw):
    """Block tables of a decode batch grown by forking: each new sequence shares a number of full
    blocks of an earlier one (its system prompt, or that plus a document), then has its own.

    The first fork shares at least one full block of the first root, so every batch has a plan."""
    page = draw(PAGES)
    n_roots = draw(st.integers(1, 2))
    n_forks = draw(st.integers(1, 6))
    contexts, shared_with = [], []
    for i in range(n_roots + n_forks):
        parent = (0 if i == n_roots else draw(st.integers(0, i - 1))) if i >= n_roots else None
        if parent is None:
            contexts.append(draw(st.integers(page if i == 0 else 1, 5 * page)))
            shared_with.append((None, 0))
        else:
            parent_full = contexts[parent] // page
            keep = draw(st.integers(1 if i == n_roots else 0, parent_full))
            # Own tokens after the shared blocks; none means this sequence is exactly the prefix.
            own = draw(st.integers(0 if keep else 1, 2 * page))
            contexts.append(keep * page + own)
            shared_with.append((parent, keep))
    return page, contexts, shared_with


@examples
@given(batch=forked_batches(), heads=HEADS, dim=HEAD_DIMS, dtype=DTYPES, seed=st.integers(0, 2**16))
def test_shared_prefix_decode_matches_reference(batch, heads, dim, dtype, seed) -> None:
    page, context, shared_with = batch
    n_heads, n_kv = heads
    pool = Pool(64, page, n_kv, dim, dtype, seed)
    tables: list[list[int]] = []
    for n, (parent, keep) in zip(context, shared_with):
        inherited = tables[parent][:keep] if parent is not None else []
        tables.append(inherited + pool.blocks(math.ceil(n / page) - keep))
    plan = kernels.plan_shared_prefix(tables, context, page)
    q = pool.queries(len(context), n_heads, dim, dtype)
    args = (q, pool.k, pool.v, table(tables), lens(context))
    assert plan is not None and plan.groups  # the batch shares at least one block (forked_batches)
    close(kernels.shared_prefix_decode_attention(*args, plan), reference.reference_paged_decode_attention(*args))


def test_shared_prefix_decode_with_many_groups_of_different_sizes_in_one_launch() -> None:
    pool = Pool(80, 16, 2, 64, torch.bfloat16, seed=4)
    tables, context = [], []
    # Group sizes 1 (no sharing), 2, 5 and 20 sequences (20 x 4 heads spans two 64-row tiles);
    # prefix lengths differ per group.
    for size, prefix_blocks in [(1, 2), (2, 3), (5, 1), (20, 4)]:
        prefix = pool.blocks(prefix_blocks)
        for i in range(size):
            own = 1 + (7 * i) % 20
            tables.append(prefix + pool.blocks(math.ceil(own / 16)))
            context.append(prefix_blocks * 16 + own)
    plan = kernels.plan_shared_prefix(tables, context, 16)
    assert [len(g.seqs) for g in plan.groups] == [2, 5, 20]
    q = pool.queries(len(context), 8, 64, torch.bfloat16)
    args = (q, pool.k, pool.v, table(tables), lens(context))
    close(kernels.shared_prefix_decode_attention(*args, plan), reference.reference_paged_decode_attention(*args))


@examples
@given(batch=forked_batches(), heads=HEADS, sms=st.sampled_from([4, 132]))
def test_decode_cost_counts_what_the_launch_builds(batch, heads, sms) -> None:
    """The cost model's closed form equals the FLOPs and partials of the items a launch holds."""
    import kernels.shared_prefix as sp

    page, context, shared_with = batch
    n_heads, n_kv = heads
    tables: list[list[int]] = []
    fresh = iter(range(1000, 10**6))
    for n, (parent, keep) in zip(context, shared_with):
        inherited = tables[parent][:keep] if parent is not None else []
        tables.append(inherited + [next(fresh) for _ in range(math.ceil(n / page) - keep)])
    plan = kernels.plan_shared_prefix(tables, context, page)
    group = n_heads // n_kv
    items = sp._items(plan, group, n_kv, sms)
    rows = [sp.group_block_m(group) if i < items.n_group_items else max(16, 1 << (group - 1).bit_length())
            for i in range(len(items.rows))]
    flops = sum(r * int(hi - lo) for r, (_, _, lo, hi, _) in zip(rows, items.rows.tolist())) * 4 * 64 * n_kv
    cost = kernels.decode_cost(plan, n_heads, n_kv, head_dim=64, dtype_bytes=2, sms=sms)
    assert cost.shared_flops == flops
    assert cost.partial_bytes == 2 * len(items.item_seqs) * n_heads * (64 + 2) * 4


def test_a_static_launch_replays_plans_of_other_shapes_on_one_grid() -> None:
    """A CUDA graph's launch: fixed capacity for 6 rows, refilled with plans of 4 and 6 sequences
    (one group, then nested groups); padded rows read one token of their table row."""
    import kernels.shared_prefix as sp

    pool = Pool(96, 16, 2, 64, torch.bfloat16, seed=9)
    launch = sp.SharedPrefixLaunch.static(torch.device(DEVICE), 6, queries_per_kv=4, n_kv_heads=2)
    system, doc = pool.blocks(3), pool.blocks(2)
    batches = [
        [system + pool.blocks(1) for _ in range(4)],
        [system + pool.blocks(2) for _ in range(2)] + [system + doc + pool.blocks(1) for _ in range(4)],
    ]
    q_all = pool.queries(6, 8, 64, torch.bfloat16)
    for tables in batches:
        context = [16 * (len(t) - 1) + 3 + i for i, t in enumerate(tables)]
        plan = kernels.plan_shared_prefix(tables, context, 16)
        assert launch.fill(plan)
        n = len(tables)
        padded = table(tables + [[0]] * (6 - n))
        out = kernels.shared_prefix_decode_attention(q_all, pool.k, pool.v, padded, lens(context + [1] * (6 - n)), launch)
        assert torch.isfinite(out.float()).all()
        args = (q_all[:n], pool.k, pool.v, table(tables), lens(context))
        close(out[:n], reference.reference_paged_decode_attention(*args))


def test_a_static_launch_refuses_a_plan_over_more_rows_than_it_has() -> None:
    import kernels.shared_prefix as sp

    launch = sp.SharedPrefixLaunch.static(torch.device(DEVICE), 2, queries_per_kv=4, n_kv_heads=2)
    plan = kernels.plan_shared_prefix([[0, 1, 5], [0, 1, 6], [0, 1, 7]], [40, 40, 40], 16)
    assert launch.fill(plan) is False


# --- paged prefill ----------------------------------------------------------------------------


@examples
@given(
    seqs=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 70)), min_size=1, max_size=3),
    heads=HEADS, dim=HEAD_DIMS, page=PAGES, dtype=DTYPES, seed=st.integers(0, 2**16),
)
def test_paged_prefill_matches_reference(seqs, heads, dim, page, dtype, seed) -> None:
    n_heads, n_kv = heads
    cached = [c for c, _ in seqs]
    q_lens = [n if c + n else 1 for c, n in seqs]  # every sequence has at least one token in all
    assume(sum(q_lens) > 0)  # a batch with no new token at all is not a prefill
    context = [c + n for c, n in zip(cached, q_lens)]
    pool = Pool(48, page, n_kv, dim, dtype, seed)
    blocks = [pool.blocks(math.ceil(n / page)) for n in context]
    q = pool.queries(sum(q_lens), n_heads, dim, dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    args = (q, pool.k, pool.v, table(blocks), starts, lens(context))
    close(kernels.paged_prefill_attention(*args), reference.reference_paged_prefill_attention(*args))


def test_paged_prefill_puts_new_tokens_after_the_cached_prefix() -> None:
    """A chunk of 3 new tokens after 61 cached: token i sees 62 + i positions, not i + 1."""
    pool = Pool(8, 16, 1, 64, torch.float32, seed=5)
    blocks = pool.blocks(4)
    q = pool.queries(3, 1, 64, torch.float32)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    out = kernels.paged_prefill_attention(q, pool.k, pool.v, table([blocks]), starts, lens([64]))
    k, v = sequence_kv(pool, blocks, 64)
    for i in range(3):
        close(out[i], oracle_attention(q[i].cpu(), k, v, 62 + i, 1 / 8).float())


# --- CUDA graphs ------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_paged_decode_replays_in_a_cuda_graph_with_new_lengths() -> None:
    pool = Pool(200, 16, 2, 128, torch.bfloat16, seed=6)
    blocks = [pool.blocks(60), pool.blocks(60)]
    tables, context = table(blocks), lens([900, 17])
    q = pool.queries(2, 8, 128, torch.bfloat16)
    kernels.paged_decode_attention(q, pool.k, pool.v, tables, context)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_decode_attention(q, pool.k, pool.v, tables, context)
    for new in ([1, 960], [500, 33]):
        context.copy_(lens(new))
        graph.replay()
        close(out, reference.reference_paged_decode_attention(q, pool.k, pool.v, tables, context))


def test_plan_from_an_array_of_padded_tables_equals_the_plan_from_lists() -> None:
    import numpy as np

    tables = [[0, 1, 2, 9], [0, 1, 3], [0, 1, 2, 8, 7], [5, 6]]
    context = [60, 40, 75, 20]
    padded = np.zeros((4, 6), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    from_lists = kernels.plan_shared_prefix(tables, context, 16)
    from_array = kernels.plan_shared_prefix(padded, context, 16)
    assert from_lists.groups == from_array.groups and from_lists.suffix_start == from_array.suffix_start
    assert [(g.seqs, g.start, g.end) for g in from_lists.groups] == [((0, 1, 2), 0, 32), ((0, 2), 32, 48)]
