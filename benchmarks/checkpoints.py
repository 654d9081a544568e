"""Random-weight Hugging Face checkpoints for benchmarks, written locally (nothing is downloaded).

The tokenizer is word-level and built in code: ``w<id>`` is token ``id`` (ids 0-2 are <unk>, <s>
and </s>), split on whitespace, so a text of n such words is exactly n tokens.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_word_checkpoint(path: Path, spec: dict, device: str) -> Path:
    """Random weights of the Llama shape ``spec`` (``ModelConfig``'s fields) in bf16 on CUDA, fp32 on a
    CPU, as four safetensors shards with their index, a config.json and the word-level tokenizer."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from engine_server.engine.model import ModelConfig, build_random_model

    path.mkdir(parents=True, exist_ok=True)
    vocab = spec["vocab_size"]
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": spec["dim"], "intermediate_size": spec["hidden_dim"], "num_hidden_layers": spec["n_layers"],
        "num_attention_heads": spec["n_heads"], "num_key_value_heads": spec["n_kv_heads"],
        "max_position_embeddings": spec["max_seq_len"], "rms_norm_eps": spec["norm_eps"],
        "rope_theta": spec["rope_theta"], "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }))  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_random_model(ModelConfig(**spec), seed=0, device=device, dtype=dtype)
    state = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in model.state_dict().items()}
    names, shards, weight_map = sorted(state), 4, {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].cpu().contiguous() for n in names[i::shards]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    del model, state
    if device == "cuda":
        torch.cuda.empty_cache()
    return path
