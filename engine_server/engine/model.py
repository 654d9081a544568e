"""Llama-family decoders (Llama 2/3, Mistral, Qwen2) in plain PyTorch over a paged KV cache.

RMSNorm, rotary embeddings (Hugging Face's rotate-half convention, with Llama-3
and linear RoPE scaling), grouped-query attention with optional q/k/v bias
(Qwen2), SwiGLU MLP, optionally tied embeddings. Module and parameter names
follow Hugging Face's ``*ForCausalLM`` without the "model." prefix, so
checkpoints load by renaming keys (loader.py).

One forward runs a whole engine iteration: the new tokens of many sequences,
packed into one [T] tensor. Attention reads and writes the paged KV pool through
``attention.AttentionBackend``; everything else is ordinary batched matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import reference_rms_norm, reference_rotary, reference_silu_mul

if TYPE_CHECKING:
    from .attention import AttentionBackend, AttentionMetadata


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched for long contexts ("llama3" or "linear")."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"rope scaling type {self.kind!r} is not supported (llama3, linear)")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape hyperparameters of a Llama-style model."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0: dim // n_heads (Mistral-style configs may set it explicitly)
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight
    rope_scaling: RopeScaling | None = None
    arch: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.attention_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + embed + self.dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token occupies across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize


def tiny_config() -> ModelConfig:
    """A ~1M-parameter byte-level model: fast on CPU, real architecture (GQA included)."""
    return ModelConfig(
        vocab_size=259,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=352,
        max_seq_len=4096,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )


def llama2_7b_config() -> ModelConfig:
    """Llama-2-7B's shape (for benchmarks with random weights)."""
    return ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        hidden_dim=11008, max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5,
    )  # fmt: skip


