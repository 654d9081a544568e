"""The Llama model: seeded determinism, cache-consistent incremental decoding, RoPE, GQA."""

import json
import math
import subprocess
import sys

import pytest
import torch

from engine_server.engine.model import (
    KVCache,
    apply_rope,
    build_tiny_model,
    rope_cos_sin,
    tiny_config,
)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


def tokens(n: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, 259, (n,), generator=torch.Generator().manual_seed(seed))


def full_logits(model, toks: torch.Tensor) -> torch.Tensor:
    return model(toks, KVCache.allocate(model.config, len(toks)))


def test_tiny_config_is_a_gqa_llama():
    c = tiny_config()
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (259, 128, 4, 4, 2)
    assert (c.hidden_dim, c.max_seq_len, c.rope_theta, c.head_dim) == (352, 4096, 10000.0, 32)


def test_same_seed_gives_identical_weights_and_logits(model):
    other = build_tiny_model(seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    toks = tokens(16)
    assert torch.equal(full_logits(model, toks), full_logits(other, toks))


def test_different_seed_gives_different_logits(model):
    toks = tokens(16)
    diff = full_logits(model, toks) - full_logits(build_tiny_model(seed=1), toks)
    assert diff.abs().max() > 1e-2


def test_same_seed_gives_identical_logits_in_another_process(model):
    code = (
        "import json, torch; from engine_server.engine.model import build_tiny_model, KVCache\n"
        "m = build_tiny_model(seed=0); t = torch.arange(10)\n"
        "print(json.dumps(m(t, KVCache.allocate(m.config, 10))[-1].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    theirs = torch.tensor(json.loads(out.stdout))
    assert torch.equal(full_logits(model, torch.arange(10))[-1], theirs)


def test_build_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    build_tiny_model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_weights_follow_init_scheme(model):
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones(128))
    assert 0.015 < model.lm_head.weight.std().item() < 0.025
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)  # untied


def test_incremental_decode_matches_full_forward(model):
    toks = tokens(24)
    full = full_logits(model, toks)
    cache = KVCache.allocate(model.config, 32)
    parts = [model(toks[:7], cache), model(toks[7:12], cache)]  # second chunk: offset causal mask
    parts += [model(toks[i : i + 1], cache) for i in range(12, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=0)


def test_last_only_returns_the_last_row(model):
    toks = tokens(9)
    last = model(toks, KVCache.allocate(model.config, 9), last_only=True)
    assert last.shape == (1, 259)
    torch.testing.assert_close(last[0], full_logits(model, toks)[-1], atol=1e-6, rtol=0)


def test_truncate_rolls_back_so_refeeding_reproduces_logits(model):
    toks = tokens(12)
    cache = KVCache.allocate(model.config, 16)
    before = model(toks, cache)
    model(tokens(3, seed=9), cache)  # a detour to roll back
    cache.truncate(8)
    assert cache.length == 8
    torch.testing.assert_close(model(toks[8:], cache), before[8:], atol=1e-5, rtol=0)


def test_truncate_beyond_length_raises(model):
    cache = KVCache.allocate(model.config, 8)
    model(tokens(4), cache)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)


def test_forward_past_cache_capacity_raises(model):
    cache = KVCache.allocate(model.config, 8)
    model(tokens(6), cache)
    with pytest.raises(ValueError, match="too long"):
        model(tokens(3), cache)
    assert cache.length == 6


def test_gqa_shapes(model):
    c = model.config
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (c.n_heads * c.head_dim, c.dim)
    assert attn.k_proj.weight.shape == (c.n_kv_heads * c.head_dim, c.dim)
    assert attn.v_proj.weight.shape == (c.n_kv_heads * c.head_dim, c.dim)
    cache = KVCache.allocate(c, 10)
    assert cache.k.shape == cache.v.shape == (4, 10, 2, 32)
    logits = model(tokens(5), cache)
    assert logits.shape == (5, 259) and logits.dtype == torch.float32
    assert cache.k[:, 5:].abs().sum() == 0 and cache.k[:, :5].abs().sum() > 0


def test_attention_matches_naive_gqa_reference(model):
    c = model.config
    attn, T, hd = model.layers[0].self_attn, 6, c.head_dim
    x = torch.randn(T, c.dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(torch.arange(T), hd, c.rope_theta, torch.float32)
    cache = KVCache.allocate(c, T)
    got = attn(x, cos, sin, cache.k[0], cache.v[0], 0, None)

    q = apply_rope(attn.q_proj(x).view(T, c.n_heads, hd), cos, sin)
    k = apply_rope(attn.k_proj(x).view(T, c.n_kv_heads, hd), cos, sin)
    v = attn.v_proj(x).view(T, c.n_kv_heads, hd)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(c.n_heads):
        g = h // (c.n_heads // c.n_kv_heads)  # HF repeat_kv: consecutive query heads share one
        scores = (q[:, h] @ k[:, g].T / math.sqrt(hd)).masked_fill(future, -math.inf)
        heads.append(scores.softmax(-1) @ v[:, g])
    torch.testing.assert_close(got, attn.o_proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=0)


def test_rope_uses_rotate_half_pairing():
    # Hugging Face Llama rotates dims (i, i + head_dim/2) together, not (2i, 2i+1).
    pos = 3
    cos, sin = rope_cos_sin(torch.tensor([pos]), 8, 10000.0, torch.float32)
    x = torch.zeros(1, 1, 8)
    x[0, 0, 0] = 1.0
    y = apply_rope(x, cos, sin)[0, 0]
    expected = torch.zeros(8)
    expected[0], expected[4] = torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))
    torch.testing.assert_close(y, expected)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([m]), 32, 10000.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([n]), 32, 10000.0, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 2), score(107, 102), atol=1e-4, rtol=0)
    assert not torch.allclose(score(7, 2), score(7, 5), atol=1e-3)
