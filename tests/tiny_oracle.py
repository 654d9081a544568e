"""What the served `tiny` model (or another model) must answer, computed in this process without the server.

The tiny model's text depends on its whole prompt (see `build_tiny_model`), so a server or notebook
test that compares a variable's value with `expected(fn, **inputs)` fails when an input is swapped,
dropped, rendered wrongly or read from the wrong producer, which a type check cannot see.

Only for plain (non-chat) functions at their default greedy sampling: the engine here is a fresh
one on the same seeded weights, so its greedy text is the server's greedy text for the same prompt.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from engine_server.engine.engine import Engine, EngineConfig, GenSegment, TextSegment
from engine_server.engine.model import build_tiny_model
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer
from parrot_nb.function import SemanticFunction
from parrot_nb.template import InputChunk, OutputChunk, TextChunk


@cache
def _engine() -> Engine:
    return Engine(build_tiny_model(seed=0), ByteTokenizer(), EngineConfig())


def expected(fn: SemanticFunction, /, **inputs: Any) -> dict[str, str]:
    """Each output of ``fn(**inputs)`` as the tiny model generates it; inputs are values, not variables."""
    return expected_on(_engine(), fn, **inputs)


def expected_on(engine: Engine, fn: SemanticFunction, /, **inputs: Any) -> dict[str, str]:
    """Each output of ``fn(**inputs)`` as ``engine`` generates it (for a model other than tiny: an
    engine built the way a server builds it, `engine_server.engine.worker.build_engine`)."""
    assert not fn.chat, "the oracle renders plain templates only"
    segments: list[TextSegment | GenSegment] = []
    for chunk in fn.parsed.chunks:
        if isinstance(chunk, TextChunk):
            segments.append(TextSegment(chunk.text))
        elif isinstance(chunk, InputChunk):
            segments.append(TextSegment(str(inputs[chunk.name])))
        elif isinstance(chunk, OutputChunk):
            spec = fn.sampling(chunk.name)
            assert spec.temperature == 0, "the oracle knows greedy outputs only"
            segments.append(GenSegment(chunk.name, SamplingParams(**dataclasses.asdict(spec))))
    return dict(engine.run(segments).outputs)


def expected_text(fn: SemanticFunction, /, **inputs: Any) -> str:
    """The one output of ``fn(**inputs)`` as the tiny model generates it."""
    (text,) = expected(fn, **inputs).values()
    return text
