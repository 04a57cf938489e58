"""kernels/rmsnorm.py against kernels/reference.py.

Forward outputs are compared with the reference run in the same dtype (HF's rounding points);
gradients with autograd through the reference on fp32 copies of the same inputs. On CPU the
kernels run under TRITON_INTERPRET=1. Triton 3.9's interpreter truncates fp32 -> bf16 where
the GPU rounds to nearest even, so on CPU each bf16 rounding may be one ulp further off; the
bf16 tolerances (about two ulps, 2^-7 relative each) cover that and nothing more. fp16 casts
are exact in the interpreter, so the fp16 rows check the rounding points tightly everywhere.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import reference  # noqa: E402
from kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [
    (1, 64),  # a single row
    (2, 8, 64),
    (5, 123, 123),  # odd everything
    (3, 576),  # SmolLM2-135M hidden size
    (1, 1, 1000),  # decode step, row not a power of two
    (2, 4096),  # Llama-3-8B hidden size
]
# (dtype, forward (atol, rtol), gradient (atol, rtol))
DTYPES = [
    (torch.float32, (1e-6, 1e-6), (3e-6, 3e-6)),
    (torch.float16, (1e-4, 2e-3), (2e-3, 2e-3)),
    (torch.bfloat16, (1e-3, 2.4e-2), (3e-2, 1.6e-2)),
]
DTYPES_BY_NAME = [(dtype, fwd) for dtype, fwd, _ in DTYPES]


def _inputs(shape, dtype, seed, n_act=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    acts = [torch.randn(shape, generator=g).to(DEVICE, dtype) * 2 for _ in range(n_act)]
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE)
    return acts, weight, g


def _leaves(*tensors):
    ours = [t.clone().requires_grad_() for t in tensors]
    fp32 = [t.detach().float().requires_grad_() for t in tensors]
    return ours, fp32


def _close(actual, expected, tol):
    """Compared in fp32, so the expected side is not rounded a second time."""
    assert actual.dtype == expected.dtype or expected.dtype == torch.float32
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol[0], rtol=tol[1])


def _dw_tol(grad_tol, rows):
    # dw sums `rows` terms: its absolute error grows like sqrt(rows), its relative one does not.
    return (grad_tol[0] * rows**0.5, grad_tol[1])


@pytest.mark.parametrize("dtype, fwd_tol, grad_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype, fwd_tol, grad_tol):
    (x,), weight, g = _inputs(shape, dtype, seed=0)
    eps = 1e-5
    _close(rms_norm(x, weight, eps), reference.rms_norm(x, weight, eps), fwd_tol)

    (x_k, w_k), (x_r, w_r) = _leaves(x, weight)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y = rms_norm(x_k, w_k, eps)
    y.backward(dy)
    reference.rms_norm(x_r, w_r, eps).backward(dy.float())
    _close(x_k.grad, x_r.grad, grad_tol)
    _close(w_k.grad, w_r.grad, _dw_tol(grad_tol, x.numel() // shape[-1]))


@pytest.mark.parametrize("dtype, fwd_tol, grad_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm(shape, dtype, fwd_tol, grad_tol):
    (x, res), weight, g = _inputs(shape, dtype, seed=1, n_act=2)
    eps = 1e-6
    y, s = add_rms_norm(x, res, weight, eps)
    y_ref, s_ref = reference.add_rms_norm(x, res, weight, eps)
    # The add is one fp32 sum rounded once, as torch does it; only the interpreter's bf16
    # truncation can move it, by at most one ulp.
    s_tol = (0.0, 0.0) if dtype != torch.bfloat16 or DEVICE == "cuda" else (0.0, 2**-7)
    torch.testing.assert_close(s, s_ref, atol=s_tol[0], rtol=s_tol[1])
    _close(y, y_ref, fwd_tol)

    (x_k, r_k, w_k), (x_r, r_r, w_r) = _leaves(x, res, weight)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    ds = torch.randn(shape, generator=g).to(DEVICE)
    y, s = add_rms_norm(x_k, r_k, w_k, eps)
    torch.autograd.backward((y, s), (dy, ds))
    y, s = reference.add_rms_norm(x_r, r_r, w_r, eps)
    torch.autograd.backward((y, s), (dy.float(), ds.float()))
    _close(x_k.grad, x_r.grad, grad_tol)
    _close(r_k.grad, r_r.grad, grad_tol)
    _close(w_k.grad, w_r.grad, _dw_tol(grad_tol, x.numel() // shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounds_where_hf_rounds(dtype):
    """Nearly every element bit-identical to HF: a missed rounding point (say, scaling by the
    weight before casting the normalised value) leaves about a quarter of them one ulp off,
    which no honest tolerance can see."""
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the interpreter truncates fp32 -> bf16; the GPU rounds to nearest even")
    (x, res), weight, _ = _inputs((64, 256), dtype, seed=6, n_act=2)
    same = rms_norm(x, weight, 1e-6) == reference.rms_norm(x, weight, 1e-6)
    assert same.float().mean().item() > 0.99
    same = add_rms_norm(x, res, weight, 1e-6)[0] == reference.add_rms_norm(x, res, weight, 1e-6)[0]
    assert same.float().mean().item() > 0.99


def test_add_rms_norm_only_y_used():
    """The s output unused: its gradient is zero, and dx = dresidual = the norm's gradient."""
    (x, res), weight, g = _inputs((3, 7, 48), torch.float32, seed=2, n_act=2)
    (x_k, r_k, w_k), (x_r, r_r, w_r) = _leaves(x, res, weight)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    add_rms_norm(x_k, r_k, w_k, 1e-6)[0].backward(dy)
    reference.add_rms_norm(x_r, r_r, w_r, 1e-6)[0].backward(dy)
    for ours, ref in ((x_k, x_r), (r_k, r_r), (w_k, w_r)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    """A row-strided view (a slice of a wider tensor) is read in place, forward and backward."""
    g = torch.Generator(device="cpu").manual_seed(3)
    wide = torch.randn(4, 5, 200, generator=g).to(DEVICE)
    x = wide[..., 17:117]
    weight = torch.randn(100, generator=g).to(DEVICE)
    torch.testing.assert_close(
        rms_norm(x, weight, 1e-6), rms_norm(x.contiguous(), weight, 1e-6), atol=0, rtol=0
    )
    (x_k,), (x_r,) = _leaves(x)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    rms_norm(x_k, weight, 1e-6).backward(dy)
    reference.rms_norm(x_r, weight.float(), 1e-6).backward(dy.float())
    tol = DTYPES[0][2] if dtype == torch.float32 else DTYPES[2][2]
    _close(x_k.grad, x_r.grad, tol)


def test_weight_dtype_promotes_like_torch():
    """bf16 activations with an fp32 weight give an fp32 output, as `weight * h` does in HF."""
    (x,), _, g = _inputs((3, 5, 96), torch.bfloat16, seed=4)
    weight = torch.randn(96, generator=g).to(DEVICE)
    y, y_ref = rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=1.6e-2)


