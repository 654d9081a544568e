"""Sampling parameters and the next-token sampler: greedy, or temperature + top-k + top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts seeds below this


@dataclass(frozen=True)
class SamplingParams:
    """How one output is generated.

    temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off.
    Generation ends at max_tokens, at EOS (unless ignore_eos), or where one of
    the `stop` strings appears (the output then ends just before it). A given
    `seed` makes sampling reproducible.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a tuple of strings, not a single string: {self.stop!r}")
        # A list is the natural thing to pass; store a tuple so params stay hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must contain only non-empty strings, got {self.stop!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        """Whether the next token is simply the argmax."""
        return self.temperature == 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Sampler:
    """Picks next tokens for one output; owns that output's random generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy, without touching the global RNG
        else:
            self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token id for 1-D logits [vocab]."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        # Shifted so the largest logit is 0: a tiny temperature then sends the others to -inf
        # instead of overflowing to inf - inf = NaN.
        logits = (logits.float() - logits.max()) / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth_largest = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth_largest, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    # A token is dropped when the tokens ranked above it already reach top_p;
    # the most likely token therefore always survives.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
