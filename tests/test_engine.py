"""One program at a time through the engine on a tiny real model: greedy equivalence,
chunked prefill, limits, EOS, stop strings, multi-output programs.

References are computed independently of the engine: greedy decoding that
recomputes the whole sequence from token ids at every step, with no cache at all.
"""

import pytest

from engine_server.engine.engine import Engine, EngineConfig, GenSegment, RunResult, TextSegment
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer
from tests.engine_reference import context_sensitive_tiny_model, greedy_ids

PROMPT = "Q: name a color. A:"
THEN = " Then:"


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return context_sensitive_tiny_model()


@pytest.fixture(scope="module")
def runner(model, tok):
    return Engine(model, tok, EngineConfig(token_budget=512, max_running=8))


@pytest.fixture(scope="module")
def greedy40(model, tok):
    """The 40 greedy tokens after PROMPT, EOS not special."""
    return greedy_ids(model, tok.encode(PROMPT, add_bos=True), 40)


def gen(key: str = "a", **kw) -> GenSegment:
    return GenSegment(key, SamplingParams(**kw))


def run_one(runner, prompt: str, **kw) -> RunResult:
    return runner.run([TextSegment(prompt), gen(**kw)])


def pick_stop(text: str, start: int = 10, multibyte: bool = False) -> tuple[str, int]:
    """A 3-char stop string first occurring at some k >= start in `text`.

    text[k-1] must be a real char: a U+FFFD there can come from the same token as
    text[k], and then no token boundary falls exactly before the stop string.
    With `multibyte`, the stop string starts with a valid non-ASCII char.
    """
    for k in range(start, len(text) - 2):
        stop = text[k : k + 3]
        if multibyte and (stop[0].isascii() or stop[0] == "\ufffd"):
            continue
        if text.find(stop) == k and text[k - 1] != "\ufffd":
            return stop, k
    raise AssertionError(f"no usable stop string in {text!r}")


def tokens_for(tok, ids: list[int], prefix: str) -> int:
    """The fewest leading ids that decode to `prefix`."""
    return next(n for n in range(len(ids) + 1) if tok.decode(ids[:n]) == prefix)


def test_greedy_output_is_deterministic(runner):
    first = run_one(runner, PROMPT, max_tokens=20)
    second = run_one(runner, PROMPT, max_tokens=20)
    assert first.outputs == second.outputs
    assert first.output_tokens == second.output_tokens


def test_greedy_output_equals_hand_rolled_greedy_loop(runner, tok, greedy40):
    res = run_one(runner, PROMPT, max_tokens=40, ignore_eos=True)
    assert res.outputs["a"] == tok.decode(greedy40)
    assert res.output_tokens["a"] == 40


def test_prefill_longer_than_a_chunk_matches_hand_rolled_greedy(runner, model, tok):
    prompt = "".join(chr(ord("a") + i % 26) for i in range(1100))  # three 512-token chunks
    expected = greedy_ids(model, tok.encode(prompt, add_bos=True), 4)
    res = run_one(runner, prompt, max_tokens=4, ignore_eos=True)
    assert res.outputs["a"] == tok.decode(expected)
    assert res.prompt_tokens == 1101


def test_prefill_runs_in_chunks_of_at_most_the_token_budget(model, tok):
    calls = []

    class RecordingModel:
        """Passes everything to the model, noting how many tokens each forward gets."""

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, tokens, *args):
            calls.append(len(tokens))
            return model(tokens, *args)

    runner = Engine(RecordingModel(), tok, EngineConfig(token_budget=512))
    run_one(runner, "z" * 1100, max_tokens=3, ignore_eos=True)
    assert calls == [512, 512, 77, 1, 1]  # 1101 prompt tokens, then 2 decode steps


def test_max_tokens_is_respected(runner):
    res = run_one(runner, PROMPT, max_tokens=7, ignore_eos=True)
    assert res.output_tokens["a"] == 7
    assert res.finish_reasons["a"] == "length"


def test_generation_ends_at_eos_unless_ignored(runner, model, tok):
    prompt = "b"  # with this model, greedy decoding after "b" emits EOS within 60 tokens
    expected = greedy_ids(model, tok.encode(prompt, add_bos=True), 60)
    assert tok.eos_id in expected
    n = expected.index(tok.eos_id)
    res = run_one(runner, prompt, max_tokens=60)
    assert res.outputs["a"] == tok.decode(expected[:n])
    assert (res.output_tokens["a"], res.finish_reasons["a"]) == (n, "eos")
    res = run_one(runner, prompt, max_tokens=60, ignore_eos=True)
    assert (res.output_tokens["a"], res.finish_reasons["a"]) == (60, "length")


def test_result_counts_prompt_tokens_and_timings(runner, tok):
    res = run_one(runner, PROMPT, max_tokens=3)
    assert res.prompt_tokens == 1 + len(tok.encode(PROMPT))
    t = res.timings
    assert t.queue_s >= 0 and t.prefill_s > 0 and t.decode_s > 0
    # Time to first token runs from receipt, through the queue, to the first sampled token.
    assert t.ttft_s == pytest.approx(t.queue_s + t.prefill_s, rel=1e-9, abs=1e-9)


