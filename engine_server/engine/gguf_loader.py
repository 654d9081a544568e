"""Load a Llama-family model from a GGUF file (llama.cpp's single-file format).

The file holds the shape (``{arch}.*`` metadata), the tokenizer (vocabulary,
merges, special ids, chat template) and the weights, most of them quantized.
Weights are dequantized with the ``gguf`` package to the engine's dtype and
renamed to Hugging Face's names; llama.cpp stores the q and k projections of
``llama`` models with their rows permuted for its rotary layout, which is
undone here (as transformers' GGUF loader does). The tokenizer is built in
memory with ``tokenizers`` from the byte-level BPE vocabulary and merges.

Supported: architectures ``llama`` (Llama 2/3, Mistral, SmolLM) and ``qwen2``,
byte-level BPE vocabularies (``tokenizer.ggml.model`` = gpt2), every tensor
type the ``gguf`` package dequantizes. Anything else is a ModelLoadError that
names the file and what is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine_server.gguf_file import GGUFError, GGUFFile
from engine_server.models import gguf_chat_format

from .hf_tokenizer import HFTokenizer
from .loader import LoadedModel, ModelLoadError, _few
from .model import LlamaModel, ModelConfig, RopeScaling, rope_inv_freq

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2")

# llama.cpp's per-layer tensor names -> ours (Hugging Face's without "model.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style RoPE scaling, stored as per-frequency divisors

# How text is split into words before BPE, per ``tokenizer.ggml.pre`` (llama.cpp's names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip
_GPT2_PRES = (None, "default", "gpt2", "gpt-2")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def load_gguf(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the model in GGUF file `path` onto `device` (float32 on CPU, bfloat16 elsewhere by default)."""
    path = Path(path).expanduser()
    try:
        gguf = GGUFFile(path)
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from exc
    try:
        meta = gguf.metadata
        config, inv_freq = _config(gguf, path)
        tokenizer = build_tokenizer(meta, str(path))
        if tokenizer.vocab_size > config.vocab_size:
            raise ModelLoadError(
                f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but the embedding {config.vocab_size} rows"
            )
        device = torch.device(device)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        with torch.device("meta"):
            model = LlamaModel(config)
        state = _state_dict(gguf, model, path, device, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    finally:
        gguf.close()
    if inv_freq is not None:
        model._inv_freq = {torch.device("cpu"): inv_freq}
    model.requires_grad_(False)
    model.eval()
    name = meta.get("general.name") if isinstance(meta.get("general.name"), str) else path.stem
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, name=name, chat_format=gguf_chat_format(meta))


# ----------------------------------------------------------------------------- shape


