"""kernels/rope.py against kernels/reference.py.

Forward outputs are compared with the reference run in the same dtype; gradients with autograd
through the reference on fp32 copies. On CPU the kernels run under TRITON_INTERPRET=1, whose
fp32 -> bf16 cast truncates where the GPU rounds to nearest even: each of the three bf16
roundings of the forward may land one ulp lower there, which the bf16 tolerances allow.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import reference  # noqa: E402
from kernels.rope import rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# (B, T, Hq, Hk, D)
SHAPES = [
    (1, 1, 32, 8, 128),  # Llama-3-8B, one decode step
    (2, 5, 9, 3, 64),  # SmolLM2-135M: 9 query heads, 3 kv heads
    (1, 13, 15, 5, 64),  # SmolLM2-360M
    (3, 7, 4, 4, 128),  # no grouping
    (2, 3, 6, 1, 96),  # multi-query, head dim not a power of two
]
# (dtype, forward (atol, rtol), gradient (atol, rtol)); values are O(1).
DTYPES = [
    (torch.float32, (1e-6, 1e-6), (1e-6, 1e-6)),
    (torch.float16, (0.0, 0.0), (2e-3, 2e-3)),  # every rounding exact in the interpreter too
    (torch.bfloat16, (3.2e-2, 2.4e-2), (1.6e-2, 1.6e-2)),
]


def _tables(bsz, seq, dim, generator, theta=500000.0):
    """cos/sin of Llama's angles at random positions, a different start for each row."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    start = torch.randint(0, 8000, (bsz, 1), generator=generator)
    angles = (start + torch.arange(seq)).float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def _qk(shape, dtype, fused, generator):
    bsz, seq, hq, hk, dim = shape
    if fused:
        # The layout of one qkv projection output: q and k are strided views into it.
        qkv = torch.randn(bsz, seq, (hq + 2 * hk) * dim, generator=generator).to(DEVICE, dtype)
        q = qkv[..., : hq * dim].view(bsz, seq, hq, dim)
        k = qkv[..., hq * dim : (hq + hk) * dim].view(bsz, seq, hk, dim)
        assert bsz * seq == 1 or not (q.is_contiguous() or k.is_contiguous())
        return q, k
    q = torch.randn(bsz, seq, hq, dim, generator=generator).to(DEVICE, dtype)
    return q, torch.randn(bsz, seq, hk, dim, generator=generator).to(DEVICE, dtype)


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype, fwd_tol, grad_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope(shape, dtype, fwd_tol, grad_tol, fused):
    g = torch.Generator().manual_seed(0)
    q, k = _qk(shape, dtype, fused, g)
    cos, sin = _tables(shape[0], shape[1], shape[-1], g)
    q_out, k_out = rope(q, k, cos, sin)
    q_ref, k_ref = reference.rope(q, k, cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    _close(q_out, q_ref, fwd_tol)
    _close(k_out, k_ref, fwd_tol)

    q_k, k_k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_r, k_r = q.float().requires_grad_(), k.float().requires_grad_()
    dq = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    dk = torch.randn(k.shape, generator=g).to(DEVICE, dtype)
    torch.autograd.backward(rope(q_k, k_k, cos, sin), (dq, dk))
    torch.autograd.backward(reference.rope(q_r, k_r, cos, sin), (dq.float(), dk.float()))
    _close(q_k.grad, q_r.grad, grad_tol)
    _close(k_k.grad, k_r.grad, grad_tol)


def test_bf16_bit_exact_on_gpu():
    """On the GPU every rounding is the one torch makes, so bf16 matches transformers exactly."""
    if INTERPRETED:
        pytest.skip("the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even")
    g = torch.Generator().manual_seed(1)
    q, k = _qk((2, 5, 9, 3, 64), torch.bfloat16, True, g)
    cos, sin = _tables(2, 5, 64, g)
    for ours, ref in zip(rope(q, k, cos, sin), reference.rope(q, k, cos, sin)):
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_batch_broadcast_tables():
    """cos/sin of shape (1, T, D/2) serve every row of the batch, as they do in the reference."""
    g = torch.Generator().manual_seed(2)
    q, k = _qk((3, 4, 6, 2, 64), torch.float32, False, g)
    cos, sin = _tables(1, 4, 64, g)
    for ours, ref in zip(rope(q, k, cos, sin), reference.rope(q, k, cos, sin)):
        _close(ours, ref, DTYPES[0][1])


def test_no_grad_path_matches_autograd_path():
    g = torch.Generator().manual_seed(3)
    q, k = _qk((2, 3, 9, 3, 64), torch.float16, True, g)
    cos, sin = _tables(2, 3, 64, g)
    q.requires_grad_()
    with torch.no_grad():
        q0, k0 = rope(q, k, cos, sin)
    assert q0.grad_fn is None
    q1, k1 = rope(q, k, cos, sin)
    assert q1.grad_fn is not None
    torch.testing.assert_close(q0, q1, atol=0, rtol=0)
    torch.testing.assert_close(k0, k1, atol=0, rtol=0)
