"""The engine's CPU paths: block-gathering attention against the kernels' torch references, and
float16 matrix semantics (two kernels, one set of numbers)."""

from __future__ import annotations

import pytest
import torch

from engine_server.engine.attention import cpu_paged_decode_attention, cpu_paged_prefill_attention
from engine_server.engine.engine import Engine, EngineConfig, GenSegment, TextSegment
from engine_server.engine.model import HALF_KERNEL_MAX_ROWS, TRANSPOSED_KERNEL_MAX_ROWS, build_tiny_model, linear, score
from engine_server.engine.sampler import SamplingParams
from engine_server.engine.tokenizer import ByteTokenizer
from kernels import reference


def _paged(seed: int, blocks: int = 48, block_size: int = 16, kv_heads: int = 2, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks, block_size, kv_heads, dim, generator=g)
    v = torch.randn(blocks, block_size, kv_heads, dim, generator=g)
    tables = torch.randperm(blocks, generator=g)[:36].reshape(3, 12).to(torch.int32)
    return k, v, tables, g


@pytest.mark.parametrize("lens", [[37, 160, 5], [64, 64, 64], [1, 2, 17]])
def test_cpu_decode_attention_matches_the_reference(lens):
    k, v, tables, g = _paged(1)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 6, 32, generator=g)  # 6 query heads over 2 KV heads
    torch.testing.assert_close(
        cpu_paged_decode_attention(q, k, v, tables, context_lens),
        reference.reference_paged_decode_attention(q, k, v, tables, context_lens),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_cpu_prefill_attention_matches_the_reference_after_cached_prefixes():
    k, v, tables, g = _paged(2)
    # Sequence 0: 7 new tokens after 30 cached; 1: a whole 50-token prompt; 2: one token after 4.
    context_lens = torch.tensor([37, 50, 5], dtype=torch.int32)
    starts = torch.tensor([0, 7, 57, 58], dtype=torch.int32)
    q = torch.randn(58, 6, 32, generator=g)
    torch.testing.assert_close(
        cpu_paged_prefill_attention(q, k, v, tables, starts, context_lens),
        reference.reference_paged_prefill_attention(q, k, v, tables, starts, context_lens),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_half_matrices_give_the_same_numbers_in_the_small_and_the_large_kernel():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=g) * 0.1
    weight.copy_(weight.half().float())
    bias = torch.randn(96, generator=g)
    x = torch.randn(TRANSPOSED_KERNEL_MAX_ROWS + 8, 64, generator=g)
    n = HALF_KERNEL_MAX_ROWS
    small = linear(x[:n], weight, bias, weight.half())  # the float16 kernel
    middle = linear(x[: n + 4], weight, bias, weight.half())[:n]  # float32 W x^T on the float16 values
    large = linear(x, weight, bias, weight.half())[:n]  # float32 x W^T on the float16 values
    exact = (x[:n].half().float() @ weight.T).half().float() + bias
    for got in (small, middle, large):
        torch.testing.assert_close(got, exact, atol=2e-3, rtol=1e-3)  # one float16 step of the outputs
        assert got.is_contiguous()


def test_half_matrices_keep_logits_close_and_greedy_text_equal_on_the_tiny_model():
    tokens = list(b"The quick brown fox jumps over the lazy dog.")
    full = build_tiny_model(seed=0)
    half = build_tiny_model(seed=0)
    half.use_half_matrices()
    assert half.layers[0].self_attn.qkv_half.dtype == torch.float16
    assert torch.equal(half.lm_head.weight, half.lm_head_half.float())  # the float32 copy holds float16 values
    expected, got = score(full, tokens), score(half, tokens)
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    program = [TextSegment("The quick brown fox"), GenSegment("out", params)]
    texts = [Engine(m, ByteTokenizer(), EngineConfig()).run(program).outputs["out"] for m in (full, half)]
    assert texts[0] == texts[1]


def test_half_matrices_are_refused_off_the_cpu_float32_path():
    model = build_tiny_model(seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float16 matrices are for a float32 model on the CPU"):
        model.use_half_matrices()
