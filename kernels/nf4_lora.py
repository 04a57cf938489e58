"""The LoRA down-projection of the NF4 GEMV: t = x A^T as fp32 partial sums, one K chunk a program.

kernels.nf4_linear launches this right before its GEMV, whose epilogue adds the partials
(kernels.nf4_gemv_rows.lora_t) and then lora_scale * B t. Reference: the x A^T of
kernels.reference.nf4_linear (peft's unmerged LoRA). lora_a_heads and lora_partial_heads compute
the same partials inside decode attention, one a KV head, from the heads it has just computed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _lora_down_kernel(
    x_ptr,  # (M, K) activations
    a_ptr,  # (R, K) LoRA down weight A, rows contiguous
    t_ptr,  # (cdiv(K, BLOCK_K), M, R) fp32 out: partial sums of x A^T, one a K chunk
    M,  # rows of x
    K,  # in features
    R,  # LoRA rank
    stride_xm,  # elements between rows of x
    MP: tl.constexpr,  # M rounded up to a power of two
    BLOCK_K: tl.constexpr,  # K elements a program
    PDL: tl.constexpr,  # programmatic dependent launch: releases the GEMV once x is ready
):
    """One fp32 partial sum of t[:, j] = x A[j]^T a program: rank index j, K chunk s."""
    j = tl.program_id(0)
    s = tl.program_id(1)
    pdl.wait(PDL)
    pdl.release(PDL)
    xm = tl.arange(0, MP)
    k = s * BLOCK_K + tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + j * K + k, mask=k < K, other=0.0).to(tl.float32)
    xmask = (xm < M)[:, None] & (k < K)[None, :]
    x = tl.load(x_ptr + xm[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0)
    t = tl.sum(x.to(tl.float32) * a[None, :], axis=1)
    tl.store(t_ptr + (s * M + xm) * R + j, t, mask=xm < M)


@triton.jit
def lora_a_heads(
    a_ptr, head, NH: tl.constexpr, GP: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr,
    R: tl.constexpr, RP: tl.constexpr,
):  # fmt: skip
    """(GP, RP, D): A[j, (head + i) D + d] for heads i < NH, ranks j < R, else 0: the part of the
    output projection's A (R, HQ * D) that heads head.. of kernels/decode_attention.py multiply.
    It loads A before its attention loop, so that the load's latency hides under the loop's."""
    i = tl.arange(0, GP)[:, None, None]
    j = tl.arange(0, RP)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    return tl.load(a_ptr + j * (HQ * D) + (head + i) * D + d, mask=(i < NH) & (j < R), other=0.0)


@triton.jit
def lora_partial_heads(out, a, t_ptr, R: tl.constexpr):
    """t_ptr[j] = sum over heads i and d of out[i, d] * a[i, j, d] (fp32, j < R): this program's
    share of out A^T; out (rows, D), its first GP rows the program's heads (a from lora_a_heads)."""
    GP: tl.constexpr = a.shape[0]
    if out.shape[0] != GP:  # keep the first GP rows (the rest are BLOCK_G's padding)
        lead = tl.arange(0, out.shape[0] // GP)[:, None, None]
        out = tl.sum(tl.where(lead == 0, tl.reshape(out, (out.shape[0] // GP, GP, out.shape[1])), 0.0), 0)
    t = tl.sum(tl.sum(a.to(tl.float32) * out[:, None, :], axis=2), axis=0)
    tl.store(t_ptr + tl.arange(0, a.shape[1]), t, mask=tl.arange(0, a.shape[1]) < R)


LORA_BLOCK_K = 1024  # K elements a down-projection program: one load each, no loop


def lora_down(x2: torch.Tensor, lora_a: torch.Tensor, use_pdl: bool) -> torch.Tensor:
    """(cdiv(K, LORA_BLOCK_K), M, r) fp32 partial sums of x2 A^T: one launch, one load a program.

    The GEMV's epilogue adds the partials in order and rounds t to x's dtype once (as cuBLAS's
    x A^T would). Partials, not a loop over K, because the GEMV waits for this kernel before its
    epilogue: a program looping over K=14336 took ~7 us, longer than the GEMV's first tiles
    (bench/NOTES.md); with cuBLAS here LoRA added 6-7 us a call.
    """
    m, k = x2.shape
    rank = lora_a.shape[0]
    splits = triton.cdiv(k, LORA_BLOCK_K)
    t = torch.empty((splits, m, rank), dtype=torch.float32, device=x2.device)
    lora_a = lora_a.contiguous()
    _lora_down_kernel[(rank, splits)](
        x2, lora_a, t, m, k, rank, x2.stride(0), MP=triton.next_power_of_2(m), BLOCK_K=LORA_BLOCK_K,
        PDL=use_pdl, launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip
    return t
