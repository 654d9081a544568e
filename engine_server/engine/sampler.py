"""Sampling parameters and the next-token sampler: greedy, or temperature + top-k + top-p."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from engine_server.protocol import CONSTRAINT_OPTIONS, check_one_constraint, check_sampling_option, is_unset


@dataclass(frozen=True)
class SamplingParams:
    """How one output is generated.

    temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off.
    Generation ends at max_tokens, at EOS (unless ignore_eos), or where one of
    the `stop` strings appears (the output then ends just before it). A given
    `seed` makes sampling reproducible. One of `choices`, `regex` and `json` (a
    JSON schema's text) constrains the output: only tokens that keep it inside
    the constraint are drawn, and it ends when the constraint is complete.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    choices: tuple[str, ...] = ()
    regex: str | None = None
    json: str | None = None
    items: int = 0  # the manager splits such an output into items; generation ignores it

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a tuple of strings, not a single string: {self.stop!r}")
        # The protocol's rulebook, the same one the notebook and the manager apply.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if is_unset(f.name, value):
                if f.name in ("stop", "choices"):
                    object.__setattr__(self, f.name, ())
                continue
            try:
                object.__setattr__(self, f.name, check_sampling_option(f.name, value))
            except TypeError as exc:
                raise ValueError(str(exc)) from None
        check_one_constraint({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @property
    def constraint(self) -> tuple[str, object] | None:
        """``(key, value)`` of the output's constraint (engine_server/constraints.py), or None."""
        for key in CONSTRAINT_OPTIONS:
            value = getattr(self, key)
            if not is_unset(key, value):
                return key, value
        return None

    @property
    def greedy(self) -> bool:
        """Whether the next token is simply the argmax."""
        return self.temperature == 0.0


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
