"""The engine: continuous batching over a paged KV pool with a context tree.

Requests are *programs*: text to prefill, interleaved with outputs to generate
(see ``TextSegment``/``GenSegment``). Every ``step()`` is one forward over
  - one new token of every running sequence that is decoding, and
  - chunks of prompt text of the others (chunked prefill), up to a token budget,
then one sampled token for every sequence whose unprocessed tokens all went in
(through a token mask when its output is constrained: see ``grammar``).
New requests join between steps. A request whose prompt starts with a cached
context (keys on its text segments, a hash chain the manager computes) forks it
and prefills only the rest. When the pool runs out, unreferenced cached contexts
are evicted, then the youngest running sequence is preempted: its blocks are
freed and it is recomputed later from its tokens, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine_server.constraints import describe

from .attention import AttentionMetadata, PagedAttention
from .backend import Delta, Event, Failed, Finished, FinishReason, RunResult, Timings
from .grammar import Grammars
from .kv import DIGEST_PREFIX, BlockPool, Context, ContextCache, block_key
from .model import LlamaModel
from .sampler import Sampler, SamplingParams



@dataclass(frozen=True)
class TextSegment:
    """Text that goes into the context as is (constant, or an already-filled input).

    `context_key` names the context ending after this segment; sequences whose
    prompts share it may share its K/V. "" means "not worth caching here".
    `blocks`: cache the prompt at every full KV block in this segment too, under keys that
    hash the tokens (automatic prefix caching, for prompts with no variable boundaries).
    """

    text: str
    context_key: str = ""
    blocks: bool = False


@dataclass(frozen=True)
class GenSegment:
    """An output, generated at this point of the context.

    ``prefix`` is set by the engine, not by callers: the spaces that ended the text before a
    constrained output, moved into the output (see ``Engine.add``).
    """

    key: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix: str = ""


Segment = TextSegment | GenSegment


@dataclass
class EngineConfig:
    """Sizes and limits of one engine."""

    block_size: int = 16
    num_blocks: int | None = None  # None: from kv_cache_bytes (CPU) or free memory (CUDA)
    kv_cache_bytes: int = 256 * 2**20  # CPU pool budget
    gpu_memory_utilization: float = 0.85  # share of free device memory the pool may take (CUDA)
    max_running: int = 64  # sequences in flight at once
    token_budget: int = 2048  # tokens per forward (decodes first, then prefill chunks)
    use_triton: bool | None = None  # None: on CUDA
    cuda_graphs: bool = True  # capture decode steps on CUDA
    # Decode reads shared prefixes once per group: None = when kernels.choose_decode_kernel
    # expects it to pay, True = whenever the batch shares a prefix, False = never.
    shared_prefix_kernel: bool | None = None
    # Prefill-only sequences (a waiting request's known start) run behind everything else: in
    # steps with nothing else to do, once the engine has had no other work for `idle_grace_s`
    # (so that a request that a finished one unblocks, usually on its way, is not kept waiting
    # behind them), and then a sixteenth of the token budget a step, so that a request arriving
    # meanwhile waits for one short step at most (512 tokens on CUDA). A step with other work gives them chunks of `background_chunk` tokens; 0
    # (the default): none. Prefill is compute-bound on a GPU as on a CPU, so a chunk there slows
    # the running requests by about what it saves later, and a decode step with prefill in it
    # runs eagerly instead of as its CUDA graph (measured in benchmarks/results/rag_app.md).
    # Streamed text waits for a whole chunk of it before it joins a busy step.
    background_chunk: int = 0
    idle_grace_s: float = 0.01

    def __post_init__(self) -> None:
        for name in ("block_size", "max_running", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")




@dataclass
class _Output:
    """Generation state of one output: its tokens and where their text ends."""

    key: str
    params: SamplingParams
    sampler: Sampler
    decoder: object
    start: int  # index in the sequence's tokens where this output begins
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ends: list[int] = field(default_factory=list)  # len(text) after each token
    emitted: int = 0  # chars already streamed
    hold: int = 0  # chars held back because they may begin a stop string
    matcher: Any = None  # llguidance's state of the output's constraint; consumed every token
    skip: int = 0  # leading chars of `text` that are the prompt's spaces moved into the output

    @property
    def generated(self) -> int:
        """Tokens generated for the output itself: not those that only spell the moved spaces."""
        return len(self.tokens) - sum(1 for end in self.ends[: self.skip] if end <= self.skip)

    def push(self, token: int, text: str) -> None:
        self.tokens.append(token)
        self.text += text
        self.ends.append(len(self.text))

    def flush(self, text: str) -> None:
        self.text += text
        if self.ends:
            self.ends[-1] = len(self.text)

    def kept_tokens(self, stop_at: int) -> int:
        """How many tokens to keep so their text ends before char `stop_at`.

        Tokens that completed no text yet are leading bytes of the next char: when
        that char is part of the stop string, they go too.
        """
        n = 0
        for i, end in enumerate(self.ends):
            if end > stop_at:
                break
            if end > (self.ends[i - 1] if i else 0):
                n = i + 1
        return n


_versions = itertools.count(1)


class BlockList(list):
    """A sequence's block ids. ``version`` takes a new number (from one counter, so no two lists
    share one) at every change, which lets the decode graphs restage only the rows that changed."""

    __slots__ = ("version",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.version = next(_versions)


def _bumps(name: str):
    method = getattr(list, name)

    def changed(self, *args):
        self.version = next(_versions)
        return method(self, *args)

    changed.__name__ = name
    return changed


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):  # fmt: skip
    setattr(BlockList, _name, _bumps(_name))


class _Sequence:
    """One request's state in the engine."""

    def __init__(self, request_id: str, program: list[tuple[Segment, list[int]]], order: int, now: float) -> None:
        self.request_id = request_id
        self.program = program  # segments with their token ids (gen segments: [])
        self.order = order  # arrival order: older sequences are served first, preempted last
        self.received = now
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.tokens: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in this sequence's blocks
        self.blocks = BlockList()
        self.next_segment = 0
        self.output: _Output | None = None
        self.boundaries: list[tuple[str, int]] = []  # keyed prompt boundaries before the first output
        self.digest, self.digest_len = b"", 0  # block_key of tokens[:digest_len] (block prefix caching)
        self.registered = 0  # boundaries already cached
        self.context: Context | None = None  # the context this sequence forked, while it runs
        self.last_context: Context | None = None  # parent for the next context it registers
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.outputs: dict[str, str] = {}
        self.output_tokens: dict[str, int] = {}
        self.finish_reasons: dict[str, FinishReason] = {}
        self.done = False
        # A prefill-only sequence computes (and caches the keyed contexts of) the known start of
        # a request whose input is not ready yet, then parks with its KV until that request
        # adopts it. Text streamed into that input extends it meanwhile: the segment being
        # streamed starts at token ``stream_start``; its text is re-encoded as it grows.
        self.prefill_only = False
        self.stream_start = 0
        self.stream_text = ""
        self.stream_dirty = False
        self.reported = False  # its Finished was sent (once, when first computed)

    @property
    def pending(self) -> int:
        """Tokens not yet through the model."""
        return len(self.tokens) - self.num_computed

    @property
    def blocks(self) -> BlockList:
        """The KV block ids of this sequence's positions, in order."""
        return self._blocks

    @blocks.setter
    def blocks(self, value) -> None:
        self._blocks = value if isinstance(value, BlockList) else BlockList(value)


