"""Automatic prefix caching over token blocks: prompts with no variable boundaries still share K/V.

Expected outputs come from a cache-free greedy reference, as in test_engine_batching.
"""

import random

from test_engine_batching import drain, gen, greedy_text, model, tok  # noqa: F401  (fixtures, and helpers)

from engine_server.engine.engine import Engine, EngineConfig, TextSegment

PREAMBLE = "You are the shop's assistant. Answer briefly, quote the policy, never invent prices. " * 2


def test_prompts_sharing_a_start_share_its_full_blocks_without_any_key(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=96))
    bs = engine.pool.block_size
    first = engine.run([TextSegment(PREAMBLE + "Q: do you ship abroad?", blocks=True), gen(8)])
    second = engine.run([TextSegment(PREAMBLE + "Q: what about returns?", blocks=True), gen(8)])
    shared = 1 + len(tok.encode(PREAMBLE + "Q: "))  # BOS, then the common text
    assert first.cached_tokens == 0
    assert second.cached_tokens == shared // bs * bs  # every full block of the common start
    assert second.outputs["a"] == greedy_text(model, tok, PREAMBLE + "Q: what about returns?", 8)


def test_without_the_flag_an_unkeyed_prompt_shares_nothing(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=96))
    engine.run([TextSegment(PREAMBLE + "Q: one"), gen(4)])
    assert engine.run([TextSegment(PREAMBLE + "Q: two"), gen(4)]).cached_tokens == 0


def test_a_chain_of_block_contexts_holds_each_block_once(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=96))
    engine.run([TextSegment(PREAMBLE * 2, blocks=True), gen(2)])
    contexts = list(engine.cache.contexts.values())
    held = [b for c in contexts for b in c.blocks]
    assert len(contexts) == len(held)  # one context per full block, each holding only its own
    assert len(set(held)) == len(held)
    longest = max(contexts, key=len)
    assert longest.all_blocks() == sorted(held, key=held.index)  # the chain walks back to block 0
    assert engine.cached_blocks() == engine.pool.num_used  # idle: all of it is the cache's, once


def test_a_repeated_prompt_forks_its_whole_chain_and_matches_the_reference(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=96))
    prompt = PREAMBLE + "Q: the same question twice"
    engine.run([TextSegment(prompt, blocks=True), gen(6)])
    again = engine.run([TextSegment(prompt, blocks=True), gen(6)])
    assert again.cached_tokens == (1 + len(tok.encode(prompt))) // engine.pool.block_size * engine.pool.block_size
    assert again.outputs["a"] == greedy_text(model, tok, prompt, 6)


def test_block_contexts_are_evicted_leaf_first_and_never_reported_to_the_manager(model, tok):
    engine = Engine(model, tok, EngineConfig(num_blocks=96))
    engine.run([TextSegment(PREAMBLE, "k-pre"), TextSegment("Q: one more question here", blocks=True), gen(2)])
    assert "k-pre" in engine.cache.contexts
    while engine.cache.evict_one():
        pass
    assert engine.cache.take_evicted() == ["k-pre"]  # digest keys stay inside the engine
    assert engine.pool.num_free == engine.pool.num_blocks


def test_every_block_returns_to_the_pool_after_random_block_cached_traffic(model, tok):
    rng = random.Random(3)
    engine = Engine(model, tok, EngineConfig(num_blocks=40, token_budget=40, max_running=5))
    expected = {}
    for i in range(30):
        prompt = PREAMBLE[: rng.randrange(20, len(PREAMBLE))] + f" q{rng.randrange(5)}"
        engine.add(f"r{i}", [TextSegment(prompt, blocks=True), gen(rng.randrange(1, 12))])
        expected[f"r{i}"] = prompt
        for _ in range(rng.randrange(3)):
            engine.step()
        if rng.random() < 0.15:
            engine.abort(f"r{rng.randrange(i + 1)}")
    drain(engine)
    assert engine.stats["preemptions"] or engine.cache.contexts  # the small pool was exercised
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks
    assert all(r == 0 for r in engine.pool.refcount)
