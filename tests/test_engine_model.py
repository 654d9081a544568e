"""The Llama model: seeded determinism, the paged path against a cache-free forward, RoPE, GQA."""

import json
import math
import subprocess
import sys

import pytest
import torch

from engine_server.engine.attention import AttentionMetadata, CausalAttention, PagedAttention
from engine_server.engine.kv import BlockPool
from engine_server.engine.model import (
    ModelConfig,
    RopeScaling,
    apply_rope,
    build_random_model,
    build_tiny_model,
    rope_cos_sin,
    rope_inv_freq,
    score,
    tiny_config,
)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


def tokens(n: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, 259, (n,), generator=torch.Generator().manual_seed(seed))


def full_logits(model, toks: torch.Tensor) -> torch.Tensor:
    return score(model, toks)


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
        "import json, torch; from engine_server.engine.model import build_tiny_model, score\n"
        "m = build_tiny_model(seed=0); t = torch.arange(10)\n"
        "print(json.dumps(score(m, t)[-1].tolist()))"
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
    assert 0.09 < model.lm_head.weight.std().item() < 0.11  # TINY_INIT_STD
    assert 0.015 < build_random_model(tiny_config(), seed=0).lm_head.weight.std().item() < 0.025
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)  # untied


def paged_forward(model, pool, chunks):
    """Feed `chunks` of one sequence through the paged path; return all logits rows."""
    attention = PagedAttention(pool.k, pool.v, use_triton=False)
    bs, blocks, done, rows = pool.block_size, [], 0, []
    for chunk in chunks:
        n = len(chunk)
        while len(blocks) * bs < done + n:
            blocks.append(pool.allocate())
        table = torch.tensor([blocks], dtype=torch.int32)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(done, done + n)])
        decode = n == 1
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode=1 if decode else 0,
            decode_block_tables=table if decode else None,
            decode_context_lens=torch.tensor([done + 1], dtype=torch.int32) if decode else None,
            prefill_block_tables=None if decode else table,
            prefill_query_start_loc=None if decode else torch.tensor([0, n], dtype=torch.int32),
            prefill_context_lens=None if decode else torch.tensor([done + n], dtype=torch.int32),
        )
        rows.append(model(chunk, torch.arange(done, done + n), attention, meta))
        done += n
    return torch.cat(rows)


def test_paged_chunks_and_decode_match_cache_free_forward(model):
    c = model.config
    toks = tokens(40)
    pool = BlockPool(8, 16, c.n_layers, c.n_kv_heads, c.head_dim, "cpu", torch.float32)
    # A 7-token chunk, then 13 crossing a block boundary, then single-token decodes.
    chunks = [toks[:7], toks[7:20]] + [toks[i : i + 1] for i in range(20, 40)]
    torch.testing.assert_close(paged_forward(model, pool, chunks), full_logits(model, toks), atol=1e-5, rtol=0)


def test_logits_indices_select_rows(model):
    toks = tokens(9)
    pos = torch.arange(9)
    picked = model(toks, pos, CausalAttention(), None, torch.tensor([8, 2]))
    full = full_logits(model, toks)
    torch.testing.assert_close(picked, full[[8, 2]], atol=1e-5, rtol=0)


def test_gqa_shapes(model):
    c = model.config
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (c.n_heads * c.head_dim, c.dim)
    assert attn.k_proj.weight.shape == (c.n_kv_heads * c.head_dim, c.dim)
    assert attn.v_proj.weight.shape == (c.n_kv_heads * c.head_dim, c.dim)
    logits = score(model, tokens(5))
    assert logits.shape == (5, 259) and logits.dtype == torch.float32


def test_attention_matches_naive_gqa_reference(model):
    c = model.config
    attn, T, hd = model.layers[0].self_attn, 6, c.head_dim
    x = torch.randn(T, c.dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(torch.arange(T), rope_inv_freq(hd, c.rope_theta), torch.float32)
    got = attn(x, cos, sin, CausalAttention(), None)

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
    cos, sin = rope_cos_sin(torch.tensor([pos]), rope_inv_freq(8, 10000.0), torch.float32)
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
        cq, sq = rope_cos_sin(torch.tensor([m]), rope_inv_freq(32, 10000.0), torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([n]), rope_inv_freq(32, 10000.0), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 2), score(107, 102), atol=1e-4, rtol=0)
    assert not torch.allclose(score(7, 2), score(7, 5), atol=1e-3)


def test_llama3_rope_scaling_slows_only_long_wavelengths():
    plain = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    wavelen = 2 * math.pi / plain
    short = wavelen < 8192 / 4.0  # above the high-frequency cutoff: unchanged
    long = wavelen > 8192 / 1.0  # below the low-frequency cutoff: divided by the factor
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8.0)
    middle = ~short & ~long
    assert middle.any()
    assert torch.all(scaled[middle] < plain[middle]) and torch.all(scaled[middle] > plain[middle] / 8.0)


def test_linear_rope_scaling_divides_every_frequency():
    torch.testing.assert_close(rope_inv_freq(64, 1e4, RopeScaling("linear", 4.0)), rope_inv_freq(64, 1e4) / 4.0)


def test_tied_embeddings_share_one_tensor_and_bias_is_applied():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48,
                      max_seq_len=64, attention_bias=True, tie_embeddings=True)  # fmt: skip
    m = build_random_model(cfg, seed=1)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert m.layers[0].self_attn.q_proj.bias is not None
    before = score(m, [1, 2, 3])
    m.layers[0].self_attn.v_proj.bias.add_(1.0)
    assert not torch.allclose(score(m, [1, 2, 3]), before)


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8, max_seq_len=8)