class RMSNorm(nn.Module):
    """Root-mean-square norm; computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_rms_norm(x, self.weight, self.eps)[0]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, after any RoPE scaling."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, interpolated, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] for the given absolute positions.

    Angles are computed in float32 (bf16 positions lose precision past 256) and
    each frequency appears twice, in the two halves, as rotate-half expects.
    """
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# Rotate-half RoPE (pairs i, i + head_dim/2): the same function the rotary kernel is tested against.
apply_rope = reference_rotary


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.reference.reference_rms_norm`` for float32 in one PyTorch op (fewer launches on a CPU)."""
    h = x if residual is None else x + residual
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


# Up to this many rows the float16 matmul is the faster kernel on a CPU (see LlamaModel.use_half_matrices).
HALF_KERNEL_MAX_ROWS = 2
# Up to this many, float32 W x^T beats F.linear (x W^T) on these CPUs; beyond, they are even.
TRANSPOSED_KERNEL_MAX_ROWS = 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, half: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. With `half` (W in float16, `weight` holding the same values in x's dtype),
    float16 matmul semantics: inputs and output rounded to float16, float32 accumulation,
    bias added after. One or two rows run the float16 kernel (half the bytes to read), more
    the float32 one on the float16 values; both give the same numbers, up to summation order.
    Up to 32 rows the float32 product is computed as W x^T: with the weight as the left operand
    MKL picks a kernel 1.3-3x faster on these CPUs (benchmarks/results/cpu_matmul.txt)."""
    if half is None:
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    if rows <= HALF_KERNEL_MAX_ROWS:
        y = F.linear(x.half(), half)
    elif rows <= TRANSPOSED_KERNEL_MAX_ROWS:
        y = torch.mm(weight, x.half().to(x.dtype).t()).t().half()
    else:
        y = F.linear(x.half().to(x.dtype), weight).half()
    y = y.to(x.dtype, memory_format=torch.contiguous_format)
    return y if bias is None else y + bias


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads and rotary positions."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse(): q, k, v stacked
        self.qkv_bias: torch.Tensor | None = None
        self.triton = False  # rotary with the fused Triton kernel (set by fuse)
        self.qkv_half: torch.Tensor | None = None  # float16 copies (set by use_half_matrices)
        self.o_half: torch.Tensor | None = None

    def fuse(self, triton: bool = True) -> None:
        """Stack q/k/v into one matrix; the per-projection weights become views of it."""
        self.triton = triton
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = _stack_as_views([p.weight for p in projs], projs, "weight")
        if self.q_proj.bias is not None:
            self.qkv_bias = _stack_as_views([p.bias for p in projs], projs, "bias")

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, dim], the new tokens of every sequence in the batch, packed."""
        T = x.shape[0]
        if self.qkv_weight is not None:  # fused: one matmul, rotary on its output
            qkv = linear(x, self.qkv_weight, self.qkv_bias, self.qkv_half)
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            # q's heads and k's heads sit side by side in each row: one rotary for both.
            qk = qkv[:, : nq + nk].view(T, self.n_heads + self.n_kv_heads, self.head_dim)
            if self.triton:
                from kernels import fused

                fused.rotary_(qk, cos, sin)
            else:
                qk = apply_rope(qk, cos, sin)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
            v = qkv[:, nq + nk :].view(T, self.n_kv_heads, self.head_dim)
        else:
            q = apply_rope(self.q_proj(x).view(T, self.n_heads, self.head_dim), cos, sin)
            k = apply_rope(self.k_proj(x).view(T, self.n_kv_heads, self.head_dim), cos, sin)
            v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        out = backend.attend(self.layer, q, k, v, meta)
        return linear(out.reshape(T, self.n_heads * self.head_dim), self.o_proj.weight, None, self.o_half)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()
        self.triton = False  # SiLU-and-multiply with the fused Triton kernel (set by fuse)
        self.gate_up_half: torch.Tensor | None = None  # float16 copies (set by use_half_matrices)
        self.down_half: torch.Tensor | None = None

    def fuse(self, triton: bool = True) -> None:
        self.triton = triton
        projs = (self.gate_proj, self.up_proj)
        self.gate_up_weight = _stack_as_views([p.weight for p in projs], projs, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate_up = linear(x, self.gate_up_weight, None, self.gate_up_half)
            if self.triton:
                from kernels import fused

                return self.down_proj(fused.silu_mul(gate_up))
            return linear(reference_silu_mul(gate_up), self.down_proj.weight, None, self.down_half)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, backend, meta, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) in, (mlp output, residual stream before it) out.

        The residual add is folded into the next norm, which fused kernels do in one pass:
        the stream is h = x + residual, and the layer sees norm(h).
        """
        ln = self.input_layernorm
        h, residual = norm(x, ln.weight, ln.eps, residual)
        x = self.self_attn(h, cos, sin, backend, meta)
        ln = self.post_attention_layernorm
        h, residual = norm(x, ln.weight, ln.eps, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Packed token ids of a batch in, next-token logits of chosen positions out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused = False  # matmuls stacked (q/k/v, gate/up)
        self.triton = False  # and the elementwise ops in fused Triton kernels
        self.lm_head_half: torch.Tensor | None = None  # set by use_half_matrices
        # Kept out of the module's buffers so .to(dtype) can never round the frequencies.
        self._inv_freq = {
            torch.device("cpu"): rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        }

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Float32 RoPE inverse frequencies on `device` (cached per device)."""
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
        return self._inv_freq[device]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run tokens [T] at `positions` [T]; return float32 logits.

        Logits are computed only for the rows in `logits_indices` (default: all),
        since an engine needs one row per sequence that samples next.
        """
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.inv_freq(positions.device), x.dtype)
        norm = rms_norm if x.dtype == torch.float32 else reference_rms_norm
        if self.triton:
            from kernels import fused

            norm = fused.rms_norm
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, backend, meta, norm)
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        x, _ = norm(x, self.norm.weight, self.norm.eps, residual)
        return linear(x, self.lm_head.weight, None, self.lm_head_half).float()

    def fuse(self, triton: bool = True) -> None:
        """Stack the q/k/v and gate/up matmuls (fewer, larger matmuls on any device); with
        `triton` (CUDA) also use the fused Triton kernels: one-pass norms with the residual
        add, in-place rotary, SiLU-and-multiply."""
        for layer in self.layers:
            layer.self_attn.fuse(triton)
            layer.mlp.fuse(triton)
        self.fused, self.triton = True, triton

    def use_half_matrices(self) -> None:
        """Run every matmul with float16 semantics (CPU serving; see ``linear``).

        A CPU decode step reads every weight once, so it runs at memory speed: float16 halves
        the bytes (SmolLM2-135M: 540 -> 270 MB a token) and its small-batch kernel is about
        2.7x faster here, while prefill's large matmuls are faster in float32 (5x at 300
        rows). Both kernels are kept, on the same float16 values: the float32 weights are
        rounded to float16 in place and a float16 copy is added (1.5x the float32 memory).
        Norms, embeddings lookups, attention and the residual stream stay in float32.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("float16 matrices are for a float32 model on the CPU")
        if not self.fused:
            self.fuse(triton=False)

        def half(weight: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                weight.copy_(weight.half().float())
            return weight.half()

        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_half, attn.o_half = half(attn.qkv_weight), half(attn.o_proj.weight)
            mlp.gate_up_half, mlp.down_half = half(mlp.gate_up_weight), half(mlp.down_proj.weight)
        self.lm_head_half = half(self.lm_head.weight)  # rounds a tied embedding too: same values

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a norm's weight: matrices may be kept quantized); caches match it."""
        return self.norm.weight.dtype

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Fill weights from `generator`: N(0, std) for matrices and biases, 1.0 for norms."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)


