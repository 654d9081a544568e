"""What the engine tests compare against: a context-sensitive tiny model and greedy decoding
that reruns the whole sequence through a cache-free forward at every step."""

from __future__ import annotations

import torch

from engine_server.engine.model import LlamaModel, build_tiny_model, score


def context_sensitive_tiny_model() -> LlamaModel:
    """The tiny model, which is drawn so that its whole context shows in its outputs (see
    `build_tiny_model`): a wrong context gives other tokens."""
    return build_tiny_model(seed=0)


def greedy_ids(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, recomputing the full sequence at every step."""
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(torch.argmax(score(model, ids)[-1])))
        ids.append(out[-1])
    return out
