"""Runs one request's program: prompt text to prefill, interleaved with outputs to generate.

A program is a list of segments, e.g.
    [TextSegment("Q: ... A:"), GenSegment("a", params), TextSegment(" Then:"),
     GenSegment("b", params)]
The whole program shares one KV cache, so each output sees the prompt and all
earlier outputs, and nothing is prefilled twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .model import KVCache, LlamaModel
from .sampler import Sampler, SamplingParams
from .tokenizer import ByteTokenizer

PREFILL_CHUNK = 512  # most tokens per prefill forward; bounds activation memory

FinishReason = Literal["length", "stop", "eos"]


@dataclass(frozen=True)
class TextSegment:
    """Text that goes into the context as is (constant, or an already-filled input)."""

    text: str


@dataclass(frozen=True)
class GenSegment:
    """An output variable, generated at this point of the context."""

    key: str
    params: SamplingParams = field(default_factory=SamplingParams)


Segment = TextSegment | GenSegment


@dataclass
class Timings:
    """Wall-clock seconds spent on one run."""

    prefill_s: float = 0.0  # all prompt forwards
    decode_s: float = 0.0  # all token-by-token forwards and sampling
    ttft_s: float | None = None  # run start to first sampled token; None if nothing was generated


@dataclass
class RunResult:
    """What a program produced, per output key."""

    outputs: dict[str, str]
    output_tokens: dict[str, int]
    finish_reasons: dict[str, FinishReason]
    prompt_tokens: int  # BOS plus every prefilled text token
    timings: Timings


@dataclass
class _Output:
    """Generation state of one output: its tokens and where their text ends."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    ends: list[int] = field(default_factory=list)  # len(text) after each token
    emitted: int = 0  # chars already passed to on_delta

    def push(self, token: int, text: str) -> None:
        """Record a sampled token and the text it completed."""
        self.tokens.append(token)
        self.text += text
        self.ends.append(len(self.text))

    def flush(self, text: str) -> None:
        """Record the decoder's end-of-stream text; it comes from the trailing tokens."""
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


class ProgramRunner:
    """Executes programs against one model, one request at a time."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: ByteTokenizer,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device if device is None else torch.device(device)

    @torch.inference_mode()
    def run(
        self,
        segments: Sequence[Segment],
        on_delta: Callable[[str, str], None] | None = None,
    ) -> RunResult:
        """Prefill and generate through `segments` in order.

        on_delta(key, text) receives each output's text as it is produced; text
        that might still become part of a stop string is held back until it cannot.
        """
        start_time = time.perf_counter()
        keys = [s.key for s in segments if isinstance(s, GenSegment)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"output keys must be unique, got {keys}")
        # Text after the last output influences nothing, so it is not run.
        last_gen = max((i for i, s in enumerate(segments) if isinstance(s, GenSegment)), default=-1)
        segments = segments[: last_gen + 1]

        texts = [self.tokenizer.encode(s.text) for s in segments if isinstance(s, TextSegment)]
        prompt_tokens = 1 + sum(len(t) for t in texts)
        max_output = sum(s.params.max_tokens for s in segments if isinstance(s, GenSegment))
        limit = self.model.config.max_seq_len
        if prompt_tokens + max_output > limit:
            raise ValueError(
                f"program too long: prompt is {prompt_tokens} tokens and outputs may add "
                f"{max_output} (sum of max_tokens): {prompt_tokens + max_output} > "
                f"max_seq_len {limit}"
            )

        cache = KVCache.allocate(
            self.model.config, prompt_tokens + max_output, self.device, self.model.dtype
        )
        # The sequence so far; the cache holds a prefix of it, the rest awaits a forward.
        ids = [self.tokenizer.bos_id]
        result = RunResult({}, {}, {}, prompt_tokens, Timings())
        texts_iter = iter(texts)
        for seg in segments:
            if isinstance(seg, TextSegment):
                ids.extend(next(texts_iter))
                continue
            t0 = time.perf_counter()
            logits = self._prefill(ids, cache)
            result.timings.prefill_s += time.perf_counter() - t0
            self._generate(seg, ids, cache, logits, result, start_time, on_delta)
        return result

    def _prefill(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Run the not-yet-cached tail of `ids`; return the last position's logits."""
        if cache.length == len(ids):
            # The last token's logits were dropped (e.g. after a stop rollback): recompute them.
            cache.truncate(cache.length - 1)
        for begin in range(cache.length, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor(ids[begin : begin + PREFILL_CHUNK], device=self.device)
            logits = self.model(chunk, cache, last_only=True)
        _synchronize(self.device)  # so the time lands on prefill, not on the first sample
        return logits[-1]

    def _generate(
        self,
        seg: GenSegment,
        ids: list[int],
        cache: KVCache,
        logits: torch.Tensor,
        result: RunResult,
        start_time: float,
        on_delta: Callable[[str, str], None] | None,
    ) -> None:
        """Decode one output into `ids`/`cache` and record it in `result`."""
        params = seg.params
        sampler = Sampler(params, self.device)
        decoder = self.tokenizer.incremental_decoder()
        out = _Output()
        gen_start = len(ids)
        hold = max((len(s) for s in params.stop), default=1) - 1
        t0 = time.perf_counter()
        stop_at = None
        while True:
            token = sampler.sample(logits)
            if result.timings.ttft_s is None:
                result.timings.ttft_s = time.perf_counter() - start_time
            if token == self.tokenizer.eos_id and not params.ignore_eos:
                reason: FinishReason = "eos"
                break
            old_len = len(out.text)
            out.push(token, decoder.push(token))
            stop_at = _find_stop(out.text, old_len, params.stop)
            if stop_at is not None:
                reason = "stop"
                break
            if len(out.tokens) == params.max_tokens:
                reason = "length"
                break
            _emit(on_delta, seg.key, out, len(out.text) - hold)
            # The sampled token has to go through the model before the next one can
            # be sampled; the last one is left for whatever comes next to prefill.
            logits = self.model(torch.tensor([token], device=self.device), cache)[-1]

        if stop_at is None:
            old_len = len(out.text)
            out.flush(decoder.flush())
            stop_at = _find_stop(out.text, old_len, params.stop)
            if stop_at is not None:
                reason = "stop"
        if stop_at is not None:
            n = out.kept_tokens(stop_at)
            del out.tokens[n:]
            out.text = out.text[: out.ends[n - 1] if n else 0]
            # Roll back so the context holds exactly the kept output.
            cache.truncate(gen_start + n)
        _emit(on_delta, seg.key, out, len(out.text))
        result.timings.decode_s += time.perf_counter() - t0

        ids.extend(out.tokens)
        result.outputs[seg.key] = out.text
        result.output_tokens[seg.key] = len(out.tokens)
        result.finish_reasons[seg.key] = reason


def _find_stop(text: str, old_len: int, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` starts, given none was in text[:old_len].

    A new match must end in the new text, so each search starts len(stop) - 1 chars before it.
    """
    hits = [text.find(s, max(0, old_len - len(s) + 1)) for s in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _emit(on_delta: Callable[[str, str], None] | None, key: str, out: _Output, upto: int) -> None:
    """Pass out.text[emitted:upto] to on_delta, if there is any."""
    if on_delta is not None and upto > out.emitted:
        on_delta(key, out.text[out.emitted : upto])
    out.emitted = max(out.emitted, upto)


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
