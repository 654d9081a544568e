"""What the engine tests compare against: a context-sensitive tiny model and greedy decoding
that reruns the whole sequence through a cache-free forward at every step."""

from __future__ import annotations

import torch

from engine_server.engine.model import LlamaModel, build_tiny_model, score


def context_sensitive_tiny_model() -> LlamaModel:
    """The tiny model re-drawn at std 0.1.

    With the default 0.02 init, attention is nearly uniform and the next token hardly
    depends on anything but the last few; at 0.1 the model is sensitive to its whole
    context, so a wrong context shows in the outputs.
    """
    model = build_tiny_model(seed=0)
    model.init_weights(torch.Generator().manual_seed(0), std=0.1)
    return model


def greedy_ids(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, recomputing the full sequence at every step."""
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(torch.argmax(score(model, ids)[-1])))
        ids.append(out[-1])
    return out
