"""Token masks for constrained outputs (choices, regex, JSON schema), built with llguidance.

One ``Grammars`` per engine: it turns the engine's tokenizer into llguidance's once, compiles
each constraint once (an LRU keyed by the constraint; a new output gets a cheap copy of the
compiled matcher), and masks a batch's logits. The mask is applied to the logits that the
model (or a CUDA-graph replay) returned, before sampling: the graph is not touched, the mask
is one more input to the sampling step.

Masks are computed on the CPU into a bitmask (32 tokens per int32; a batch's masks on
llguidance's thread pool) and unpacked where the logits are: on the GPU after a copy from
pinned memory, on a CPU with numpy. On CUDA the forward pass is launched before the masks
are computed, so the CPU builds them while the GPU runs the model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from engine_server.constraints import ConstraintError, describe, grammar

CACHE_SIZE = 256  # compiled constraints kept per engine
# Copies of one compiled matcher share its lexer behind a lock, so their masks are computed one
# at a time even on llguidance's thread pool (H200 host, 64 JSON outputs: 5.9 ms from one root,
# 1.9 ms from 8). So while other sequences are in the engine, each new output copies the next of
# ROOTS compiled roots in turn (a root is compiled when its turn first comes, about 1 ms): rows
# of a batch then hold different locks. An engine with nothing else in it uses the first root
# only, so a constraint used one request at a time is compiled once. Measured side by side on
# the H200 at batch 64: 8 roots 1.35x the unconstrained step, 64 roots 1.14x.
ROOTS = 64
MAX_COMPILED = 1024  # compiled matchers kept in all; least recently used constraints go first


class Grammars:
    """Compiled constraints for one tokenizer and vocabulary, and the masks they put on logits."""

    def __init__(self, tokenizer: Any, vocab_size: int, capacity: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (the model's, may exceed the tokenizer's)
        self.capacity = capacity
        self._ll_tokenizer = None
        self._compiled: OrderedDict[tuple[str, Any, str], _Roots] = OrderedDict()
        self.compiled = 0  # grammar compilations (cache misses, and the other roots of a busy engine)
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._pool = None  # llguidance's LLExecutor, made when a step first has two constrained rows

    def matcher(self, key: str, value: Any, prefix: str = "", running: int = 0) -> Any:
        """A fresh llguidance matcher at the start of constraint ``(key, value)``, after the forced ``prefix``.

        ``running``: how many sequences the engine holds, running or waiting (more roots for a busy engine).
        Raises ``ConstraintError`` when the constraint does not compile for this tokenizer.
        """
        roots = self.prepare(key, value, prefix)
        if running == 0:
            return roots.matchers[0].deep_copy()
        roots.turn = (roots.turn + 1) % ROOTS
        if roots.turn == len(roots.matchers):
            roots.matchers.append(self._compile(key, value, prefix))
            while len(self._compiled) > 1 and sum(len(r.matchers) for r in self._compiled.values()) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return roots.matchers[roots.turn].deep_copy()

    def prepare(self, key: str, value: Any, prefix: str = "") -> _Roots:
        """The compiled roots of a constraint, compiling the first now if it is not cached.

        Raises ``ConstraintError`` when the constraint does not compile for this tokenizer.
        """
        cache_key = (key, value, prefix)
        roots = self._compiled.get(cache_key)
        if roots is None:
            roots = self._compiled[cache_key] = _Roots([self._compile(key, value, prefix)])
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(cache_key)
        return roots

    def _compile(self, key: str, value: Any, prefix: str) -> Any:
        from llguidance import LLMatcher

        compiled = LLMatcher(self._tokenizer(), grammar(key, value, prefix), log_level=0)
        if compiled.is_error():
            raise ConstraintError(f"{describe(key, value)} does not compile: {compiled.get_error()}")
        self.compiled += 1
        return compiled

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> torch.Tensor:
        """``logits`` [n, vocab] with every token that ``matchers[i]`` forbids set to -inf in ``rows[i]``.

        Returns a new tensor (the input may be a CUDA graph's output buffer). One bitmask covers
        every row (all bits set in the unconstrained ones), so the masking is one ``masked_fill``,
        and nothing here waits for the GPU: the bitmask goes over from pinned memory.
        """
        n, vocab = logits.shape
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((n, words), -1, dtype=torch.int32, pin_memory=logits.is_cuda)
        # llguidance writes the masks straight into the tensor's memory (what llguidance.torch's helpers
        # do; that module is not imported: its torch.compile decorator costs seconds at import).
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask[rows[0]].data_ptr(), words * 4)
        else:  # llguidance's thread pool, without the GIL
            self._executor().unsafe_compute_mask_ptr(list(zip(matchers, rows)), bitmask.data_ptr(), words * 4, n)
        if logits.is_cuda:
            shifts = self._shifts.get(logits.device)
            if shifts is None:
                shifts = self._shifts[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
            bits = bitmask.to(logits.device, non_blocking=True)
            forbidden = ((bits.unsqueeze(-1) >> shifts) & 1).view(n, words * 32)[:, :vocab] == 0
        else:
            unpacked = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
            forbidden = torch.from_numpy(unpacked == 0)
        return logits.masked_fill(forbidden, float("-inf"))

    def _executor(self) -> Any:
        if self._pool is None:
            from llguidance import LLExecutor

            self._pool = LLExecutor()
        return self._pool

    def _tokenizer(self) -> Any:
        """llguidance's view of the engine's tokenizer, built on first use (about 0.5 s for 50k tokens)."""
        if self._ll_tokenizer is None:
            from llguidance import LLTokenizer, TokenizerWrapper

            tok = self.tokenizer
            eos = sorted(getattr(tok, "eos_ids", None) or {tok.eos_id})
            if hasattr(tok, "tokenizer_json"):
                self._ll_tokenizer = LLTokenizer(tok.tokenizer_json(), n_vocab=self.vocab_size, eos_token=eos)
            else:
                vocabulary = TokenizerWrapper(_ByteVocabulary(tok))
                self._ll_tokenizer = LLTokenizer(vocabulary, n_vocab=self.vocab_size, eos_token=eos)
        return self._ll_tokenizer


class _ByteVocabulary:
    """The byte tokenizer (tokenizer.ByteTokenizer) in the shape llguidance's TokenizerWrapper reads."""

    def __init__(self, tok: Any) -> None:
        specials = {tok.bos_id: b"<s>", tok.eos_id: b"</s>", tok.pad_id: b"<pad>"}
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.tokens = [bytes([i]) if i < 256 else specials.get(i, b"") for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(specials)

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


class _Roots:
    """The compiled matchers of one constraint, and whose turn it is to be copied."""

    def __init__(self, matchers: list[Any]) -> None:
        self.matchers = matchers
        self.turn = 0
