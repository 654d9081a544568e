"""Tiny Hugging Face-style model directories for loader and parity tests, built offline.

Tokenizers are trained in code on a small corpus with the ``tokenizers`` library,
in the three shapes real Llama-family checkpoints use: byte-level BPE with a BOS
post-processor (Llama 3), byte-level BPE without BOS (Qwen2), and
sentencepiece-style BPE with byte fallback (Llama 2 / Mistral), either with a
Metaspace pre-tokenizer or with the older Prepend("▁") normalizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# ASCII only, so characters such as "é" or "€" exercise the sentencepiece byte fallback.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, world of tokens.",
    "A semantic variable names a slot in a prompt; the engine fills it.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and {braces} and [brackets].",
    "Parrot serves applications, not isolated requests.",
] * 4

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_bpe(specials: list[str], bos: str | None, vocab_size: int = 320) -> Tokenizer:
    """A GPT-2-style byte-level BPE; `bos`, when given, is added by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def sentencepiece_bpe(style: str = "metaspace", vocab_size: int = 340) -> Tokenizer:
    """A Llama-2-style tokenizer: BPE over "▁"-joined words with <0xXX> byte-fallback tokens.

    style "metaspace": a Metaspace pre-tokenizer (prepend_scheme "first"), as newer
    conversions write; "prepend": a Prepend("▁") + Replace(" ", "▁") normalizer, as Llama 2's
    and Mistral's tokenizer.json have. Both decode with Replace/ByteFallback/Fuse/Strip.
    """
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SP_SPECIALS, show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = {token: i for i, token in enumerate(SP_SPECIALS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))

    bpe = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SP_SPECIALS])
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    elif style == "prepend":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        raise ValueError(f"unknown style {style!r}")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def write_tokenizer(
    path: Path,
    kind: str,
    tokenizer_config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json for `kind`.

    kind: "llama3" (byte-level, BOS by post-processor, EOS list in generation_config),
    "qwen2" (byte-level, no BOS), "llama2" (sentencepiece, Metaspace) or
    "mistral" (sentencepiece, Prepend normalizer; special tokens in AddedToken-dict form).
    The given configs override the defaults field by field.
    """
    path.mkdir(parents=True, exist_ok=True)
    if kind == "llama3":
        tok = byte_level_bpe(LLAMA3_SPECIALS, bos="<|begin_of_text|>")
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        generation = {"eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}
    elif kind == "qwen2":
        tok = byte_level_bpe(QWEN2_SPECIALS, bos=None)
        config = {"bos_token": None, "eos_token": "<|im_end|>"}
        generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    elif kind in ("llama2", "mistral"):
        tok = sentencepiece_bpe("metaspace" if kind == "llama2" else "prepend")
        if kind == "llama2":
            config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
        else:
            added = {"__type": "AddedToken", "lstrip": False, "normalized": False, "special": True}
            config = {
                "add_bos_token": True,
                "bos_token": {**added, "content": "<s>"},
                "eos_token": {**added, "content": "</s>"},
            }
        generation = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    config.update(tokenizer_config or {})
    generation.update(generation_config or {})
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(generation))
    return tok


def tiny_hf_config(model_type: str, vocab_size: int = 384, **overrides: Any) -> dict[str, Any]:
    """A config.json dict of a 2-layer, 64-wide model of `model_type` (GQA: 4 heads, 2 KV heads)."""
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}.get(model_type, "Unknown")],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }  # fmt: skip
    config.update(overrides)
    return config


def write_checkpoint(path: Path, config: dict[str, Any], seed: int = 0, shards: int = 1) -> dict[str, Any]:
    """Save random weights for `config` as HF would (safetensors, "model." names) without transformers.

    shards > 1 splits the tensors over that many files with a model.safetensors.index.json.
    Returns the tensors written, by checkpoint name.
    """
    from safetensors.torch import save_file

    from engine_server.engine.loader import config_from_hf
    from engine_server.engine.model import build_random_model

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    model_config = config_from_hf(config)
    model = build_random_model(model_config, seed=seed)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model_config.tie_embeddings:
            continue
        tensors[name if name == "lm_head.weight" else f"model.{name}"] = tensor.contiguous().clone()
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors
