"""Small GGUF files for loader tests, written offline with the ``gguf`` package's writer.

A random transformers model (Llama with GQA, or Qwen2 with q/k/v biases) is
written the way llama.cpp's converter writes it: llama.cpp tensor names, q/k
rows permuted for llama, tensors quantized to the requested types, and a
byte-level BPE tokenizer (trained in tests/checkpoints.py) as metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine_server.models import TINY_CHAT_TEMPLATE
from tests.checkpoints import QWEN2_SPECIALS, byte_level_bpe

CHATML = TINY_CHAT_TEMPLATE  # ChatML, as SmolLM2's file has it
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def random_hf_model(arch: str = "llama", seed: int = 0, tied: bool = False, rope_scaling: dict | None = None):
    """A small random transformers model of `arch` (every weight random, norms included)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )  # fmt: skip
    if rope_scaling is not None:
        shape["rope_scaling"] = rope_scaling
    config = LlamaConfig(**shape) if arch == "llama" else Qwen2Config(**shape)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0.0))
    return model


def write_gguf(
    path: Path, model, quant: str = "F32", chat_template: str | None = CHATML, rope_freqs=None, **meta_overrides
) -> Path:
    """Write `model` (from random_hf_model) as a GGUF file; matrices in `quant`, norms in F32;
    `rope_freqs` (per-frequency divisors, as llama.cpp writes Llama 3.1's RoPE scaling) if given."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    qtype = gguf.GGMLQuantizationType[quant]
    tok = byte_level_bpe(QWEN2_SPECIALS, bos=None, vocab_size=cfg.vocab_size)
    learned = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(meta_overrides.pop("tokenizer_model", "gpt2"))
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in QWEN2_SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in meta_overrides.items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)

    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        array = tensor.float().numpy()
        gname = _gguf_name(name)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            array = _permute(array, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            array = _permute(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(array, dtype=np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.ascontiguousarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_name(name: str) -> str:
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_LAYER[rest]}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half pairs interleaved, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