def _stack_as_views(tensors: list[torch.Tensor], modules, attr: str) -> torch.Tensor:
    """Concatenate tensors along dim 0 and re-point each module's parameter at its slice.

    The separate parameters keep their names (so state_dict and loading are unchanged)
    but share the stacked storage, so no memory is doubled.
    """
    stacked = torch.cat([t.detach() for t in tensors], dim=0)
    offset = 0
    for module, t in zip(modules, tensors):
        n = t.shape[0]
        setattr(module, attr, nn.Parameter(stacked[offset : offset + n], requires_grad=False))
        offset += n
    return stacked


def build_random_model(
    config: ModelConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> LlamaModel:
    """A deterministic random model of `config`: same seed, same weights, in any process.

    Matrices are drawn from N(0, std); norms are 1.

    Small models draw in float32 on the CPU from a local generator (the global RNG
    is left alone), then move, so the seed fixes the weights independently of
    device. Large ones (benchmarks) draw directly on the device in `dtype`.
    """
    # Building on "meta" skips nn.Linear's default init, which would draw from the global RNG.
    with torch.device("meta"):
        model = LlamaModel(config)
    big = config.num_params() > 200_000_000
    init_device = torch.device(device) if big else torch.device("cpu")
    model.to_empty(device=init_device)
    if big:
        model.to(dtype=dtype)
    if config.tie_embeddings:  # to_empty re-creates parameters, so tie again
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights(torch.Generator(device=init_device).manual_seed(seed), std=std)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


TINY_INIT_STD = 0.1


def build_tiny_model(
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaModel:
    """The seeded random model of `tiny_config()` that tests serve (`--model tiny`).

    Drawn at std 0.1, not the usual 0.02: at 0.02 attention is nearly uniform and the next token
    hardly depends on anything but the last few, so different prompts give the same text; at 0.1
    the text depends on the whole prompt, so a test that feeds a call the wrong input sees it.
    """
    return build_random_model(tiny_config(), seed, device, dtype, std=TINY_INIT_STD)


@torch.inference_mode()
def score(model: LlamaModel, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, vocab] of one whole sequence, without any cache.

    The equivalent of a Hugging Face forward over `token_ids`; the engine's paged
    path is checked against it.
    """
    from .attention import CausalAttention

    tokens = torch.as_tensor(token_ids, device=model.device).reshape(-1)
    if tokens.numel() == 0:
        raise ValueError("score needs at least one token")
    positions = torch.arange(tokens.numel(), device=model.device)
    return model(tokens, positions, CausalAttention(), None)