def _config(gguf: GGUFFile, path: Path) -> tuple[ModelConfig, torch.Tensor | None]:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported; this engine runs {', '.join(SUPPORTED_ARCHS)} "
            "(Llama 2/3, Mistral, SmolLM, Qwen2) GGUF files"
        )

    def field(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} is missing; the file is incomplete")
        return value

    if "token_embd.weight" not in gguf.tensors:
        raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing; the file is incomplete")
    n_heads = int(field("attention.head_count"))
    dim = int(field("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // max(n_heads, 1))
    rot_dims = meta.get(f"{arch}.rope.dimension_count")
    if rot_dims is not None and int(rot_dims) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings ({rot_dims} of {head_dim} dims) are not supported")
    theta = float(field("rope.freq_base", 10000.0))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling("linear", float(field("rope.scaling.factor")))
    elif kind != "none":
        raise ModelLoadError(f"{path}: RoPE scaling {kind!r} is not supported (linear, or llama3 via rope_freqs)")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    try:
        config = ModelConfig(
            vocab_size=int(meta.get(f"{arch}.vocab_size") or gguf.tensors["token_embd.weight"].shape[0]),
            dim=dim,
            n_layers=int(field("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
            hidden_dim=int(field("feed_forward_length")),
            max_seq_len=int(field("context_length")),
            rope_theta=theta,
            norm_eps=float(field("attention.layer_norm_rms_epsilon")),
            head_dim=head_dim,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            tie_embeddings="output.weight" not in gguf.tensors,
            rope_scaling=scaling,
            arch=arch,
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    if len(tokens) > config.vocab_size:
        raise ModelLoadError(f"{path}: {len(tokens)} tokens but an embedding of {config.vocab_size} rows")
    inv_freq = None
    if ROPE_FREQS in gguf.tensors:
        if scaling is not None:
            raise ModelLoadError(f"{path}: both {ROPE_FREQS} and {arch}.rope.scaling.type are set")
        divisors = torch.from_numpy(_dequantize(gguf, ROPE_FREQS)).float().reshape(-1)
        if divisors.numel() != head_dim // 2:
            raise ModelLoadError(f"{path}: {ROPE_FREQS} has {divisors.numel()} values, expected {head_dim // 2}")
        inv_freq = rope_inv_freq(head_dim, theta) / divisors
    return config, inv_freq


# ----------------------------------------------------------------------------- weights


def _state_dict(
    gguf: GGUFFile, model: LlamaModel, path: Path, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    config = model.config
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for gname in gguf.tensors:
        name = _our_name(gname)
        if name is None:
            if gname != ROPE_FREQS:
                unexpected.append(gname)
            continue
        if name not in expected:
            unexpected.append(gname)
            continue
        array = _dequantize(gguf, gname)
        if tuple(array.shape) != expected[name]:
            raise ModelLoadError(
                f"{path}: tensor {gname!r} has shape {list(array.shape)}, the metadata implies "
                f"{list(expected[name])}; the file is inconsistent"
            )
        if config.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute(array, config.n_heads)
        elif config.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute(array, config.n_kv_heads)
        state[name] = torch.from_numpy(array).to(device=device, dtype=dtype)
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensors {_few(unexpected)} for a {config.arch} model")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = [n for n in expected if n not in state]
    if missing:
        raise ModelLoadError(f"{path}: tensors for {_few(missing)} are missing; the file is incomplete")
    return state


def _our_name(gname: str) -> str | None:
    if gname in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gname]
    parts = gname.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _dequantize(gguf: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name` as a float32 array in PyTorch's shape."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    info = gguf.tensors[name]
    qtype = GGMLQuantizationType(info.ggml_type)
    raw = np.frombuffer(gguf.data(name), dtype=np.uint8)
    rows = raw.reshape(*info.shape[:-1], -1) if len(info.shape) > 1 else raw
    try:
        array = dequantize(rows, qtype)
    except NotImplementedError:
        raise ModelLoadError(
            f"{gguf.path}: tensor {name!r} has type {qtype.name}, which the gguf package cannot dequantize"
        ) from None
    # A copy: unquantized types come back as views of the memory-mapped file.
    return np.array(array, dtype=np.float32).reshape(info.shape)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs back to rotate-half halves)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict[str, Any], source: str) -> HFTokenizer:
    """The tokenizer a GGUF file's metadata describes (byte-level BPE), with its special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{source}: tokenizer model {kind!r} is not supported; GGUF files with a byte-level BPE vocabulary "
            "(tokenizer.ggml.model = gpt2: Llama 3, Qwen2, SmolLM) are. Use the model's Hugging Face "
            "directory instead"
            if kind is not None
            else f"{source}: the file has no tokenizer (tokenizer.ggml.model is missing)"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not isinstance(merges, list):
        raise ModelLoadError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    vocab = {token: i for i, token in enumerate(tokens)}
    pre = meta.get("tokenizer.ggml.pre")
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in ("llama3", "llama-bpe"))
    tok = Tokenizer(bpe)
    if pre == "smollm":  # digits one by one, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_PRES:
            log.warning("%s: pre-tokenizer %r is not known; splitting text as GPT-2 does", source, pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED]
    )

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = token("tokenizer.ggml.eos_token_id")
    extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]
    if eos is None and not extra:
        raise ModelLoadError(f"{source}: no end-of-sequence token (tokenizer.ggml.eos_token_id is missing)")
    try:
        return HFTokenizer(
            tok,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=eos,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            extra_eos_ids=extra,
        )
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc
