"""NF4 GEMV for 2-16 rows of x on the tensor cores: the decode is paid once for all rows.

    y = x W^T + lora_scale * t B^T   (t = x A^T, from kernels.nf4_linear's down-projection)

kernels.nf4_gemv_rows does 8 fp32 FMAs a weight for 8 rows of x on top of the decode, so its
step grows ~3x from 1 to 8 rows (bench/NOTES.md). Here each decoded weight goes through one
bf16 MMA for up to 16 rows: a tile of BN weight rows x BKW int32 words (8 nibbles each) is
decoded by kernels.nf4.decode_words into 8 fp32 tiles, nibble m of every word. Nibble m of
word w is element 8w + 2(m // 2) + 1 - m % 2 (bitsandbytes puts the first element of a byte in
its high nibble), so tile m multiplies the x columns at that offset: 8 dots of K = BKW each,
no interleaving of the decoded values. Each value times its block's absmax, rounded to x's
dtype, is exactly what bitsandbytes' dequantize_4bit and kernels.nf4.nf4_dequantize produce,
so this is the prefill path's math (dequantize, then a bf16 GEMM with fp32 sums) without
writing the weight; rows of x past M are zeros. Reference: kernels.reference.nf4_linear.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import pdl
from kernels.nf4 import decode_words
from kernels.nf4_gemv_rows import rows_epilogue, tile_rows

MMA_ROWS = 16  # rows of x a tile (the smallest tl.dot side); fewer are masked


@triton.jit
def _nf4_gemv_mma_kernel(
    x_ptr,  # (M, K) activations, fp16 or bf16
    w_ptr,  # (N, K // 8) int32: the packed NF4 weight (bitsandbytes' bytes), 8 nibbles a word
    absmax_ptr,  # (N, K // 64) fp32 block scales
    code_ptr,  # (16,) fp32 code table (interpreter decode only)
    t_ptr,  # (T_SPLITS, M, R) fp32 partial sums of the LoRA down-projection x A^T
    b_ptr,  # (N, R) LoRA up weight B, contiguous
    y_ptr,  # (M, N_OUT) output, x's dtype
    M,  # rows of x
    T_SPLITS,  # partial sums of t
    N_OUT,  # output features (I for SwiGLU, whose weight has 2I rows)
    kw,  # K // 8: words in a weight row
    kb,  # K // 64: absmax blocks in a weight row
    stride_xm,  # elements between rows of x
    stride_ym,  # elements between rows of y
    lora_scale,  # s in y += s * B (A x)
    MP: tl.constexpr,  # rows of x a tile (MMA_ROWS)
    R: tl.constexpr,  # LoRA rank, 0 for none
    RP: tl.constexpr,  # R rounded up to a power of two
    TSP: tl.constexpr,  # T_SPLITS rounded up to a power of two
    BN: tl.constexpr,  # output features a tile
    BKW: tl.constexpr,  # words a loop step (a multiple of 8: whole absmax blocks)
    SWIGLU: tl.constexpr,  # rows n and n + N_OUT combined as silu(g) * u
    DECODE_SHFL: tl.constexpr,  # shuffle decode, bf16 MMA (GPU); table gather, fp32 dot (interpreter)
    NUM_STAGES: tl.constexpr,  # software pipeline depth of the loop
    PDL: tl.constexpr,  # programmatic dependent launch; x was written two kernels back if R > 0
):
    RB: tl.constexpr = BN * (1 + SWIGLU)
    pdl.release(PDL)  # as kernels.nf4_linear's GEMV: with LoRA only t waits (kernels/pdl.py)
    if R == 0:
        pdl.wait(PDL)
    n, rows, rmask = tile_rows(tl.program_id(0), N_OUT, BN, SWIGLU)
    xm = tl.arange(0, MP)
    xmask = (xm < M)[None, :]
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((RB, MP), dtype=tl.float32)
    for w0 in tl.range(0, kw, BKW, num_stages=NUM_STAGES):
        wcol = w0 + tl.arange(0, BKW)
        kmask = wcol < kw
        w = tl.load(w_ptr + rows[:, None] * kw + wcol[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
        bcol = w0 // 8 + tl.arange(0, BKW // 8)
        bmask = rmask[:, None] & (bcol < kb)[None, :]
        scale = tl.load(absmax_ptr + rows[:, None] * kb + bcol[None, :], mask=bmask, other=0.0)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (RB, BKW // 8, 8)), (RB, BKW))
        c = decode_words(w, code_ptr, DECODE_SHFL)
        xcol = (wcol * 8)[:, None] + (xm * stride_xm)[None, :]  # (BKW, MP)
        xk = kmask[:, None] & xmask
        for m in tl.static_range(8):
            offset = 2 * (m // 2) + 1 - m % 2  # element of nibble m within its word
            xs = tl.load(x_ptr + xcol + offset, mask=xk, other=0.0)
            wm = (c[m] * scale).to(dtype)
            if DECODE_SHFL:
                acc = tl.dot(wm, xs, acc)
            else:  # the interpreter's dot multiplies 16-bit floats' bits: the same values in fp32
                acc = tl.dot(wm.to(tl.float32), xs.to(tl.float32), acc, input_precision="ieee")
    rows_epilogue(
        acc, n, rows, rmask, xm, M, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT, stride_ym, lora_scale,
        R, RP, TSP, BN, SWIGLU, PDL,
    )  # fmt: skip


# (weight rows a tile, BKW, num_warps, num_stages, "mma") candidates for kernels.nf4_linear's
# tuner, next to kernels.nf4_gemv_rows' configs; "mma" tells the launcher which kernel.
CONFIGS = [(64, 32, 4, 3, "mma"), (32, 64, 4, 3, "mma"), (64, 64, 4, 2, "mma"), (128, 32, 8, 3, "mma")]


def launch_gemv_mma(
    cfg, x2, words, scales, code, t, b, y, m, n_out, k, lora_scale, swiglu, interpret, use_pdl
):
    """One launch of the kernel above; x2 (M, K) fp16/bf16, other arguments as kernels.nf4_linear's."""
    rb, bkw, warps, stages, _ = cfg
    bn = rb // 2 if swiglu else rb
    rank = 0 if t is None else t.shape[2]
    _nf4_gemv_mma_kernel[(triton.cdiv(n_out, bn),)](
        x2, words, scales, code, scales if t is None else t, scales if b is None else b, y,
        m, 0 if t is None else t.shape[0], n_out, k // 8, k // 64, x2.stride(0), y.stride(0),
        float(lora_scale), MP=MMA_ROWS, R=rank, RP=triton.next_power_of_2(max(rank, 1)),
        TSP=triton.next_power_of_2(1 if t is None else t.shape[0]), BN=bn,
        BKW=bkw, SWIGLU=swiglu, DECODE_SHFL=not interpret, NUM_STAGES=stages, PDL=use_pdl,
        num_warps=warps, launch_pdl=use_pdl,
    )  # fmt: skip
