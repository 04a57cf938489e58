"""RMSNorm fused with the LoRA down-projection of the projection that reads its output (decode).

    y, s = rms_norm(x (+ residual))              kernels/rmsnorm.py's forward, bit for bit
    t[c] = y[:, chunk c] A[:, chunk c]^T          fp32, one partial sum per 1024-element chunk

t is kernels/nf4_lora.py's format, which kernels.nf4_linear takes as `lora_t` instead of
launching lora_down itself: one launch instead of two before each q/k/v and gate/up GEMV of a
decode step (bench/NOTES.md, session 12: -2.5% a step on an H100). Reference:
kernels.reference.rms_norm_lora_down.

Program (c, g, row) normalises the whole row with the plain kernel's loads and reduction (the
same layout and order, so y and s are the same bits), keeps chunk c of it, stores that chunk of
y and s if it is in the first rank group, and sums it against ranks g*RB .. g*RB + RB - 1 of A.
Never launched with PDL (the fusion is off then): the GEMV that reads y would read it before
its own wait (kernels/pdl.py, rule 2), which is safe only when y was written two launches back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.rmsnorm import _block_and_warps, _needs_grad, add_rms_norm, forward_buffers, rms_norm


@triton.jit
def _rms_norm_lora_kernel(
    x_ptr,  # (M, N) input rows, last dim contiguous
    r_ptr,  # (M, N) residual rows; unused unless HAS_RESIDUAL
    s_ptr,  # (M, N) out: x + residual; unused unless HAS_RESIDUAL
    w_ptr,  # (N,) scale
    y_ptr,  # (M, N) out: normalised and scaled rows, contiguous
    a_ptr,  # (R, N) LoRA down weight A, rows contiguous
    t_ptr,  # (cdiv(N, CHUNK), M, R) fp32 out: the chunks' partial sums of y A^T
    stride_x,  # elements between rows of x
    stride_r,  # elements between rows of residual
    M,  # rows
    N,  # row length
    R,  # LoRA rank
    eps,  # added to the mean square before the root
    HAS_RESIDUAL: tl.constexpr,  # fuse the residual add in front
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row, for its mean square
    CHUNK: tl.constexpr,  # K elements of a partial sum (a program's share of y)
    RB: tl.constexpr,  # ranks a program
):
    c = tl.program_id(0)
    g = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # the whole row, exactly as _rms_norm_forward_kernel reduces it (same layout, same order)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty).to(tl.float32)
    else:
        h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    # this program's chunk, computed again from its own loads (cached) with the same operations
    k = c * CHUNK + tl.arange(0, CHUNK)
    kmask = k < N
    xc = tl.load(x_ptr + row * stride_x + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        rc = tl.load(r_ptr + row * stride_r + k, mask=kmask, other=0.0)
        sc = (xc.to(tl.float32) + rc.to(tl.float32)).to(s_ptr.dtype.element_ty)
    else:
        sc = xc
    n = (sc.to(tl.float32) * rstd).to(sc.dtype).to(tl.float32)
    w = tl.load(w_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    y = (w * n).to(y_ptr.dtype.element_ty)
    if g == 0:
        tl.store(y_ptr + row * N + k, y, mask=kmask)
        if HAS_RESIDUAL:
            tl.store(s_ptr + row * N + k, sc, mask=kmask)
    j = g * RB + tl.arange(0, RB)
    a = tl.load(a_ptr + j[:, None] * N + k[None, :], mask=(j < R)[:, None] & kmask[None, :], other=0.0)
    t = tl.sum(a.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
    tl.store(t_ptr + (c * M + row) * R + j, t, mask=j < R)


LORA_CHUNK = 1024  # K elements a partial sum: kernels.nf4_lora.LORA_BLOCK_K's chunks
LORA_RANKS = 4  # ranks a program: 48 programs for q/k/v at r=16 (3 x 16 ranks), 32 for gate/up
LORA_MAX_ROWS = 8  # decode batches (kernels.nf4_linear.GEMV_MAX_ROWS): prefill computes x A^T itself


def rms_norm_lora_down(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    lora_a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(y, s, t): rms_norm(x) or add_rms_norm(x, residual) (s = x without a residual), and
    t = y A^T for lora_a (r, N) as (cdiv(N, LORA_CHUNK), M, r) fp32 partial sums, the format of
    kernels.nf4_lora.lora_down, which kernels.nf4_linear takes as lora_t. One launch.

    t is None, and the norm the plain one, where the fusion does not apply: no rows or more than
    LORA_MAX_ROWS, autograd, A of rank 0 or in another dtype or width, or PDL on (see above).
    """
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if (
        not 0 < rows <= LORA_MAX_ROWS
        or _needs_grad(x, weight, lora_a, *(() if residual is None else (residual,)))
        or lora_a.dim() != 2
        or lora_a.shape[0] == 0
        or lora_a.shape[1] != n
        or lora_a.dtype != x.dtype
        or pdl.pdl_enabled(x.device)
    ):
        if residual is None:
            return rms_norm(x, weight, eps), x, None
        return (*add_rms_norm(x, residual, weight, eps), None)
    x2, r2, y, s = forward_buffers(x, residual, weight)
    rank = lora_a.shape[0]
    chunks = triton.cdiv(n, LORA_CHUNK)
    t = torch.empty((chunks, rows, rank), dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(n)
    _rms_norm_lora_kernel[(chunks, triton.cdiv(rank, LORA_RANKS), rows)](
        x2, r2, s, weight.contiguous(), y, lora_a.contiguous(), t,
        x2.stride(0), r2.stride(0), rows, n, rank, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, CHUNK=LORA_CHUNK, RB=LORA_RANKS,
        num_warps=warps, enable_fp_fusion=True,
    )  # fmt: skip
    return y.view(x.shape), s.view(x.shape) if residual is not None else x, t
