"""The engine with a real (random) Hugging Face checkpoint and its BPE tokenizer, where a
token can carry several characters: stop strings that begin inside a token."""

from __future__ import annotations

import pytest

from engine_server.engine.engine import Delta, Engine, EngineConfig, Finished, GenSegment, TextSegment
from engine_server.engine.loader import load_model
from engine_server.engine.sampler import SamplingParams
from tests.checkpoints import tiny_hf_config, write_checkpoint, write_tokenizer

PROMPT = "a b c d"  # with this checkpoint, greedy output has multi-character tokens early


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-bpe")
    tok = write_tokenizer(path, "qwen2")
    write_checkpoint(path, tiny_hf_config("qwen2", vocab_size=tok.get_vocab_size()), seed=3)
    return load_model(path)


def run(loaded, **params):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(num_blocks=64))
    engine.add("r", [TextSegment(PROMPT), GenSegment("a", SamplingParams(max_tokens=20, ignore_eos=True, **params))])
    deltas, result = [], None
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, Delta):
                deltas.append(ev.text)
            elif isinstance(ev, Finished):
                result = ev.result
    return result, "".join(deltas), engine


def test_a_stop_string_that_begins_inside_a_token_keeps_the_text_before_it(loaded):
    plain, _, _ = run(loaded)
    text = plain.outputs["a"]
    # The per-token texts of the greedy output, to find a token of several characters.
    ids = loaded.tokenizer.encode(PROMPT)
    decoder, pieces = loaded.tokenizer.incremental_decoder(), []
    from engine_server.engine.model import score

    for _ in range(20):
        token = int(score(loaded.model, ids)[-1].argmax())
        ids.append(token)
        pieces.append(decoder.push(token))
    assert "".join(pieces) == text[: len("".join(pieces))]

    def stop_inside_a_token():
        """(position, stop): a stop string that first occurs one character into a multi-character token."""
        for i, piece in enumerate(pieces):
            at = len("".join(pieces[:i])) + 1
            stop = text[at : at + 2]
            if len(piece) >= 2 and "\ufffd" not in piece and len(stop) == 2 and text.find(stop) == at:
                return at, stop
        raise AssertionError(f"no token to stop inside in {pieces}")

    at, stop = stop_inside_a_token()
    result, streamed, engine = run(loaded, stop=(stop,))
    assert result.outputs["a"] == text[:at]  # the token's first character stays
    assert streamed == result.outputs["a"]  # and what was streamed agrees with the value
    assert result.finish_reasons["a"] == "stop"
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks
