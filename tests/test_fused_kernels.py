"""The fused layer kernels (RMSNorm + residual, rotary, SiLU-and-multiply) give their torch
references' answers. Interpreted on CPU without CUDA (the mode is chosen for the whole
process, as in test_kernels.py), compiled on the GPU with it.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from kernels import fused, reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu] if CUDA else []
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
examples = settings(max_examples=15, deadline=None, derandomize=True)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def close(a, b):
    tol = TOL[a.dtype]
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=tol, rtol=tol)


@examples
@given(rows=st.integers(0, 9), cols=st.sampled_from([32, 100, 256]), dtype=DTYPES, residual=st.booleans())
def test_rms_norm_matches_reference(rows, cols, dtype, residual):
    x, w = rand(rows, cols, dtype=dtype, seed=1), rand(cols, dtype=dtype, seed=2)
    r = rand(rows, cols, dtype=dtype, seed=3) if residual else None
    out, h = fused.rms_norm(x, w, 1e-5, r)
    ref_out, ref_h = reference.reference_rms_norm(x, w, 1e-5, r)
    close(out, ref_out)
    close(h, ref_h)


def test_rms_norm_leaves_its_inputs_alone():
    x, w, r = rand(3, 64, dtype=torch.float32, seed=1), rand(64, dtype=torch.float32, seed=2), rand(3, 64, dtype=torch.float32, seed=3)
    x0, r0 = x.clone(), r.clone()
    fused.rms_norm(x, w, 1e-5, r)
    assert torch.equal(x, x0) and torch.equal(r, r0)


@examples
@given(tokens=st.integers(0, 7), heads=st.sampled_from([1, 3, 8]), dim=st.sampled_from([32, 64, 128]), dtype=DTYPES)
def test_rotary_matches_reference(tokens, heads, dim, dtype):
    x = rand(tokens, heads, dim, dtype=dtype, seed=4)
    angles = rand(tokens, dim // 2, dtype=torch.float32, seed=5) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = reference.reference_rotary(x, cos, sin)
    got = fused.rotary_(x.clone(), cos, sin)
    close(got, expected)


def test_rotary_pairs_dimension_i_with_i_plus_half():
    x = torch.zeros(1, 1, 8, device=DEVICE)
    x[0, 0, 0] = 1.0
    angle = torch.full((1, 8), 3.0, device=DEVICE)
    got = fused.rotary_(x, angle.cos(), angle.sin())[0, 0].cpu()
    expected = torch.zeros(8)
    expected[0], expected[4] = torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))
    torch.testing.assert_close(got, expected)


@examples
@given(rows=st.integers(0, 6), hidden=st.sampled_from([16, 176, 1500]), dtype=DTYPES)
def test_silu_mul_matches_reference(rows, hidden, dtype):
    x = rand(rows, 2 * hidden, dtype=dtype, seed=6)
    close(fused.silu_mul(x), reference.reference_silu_mul(x))


def test_fused_model_gives_the_unfused_logits():
    from engine_server.engine.model import build_tiny_model, score

    model = build_tiny_model(seed=0, device=DEVICE)
    tokens = list(range(1, 40))
    before = score(model, tokens)
    model.fuse()
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # views, no second copy
    torch.testing.assert_close(score(model, tokens), before, atol=1e-4, rtol=0)
