"""Load a Llama-family checkpoint from a local Hugging Face model directory.

A directory as ``save_pretrained`` writes it: ``config.json``, weights in
``model.safetensors`` or in shards listed by ``model.safetensors.index.json``,
and ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``).
Supported ``model_type``s: llama (Llama 2 and 3, with llama3 or linear RoPE
scaling), mistral and qwen2. Nothing here reaches the network: a directory that
lacks something is an error that names the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_server.models import ChatFormat, hf_chat_format

from .hf_tokenizer import HFTokenizer, read_json_object
from .model import LlamaModel, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Per model_type, the defaults of the Hugging Face config class, for fields a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "mistral": {"max_position_embeddings": 4096 * 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}

# Buffers some older checkpoints saved alongside the weights; the model recomputes them.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message says which file or field and what to do."""


@dataclass
class LoadedModel:
    """A checkpoint ready to serve: weights on their device, its tokenizer and shape."""

    model: LlamaModel
    tokenizer: HFTokenizer
    config: ModelConfig
    name: str
    chat_format: ChatFormat | None = None  # the chat template the files carry


def config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a ModelConfig.

    Mistral's and Qwen2's sliding-window attention is not implemented (every
    layer attends to the whole context), so when a window is in force the
    context length is capped at the window: up to that length full and
    sliding-window attention are the same computation.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"use a checkpoint of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("quantization_config"):
        raise ModelLoadError(
            f"{source}: quantized checkpoints are not supported; use the unquantized (bf16/fp16) weights"
        )

    def field(name: str) -> Any:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
        if name in _DEFAULTS[model_type]:
            return _DEFAULTS[model_type][name]
        raise ModelLoadError(f"{source}: required field {name!r} is missing; the config.json is incomplete")

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise ModelLoadError(f"{source}: {what} is not supported by this engine")

    require(cfg.get("hidden_act", "silu") == "silu", f"hidden_act {cfg.get('hidden_act')!r} (only silu)")
    require(not cfg.get("mlp_bias", False), "mlp_bias=true")
    if model_type == "llama":
        # Llama's attention_bias also adds a bias to o_proj, which our model lacks.
        require(not cfg.get("attention_bias", False), "attention_bias=true on a llama model")

    rope_theta, rope_scaling = _rope(cfg, field, source)
    n_heads = field("num_attention_heads")
    max_seq_len = field("max_position_embeddings")
    window = _sliding_window(cfg, model_type)
    if window is not None and window < max_seq_len:
        max_seq_len = window

    try:
        return ModelConfig(
            vocab_size=field("vocab_size"),
            dim=field("hidden_size"),
            n_layers=field("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=field("intermediate_size"),
            max_seq_len=max_seq_len,
            rope_theta=float(rope_theta),
            norm_eps=float(field("rms_norm_eps")),
            head_dim=cfg.get("head_dim") or 0,
            attention_bias=model_type == "qwen2",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            arch=model_type,
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc


def _rope(cfg: dict[str, Any], field: Any, source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling, from ``rope_theta`` + ``rope_scaling`` or the newer ``rope_parameters``."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{source}: rope_scaling must be an object, got {params!r}")
    theta = params.get("rope_theta") if cfg.get("rope_parameters") else None
    theta = theta if theta is not None else field("rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear"):
        raise ModelLoadError(
            f"{source}: RoPE scaling type {kind!r} is not supported (llama3, linear); "
            "use a checkpoint without it"
        )
    if "factor" not in params:
        raise ModelLoadError(f"{source}: rope_scaling needs a 'factor'")
    extra = {}
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in params:
                raise ModelLoadError(f"{source}: llama3 rope_scaling needs {name!r}")
            extra[name] = params[name]
    try:
        return theta, RopeScaling(kind=kind, factor=float(params["factor"]), **extra)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The attention window in force, if any (Mistral v0.1 sets one; Qwen2 only when enabled)."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return window


def default_dtype(device: torch.device, cfg: dict[str, Any]) -> torch.dtype:
    """float32 on CPU; on an accelerator the checkpoint's half dtype, bfloat16 if it names none."""
    if device.type == "cpu":
        return torch.float32
    named = cfg.get("torch_dtype") or cfg.get("dtype")
    return torch.float16 if named == "float16" else torch.bfloat16


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load the checkpoint in directory `path` onto `device` in `dtype` (see default_dtype).

    Raises ModelLoadError for anything the directory lacks or holds wrongly.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass a Hugging Face model directory")
    config_file = path / "config.json"
    raw = _read_json(config_file, "it describes the model; copy it from the model's repository")
    config = config_from_hf(raw, str(config_file))
    device = torch.device(device)
    dtype = dtype or default_dtype(device, raw)

    # The tokenizer first: it is cheap, and a bad one should not wait behind gigabytes of weights.
    try:
        tokenizer = HFTokenizer.from_dir(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"{path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{config.vocab_size}; the tokenizer belongs to another model"
        )

    with torch.device("meta"):
        model = LlamaModel(config)
    state = _load_weights(path, model, device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, config=config, name=_model_name(path), chat_format=hf_chat_format(path)
    )


def _model_name(path: Path) -> str:
    """The directory's name, or "org/name" for a snapshot in the Hugging Face cache."""
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return path.name


def _read_json(file: Path, why: str) -> dict[str, Any]:
    """The JSON object in a file the checkpoint must have."""
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing: {why}")
    try:
        return read_json_object(file)
    except ValueError as exc:
        raise ModelLoadError(f"{exc}; re-download it") from exc


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (read from headers or the index)."""
    from safetensors import safe_open

    index_file = path / INDEX_FILE
    if index_file.is_file():
        index = _read_json(index_file, "")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_file} has no 'weight_map'; re-download it")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(
                    f"{shard} is missing: {index_file.name} lists it as a weight shard; download every shard"
                )
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ModelLoadError(
            f"{path} holds PyTorch .bin/.pt weights only: safetensors weights are required; download "
            f"the model's *.safetensors files or convert with transformers (save_pretrained(..., "
            f"safe_serialization=True))"
        )
    raise ModelLoadError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} is there; download the weights")


def _load_weights(
    path: Path, model: LlamaModel, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's state dict read from the safetensors files, on `device` in `dtype`.

    Files are memory-mapped and each tensor is read straight onto `device`, so a
    checkpoint never needs to fit in host memory twice.
    """
    from safetensors import SafetensorError, safe_open

    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    files = _weight_files(path)
    names: dict[str, str] = {}  # our name -> checkpoint name
    unexpected = []
    tied = model.config.tie_embeddings
    for ckpt_name in files:
        name = ckpt_name.removeprefix("model.")
        if tied and name == "lm_head.weight":
            continue  # a tied head is the embedding; a saved copy of it is not read
        if name in expected:
            names[name] = ckpt_name
        elif not ckpt_name.endswith(_IGNORED_SUFFIXES):
            unexpected.append(ckpt_name)
    if unexpected:
        raise ModelLoadError(
            f"{path}: unexpected tensors {_few(unexpected)}: the weights do not match config.json "
            f"(model_type {model.config.arch!r}); check that they come from the same model"
        )
    missing = [n for n in expected if n not in names and not (tied and n == "lm_head.weight")]
    if missing:
        raise ModelLoadError(
            f"{path}: tensors {_few(missing)} are missing from the safetensors files; "
            "the download is incomplete or the weights do not match config.json"
        )

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, ckpt_name in names.items():
        by_file.setdefault(files[ckpt_name], []).append(name)
    safetensors_device = "cpu" if device.type == "cpu" else str(device)
    for file, file_names in sorted(by_file.items()):
        try:
            with safe_open(file, framework="pt", device=safetensors_device) as f:
                for name in file_names:
                    shape = list(f.get_slice(names[name]).get_shape())
                    if shape != list(expected[name]):
                        raise ModelLoadError(
                            f"{file}: tensor {names[name]!r} has shape {shape}, config.json implies "
                            f"{list(expected[name])}; the weights do not match the config"
                        )
                    state[name] = f.get_tensor(names[name]).to(dtype=dtype)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file} could not be read ({exc}); re-download it") from exc
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
