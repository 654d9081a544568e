"""Continuous batching, the context tree and the pool: many programs at once on the tiny model.

Every expected output is computed independently, by greedy decoding that reruns
the whole sequence through a cache-free forward at every step.
"""

import random

import pytest

from engine_server.engine.engine import (
    Delta,
    Engine,
    EngineConfig,
    Failed,
    Finished,
    GenSegment,
    TextSegment,
)
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer
from tests.engine_reference import context_sensitive_tiny_model, greedy_ids

SYSTEM = "System: you are a careful parrot who repeats things. "


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return context_sensitive_tiny_model()


def greedy_text(model, tok, prompt: str, n: int) -> str:
    return tok.decode(greedy_ids(model, [tok.bos_id, *tok.encode(prompt)], n))


def gen(n: int, **kw) -> GenSegment:
    return GenSegment("a", SamplingParams(max_tokens=n, ignore_eos=True, **kw))


def drain(engine: Engine) -> tuple[dict, list]:
    """Step until idle; (results by request id, all events in order)."""
    results, events = {}, []
    while engine.has_work():
        for ev in engine.step():
            events.append(ev)
            if isinstance(ev, Finished):
                results[ev.request_id] = ev.result
            elif isinstance(ev, Failed):
                raise AssertionError(ev.error)
    return results, events


def assert_pool_whole(engine: Engine) -> None:
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks
    assert all(r == 0 for r in engine.pool.refcount)


def test_concurrent_programs_match_their_solo_greedy_outputs(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=48, max_running=6))
    prompts = [f"Q{i}: " + "xyz" * (i * 7) for i in range(8)]  # 4..150 tokens: chunked, staggered
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", [TextSegment(p), gen(12 + i)])
    results, _ = drain(engine)
    for i, p in enumerate(prompts):
        assert results[f"r{i}"].outputs["a"] == greedy_text(model, tok, p, 12 + i), i
    assert engine.stats["steps"] < sum(12 + i for i in range(8))  # decodes really were batched
    assert_pool_whole(engine)


