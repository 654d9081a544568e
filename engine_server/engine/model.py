"""A Llama-architecture decoder in plain PyTorch, with a contiguous per-sequence KV cache.

RMSNorm, rotary embeddings (Hugging Face's rotate-half convention), grouped-query
attention, SwiGLU MLP, untied lm_head. Module and parameter names follow Hugging
Face's LlamaForCausalLM (without its "model." prefix) so its checkpoints can be
loaded by renaming keys. Runs on any device; float32 on CPU, bf16 on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


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


@dataclass
class KVCache:
    """Keys and values of one sequence, stored contiguously by position.

    Positions [0, length) are valid; writing past `length` and moving it forward
    appends, lowering it (`truncate`) rolls the sequence back.
    """

    k: torch.Tensor  # [n_layers, max_len, n_kv_heads, head_dim]
    v: torch.Tensor  # [n_layers, max_len, n_kv_heads, head_dim]
    length: int = 0

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty cache for up to `max_len` positions (default: config.max_seq_len)."""
        max_len = config.max_seq_len if max_len is None else max_len
        shape = (config.n_layers, max_len, config.n_kv_heads, config.head_dim)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def capacity(self) -> int:
        """The most positions this cache can hold."""
        return self.k.shape[1]

    def truncate(self, n: int) -> None:
        """Keep only the first `n` positions; later writes overwrite the rest."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate: n must be in [0, {self.length}], got {n}")
        self.length = n


class RMSNorm(nn.Module):
    """Root-mean-square norm; computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] for the given absolute positions.

    Angles are computed in float32 (bf16 positions lose precision past 256) and
    each frequency appears twice, in the two halves, as rotate-half expects.
    """
    dims = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by position: pairs are (i, i + head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads and rotary positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [T, dim] at positions start..start+T-1.

        k_cache/v_cache are this layer's [max_len, n_kv_heads, head_dim] slices. mask is
        [T, start+T] (True = may attend), or None when the cache was empty (SDPA's own
        causal mask applies) or T == 1 (a lone query sees everything).
        """
        T = x.shape[0]
        q = apply_rope(self.q_proj(x).view(T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)

        end = start + T
        k_cache[start:end] = k
        v_cache[start:end] = v

        # SDPA wants [heads, seq, head_dim]. Query head h reads K/V head h // n_rep,
        # which is what repeat_interleave lays out (enable_gqa needs torch >= 2.5).
        n_rep = self.n_heads // self.n_kv_heads
        keys = k_cache[:end].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        values = v_cache[:end].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        # An empty cache makes the mask the plain square causal one, which SDPA
        # builds itself (and which lets it pick flash kernels).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=start == 0 and T > 1
        )
        return self.o_proj(out.transpose(0, 1).reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Token ids in, next-token logits out, one sequence at a time through its KVCache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """Run tokens [T] at positions cache.length.. and append their K/V to the cache.

        Returns float32 logits [T, vocab] (or [1, vocab] for the last token only,
        which is all prefill needs) and advances cache.length by T.
        """
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise ValueError(
                f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}"
            )
        T = tokens.shape[0]
        start, end = cache.length, cache.length + T
        limit = min(cache.capacity, self.config.max_seq_len)
        if end > limit:
            raise ValueError(
                f"sequence too long: {start} cached + {T} new = {end} positions > limit {limit} "
                f"(cache capacity {cache.capacity}, max_seq_len {self.config.max_seq_len})"
            )

        x = self.embed_tokens(tokens)
        positions = torch.arange(start, end, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        # Query i sits at absolute position start+i and may see keys 0..start+i. A lone
        # query sees everything; an empty cache is the square case SDPA handles itself.
        mask = None
        if start > 0 and T > 1:
            mask = positions[:, None] >= torch.arange(end, device=tokens.device)[None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        cache.length = end

        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype; caches must match it."""
        return self.lm_head.weight.dtype

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Fill weights from `generator`: N(0, std) for matrices, 1.0 for norms."""
        with torch.no_grad():
            for param in self.parameters():
                if param.ndim == 1:  # only RMSNorm weights are vectors
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)


def build_tiny_model(
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaModel:
    """A deterministic random model of `tiny_config()`: same seed, same weights, in any process.

    Weights are drawn in float32 on the CPU from a local generator (the global RNG
    is left alone), then moved, so the seed fixes them independently of device.
    """
    # Building on "meta" skips nn.Linear's default init, which would draw from the global RNG.
    with torch.device("meta"):
        model = LlamaModel(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()