class Engine:
    """Runs many request programs at once on one model."""

    def __init__(self, model: LlamaModel, tokenizer, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        self.device = model.device
        mc = model.config
        num_blocks = config.num_blocks or self._pool_blocks()
        self.pool = BlockPool(
            num_blocks, config.block_size, mc.n_layers, mc.n_kv_heads, mc.head_dim, self.device, model.dtype
        )
        self.cache = ContextCache(self.pool)
        use_triton = self.device.type == "cuda" if config.use_triton is None else config.use_triton
        self.attention = PagedAttention(self.pool.k, self.pool.v, use_triton)
        if not model.fused:
            model.fuse(triton=use_triton)  # the fused layer kernels come with the Triton path
        self.max_blocks_per_seq = self.pool.blocks_for(mc.max_seq_len)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._busy_until = 0.0  # prefill-only work alone waits until then (see idle_grace_s)
        self.parked: dict[str, _Sequence] = {}  # computed prefill-only sequences, oldest first
        self._order = 0
        self._pending_events: list[Event] = []  # produced outside step(), returned by the next one
        self.eos_ids = frozenset(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id})
        self.grammars = Grammars(tokenizer, mc.vocab_size)
        self.stats = {"steps": 0, "preemptions": 0, "forward_tokens": 0}
        self.graphs = None
        if self.device.type == "cuda" and config.cuda_graphs:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    @property
    def uses_shared_kernel(self) -> bool:
        """Whether decode steps may read shared prefixes once (``shared_prefix_kernel`` not off, Triton on)."""
        return self.config.shared_prefix_kernel is not False and self.attention.use_triton

    def warmup(self) -> None:
        """Compile kernels and capture decode graphs now rather than on the first request.

        On CUDA a short request goes through prefill (a chunk after a cached prefix, too)
        and decode, so the first real request pays no Triton compile; the cache is then
        cleared and the statistics reset.
        """
        if self.device.type != "cuda":
            return
        if self.graphs is not None and not self.graphs.captured:
            self.graphs.capture()
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        text = " ".join(["0"] * 100)  # tokenizes under any vocabulary, into two blocks or more
        self.run([TextSegment(text, "\0warmup"), GenSegment("a", params)])
        # Two sequences forked from that context decode through the shared-prefix kernel.
        shared, self.config.shared_prefix_kernel = self.config.shared_prefix_kernel, True
        try:
            for i in range(2):
                self.add(f"\0warmup-{i}", [TextSegment(text, "\0warmup"), TextSegment(" 1" * (i + 1)), GenSegment("a", params)])
            while self.has_work():
                self.step()
        finally:
            self.config.shared_prefix_kernel = shared
        self.cache.clear()
        self.cache.take_evicted()
        self.stats = dict.fromkeys(self.stats, 0)

    # ------------------------------------------------------------------ sizing

    def _pool_blocks(self) -> int:
        cfg, mc = self.config, self.model.config
        per_block = mc.kv_bytes_per_token(self.model.dtype) * cfg.block_size
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cfg.gpu_memory_utilization)
        else:
            budget = cfg.kv_cache_bytes
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(
                f"the KV budget ({budget} bytes) holds no {cfg.block_size}-token block "
                f"({per_block} bytes); raise kv_cache_bytes or free device memory"
            )
        return int(blocks)

    # ------------------------------------------------------------ requests

    def add(
        self, request_id: str, segments: Sequence[Segment], *, prefill_only: bool = False, adopt: str = ""
    ) -> None:
        """Queue a program; raises ValueError (and queues nothing) if it can never run.

        ``prefill_only``: the program is text alone, the known start of a request whose
        inputs are not all ready yet; the engine computes it, caches its keyed contexts,
        reports it finished (with no output) and keeps it parked with its KV. ``extend``
        appends text streamed into the next input meanwhile.

        ``adopt``: the id of such a prefill-only sequence; this request takes over its KV
        for as many tokens as the two agree on, and computes only the rest. A request
        refused here frees that prefill too: nothing else would adopt it.
        """
        try:
            self._add(request_id, segments, prefill_only, adopt)
        except ValueError:
            if adopt:
                self.abort(adopt)
            raise

    def _add(self, request_id: str, segments: Sequence[Segment], prefill_only: bool, adopt: str) -> None:
        if any(s.request_id == request_id for s in (*self.waiting, *self.running, *self.parked.values())):
            raise ValueError(f"request {request_id!r} is already in the engine")
        keys = [s.key for s in segments if isinstance(s, GenSegment)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"output keys must be unique, got {keys}")
        if prefill_only:
            if keys or not any(isinstance(s, TextSegment) and s.context_key for s in segments):
                raise ValueError("a prefill-only program is text with context keys, and no outputs")
            segments = list(segments)
        else:
            # Text after the last output influences nothing, so it is not run.
            last_gen = max((i for i, s in enumerate(segments) if isinstance(s, GenSegment)), default=-1)
            segments = list(segments[: last_gen + 1])
        program: list[tuple[Segment, list[int]]] = []
        prompt = 1 if self._add_bos() else 0
        before_first_output: int | None = None  # tokens the first output is conditioned on
        for i, seg in enumerate(segments):
            if isinstance(seg, TextSegment):
                nxt = segments[i + 1] if i + 1 < len(segments) else None
                if isinstance(nxt, GenSegment) and nxt.params.constraint is not None:
                    seg, segments[i + 1] = _move_trailing_spaces(seg, nxt)
                # The opening text is encoded as text that starts a document; later pieces as
                # continuations (no sentencepiece-style leading space of their own).
                ids = self._encode(seg.text, first=i == 0)
                prompt += len(ids)
                program.append((seg, ids))
            else:
                if before_first_output is None:
                    before_first_output = prompt
                program.append((seg, []))
        for seg in segments:
            if isinstance(seg, GenSegment) and seg.params.constraint is not None:
                # Compiled now, so a bad one refuses the request.
                self.grammars.prepare(*seg.params.constraint, seg.prefix)
        max_output = sum(s.params.max_tokens for s in segments if isinstance(s, GenSegment))
        limit = self.model.config.max_seq_len
        if prompt + max_output > limit:
            raise ValueError(
                f"program too long: prompt is {prompt} tokens and outputs may add "
                f"{max_output} (sum of max_tokens): {prompt + max_output} > max_seq_len {limit}"
            )
        # One block more than the tokens need: a fork may have to copy a shared partial block.
        need = self.pool.blocks_for(prompt + max_output) + 1
        if need > self.pool.num_blocks:
            raise ValueError(
                f"program needs up to {prompt + max_output} tokens of KV, {need} blocks of "
                f"{self.pool.block_size} with one to spare, but the engine's pool has "
                f"{self.pool.num_blocks}; lower max_tokens or give the engine more memory"
            )
        if before_first_output == 0:
            raise ValueError(
                "the first output would start from an empty context (no text before it, and this "
                "model uses no BOS token): put some text before it"
            )
        seq = _Sequence(request_id, program, self._order, time.perf_counter())
        self._order += 1
        seq.prompt_tokens = prompt
        if self._add_bos():
            seq.tokens.append(self.tokenizer.bos_id)
        self._advance(seq)
        if prefill_only:
            seq.done, seq.prefill_only = False, True  # it is reported once its prompt is computed
            seq.stream_start = len(seq.tokens)
        elif adopt:
            self._adopt(seq, adopt)
        if seq.done:  # no outputs at all: nothing to run
            self._pending_events.append(Finished(request_id, self._result(seq)))
            return
        self.waiting.append(seq)

    def extend(self, request_id: str, pieces: Sequence[str]) -> bool:
        """Append streamed text to a prefill-only sequence; False if it is not here (any more).

        ``pieces[0]`` continues the segment being streamed; each later piece starts a new
        segment (a later part of the prompt), so tokens break where the request's own
        program breaks them. The text is re-encoded before the next step, and its last
        token is held back while it may still merge with text to come.
        """
        seq = self._prefill_seq(request_id)
        if seq is None:
            return False
        for i, piece in enumerate(pieces):
            if i:
                self._encode_stream(seq, final=True)
                seq.stream_start, seq.stream_text = len(seq.tokens), ""
            seq.stream_text += piece
        seq.stream_dirty = True
        if request_id in self.parked:  # back into the queue, to compute what was added
            del self.parked[request_id]
            self.waiting.append(seq)
        return True

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is, with its unsent events; True if it was there."""
        self._pending_events = [e for e in self._pending_events if e.request_id != request_id]
        parked = self.parked.pop(request_id, None)
        if parked is not None:
            self._release(parked)
            return True
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._release(seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._release(seq)
                return True
        return False

    def reset(self) -> list[str]:
        """After a failed step: drop the running sequences and every cached context.

        Returns the dropped request ids. Waiting requests hold no KV and stay queued;
        results already produced (Finished events) are still returned by the next step().
        """
        dropped = [s.request_id for s in self.running]
        for seq in (*self.running, *self.parked.values()):
            self._release(seq)
        self.running.clear()
        self.parked.clear()
        gone = set(dropped)
        self._pending_events = [e for e in self._pending_events if e.request_id not in gone]
        self.cache.clear()
        return dropped

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_events)

    def release_contexts(self, keys: Sequence[str]) -> None:
        """No pending request needs these contexts: they go first when memory is needed,
        but stay (and can still be forked) until then."""
        self.cache.release(keys)

    def load(self) -> dict[str, int]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_used": self.pool.num_used,
            "kv_blocks_total": self.pool.num_blocks,
            "cached_keys": len(self.cache.contexts),
        }

    def cached_blocks(self) -> int:
        """Blocks that only the context cache and parked prefills hold: evicting (or dropping the
        prefills, which goes first when memory is short) would free them, so they are room for new
        work. (When nothing runs, every used block must be one of these.)"""
        held: dict[int, int] = {}
        for blocks in (*(c.blocks for c in self.cache.contexts.values()), *(s.blocks for s in self.parked.values())):
            for b in blocks:
                held[b] = held.get(b, 0) + 1
        refcount = self.pool.refcount
        return sum(1 for b, n in held.items() if refcount[b] == n)

    def run(self, segments: Sequence[Segment], on_delta: Callable[[str, str], None] | None = None) -> RunResult:
        """Run one program to completion (other queued requests progress too)."""
        rid = f"run-{self._order}"
        self.add(rid, segments)
        while True:
            for ev in self.step():
                if ev.request_id != rid:
                    continue
                if isinstance(ev, Delta) and on_delta is not None:
                    on_delta(ev.key, ev.text)
                elif isinstance(ev, Finished):
                    return ev.result
                elif isinstance(ev, Failed):
                    raise RuntimeError(ev.error)

    # ---------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One iteration: admit, schedule, forward, sample. Returns what happened."""
        # Events collect in _pending_events until the step returns, so results produced
        # before a failure later in the step are still delivered.
        events = self._pending_events
        for seq in (*self.waiting, *self.running):
            if seq.stream_dirty:
                self._encode_stream(seq)
                if seq.pending == 0 and seq.num_computed:  # nothing new to compute (held back)
                    self._park(seq, events)
        self._admit()
        batch = self._schedule()
        if batch:
            self.stats["steps"] += 1
            # A decode is one new token of a sequence that samples right after it.
            decode = [(s, n) for s, n in batch if s.pending == 1 and s.output is not None]
            prefill = [(s, n) for s, n in batch if not (s.pending == 1 and s.output is not None)]
            ordered = decode + prefill
            logits, sampling = self._forward(ordered, len(decode))
            for seq, n in ordered:
                seq.num_computed += n
                self._register_contexts(seq)
                if seq.prefill_only and seq.pending == 0:
                    self._park(seq, events)
            for seq, token in zip(sampling, self._sample(logits, sampling, events)):
                if token is not None:
                    self._on_token(seq, token, events)
        self._pending_events = []
        return events

    # ------------------------------------------------------------ internals

    def _add_bos(self) -> bool:
        return getattr(self.tokenizer, "add_bos", True) and self.tokenizer.bos_id is not None

    def _encode(self, text: str, first: bool) -> list[int]:
        if first or not hasattr(self.tokenizer, "encode_continuation"):
            return self.tokenizer.encode(text)
        return self.tokenizer.encode_continuation(text)

    def _advance(self, seq: _Sequence) -> None:
        """Append text segments up to the next output; mark the sequence done after the last one."""
        while seq.next_segment < len(seq.program):
            seg, ids = seq.program[seq.next_segment]
            seq.next_segment += 1
            if isinstance(seg, TextSegment):
                seq.tokens.extend(ids)
                if not seq.outputs and seq.output is None:
                    if seg.blocks:
                        self._block_boundaries(seq)
                    if seg.context_key:
                        seq.boundaries.append((seg.context_key, len(seq.tokens)))
                continue
            params = seg.params
            seq.output = _Output(
                seg.key,
                params,
                Sampler(params, self.device),
                self.tokenizer.incremental_decoder(),
                start=len(seq.tokens),
                hold=max((len(s) for s in params.stop), default=1) - 1,
                matcher=(
                    self.grammars.matcher(*params.constraint, seg.prefix, len(self.running) + len(self.waiting))
                    if params.constraint
                    else None
                ),
                skip=len(seg.prefix),
                emitted=len(seg.prefix),
            )
            if seq.pending == 0:  # nothing left to run before sampling: recompute the last token
                self._rewind(seq, len(seq.tokens) - 1)
            return
        seq.done = True

    def _block_boundaries(self, seq: _Sequence) -> None:
        """Boundaries at the full blocks of the prompt so far, keyed by the digest of their tokens."""
        bs = self.pool.block_size
        floor = seq.boundaries[-1][1] if seq.boundaries else 0  # boundaries stay in order of length
        while seq.digest_len + bs <= len(seq.tokens):
            end = seq.digest_len + bs
            seq.digest, seq.digest_len = block_key(seq.digest, seq.tokens[seq.digest_len : end]), end
            if end > floor:
                seq.boundaries.append((DIGEST_PREFIX + seq.digest.hex(), end))

    def _admit(self) -> None:
        """Move waiting sequences into the running set while there is room.

        A sequence whose prompt extends a context that a running sequence is about
        to cache waits for it (one prefill, then a fork) instead of computing the
        same prefix alongside.
        """
        inflight = {
            key: length
            for s in self.running
            for key, length in s.boundaries[s.registered :]
        }
        reclaimable = None
        for seq in list(self.waiting):
            if len(self.running) >= self.config.max_running:
                return
            # A sequence that holds KV already (a parked prefill extended, or a request that
            # adopted one) continues from it; any other forks the longest cached context.
            ctx = None if seq.blocks else self.cache.lookup(seq.boundaries, seq.tokens)
            cached = len(ctx) if ctx is not None else seq.num_computed
            if any(inflight.get(key) == n and n > cached for key, n in seq.boundaries):
                continue
            start = min(cached, len(seq.tokens) - 1)  # the last token must run to give logits
            held = len(seq.blocks) or self.pool.blocks_for(start)
            needed = self.pool.blocks_for(len(seq.tokens)) - held + 1
            if self.running and reclaimable is None:
                # Blocks eviction would really free: held by an evictable context and no one else.
                refs = self.pool.refcount
                reclaimable = sum(1 for c in self.cache.evictable() for b in c.blocks if refs[b] == 1)
            if self.running and needed > self.pool.num_free + reclaimable:
                return  # wait for room rather than preempt a running sequence to admit this one
            self.waiting.remove(seq)
            if ctx is not None:
                seq.blocks = self.cache.fork(ctx)
                seq.context = seq.last_context = ctx
                seq.num_computed = start
                if seq.scheduled is None:
                    seq.cached_tokens = start
                seq.registered = sum(1 for _, n in seq.boundaries if n <= len(ctx))
            if seq.scheduled is None:
                seq.scheduled = time.perf_counter()
            self.running.append(seq)
            for key, length in seq.boundaries[seq.registered :]:
                inflight.setdefault(key, length)

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """Pick (sequence, new tokens) pairs for this forward and make their blocks writable."""
        budget = self.config.token_budget
        batch: list[tuple[_Sequence, int]] = []
        count = len(self.running)  # only preemption (in _make_room) changes it during the loop
        # Requests' own work first: decodes (one token each), then prefill chunks, oldest sequences
        # first; prefill-only sequences last (see EngineConfig.background_chunk).
        others = any(not s.prefill_only and s.pending for s in self.running)
        now = time.perf_counter()
        if others:
            self._busy_until = now + self.config.idle_grace_s
        for seq in sorted(self.running, key=lambda s: (s.prefill_only, s.pending > 1, s.order)):
            if len(self.running) != count and seq not in self.running:
                continue  # preempted while making room for an older one
            n = min(seq.pending, budget)
            if seq.prefill_only and others:
                chunk = self.config.background_chunk
                n = min(n, chunk) if not seq.reported or seq.pending >= chunk else 0
            elif seq.prefill_only and not others:
                # Just idle: a request unblocked by one that finished may be on its way.
                n = 0 if now < self._busy_until else min(n, max(1, self.config.token_budget // 16))
            if n <= 0:
                continue
            if not self._make_room(seq, n):
                continue  # this sequence itself was preempted
            batch.append((seq, n))
            budget -= n
            if budget == 0:
                break
        if len(self.running) == count:
            return batch
        running = set(self.running)
        return [(s, n) for s, n in batch if s in running]

    def _make_room(self, seq: _Sequence, n: int) -> bool:
        """Ensure seq owns writable blocks for its next n positions; evict/preempt as needed."""
        while True:
            if self._writable(seq, seq.num_computed, seq.num_computed + n):
                return True
            if self.cache.evict_one() or self._drop_parked():
                continue
            if len(self.running) == 1 and seq.context is not None:
                # Alone and still short: let go of the context it forked (its own block
                # references stay) so that context, too, can be evicted.
                self.cache.unfork(seq.context)
                seq.context = None
                continue
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim)
            if victim is seq:
                return False

    def _drop_parked(self) -> bool:
        """Free the oldest parked prefill (an optimisation, so it goes before any running work)."""
        if not self.parked:
            return False
        self._release(self.parked.pop(next(iter(self.parked))))
        return True

    def _writable(self, seq: _Sequence, start: int, end: int) -> bool:
        """Copy shared blocks in [start, end) and append new ones; False if the pool ran dry."""
        bs = self.pool.block_size
        for i in range(start // bs, (end - 1) // bs + 1):
            if i < len(seq.blocks):
                old = seq.blocks[i]
                if self.pool.refcount[old] > 1:
                    new = self.pool.allocate()
                    if new is None:
                        return False
                    self.pool.copy(old, new)
                    self.pool.decref([old])
                    seq.blocks[i] = new
            else:
                new = self.pool.allocate()
                if new is None:
                    return False
                seq.blocks.append(new)
        return True

    def _preempt(self, seq: _Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.registered = 0
        self.stats["preemptions"] += 1
        # Back in arrival order (ahead of anything younger that is waiting).
        at = next((i for i, w in enumerate(self.waiting) if w.order > seq.order), len(self.waiting))
        self.waiting.insert(at, seq)

    def _park(self, seq: _Sequence, events: list[Event]) -> None:
        """A prefill-only sequence is computed: report it (the first time) and keep its KV aside."""
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.parked[seq.request_id] = seq
        if not seq.reported:
            seq.reported = True
            events.append(Finished(seq.request_id, self._result(seq)))

    def _encode_stream(self, seq: _Sequence, final: bool = False) -> None:
        """Re-encode the streamed segment: keep the tokens that did not change, replace the rest.

        Its last token is held back unless the segment is ``final``: it may still merge
        with text to come, and a wrong guess would have to be recomputed.
        """
        seq.stream_dirty = False
        ids = self._encode(seq.stream_text, first=False) if seq.stream_text else []
        if not final:
            ids = ids[:-1]
        old = seq.tokens[seq.stream_start :]
        same = _common_prefix(old, ids)
        if same < len(old):
            del seq.tokens[seq.stream_start + same :]
            self._rewind(seq, len(seq.tokens))
        seq.tokens.extend(ids[same:])
        seq.prompt_tokens = len(seq.tokens)

    def _adopt(self, seq: _Sequence, stream_id: str) -> None:
        """Start ``seq`` from a prefill-only sequence's KV, as far as their tokens agree.

        Unless the context cache holds a longer prefix of ``seq``'s prompt: then the prefill is
        dropped and ``seq`` forks the cached context when it is admitted, as any request does.
        """
        stream = self._prefill_seq(stream_id)
        if stream is None:
            return  # dropped for memory, or never arrived: prefill as usual
        if self.parked.pop(stream_id, None) is None:
            (self.waiting if stream in self.waiting else self.running).remove(stream)
        n = min(_common_prefix(stream.tokens[: stream.num_computed], seq.tokens), len(seq.tokens) - 1)
        cached = self.cache.lookup(seq.boundaries, seq.tokens)
        if n <= 0 or (cached is not None and len(cached) > n):
            self._release(stream)  # a longer cached context (the same prompt ran before) is worth more
            return
        seq.blocks, seq.context, seq.last_context = stream.blocks, stream.context, stream.last_context
        stream.blocks, stream.context, stream.last_context = [], None, None
        seq.num_computed = seq.cached_tokens = n
        self._trim_blocks(seq)
        # Its keyed boundaries within the adopted KV are cached at its first step (those the prefill
        # cached itself are found there): streamed text has no key in the prefill, only here, and
        # other requests that share it fork it from the cache instead of prefilling it again.
        seq.registered, seq.last_context = 0, None

    def _prefill_seq(self, request_id: str) -> _Sequence | None:
        """The prefill-only sequence ``request_id``, parked, waiting or running; None if it is not here."""
        return self.parked.get(request_id) or next(
            (s for s in (*self.waiting, *self.running) if s.request_id == request_id and s.prefill_only), None
        )

    def _release(self, seq: _Sequence) -> None:
        self.pool.decref(seq.blocks)
        seq.blocks = []
        if seq.context is not None:
            self.cache.unfork(seq.context)
            seq.context = None
        seq.last_context = None

    def _rewind(self, seq: _Sequence, n: int) -> None:
        """Keep only the first n computed positions (the tokens themselves stay)."""
        seq.num_computed = min(seq.num_computed, n)
        self._trim_blocks(seq)

    def _trim_blocks(self, seq: _Sequence) -> None:
        """Return blocks beyond what the sequence's tokens need."""
        keep = self.pool.blocks_for(len(seq.tokens))
        if len(seq.blocks) > keep:
            self.pool.decref(seq.blocks[keep:])
            del seq.blocks[keep:]

    def _register_contexts(self, seq: _Sequence) -> None:
        """Cache keyed prompt boundaries this sequence has now computed."""
        while seq.registered < len(seq.boundaries):
            key, length = seq.boundaries[seq.registered]
            if length > seq.num_computed:
                return
            seq.registered += 1
            ctx = self.cache.contexts.get(key)
            if ctx is None:
                ctx = self.cache.insert(key, seq.tokens[:length], seq.blocks, seq.last_context)
            seq.last_context = ctx

    def _forward(self, batch: list[tuple[_Sequence, int]], num_decode: int):
        """Build the packed inputs, run the model; returns (logits, sequences to sample)."""
        bs = self.pool.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[_Sequence] = []
        for seq, n in batch:
            start = seq.num_computed
            tokens.extend(seq.tokens[start : start + n])
            for p in range(start, start + n):
                positions.append(p)
                slots.append(seq.blocks[p // bs] * bs + p % bs)
            if start + n == len(seq.tokens) and seq.output is not None:
                logits_rows.append(len(tokens) - 1)
                sampling.append(seq)
        self.stats["forward_tokens"] += len(tokens)
        dev = self.device
        decode, prefill = batch[:num_decode], batch[num_decode:]
        decode_seqs = [s for s, _ in decode]
        plan = None
        graphed = self.graphs is not None and not prefill
        staged = self.graphs.stage(decode_seqs) if graphed else None  # the planner reads these rows too
        if decode and self.uses_shared_kernel:
            plan = self._shared_plan(decode_seqs, staged)
        if graphed:
            logits = self.graphs.run(tokens, positions, slots, plan)
            if logits is not None:
                return logits, sampling

        def tables(seqs):
            width = max(len(s.blocks) for s in seqs)
            return torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], dtype=torch.int32, device=dev)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode=num_decode,
            decode_block_tables=tables(decode_seqs) if decode else None,
            decode_context_lens=(
                torch.tensor([s.num_computed + 1 for s, _ in decode], dtype=torch.int32, device=dev) if decode else None
            ),
            prefill_block_tables=tables([s for s, _ in prefill]) if prefill else None,
            prefill_query_start_loc=(
                torch.tensor(_cumsum([n for _, n in prefill]), dtype=torch.int32, device=dev) if prefill else None
            ),
            prefill_context_lens=(
                torch.tensor([s.num_computed + n for s, n in prefill], dtype=torch.int32, device=dev)
                if prefill
                else None
            ),
        )
        meta.shared_plan = plan
        logits = self.model(
            torch.tensor(tokens, device=dev),
            torch.tensor(positions, device=dev),
            self.attention,
            meta,
            torch.tensor(logits_rows, device=dev) if logits_rows else torch.zeros(0, dtype=torch.long, device=dev),
        )
        return logits, sampling

    def _shared_plan(self, seqs: list[_Sequence], tables=None):
        """The batch's shared-prefix plan when the shared kernel should run it, else None.
        ``tables``: the block tables already as a numpy array (the graphs' staged rows), if any."""
        bs = self.pool.block_size
        first = [s.blocks[0] for s in seqs if s.num_computed + 1 >= bs]  # only full blocks are shared
        if len(set(first)) == len(first):
            return None  # no two sequences share even their first block: skip the planner
        import kernels
        from kernels.paged_decode import multiprocessors

        plan = kernels.plan_shared_prefix(
            [s.blocks for s in seqs] if tables is None else tables, [s.num_computed + 1 for s in seqs], bs
        )
        if plan is None or self.config.shared_prefix_kernel:
            return plan
        mc = self.model.config
        choice = kernels.choose_decode_kernel(
            plan, mc.n_kv_heads, mc.head_dim, self.pool.k.element_size(), n_heads=mc.n_heads, sms=multiprocessors(self.device)
        )
        return plan if choice == "shared" else None

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence], events: list[Event]) -> list[int | None]:
        """Next token per sequence (greedy rows batched); a sequence whose sampling fails
        fails alone (None), the others go on."""
        constrained = [i for i, s in enumerate(seqs) if s.output.matcher is not None]
        if constrained:
            logits = self.grammars.apply(logits, constrained, [seqs[i].output.matcher for i in constrained])
        greedy = [i for i, s in enumerate(seqs) if s.output.params.greedy]
        out: list[int | None] = [None] * len(seqs)
        if greedy:
            rows = logits[greedy] if len(greedy) < len(seqs) else logits
            for i, t in zip(greedy, torch.argmax(rows, dim=-1).tolist()):
                out[i] = t
        for i, seq in enumerate(seqs):
            if not seq.output.params.greedy:
                try:
                    out[i] = seq.output.sampler.sample(logits[i])
                except RuntimeError as exc:
                    self._fail(seq, f"sampling failed: {exc}", events)
        return out

    def _fail(self, seq: _Sequence, error: str, events: list[Event]) -> None:
        self.running.remove(seq)
        self._release(seq)
        events.append(Failed(seq.request_id, error))

    def _on_token(self, seq: _Sequence, token: int, events: list[Event]) -> None:
        out = seq.output
        now = time.perf_counter()
        if seq.first_token is None:
            seq.first_token = now
        params = out.params
        if out.matcher is not None and not out.matcher.consume_token(token):
            self._fail(seq, f"the constrained output could not take token {token}: {out.matcher.get_error()}", events)
            return
        # A constrained output ends at EOS even with ignore_eos: its grammar allows EOS only once complete.
        if token in self.eos_ids and (not params.ignore_eos or out.matcher is not None):
            if out.matcher is not None:
                out.matcher.rollback(1)  # the matcher then holds exactly the output's tokens, as after a stop
            self._finish_output(seq, "eos", None, events)
            return
        old_len = len(out.text)
        out.push(token, out.decoder.push(token))
        seq.tokens.append(token)
        stop_at = _find_stop(out.text, old_len, params.stop, out.skip)
        if stop_at is not None:
            self._finish_output(seq, "stop", stop_at, events)
        elif out.matcher is not None and out.matcher.is_stopped():  # the constraint is complete: nothing may follow
            self._finish_output(seq, "stop", None, events)
        elif out.generated == params.max_tokens:
            self._finish_output(seq, "length", None, events)
        else:
            self._emit(seq, len(out.text) - out.hold, events)

    def _finish_output(self, seq: _Sequence, reason: FinishReason, stop_at: int | None, events: list[Event]) -> None:
        out = seq.output
        if stop_at is None:
            old_len = len(out.text)
            out.flush(out.decoder.flush())
            stop_at = _find_stop(out.text, old_len, out.params.stop, out.skip)
            if stop_at is not None:
                reason = "stop"
        if stop_at is not None:
            n = out.kept_tokens(stop_at)
            # A token that straddles the stop's start is dropped, but the text it carried
            # before the stop is kept (it may have been streamed already): re-encode it.
            tail = out.text[(out.ends[n - 1] if n else 0) : stop_at]
            if out.matcher is not None:
                out.matcher.rollback(len(out.tokens) - n)
            del out.tokens[n:]
            out.text = out.text[:stop_at]
            # Roll back so the context holds exactly the kept output.
            del seq.tokens[out.start + n :]
            self._rewind(seq, len(seq.tokens))
            if tail:
                tail_ids = self._encode(tail, first=False)
                out.tokens.extend(tail_ids)
                seq.tokens.extend(tail_ids)
                if out.matcher is not None:
                    out.matcher.consume_tokens(tail_ids)
        if out.matcher is not None and not (out.matcher.is_accepting() and not out.matcher.is_error()):
            how = {"length": f"at max_tokens={out.params.max_tokens}", "stop": "at a stop string", "eos": "at EOS"}[reason]
            fix = "raise max_tokens" if reason == "length" else "remove the stop strings that can occur inside it"
            self._fail(
                seq,
                f"a constrained output ended {how} before its {describe(*out.params.constraint)} was satisfied, "
                f"with {_shorten(out.text[out.skip :])!r}; {fix}",
                events,
            )
            return
        self._emit(seq, len(out.text), events)
        seq.outputs[out.key] = out.text[out.skip :]
        seq.output_tokens[out.key] = out.generated
        seq.finish_reasons[out.key] = reason
        seq.output = None
        self._advance(seq)
        if seq.done:
            self.running.remove(seq)
            self._release(seq)
            events.append(Finished(seq.request_id, self._result(seq)))

    def _emit(self, seq: _Sequence, upto: int, events: list[Event]) -> None:
        out = seq.output
        if upto > out.emitted:
            events.append(Delta(seq.request_id, out.key, out.text[out.emitted : upto]))
        out.emitted = max(out.emitted, upto)

    def _result(self, seq: _Sequence) -> RunResult:
        now = time.perf_counter()
        scheduled = seq.scheduled if seq.scheduled is not None else now
        first = seq.first_token
        t = Timings(
            queue_s=scheduled - seq.received,
            prefill_s=(first if first is not None else now) - scheduled,
            decode_s=now - first if first is not None else 0.0,
            ttft_s=first - seq.received if first is not None else None,
        )
        return RunResult(
            dict(seq.outputs), dict(seq.output_tokens), dict(seq.finish_reasons),
            seq.prompt_tokens, seq.cached_tokens, t,
        )  # fmt: skip


def _move_trailing_spaces(text: TextSegment, output: GenSegment) -> tuple[TextSegment, GenSegment]:
    """Move the spaces that end ``text`` into the constrained ``output`` that follows it.

    Tokenizers of the GPT-2 and sentencepiece families put a word's space in front of it
    (" billing" is one token); a prompt that ends in a space leaves the model a context it
    rarely saw, and a constraint then forbids it to recover. So the output's grammar starts
    with those spaces, the model writes " billing" as it would, and the spaces are not part
    of the output's value. The text loses its context key: its tokens no longer end where
    the key's hash says.
    """
    stripped = text.text.rstrip(" ")
    if stripped == text.text or not stripped:
        return text, output
    return TextSegment(stripped), dataclasses.replace(output, prefix=text.text[len(stripped) :])


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _find_stop(text: str, old_len: int, stops: tuple[str, ...], floor: int = 0) -> int | None:
    """Where the earliest stop string in `text` starts, given none was in text[:old_len].

    A new match must end in the new text, so each search starts len(stop) - 1 chars before it,
    and not before `floor` (the output's own text starts there).
    """
    hits = [text.find(s, max(floor, old_len - len(s) + 1)) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None