def test_forked_prefix_gives_the_same_output_as_a_fresh_prefill(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    doc = "The document: " + "lorem ipsum " * 6
    program = [TextSegment(SYSTEM, "k-sys"), TextSegment(doc, "k-doc"), TextSegment(" Summary:"), gen(16)]
    first = engine.run(program)
    second = engine.run(program)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 1 + len(tok.encode(SYSTEM + doc))
    assert first.outputs == second.outputs
    assert second.outputs["a"] == greedy_text(model, tok, SYSTEM + doc + " Summary:", 16)


def test_prompt_that_is_entirely_cached_recomputes_only_its_last_token(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    program = [TextSegment(SYSTEM * 2, "k-all"), gen(10)]  # block-unaligned length
    engine.run(program)
    before = engine.stats["forward_tokens"]
    again = engine.run(program)
    assert engine.stats["forward_tokens"] - before == 1 + 9  # last prompt token, then 9 decodes
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.outputs["a"] == greedy_text(model, tok, SYSTEM * 2, 10)


def test_requests_sharing_a_prefix_prefill_it_once_even_when_they_arrive_together(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=128, token_budget=32))
    for i in range(4):
        engine.add(f"r{i}", [TextSegment(SYSTEM, "k-sys"), TextSegment(f"Task {i}:", f"k-{i}"), gen(5)])
    results, _ = drain(engine)
    shared = 1 + len(tok.encode(SYSTEM))
    assert sorted(r.cached_tokens for r in results.values()) == [0, shared, shared, shared]
    own = sum(len(tok.encode(f"Task {i}:")) for i in range(4))
    assert engine.stats["forward_tokens"] == shared + own + 4 * 4  # each token through the model once
    for i in range(4):
        assert results[f"r{i}"].outputs["a"] == greedy_text(model, tok, SYSTEM + f"Task {i}:", 5)


def test_nested_contexts_form_a_tree_and_leaves_are_evicted_first(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.run([TextSegment(SYSTEM, "sys"), TextSegment("doc one. ", "sys/1"), gen(2)])
    engine.run([TextSegment(SYSTEM, "sys"), TextSegment("doc two. ", "sys/2"), gen(2)])
    ctx = engine.cache.contexts
    assert ctx["sys/1"].parent is ctx["sys"] and ctx["sys/2"].parent is ctx["sys"]
    assert ctx["sys"].children == 2
    # The system prompt's full blocks are shared, not copied.
    full = len(ctx["sys"].tokens) // engine.pool.block_size
    assert ctx["sys/1"].blocks[:full] == ctx["sys/2"].blocks[:full] == ctx["sys"].blocks[:full]
    assert engine.cache.evict_one() and engine.cache.evict_one()
    assert list(ctx) == ["sys"]  # the two leaves went first, the older one first
    assert engine.cache.take_evicted() == ["sys/1", "sys/2"]


def test_pool_pressure_evicts_then_preempts_and_outputs_stay_exact(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=12, token_budget=64, max_running=8))
    prompts = [SYSTEM + f"item {i} " * 3 for i in range(6)]
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", [TextSegment(SYSTEM, "sys"), TextSegment(f"item {i} " * 3), gen(30)])
    results, _ = drain(engine)
    assert engine.stats["preemptions"] > 0
    for i, p in enumerate(prompts):
        assert results[f"r{i}"].outputs["a"] == greedy_text(model, tok, p, 30)
    assert_pool_whole(engine)


def test_every_block_returns_to_the_pool_after_random_forks_aborts_and_releases(model, tok):
    rng = random.Random(7)
    engine = Engine(model, tok, EngineConfig(num_blocks=40, token_budget=40, max_running=5))
    added, ended, aborted = [], set(), set()
    for i in range(40):
        parts = [TextSegment(SYSTEM[: rng.randrange(10, len(SYSTEM))], f"s{rng.randrange(3)}")]
        if rng.random() < 0.7:
            parts.append(TextSegment(f"doc {rng.randrange(4)}", f"d{rng.randrange(6)}"))
        parts.append(gen(rng.randrange(1, 20), stop=("zz",) if rng.random() < 0.3 else ()))
        if rng.random() < 0.3:
            parts += [TextSegment(" then"), GenSegment("b", SamplingParams(max_tokens=3, ignore_eos=True))]
        engine.add(f"r{i}", parts)
        added.append(f"r{i}")
        for _ in range(rng.randrange(4)):
            ended |= {ev.request_id for ev in engine.step() if isinstance(ev, (Finished, Failed))}
        if rng.random() < 0.2:
            victim = rng.choice(added)
            # True exactly for a request still queued or running; one that ended or was aborted is gone.
            assert engine.abort(victim) == (victim not in ended and victim not in aborted)
            aborted.add(victim)
        if rng.random() < 0.2:
            engine.release_contexts([f"s{rng.randrange(3)}", f"d{rng.randrange(6)}"])
    assert aborted - ended, "the seed aborted no live request: pick another"
    results, events = drain(engine)
    assert not engine.running and not engine.waiting
    assert not {ev.request_id for ev in events} & (aborted - ended)  # an aborted request says nothing more
    assert set(results) | ended | aborted == set(added)  # every other request finished
    assert_pool_whole(engine)


def test_cached_blocks_counts_only_blocks_eviction_would_free(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.run([TextSegment(SYSTEM, "sys"), gen(2)])
    idle = engine.cached_blocks()
    assert idle == engine.pool.num_used > 0  # idle: every used block is the cache's alone
    engine.add("r", [TextSegment(SYSTEM, "sys"), TextSegment(" and more"), gen(40)])
    engine.step()  # it forks the cached system prompt: those blocks are in use now
    assert engine.cached_blocks() < idle
    drain(engine)
    assert engine.cached_blocks() == engine.pool.num_used


def test_released_contexts_stay_forkable_but_are_evicted_first(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.run([TextSegment(SYSTEM, "kept"), gen(2)])
    engine.run([TextSegment("Another preamble entirely. ", "released"), gen(2)])
    engine.run([TextSegment(SYSTEM, "kept"), gen(2)])  # "kept" is now the more recently used
    engine.release_contexts(["kept"])
    again = engine.run([TextSegment(SYSTEM, "kept"), gen(2)])
    assert again.cached_tokens > 0  # released is not dropped while memory allows
    engine.release_contexts(["kept"])
    assert engine.cache.evict_one()
    assert list(engine.cache.contexts) == ["released"]  # released first, despite being more recent


def test_seeded_sampling_is_reproducible_inside_a_batch(model, tok):
    params = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = Engine(model, tok, EngineConfig(num_blocks=64)).run([TextSegment("Once"), gen(20, **params)])
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.add("noise", [TextSegment("Other things"), gen(25, temperature=1.0)])
    engine.add("seeded", [TextSegment("Once"), gen(20, **params)])
    results, _ = drain(engine)
    assert results["seeded"].outputs == alone.outputs


def test_deltas_of_concurrent_requests_interleave_and_concatenate(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    for i in range(3):
        engine.add(f"r{i}", [TextSegment(f"stream {i}:"), gen(15)])
    results, events = drain(engine)
    deltas = [e for e in events if isinstance(e, Delta)]
    order = [e.request_id for e in deltas]
    assert order.index("r1") < max(i for i, r in enumerate(order) if r == "r0")  # interleaved
    for i in range(3):
        assert "".join(e.text for e in deltas if e.request_id == f"r{i}") == results[f"r{i}"].outputs["a"]


def test_program_larger_than_the_pool_is_refused_at_once(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=4, block_size=16))
    with pytest.raises(ValueError, match=r"71 tokens of KV, 6 blocks .* pool has 4"):
        engine.add("big", [TextSegment("x" * 50), gen(20)])
    assert not engine.has_work()


def test_duplicate_request_id_is_refused(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=16))
    engine.add("same", [TextSegment("a"), gen(2)])
    with pytest.raises(ValueError, match="already"):
        engine.add("same", [TextSegment("b"), gen(2)])
    drain(engine)


def test_a_lone_sequence_forked_from_nested_contexts_gets_the_whole_pool(model, tok):
    # The pool fits the request only if the contexts it forked are evicted too; it must
    # let go of them instead of preempting itself forever.
    # A 21-token budget ends the first chunk right at "sys", so "sys" keeps the partial
    # block as it was and the sequence copies it: the two contexts hold 4 blocks between them.
    engine = Engine(model, tok, EngineConfig(num_blocks=6, token_budget=21))
    s, d = "s" * 20, "d" * 20
    engine.run([TextSegment(s, "sys"), TextSegment(d, "doc"), gen(1)])
    assert set(engine.cache.contexts) == {"sys", "doc"} and engine.pool.num_used == 4
    result = engine.run([TextSegment(s, "sys"), TextSegment(d, "doc"), TextSegment("x" * 30), gen(1)])
    assert result.cached_tokens == 1 + 40
    assert result.outputs["a"] == greedy_text(model, tok, s + d + "x" * 30, 1)
    assert_pool_whole(engine)


def test_an_output_with_nothing_before_it_is_refused_when_the_model_has_no_bos(model):
    no_bos = ByteTokenizer()
    no_bos.add_bos = False
    engine = Engine(model, no_bos, EngineConfig(num_blocks=16))
    for program in ([TextSegment(""), gen(2)], [gen(2), TextSegment("x"), GenSegment("b")]):
        with pytest.raises(ValueError, match="empty context"):
            engine.add("r", program)
    assert not engine.has_work()
    assert engine.run([TextSegment("x"), gen(2)]).output_tokens == {"a": 2}


def test_after_a_failed_step_finished_results_arrive_and_queued_requests_still_run(model, tok):
    class FailsOnce:
        """The real model, except that one forward raises (a device error, say)."""

        armed = False

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *args):
            if FailsOnce.armed:
                FailsOnce.armed = False
                raise RuntimeError("injected forward failure")
            return model(*args)

    engine = Engine(FailsOnce(), tok, EngineConfig(num_blocks=32, max_running=1))
    engine.add("no-outputs", [TextSegment("nothing to generate")])
    engine.add("running", [TextSegment("first"), gen(3)])
    engine.add("queued", [TextSegment("second"), gen(3)])
    FailsOnce.armed = True
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert engine.reset() == ["running"]
    results, _ = drain(engine)
    assert set(results) == {"no-outputs", "queued"}
    assert results["queued"].outputs["a"] == greedy_text(model, tok, "second", 3)
    assert_pool_whole(engine)


# ---------------------------------------------------------------- prefill before the inputs arrive


def test_a_prefill_only_program_caches_its_contexts_and_finishes_with_no_output(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    doc = "The document: " + "lorem ipsum " * 6
    engine.add("early", [TextSegment(SYSTEM, "k-sys"), TextSegment(doc, "k-doc")], prefill_only=True)
    results, events = drain(engine)
    early = results["early"]
    assert early.outputs == {} and early.prompt_tokens == 1 + len(tok.encode(SYSTEM + doc))
    assert not [e for e in events if isinstance(e, Delta)]
    assert engine.cache.contexts["k-doc"].tokens == tuple([tok.bos_id, *tok.encode(SYSTEM + doc)])
    # The request it stood for, once its input arrives, forks that context and prefills only the rest.
    program = [TextSegment(SYSTEM, "k-sys"), TextSegment(doc, "k-doc"), TextSegment(" Summary:"), gen(12)]
    before = engine.stats["forward_tokens"]
    late = engine.run(program)
    assert late.cached_tokens == early.prompt_tokens
    assert engine.stats["forward_tokens"] - before == len(tok.encode(" Summary:")) + 11
    assert late.outputs["a"] == greedy_text(model, tok, SYSTEM + doc + " Summary:", 12)


def test_a_prefill_only_program_already_cached_recomputes_only_its_last_token(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    segments = [TextSegment(SYSTEM, "k-sys")]
    engine.add("one", segments, prefill_only=True)
    drain(engine)
    before = engine.stats["forward_tokens"]
    engine.add("two", segments, prefill_only=True)
    results, _ = drain(engine)
    assert engine.stats["forward_tokens"] == before + 1
    assert results["two"].cached_tokens == results["two"].prompt_tokens - 1


# ---------------------------------------------------------------- consumers on streamed tokens

KNOWN = "Reviewer notes. " * 4
VALUE = "def add(a, b): return a + b  # adds"


def _stream(engine: Engine, value: str, step: int = 5) -> None:
    """Open a prefill for KNOWN, then stream ``value`` into it a few characters at a time."""
    engine.add("r/prefill", [TextSegment(KNOWN, "k-known")], prefill_only=True)
    drain(engine)
    for i in range(0, len(value), step):
        assert engine.extend("r/prefill", [value[i : i + step]])
        drain(engine)


def _final(value: str = VALUE) -> list:
    return [TextSegment(KNOWN, "k-known"), TextSegment(value), TextSegment(" Review:"), gen(10)]


def test_a_request_adopts_the_prefill_its_input_streamed_into(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    _stream(engine, VALUE)
    assert "r/prefill" in engine.parked
    before = engine.stats["forward_tokens"]
    engine.add("r", _final(), adopt="r/prefill")
    results, _ = drain(engine)
    # Everything but the value's last token (held back: it might have merged with more text) was computed.
    assert results["r"].cached_tokens == 1 + len(tok.encode(KNOWN + VALUE)) - 1
    assert engine.stats["forward_tokens"] - before == 1 + len(tok.encode(" Review:")) + 9
    assert results["r"].outputs["a"] == greedy_text(model, tok, KNOWN + VALUE + " Review:", 10)
    assert "r/prefill" not in engine.parked
    assert_pool_whole(engine)


def test_a_request_forks_a_longer_cached_context_rather_than_adopt_a_shorter_prefill(model, tok):
    # The same request ran before (a question asked again): its whole prompt is cached, while
    # the early prefill covers only the part that was known before its inputs arrived.
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    program = [TextSegment(KNOWN, "k-known"), TextSegment(VALUE, "k-value"), TextSegment(" Review:", "k-review"), gen(10)]
    engine.add("first", program)
    first, _ = drain(engine)
    engine.add("r/prefill", [TextSegment(KNOWN, "k-known")], prefill_only=True)
    drain(engine)
    assert "r/prefill" in engine.parked
    before = engine.stats["forward_tokens"]
    engine.add("r", program, adopt="r/prefill")
    results, _ = drain(engine)
    prompt = 1 + len(tok.encode(KNOWN + VALUE + " Review:"))
    assert results["r"].cached_tokens == prompt - 1
    assert engine.stats["forward_tokens"] - before == 1 + 9
    assert results["r"].outputs["a"] == first["first"].outputs["a"]
    assert "r/prefill" not in engine.parked
    assert_pool_whole(engine)


def test_a_streamed_prefix_that_turns_out_different_is_recomputed_from_where_it_differs(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    _stream(engine, VALUE[:10] + "XYZ")
    engine.add("r", _final(), adopt="r/prefill")
    results, _ = drain(engine)
    assert results["r"].cached_tokens == 1 + len(tok.encode(KNOWN)) + 10
    assert results["r"].outputs["a"] == greedy_text(model, tok, KNOWN + VALUE + " Review:", 10)
    assert_pool_whole(engine)


def test_a_later_piece_starts_a_new_segment_as_the_request_encodes_it(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    _stream(engine, VALUE)
    engine.extend("r/prefill", ["", " Review:"])  # the input is complete; the template's text follows
    drain(engine)
    engine.add("r", _final(), adopt="r/prefill")
    results, _ = drain(engine)
    prompt = 1 + len(tok.encode(KNOWN + VALUE + " Review:"))
    assert results["r"].cached_tokens == prompt - 1  # all of it (the last token runs again for logits)
    assert results["r"].outputs["a"] == greedy_text(model, tok, KNOWN + VALUE + " Review:", 10)


def test_an_aborted_parked_prefill_frees_its_blocks(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=32))
    _stream(engine, VALUE)
    assert engine.abort("r/prefill")
    assert not engine.parked and not engine.extend("r/prefill", ["more"])
    assert_pool_whole(engine)


def test_a_request_whose_prefill_is_gone_prefills_as_usual(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    engine.add("r", _final(), adopt="r/prefill")  # never opened (or dropped for memory)
    results, _ = drain(engine)
    assert results["r"].cached_tokens == 0
    assert results["r"].outputs["a"] == greedy_text(model, tok, KNOWN + VALUE + " Review:", 10)


def test_parked_prefills_are_dropped_before_running_work_is_preempted(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=12, token_budget=64))
    _stream(engine, VALUE)
    engine.add("big", [TextSegment("q" * 100), gen(60)])
    results, _ = drain(engine)
    assert engine.stats["preemptions"] == 0 and "r/prefill" not in engine.parked
    assert results["big"].outputs["a"] == greedy_text(model, tok, "q" * 100, 60)
    assert_pool_whole(engine)


def test_a_prefill_only_program_must_be_keyed_text(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    with pytest.raises(ValueError, match="prefill-only program is text with context keys"):
        engine.add("x", [TextSegment(SYSTEM, "k"), gen(3)], prefill_only=True)
    with pytest.raises(ValueError, match="prefill-only program is text with context keys"):
        engine.add("y", [TextSegment(SYSTEM)], prefill_only=True)


def test_a_prefill_only_program_waits_for_a_step_without_other_work_by_default(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=64))
    engine.add("r", [TextSegment("Q: "), gen(8)])
    engine.add("early", [TextSegment(SYSTEM * 2, "k")], prefill_only=True)
    order = []
    while engine.has_work():
        order += [e.request_id for e in engine.step() if isinstance(e, Finished)]
    assert order == ["r", "early"]  # the request decoded alone, then the prefill ran


def test_a_prefill_only_program_takes_a_background_chunk_beside_other_work(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=64, background_chunk=4))
    engine.add("r", [TextSegment("Q: "), gen(30)])
    engine.add("early", [TextSegment(SYSTEM, "k")], prefill_only=True)
    results, events = drain(engine)
    finished = [e.request_id for e in events if isinstance(e, Finished)]
    assert finished == ["early", "r"]  # 4 tokens a step got it done while r decoded
    assert results["r"].outputs["a"] == greedy_text(model, tok, "Q: ", 30)


def test_streamed_text_short_of_a_background_chunk_waits_while_others_decode(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=64, background_chunk=8))
    engine.add("early", [TextSegment(SYSTEM, "k")], prefill_only=True)
    drain(engine)  # computed alone, and parked
    engine.add("r", [TextSegment("Q: "), gen(12)])
    engine.step()  # r's prefill
    engine.extend("early", ["abcdef"])  # 5 tokens to compute (the 6th is held back): less than a chunk
    engine.step()
    early = next(s for s in (*engine.waiting, *engine.running) if s.request_id == "early")
    assert early.pending == 5
    drain(engine)  # r decodes to the end; then the stream is computed in an idle step
    assert engine.parked["early"].pending == 0


def test_prefill_only_work_stays_out_of_a_requests_prefill_step_by_default(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=256))
    engine.add("r", [TextSegment("Q: " * 10), gen(12)])
    engine.add("early", [TextSegment(SYSTEM, "k")], prefill_only=True)
    engine.step()
    early = next(s for s in engine.running if s.request_id == "early")
    assert early.num_computed == 0  # r's first token is not delayed by it


def test_prefill_only_work_waits_a_moment_after_other_work_ends(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=64, idle_grace_s=60.0))
    engine.add("r", [TextSegment("Q: "), gen(4)])
    engine.step()
    engine.add("early", [TextSegment(SYSTEM, "k")], prefill_only=True)
    for _ in range(10):
        engine.step()
    early = next(s for s in engine.running if s.request_id == "early")
    assert early.num_computed == 0  # r is done, but an unblocked request might still arrive


def test_blocks_a_parked_prefill_holds_count_as_room_when_idle(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    _stream(engine, VALUE)
    assert engine.pool.num_used > 0 and not engine.running and not engine.waiting
    assert engine.cached_blocks() == engine.pool.num_used  # dropped first when memory is needed


def test_an_idle_step_gives_prefill_only_work_a_sixteenth_of_the_budget(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64, token_budget=64, idle_grace_s=0.0))
    engine.add("early", [TextSegment(SYSTEM, "k")], prefill_only=True)
    engine.step()
    early = next(s for s in engine.running if s.request_id == "early")
    assert early.num_computed == 64 // 16  # a request arriving now waits for one short step at most


def test_a_refused_request_frees_the_prefill_it_would_have_adopted(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=64))
    _stream(engine, VALUE)
    with pytest.raises(ValueError, match="program too long"):
        engine.add("r", [TextSegment(KNOWN, "k-known"), TextSegment("x" * 5000), gen(4)], adopt="r/prefill")
    assert "r/prefill" not in engine.parked
    assert_pool_whole(engine)