def test_stop_string_cuts_output_before_it(runner, tok, greedy40):
    text = tok.decode(greedy40)
    stop, k = pick_stop(text)
    res = run_one(runner, PROMPT, max_tokens=40, ignore_eos=True, stop=(stop,))
    assert res.outputs["a"] == text[:k]
    assert res.finish_reasons["a"] == "stop"
    assert res.output_tokens["a"] == tokens_for(tok, greedy40, text[:k])


def test_stop_starting_with_a_multibyte_char_drops_all_its_bytes(runner, model, tok):
    # The stop's first char arrives over several byte tokens; none of them may stay
    # in the output or the context, though they completed no text on their own.
    prompt = "Hello"  # with this model, greedy output after it has non-ASCII chars
    ids = greedy_ids(model, tok.encode(prompt, add_bos=True), 40)
    text = tok.decode(ids)
    stop, k = pick_stop(text, start=1, multibyte=True)
    kept = ids[: tokens_for(tok, ids, text[:k])]
    res = runner.run(
        [TextSegment(prompt), gen("a", max_tokens=40, ignore_eos=True, stop=(stop,)),
         TextSegment(THEN), gen("b", max_tokens=8, ignore_eos=True)]
    )
    assert res.outputs["a"] == text[:k]
    assert res.output_tokens["a"] == len(kept)
    context = tok.encode(prompt, add_bos=True) + kept + tok.encode(THEN)
    assert res.outputs["b"] == tok.decode(greedy_ids(model, context, 8))


def test_streamed_deltas_concatenate_to_final_output_with_stop(runner, tok, greedy40):
    text = tok.decode(greedy40)
    stop, k = pick_stop(text)
    deltas = []
    res = runner.run(
        [TextSegment(PROMPT), gen(max_tokens=40, ignore_eos=True, stop=(stop,))],
        on_delta=lambda key, d: deltas.append((key, d)),
    )
    assert len(deltas) > 1  # streamed, not delivered once at the end
    assert all(key == "a" and d for key, d in deltas)
    assert "".join(d for _, d in deltas) == res.outputs["a"] == text[:k]


def test_streamed_deltas_concatenate_to_final_output_without_stop(runner):
    deltas = []
    res = runner.run(
        [TextSegment(PROMPT), gen(max_tokens=25, ignore_eos=True)],
        on_delta=lambda key, d: deltas.append(d),
    )
    assert len(deltas) > 1
    assert "".join(deltas) == res.outputs["a"]


def test_second_output_sees_prompt_and_kept_first_output_after_stop(runner, model, tok, greedy40):
    stop, k = pick_stop(tok.decode(greedy40))
    kept = greedy40[: tokens_for(tok, greedy40, tok.decode(greedy40)[:k])]
    res = runner.run(
        [TextSegment(PROMPT), gen("a", max_tokens=40, ignore_eos=True, stop=(stop,)),
         TextSegment(THEN), gen("b", max_tokens=12, ignore_eos=True)]
    )
    context = tok.encode(PROMPT, add_bos=True) + kept + tok.encode(THEN)
    assert res.outputs == {"a": tok.decode(kept), "b": tok.decode(greedy_ids(model, context, 12))}
    assert res.finish_reasons == {"a": "stop", "b": "length"}


def test_second_output_sees_last_token_of_first_output_after_length(runner, model, tok, greedy40):
    # The last sampled token of "a" is not fed by its own decode loop; the
    # prefill of the text after it must feed it.
    res = runner.run(
        [TextSegment(PROMPT), gen("a", max_tokens=5, ignore_eos=True),
         TextSegment(THEN), gen("b", max_tokens=12, ignore_eos=True)]
    )
    context = tok.encode(PROMPT, add_bos=True) + greedy40[:5] + tok.encode(THEN)
    expected_b = tok.decode(greedy_ids(model, context, 12))
    assert res.outputs == {"a": tok.decode(greedy40[:5]), "b": expected_b}
    assert res.prompt_tokens == 1 + len(tok.encode(PROMPT)) + len(tok.encode(THEN))


def test_adjacent_outputs_continue_from_kept_output_after_stop(runner, model, tok, greedy40):
    stop, k = pick_stop(tok.decode(greedy40))
    kept = greedy40[: tokens_for(tok, greedy40, tok.decode(greedy40)[:k])]
    res = runner.run(
        [TextSegment(PROMPT), gen("a", max_tokens=40, ignore_eos=True, stop=(stop,)),
         gen("b", max_tokens=10, ignore_eos=True)]
    )
    context = tok.encode(PROMPT, add_bos=True) + kept
    assert res.outputs["b"] == tok.decode(greedy_ids(model, context, 10))


def test_duplicate_output_keys_raise(runner):
    with pytest.raises(ValueError, match="unique"):
        runner.run([TextSegment(PROMPT), gen("a"), gen("a")])


def test_too_long_prompt_raises_with_the_numbers(runner):
    with pytest.raises(ValueError, match=r"too long.*4100.*4096"):
        run_one(runner, "x" * 4099, max_tokens=1)


def test_prompt_plus_max_tokens_over_limit_raises(runner):
    # The prompt alone fits (4001 tokens with BOS); its outputs might not.
    with pytest.raises(ValueError, match=r"4001.*100.*4096"):
        run_one(runner, "x" * 4000, max_tokens=100)
