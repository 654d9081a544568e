"""Checkpoints saved by `transformers` load into our model and compute what `transformers` computes.

Each case builds a tiny random model with the Hugging Face class, saves it with
``save_pretrained`` (safetensors; one case sharded with an index), loads the
directory with ``load_model`` and compares, in float32 on the CPU:
logits of a whole sequence (max abs diff <= 1e-4; measured: 0, and 1.6e-6 for Mistral),
greedy continuations token for token, and prompt tokenization.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may reach the hub
transformers = pytest.importorskip("transformers")

from checkpoints import write_tokenizer  # noqa: E402

from engine_server.engine.loader import LoadedModel, load_model  # noqa: E402
from engine_server.engine.model import score  # noqa: E402

VOCAB = 384
ATOL = 1e-4
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)  # fmt: skip

# name: (HF class, config class, config overrides, tokenizer kind, max_shard_size)
CASES = {
    "llama2": ("LlamaForCausalLM", "LlamaConfig", {}, "llama2", None),
    "llama3-rope-scaling": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            # A short original context puts frequencies in all three llama3 bands at head_dim 16.
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        },
        "llama3",
        "60KB",
    ),  # fmt: skip
    "llama-linear-rope": (
        "LlamaForCausalLM", "LlamaConfig", {"rope_scaling": {"type": "linear", "factor": 4.0}}, "llama2", None,
    ),  # fmt: skip
    "mistral-head-dim": (
        "MistralForCausalLM", "MistralConfig", {"head_dim": 32, "sliding_window": 4096}, "mistral", None,
    ),  # fmt: skip
    "qwen2": (
        "Qwen2ForCausalLM", "Qwen2Config", {"rope_theta": 1e6, "tie_word_embeddings": False}, "qwen2", None,
    ),  # fmt: skip
    "qwen2-tied": (
        "Qwen2ForCausalLM", "Qwen2Config", {"rope_theta": 1e6, "tie_word_embeddings": True}, "qwen2", None,
    ),  # fmt: skip
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, biases and norm gains included (HF initialises those to 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.08)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[str, torch.nn.Module, LoadedModel, Path]:
    name = request.param
    model_class, config_class, overrides, tokenizer_kind, shard_size = CASES[name]
    config = getattr(transformers, config_class)(**SHAPE, **overrides, attn_implementation="eager")
    hf_model = getattr(transformers, model_class)(config).eval()
    randomize(hf_model, seed=len(name))
    path = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size or "50MB")
    write_tokenizer(path, tokenizer_kind)
    return name, hf_model, load_model(path), path


def test_sharded_case_really_is_sharded(case) -> None:
    name, _, _, path = case
    shards = list(path.glob("model-*-of-*.safetensors"))
    if CASES[name][4] is None:
        assert (path / "model.safetensors").is_file() and not shards
    else:
        assert (path / "model.safetensors.index.json").is_file() and len(shards) > 2


def test_logits_match_transformers(case) -> None:
    name, hf_model, loaded, _ = case
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))
    ours = score(loaded.model, ids)
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0].float()
    assert ours.shape == ref.shape == (48, VOCAB)
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs logit diff {diff:.2e} > {ATOL:.0e}"


def test_greedy_continuation_matches_generate(case) -> None:
    name, hf_model, loaded, _ = case
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    eos = sorted(loaded.tokenizer.eos_ids)
    ours = list(prompt)
    for _ in range(16):
        ours.append(int(score(loaded.model, ours)[-1].argmax()))
        if ours[-1] in eos:
            break
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )[0].tolist()
    assert ours == ref, f"{name}: greedy tokens differ"


def test_tied_embeddings_share_one_tensor(case) -> None:
    name, hf_model, loaded, _ = case
    model = loaded.model
    assert loaded.config.tie_embeddings == hf_model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.embed_tokens.weight) == loaded.config.tie_embeddings
    assert not any(p.requires_grad for p in model.parameters())


def test_prompt_tokens_match_transformers_tokenizer(case) -> None:
    _, _, loaded, path = case
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    for text in ("Hello world", "The quick brown fox, café € 😀!", "  two spaces\nand a line"):
        assert loaded.tokenizer.encode(text, add_bos=True) == hf_tokenizer(text).input_ids


def test_bfloat16_load_keeps_ties_and_scores_close(case) -> None:
    name, hf_model, loaded, path = case
    half = load_model(path, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    assert (half.model.lm_head.weight is half.model.embed_tokens.weight) == half.config.tie_embeddings
    ids = list(range(1, 17))
    diff = (score(half.model, ids) - score(loaded.model, ids)).abs().max().item()
    assert diff < 0.1, f"{name}: bf16 logits drift {diff:.3f}"
