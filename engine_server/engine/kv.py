"""The paged KV pool and the context tree that shares its blocks.

K/V live in fixed-size blocks of one preallocated pool per model. A sequence
holds a list of block ids (its block table); a *context* is a cached, named
prefix of some sequence (a system prompt, a prompt up to a variable boundary)
that later sequences fork: the fork takes the context's block ids and bumps
their reference counts, copying nothing. Before a sequence writes into a block
that anyone else also references (only a partial last block can be), it copies
that block (copy-on-write).

Contexts form a tree: a context registered by a sequence that was itself
forked from (or registered) a shorter context is that context's child. When
the pool runs dry, unreferenced leaf contexts go first, least recently used
first; their blocks return to the pool once no sequence holds them either.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class BlockPool:
    """Reference-counted block ids over a preallocated K/V tensor pair."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids come out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int | None:
        """A fresh block with one reference, or None when the pool is empty."""
        if not self._free:
            return None
        block = self._free.pop()
        self.refcount[block] = 1
        return block

    def incref(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise RuntimeError(f"block {b} is free; it cannot be shared")
            self.refcount[b] += 1

    def decref(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if self.refcount[b] <= 0:
                raise RuntimeError(f"block {b} released more often than it was referenced")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)

    def copy(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def blocks_for(self, n_tokens: int) -> int:
        """How many blocks hold `n_tokens` tokens."""
        return -(-n_tokens // self.block_size)


@dataclass(eq=False)
class Context:
    """A cached prefix: its tokens and the blocks that hold their K/V.

    A context keyed by manager keys holds every block of its prefix (``start`` 0) and keeps its
    tokens, which a lookup compares. A *digest* context (automatic prefix caching: its key is a
    hash of the tokens themselves, see ``block_key``) keeps no tokens, and when its parent ends on
    a block boundary it holds only its own blocks, from index ``start``: the rest are its
    parent's, which cannot be evicted while a child extends it. Each cached block is then held
    once however long the chain, as in vLLM's block-level prefix cache.
    """

    key: str
    tokens: tuple[int, ...]
    blocks: list[int]  # the blocks this context holds a reference on: the prefix's, from index `start`
    parent: Context | None
    length: int = -1  # tokens of the prefix; -1: len(tokens)
    start: int = 0
    digest: bool = False
    children: int = 0
    users: int = 0  # live sequences forked from this context
    last_used: int = 0
    released: bool = False  # the manager said nobody needs it any more

    def __post_init__(self) -> None:
        if self.length < 0:
            self.length = len(self.tokens)

    def __len__(self) -> int:
        return self.length

    def all_blocks(self) -> list[int]:
        """Every block of the prefix, in order (walking up the chain of digest contexts)."""
        parts, ctx = [], self
        while True:
            parts.append(ctx.blocks)
            if ctx.start == 0:
                break
            assert ctx.parent is not None  # a context that holds part of its prefix keeps its parent
            ctx = ctx.parent
        return [b for part in reversed(parts) for b in part]


DIGEST_PREFIX = "#"  # keys of digest contexts; the manager's keys are hex and never start with it


def block_key(previous: bytes, tokens: Sequence[int]) -> bytes:
    """The digest of a token block following the prefix whose digest is ``previous`` (b"" at the start)."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class ContextCache:
    """Contexts by key, sharing blocks of a BlockPool; evicts unreferenced leaves, LRU."""

    pool: BlockPool
    contexts: dict[str, Context] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)  # manager keys dropped since the last take_evicted()
    _clock: itertools.count = field(default_factory=itertools.count)

    def lookup(self, boundaries: Sequence[tuple[str, int]], tokens: Sequence[int]) -> Context | None:
        """The longest cached context among (key, length) boundaries whose tokens equal tokens[:length]."""
        for key, length in reversed(boundaries):
            ctx = self.contexts.get(key)
            # A digest key names its tokens; any other key is a name only, so the tokens are compared.
            if ctx is not None and len(ctx) == length and (ctx.digest or ctx.tokens == tuple(tokens[:length])):
                return ctx
        return None

    def fork(self, ctx: Context) -> list[int]:
        """A new reference to every block of `ctx`, for a sequence that continues it."""
        blocks = ctx.all_blocks()
        self.pool.incref(blocks)
        ctx.users += 1
        ctx.released = False
        ctx.last_used = next(self._clock)
        return blocks

    def unfork(self, ctx: Context) -> None:
        """A sequence forked from `ctx` ended (its own block references are released separately)."""
        ctx.users -= 1
        ctx.last_used = next(self._clock)

    def insert(self, key: str, tokens: Sequence[int], blocks: Sequence[int], parent: Context | None) -> Context:
        """Cache tokens[:] (held in `blocks`) under `key`; an existing entry is kept and returned.

        A key that starts with ``DIGEST_PREFIX`` makes a digest context (see ``Context``).
        """
        if key in self.contexts:
            return self.contexts[key]
        n_blocks = self.pool.blocks_for(len(tokens))
        if len(blocks) < n_blocks:
            raise ValueError(f"context {key!r}: {len(tokens)} tokens need {n_blocks} blocks, got {len(blocks)}")
        if parent is not None and self.contexts.get(parent.key) is not parent:
            parent = None  # evicted meanwhile (perhaps re-inserted since, as another object)
        digest = key.startswith(DIGEST_PREFIX)
        bs = self.pool.block_size
        start = 0
        if digest and parent is not None and len(parent) % bs == 0 and len(parent) < len(tokens):
            start = len(parent) // bs  # the parent holds the blocks before this one's
        held = list(blocks[start:n_blocks])
        self.pool.incref(held)
        ctx = Context(
            key, () if digest else tuple(tokens), held, parent, len(tokens), start, digest, last_used=next(self._clock)
        )
        if parent is not None:
            parent.children += 1
        self.contexts[key] = ctx
        return ctx

    def release(self, keys: Sequence[str]) -> None:
        """Nobody will ask for these again soon: evict them before anything else."""
        for key in keys:
            if key in self.contexts:
                self.contexts[key].released = True

    def evictable(self) -> list[Context]:
        """Contexts no live sequence forked from and no cached child extends, eviction order first."""
        leaves = [c for c in self.contexts.values() if c.users == 0 and c.children == 0]
        return sorted(leaves, key=lambda c: (not c.released, c.last_used))

    def evict_one(self) -> bool:
        """Drop the first evictable context; False if there is none."""
        candidates = self.evictable()
        if not candidates:
            return False
        self._drop(candidates[0])
        return True

    def clear(self) -> None:
        """Drop every context (sequences keep their own block references)."""
        for ctx in list(self.contexts.values()):
            ctx.parent = None
            self.pool.decref(ctx.blocks)
            if not ctx.digest:
                self.evicted.append(ctx.key)
        self.contexts.clear()

    def take_evicted(self) -> list[str]:
        out, self.evicted = self.evicted, []
        return out

    def _drop(self, ctx: Context) -> None:
        del self.contexts[ctx.key]
        if ctx.parent is not None:
            ctx.parent.children -= 1
            ctx.parent.last_used = max(ctx.parent.last_used, ctx.last_used)
        self.pool.decref(ctx.blocks)
        if not ctx.digest:  # the manager never knew digest keys
            self.evicted.append(ctx.key)
