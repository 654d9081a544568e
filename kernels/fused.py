"""Fused elementwise kernels for a decoder layer: RMSNorm (with the residual add), rotary
embeddings on q and k together, and SiLU-and-multiply.
Their torch references are in ``kernels.reference``.

At decode batch sizes a layer's matmuls are short, and the elementwise ops between them
(a norm is seven torch kernels, rotating q and k ten) cost more in launches than in
bytes; each of these does its op in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype, as `x + residual` in torch would be.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * inv).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * norm(h), h)`` with ``h = x + residual`` (or ``x``), rows of ``[T, D]``.

    Normalised in fp32, rounded to x's dtype, then scaled (Hugging Face's LlamaRMSNorm).
    """
    assert x.ndim == 2 and x.stride(-1) == 1
    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, n_cols, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is None:
        res_out, res, has = x, x, False
    else:
        res_out, res, has = torch.empty_like(x), residual, True
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x, res, weight, out, res_out,
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            n_cols, eps,
            HAS_RESIDUAL=has, BLOCK=triton.next_power_of_2(n_cols),
        )  # fmt: skip
    return out, res_out




@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c,
    n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    mask = (h < n_heads)[:, None]
    base = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    # cos/sin hold each frequency twice (both halves); the first half is enough.
    cos = tl.load(cos_ptr + t * stride_c + d).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_c + d).to(tl.float32)[None, :]
    tl.store(base, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ``[T, H, D]`` in place by rotate-half RoPE; cos/sin ``[T, D]``. Returns x."""
    n_tokens, n_heads, dim = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    if n_tokens:
        _rotary_kernel[(n_tokens,)](
            x, cos, sin, x.stride(0), x.stride(1), cos.stride(0),
            n_heads, HALF=dim // 2, BLOCK_H=triton.next_power_of_2(n_heads),
        )  # fmt: skip
    return x




@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    # Rounded after the SiLU, as torch's F.silu(gate) * up rounds between the two ops.
    act = (gate.to(tl.float32) * tl.sigmoid(gate.to(tl.float32))).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, act.to(tl.float32) * up.to(tl.float32), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` of shape ``[T, 2H]`` -> ``[T, H]``."""
    n_rows, width = gate_up.shape
    assert gate_up.stride(-1) == 1 and width % 2 == 0
    out = torch.empty(n_rows, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if n_rows:
        _silu_mul_kernel[(n_rows, triton.cdiv(width // 2, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), width // 2, BLOCK=block
        )
    return out
