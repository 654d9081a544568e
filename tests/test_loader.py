"""Loading model directories: what maps onto ModelConfig, what errors say, how the tokenizer behaves.

Directories are written with safetensors from our own random models (no
transformers needed); test_parity.py checks the numbers against transformers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_hf_config, write_checkpoint, write_tokenizer
from safetensors.torch import load_file, save_file

from engine_server.engine.hf_tokenizer import HFTokenizer
from engine_server.engine.loader import ModelLoadError, config_from_hf, default_dtype, load_model
from engine_server.engine.model import RopeScaling

LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
TEXTS = ["Hello world", "café, naïve € and 😀 emoji", "two  spaces\nnew line\ttab", "日本語のテキスト", "x"]


def model_dir(
    tmp_path: Path, model_type: str = "llama", tokenizer: str = "llama2", shards: int = 1, **overrides
) -> Path:
    path = tmp_path / "model"
    write_checkpoint(path, tiny_hf_config(model_type, **overrides), shards=shards)
    write_tokenizer(path, tokenizer)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    return str(info.value)


# --- config.json -> ModelConfig ------------------------------------------------------------


def test_llama_config_maps_shape_fields() -> None:
    config = config_from_hf(tiny_hf_config("llama", num_key_value_heads=None))
    assert (config.vocab_size, config.dim, config.n_layers, config.hidden_dim) == (384, 64, 2, 160)
    assert config.n_heads == config.n_kv_heads == 4  # no num_key_value_heads: plain multi-head
    assert (config.head_dim, config.max_seq_len, config.norm_eps) == (16, 512, 1e-5)
    assert not config.attention_bias and not config.tie_embeddings and config.rope_scaling is None


def test_llama3_rope_scaling_reads_old_and_new_config_forms() -> None:
    old = tiny_hf_config("llama", rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE})
    new_rope = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_ROPE}
    new = tiny_hf_config("llama", rope_parameters=new_rope)
    del new["rope_theta"]
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    for cfg in (old, new):
        config = config_from_hf(cfg)
        assert config.rope_theta == 500000.0 and config.rope_scaling == expected


def test_linear_rope_scaling_accepts_the_old_type_key() -> None:
    config = config_from_hf(tiny_hf_config("llama", rope_scaling={"type": "linear", "factor": 2.0}))
    assert config.rope_scaling == RopeScaling("linear", 2.0)


def test_default_rope_type_means_no_scaling() -> None:
    cfg = tiny_hf_config("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = config_from_hf(cfg)
    assert config.rope_scaling is None and config.rope_theta == 1e6


def test_mistral_explicit_head_dim_and_sliding_window_caps_context() -> None:
    config = config_from_hf(tiny_hf_config("mistral", head_dim=32, sliding_window=256))
    assert config.head_dim == 32 and config.max_seq_len == 256
    assert config_from_hf(tiny_hf_config("mistral", sliding_window=None)).max_seq_len == 512


def test_qwen2_has_qkv_bias_and_ignores_a_disabled_sliding_window() -> None:
    config = config_from_hf(tiny_hf_config("qwen2", tie_word_embeddings=True, sliding_window=128))
    assert config.attention_bias and config.tie_embeddings and config.max_seq_len == 512
    enabled = tiny_hf_config("qwen2", sliding_window=128, use_sliding_window=True)
    assert config_from_hf(enabled).max_seq_len == 128


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantized"),
        ({"num_attention_heads": 5}, "divisible"),
    ],
)
def test_unsupported_or_incomplete_config_names_the_field(overrides, message) -> None:
    with pytest.raises(ModelLoadError, match="config.json") as info:
        config_from_hf({**tiny_hf_config("llama"), **overrides})
    assert message in str(info.value)


def test_default_dtype_is_float32_on_cpu_and_half_on_accelerators() -> None:
    assert default_dtype(torch.device("cpu"), {"torch_dtype": "bfloat16"}) == torch.float32
    assert default_dtype(torch.device("cuda"), {"torch_dtype": "float16"}) == torch.float16
    assert default_dtype(torch.device("cuda"), {"dtype": "float32"}) == torch.bfloat16


# --- loading weights ------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
def test_loads_the_written_tensors(tmp_path, shards) -> None:
    path = tmp_path / "model"
    written = write_checkpoint(path, tiny_hf_config("qwen2", tie_word_embeddings=True), seed=7, shards=shards)
    write_tokenizer(path, "qwen2")
    loaded = load_model(path)
    state = loaded.model.state_dict()
    bias = "layers.1.self_attn.k_proj.bias"
    assert torch.equal(state[bias], written[f"model.{bias}"])
    assert torch.equal(state["embed_tokens.weight"], written["model.embed_tokens.weight"])
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.name == "model" and loaded.model.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_saved_copy_of_a_tied_head_is_not_read(tmp_path) -> None:
    path = model_dir(tmp_path, "qwen2", "qwen2", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path / "model.safetensors")
    model = load_model(path).model
    assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.weight.abs().sum() > 0


def test_hugging_face_cache_snapshot_is_named_after_its_repository(tmp_path) -> None:
    path = tmp_path / "models--org--tiny-llama" / "snapshots" / "abc123"
    write_checkpoint(path, tiny_hf_config("llama"))
    write_tokenizer(path, "llama2")
    assert load_model(path).name == "org/tiny-llama"


def test_old_rotary_inv_freq_buffers_are_ignored(tmp_path) -> None:
    path = model_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors")
    assert load_model(path).config.n_layers == 2


def test_not_a_directory(tmp_path) -> None:
    assert "is not a directory" in load_error(tmp_path / "nowhere")


def test_missing_config_json(tmp_path) -> None:
    path = model_dir(tmp_path)
    (path / "config.json").unlink()
    assert "config.json is missing" in load_error(path)


def test_invalid_config_json(tmp_path) -> None:
    path = model_dir(tmp_path)
    (path / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in load_error(path)


def test_missing_weights_names_both_layouts(tmp_path) -> None:
    path = model_dir(tmp_path)
    (path / "model.safetensors").unlink()
    message = load_error(path)
    assert "model.safetensors" in message and "model.safetensors.index.json" in message


def test_bin_only_checkpoint_asks_for_safetensors(tmp_path) -> None:
    path = model_dir(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"")
    assert "safetensors weights are required" in load_error(path)


def test_missing_shard_is_named(tmp_path) -> None:
    path = model_dir(tmp_path, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors is missing" in load_error(path)


def test_missing_tensor_is_named(tmp_path) -> None:
    path = model_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    assert "'layers.1.mlp.up_proj.weight'" in load_error(path)


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path) -> None:
    path = model_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    assert "'lm_head.weight'" in load_error(path)


def test_unexpected_tensor_is_named(tmp_path) -> None:
    path = model_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, path / "model.safetensors")
    assert "unexpected tensors 'model.layers.0.self_attn.o_proj.bias'" in load_error(path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path) -> None:
    path = model_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    message = load_error(path)
    assert "model.safetensors: tensor 'model.layers.0.mlp." in message
    assert "has shape" in message and "config.json implies" in message


def test_missing_tokenizer_json_is_named(tmp_path) -> None:
    path = model_dir(tmp_path)
    (path / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in load_error(path)
    (path / "tokenizer.model").write_bytes(b"")
    assert "AutoTokenizer.from_pretrained(path).save_pretrained(path)" in load_error(path)


def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path) -> None:
    path = tmp_path / "model"
    write_checkpoint(path, tiny_hf_config("llama", vocab_size=300))
    write_tokenizer(path, "llama2")  # 340 tokens
    assert "tokenizer.json has 340 tokens but config.json's vocab_size is 300" in load_error(path)


def test_special_token_outside_vocabulary_is_named(tmp_path) -> None:
    path = tmp_path / "model"
    write_checkpoint(path, tiny_hf_config("llama"))
    write_tokenizer(path, "llama2", tokenizer_config={"eos_token": "<|nope|>"})
    assert "eos_token '<|nope|>' is not in the vocabulary" in load_error(path)


# --- tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama2", "mistral", "llama3", "qwen2"])
def tokenizer(request, tmp_path_factory) -> HFTokenizer:
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, request.param)
    tok = HFTokenizer.from_dir(path)
    tok.kind = request.param  # type: ignore[attr-defined]
    return tok


def test_sentencepiece_special_tokens_from_strings_and_added_token_dicts(tmp_path) -> None:
    for kind in ("llama2", "mistral"):  # mistral's config spells them as AddedToken dicts
        write_tokenizer(tmp_path / kind, kind)
        tok = HFTokenizer.from_dir(tmp_path / kind)
        assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (1, 2, frozenset({2}), True)


def test_llama3_bos_comes_from_post_processor_and_eos_set_from_generation_config(tmp_path) -> None:
    raw = write_tokenizer(tmp_path, "llama3")
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.bos_id == raw.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == raw.token_to_id("<|eot_id|>")
    assert tok.eos_ids == {raw.token_to_id("<|eot_id|>"), raw.token_to_id("<|end_of_text|>")}


def test_qwen2_has_no_bos(tmp_path) -> None:
    raw = write_tokenizer(tmp_path, "qwen2")
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.bos_id is None and not tok.add_bos
    assert tok.encode("Hello", add_bos=True) == tok.encode("Hello")
    assert tok.eos_ids == {raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>")}


def test_add_bos_token_false_is_respected(tmp_path) -> None:
    write_tokenizer(tmp_path, "llama2", tokenizer_config={"add_bos_token": False})
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.bos_id == 1 and not tok.add_bos and tok.encode("Hi", add_bos=True) == tok.encode("Hi")


def test_eos_id_from_config_json_joins_the_eos_set(tmp_path) -> None:
    write_tokenizer(tmp_path, "llama2")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert HFTokenizer.from_dir(tmp_path).eos_ids == {2, 5}


def test_encode_adds_bos_only_when_asked(tokenizer) -> None:
    plain = tokenizer.encode("Hello world")
    assert tokenizer.bos_id not in plain and tokenizer.eos_id not in plain
    with_bos = tokenizer.encode("Hello world", add_bos=True)
    assert with_bos == ([tokenizer.bos_id, *plain] if tokenizer.add_bos else plain)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips_text(tokenizer, text) -> None:
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True)) == text


def test_decode_skips_special_tokens(tokenizer) -> None:
    ids = tokenizer.encode("Hello")
    assert tokenizer.decode([*ids, *sorted(tokenizer.eos_ids)]) == "Hello"


@pytest.mark.parametrize(("head", "tail"), [("Hello", " world"), ("Hello", "world"), ("The quick", " brown fox."),
                                            ("a", " café 😀"), ("x", "\nnew line")])  # fmt: skip
def test_continuation_tokens_concatenate_to_the_text(tokenizer, head, tail) -> None:
    ids = tokenizer.encode(head, add_bos=True) + tokenizer.encode_continuation(tail)
    assert tokenizer.decode(ids) == head + tail


def test_continuation_adds_no_sentencepiece_word_start(tokenizer) -> None:
    ids = tokenizer.encode_continuation("world")
    assert not tokenizer._tok.id_to_token(ids[0]).startswith("▁")
    if tokenizer.kind in ("llama2", "mistral"):  # a plain encode starts the text with "▁"
        assert tokenizer._tok.id_to_token(tokenizer.encode("world")[0]).startswith("▁")
        assert tokenizer.encode_continuation(" world") == tokenizer.encode("world")
    else:  # byte-level BPE adds nothing in front, so a continuation is a plain encode
        assert ids == tokenizer.encode("world")


def test_continuation_of_a_space_separated_text_matches_whole_encoding(tokenizer) -> None:
    whole = tokenizer.encode("Hello world")
    assert tokenizer.encode("Hello") + tokenizer.encode_continuation(" world") == whole


def stream(tokenizer: HFTokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.incremental_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_concatenates_to_decode(tokenizer, text) -> None:
    ids = tokenizer.encode(text, add_bos=True) + sorted(tokenizer.eos_ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)  # half a character is never emitted


def test_incremental_decoding_holds_a_multibyte_char_until_it_is_complete(tokenizer) -> None:
    emoji = tokenizer.encode_continuation("😀")
    assert len(emoji) > 1  # byte fallback (sentencepiece) or byte-level pieces
    pieces = stream(tokenizer, emoji + tokenizer.encode_continuation("!"))
    assert pieces[: len(emoji) - 1] == [""] * (len(emoji) - 1)
    # Byte-level BPE emits it with its last byte; a byte-fallback run waits for the next token.
    assert pieces[len(emoji) - 1] == ("" if tokenizer.is_byte_fallback_token(emoji[-1]) else "😀")
    assert "".join(pieces[: len(emoji) + 1]) == "😀!"


def test_incremental_decoding_of_a_cut_off_char_flushes_a_replacement(tokenizer) -> None:
    ids = tokenizer.encode("ok") + tokenizer.encode_continuation("€")[:-1]
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) and pieces[-1].endswith("\ufffd")


def test_incremental_decoding_of_arbitrary_ids_concatenates_to_decode(tokenizer) -> None:
    """Invalid byte runs and special tokens inside them included (a model can emit anything)."""
    specials = [i for i in (tokenizer.bos_id, *tokenizer.eos_ids) if i is not None]
    low_ids = list(range(3, 260))  # sentencepiece byte tokens, byte-level single bytes
    rng = random.Random(0)
    for _ in range(300):
        ids = [
            rng.choice(rng.choice([low_ids, low_ids, specials, range(tokenizer.vocab_size)]))
            for _ in range(rng.randint(1, 24))
        ]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids
