"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a large model is hundreds of small kernel launches; replaying
a captured graph issues them all at once, so batch-1 decode approaches the time
it takes to read the weights. Inputs go through static buffers; a batch is
padded up to its bucket with rows that write nowhere (slot -1) and attend to one
token of block 0, and their logits are dropped.

Batches whose sequences share prefixes get a second graph per bucket (from 2 up), captured over
a static shared-prefix launch (``kernels.SharedPrefixLaunch.static``): each step loads its plan's
items into that launch's buffer and replays, so a shared step costs the host no more than a
plain one plus its plan. A plan the launch cannot hold runs eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention import AttentionMetadata

if TYPE_CHECKING:
    from .engine import Engine


def buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then multiples of 16 up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class StagedRows:
    """Block tables kept in a host array across steps, a row rewritten only when its sequence or
    that sequence's blocks changed (``BlockList.version``): at 64 sequences over 8k tokens,
    converting every table again each step cost about a millisecond of host time."""

    def __init__(self, rows) -> None:
        self.rows = rows  # [max batch, width] ints, zero at first
        self.owners: list[tuple[object, int, int] | None] = [None] * rows.shape[0]  # (sequence, version, length)

    def write(self, seqs, size: int) -> None:
        """Rows ``[0, len(seqs))`` become the sequences' tables (zero past each), rows up to ``size`` zero."""
        rows, owners = self.rows, self.owners
        for i, seq in enumerate(seqs):
            blocks, owner = seq.blocks, owners[i]
            if owner is not None and owner[0] is seq and owner[1] == blocks.version:
                continue
            n = len(blocks)
            rows[i, :n] = blocks
            if owner is not None and owner[2] > n:
                rows[i, n : owner[2]] = 0
            owners[i] = (seq, blocks.version, n)
        for i in range(len(seqs), size):  # padding rows: attend to one token of block 0
            if owners[i] is not None:
                rows[i, : owners[i][2]] = 0
                owners[i] = None


class DecodeGraphs:
    """Captured decode forwards of an engine's model, replayed for decode-only batches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sizes = buckets(engine.config.max_running)
        self.max_batch = self.sizes[-1]
        dev = engine.device
        n, width = self.max_batch, engine.max_blocks_per_seq
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        # Host-side staging, pinned so the copies are asynchronous.
        self.host_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=True)
        self.host_rows = self.host_tables.numpy()
        self.staged_rows = StagedRows(self.host_rows)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # Shared-prefix graphs and their static launches, per bucket of 2 or more rows.
        self.shared_sizes = [b for b in self.sizes if b >= 2] if engine.uses_shared_kernel else []
        self.shared_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.shared_outputs: dict[int, torch.Tensor] = {}
        self.launches = {}
        self.pool = None  # the graphs' shared memory pool
        self.captured = False

    def _meta(self, b: int, shared: bool = False) -> AttentionMetadata:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:b],
            num_decode=b,
            decode_block_tables=self.tables[:b],
            decode_context_lens=self.lens[:b],
            prefill_block_tables=None,
            prefill_query_start_loc=None,
            prefill_context_lens=None,
        )
        meta.shared_plan = self.launches[b] if shared else None
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller ones reuse its memory."""
        import kernels

        model, attention = self.engine.model, self.engine.attention
        mc = model.config
        for b in self.shared_sizes:
            self.launches[b] = kernels.SharedPrefixLaunch.static(
                self.engine.device, b, mc.n_heads // mc.n_kv_heads, mc.n_kv_heads
            )
        self.slots.fill_(-1)
        self.lens.fill_(1)
        self.tables.zero_()
        stream = torch.cuda.Stream(self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                # Warm up outside the graph: Triton compiles and autotunes, caches fill.
                model(self.tokens[:b], self.positions[:b], attention, self._meta(b))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[b] = model(self.tokens[:b], self.positions[:b], attention, self._meta(b))
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b] = graph
                if b in self.launches:
                    model(self.tokens[:b], self.positions[:b], attention, self._meta(b, shared=True))
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        self.shared_outputs[b] = model(
                            self.tokens[:b], self.positions[:b], attention, self._meta(b, shared=True)
                        )
                    self.shared_graphs[b] = graph
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        torch.cuda.synchronize(self.engine.device)
        self.captured = True

    def bucket(self, b: int) -> int:
        """The captured batch size a batch of ``b`` rows runs as."""
        return next(s for s in self.sizes if s >= b)

    def stage(self, seqs):
        """Write the batch's block tables to the pinned host buffer, for the next ``run``; returns
        them as a numpy view ``[len(seqs), width]`` (rows zero past each table), which the
        shared-prefix planner reads too."""
        # The pinned buffer is rewritten while the previous step's copy from it might be in
        # flight; that cannot happen here, because every step ends by reading its sampled
        # tokens back to the host, which waits for the stream.
        self.staged_rows.write(seqs, self.bucket(len(seqs)))
        return self.host_rows[: len(seqs)]

    def run(self, tokens: list[int], positions: list[int], slots: list[int], plan=None) -> torch.Tensor | None:
        """Logits [len(tokens), vocab] of one decode token per sequence of the batch last given to
        ``stage``; with a shared-prefix ``plan``, None when no captured launch can hold it (the
        caller runs the step eagerly)."""
        if not self.captured:
            self.capture()
        b = len(tokens)
        size = self.bucket(b)
        if plan is not None and (size not in self.launches or not self.launches[size].fill(plan)):
            return None
        host = self.host_tables
        pad = size - b
        self.tokens[:size].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.lens[:size].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.tables[:size].copy_(host[:size], non_blocking=True)
        if plan is not None:
            self.shared_graphs[size].replay()
            return self.shared_outputs[size][:b]
        self.graphs[size].replay()
        return self.outputs[size][:b]