def test_no_grad_path_matches_autograd_path():
    (x, res), weight, _ = _inputs((2, 9, 80), torch.float16, seed=5, n_act=2)
    (x_k, r_k, w_k), _ = _leaves(x, res, weight)
    with torch.no_grad():
        y0, s0 = add_rms_norm(x_k, r_k, w_k, 1e-6)
    assert y0.grad_fn is None and s0.grad_fn is None
    y1, s1 = add_rms_norm(x_k, r_k, w_k, 1e-6)
    assert y1.grad_fn is not None
    torch.testing.assert_close(y0, y1, atol=0, rtol=0)
    torch.testing.assert_close(s0, s1, atol=0, rtol=0)


# kernels/rmsnorm_lora.py, the norm fused with the next projection's LoRA down-projection
# (decode): y and s must be the plain kernel's bit for bit (the same loads and reduction), t the
# partial sums of y A^T in kernels/nf4_lora.py's format and chunks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows, n, rank", [(1, 4096, 48), (3, 1000, 5), (8, 2 * 1024 + 64, 16), (2, 64, 1)])
def test_rms_norm_lora_down(rows, n, rank, residual, dtype):
    from kernels.nf4_lora import LORA_BLOCK_K, lora_down
    from kernels.rmsnorm import rms_norm_forward
    from kernels.rmsnorm_lora import LORA_CHUNK, rms_norm_lora_down

    (x, r), weight, g = _inputs((rows, 2 * n), dtype, seed=rows * n + rank, n_act=2)
    x, r, weight = x[:, :n], r[:, n:], weight[:n].to(dtype)  # rows of x and residual 2n apart
    a = (torch.randn(rank, n, generator=g) / n**0.5).to(DEVICE, dtype)
    res = r if residual else None
    y, s, t = rms_norm_lora_down(x, res, weight, 1e-5, a)
    want_y, want_s, _ = rms_norm_forward(x, res, weight, 1e-5)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)
    assert s is x if not residual else s.dtype == dtype
    assert LORA_CHUNK == LORA_BLOCK_K  # the same chunks as the unfused down-projection
    assert t.shape == (-(-n // LORA_CHUNK), rows, rank) and t.dtype == torch.float32
    torch.testing.assert_close(t, lora_down(y, a, use_pdl=False), atol=1e-5, rtol=1e-5)
    ref_y, ref_s, ref_t = reference.rms_norm_lora_down(x, res, weight, 1e-5, a, LORA_CHUNK)
    _close(y, ref_y, dict(DTYPES_BY_NAME)[dtype])
    # the reference's y may differ from ours by an ulp here and there (fp32 sum order, and the
    # interpreter's bf16 truncation), each such ulp times an A entry in t
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(t, ref_t, atol=tol, rtol=tol)
    torch.testing.assert_close(t.double().sum(0), y.double() @ a.double().T, atol=1e-5, rtol=1e-5)


def test_rms_norm_lora_down_leaves_t_to_the_projection_where_it_does_not_apply():
    from kernels.rmsnorm import rms_norm_forward
    from kernels.rmsnorm_lora import LORA_MAX_ROWS, rms_norm_lora_down

    (x, r), weight, g = _inputs((LORA_MAX_ROWS + 1, 256), torch.float16, seed=3, n_act=2)
    a = torch.randn(4, 256, generator=g).to(DEVICE, torch.float16)
    y, s, t = rms_norm_lora_down(x, None, weight, 1e-5, a)  # a prefill: too many rows
    assert t is None and torch.equal(y, rms_norm_forward(x, None, weight, 1e-5)[0]) and s is x
    for other in (a.float(), a[:, :128], a[:0]):  # another dtype, another width, rank 0
        y, s, t = rms_norm_lora_down(x[:2], r[:2], weight, 1e-5, other)
        assert t is None and torch.equal(y, rms_norm_forward(x[:2], r[:2], weight, 1e-5)[0])
    # autograd: the plain norm, with its gradient
    (x_k,), _ = _leaves(x[:2])
    y, s, t = rms_norm_lora_down(x_k, None, weight, 1e-5, a)
    assert t is None and y.grad_fn is not None
    y.sum().backward()
    assert x_k.grad is not None
