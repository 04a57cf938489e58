"""NF4 GEMV for 3-8 rows of x: direct 16-byte loads into registers, nothing staged.

    y = x W^T + lora_scale * t B^T   (t = x A^T, computed by kernels.nf4_linear's small kernel)

Same math and results as kernels.nf4_gemv (its reference: kernels.reference.nf4_linear),
which serves 1-2 rows; kernels.nf4_linear dispatches here for more. Why a second kernel: that one stages
W and x through shared memory with cp.async, and with more rows its cost grows with the rows
(bench/NOTES.md, H200: 8 rows 6.3x the 1-row step). Here each thread loads 16 bytes (4 words)
of a weight row straight into registers, byte-transposes them 4 x 4 with 8 PRMTs so that byte i
of its 4 words multiplies 4 contiguous x pairs, and loads those x pairs with one 16-byte load in
the same register layout. Tiles are (words, weight rows, x rows) with every warp along the words
(BKW >= 128 * num_warps), so the compiler's layouts for W, x and absmax coincide and no value
changes layout inside the loop. Decode: kernels.nf4.decode_words (one warp shuffle a weight,
exact fp32), shared by all rows of x; a 4-word chunk is half an absmax block, scaled once.
Measured (H200, bench/NOTES.md; 32 layers of qkv, o, gate+up, down, no LoRA): 8 rows 6.9 ms a
step against 13.5 with the staged kernel, 4 rows 3.8 against 4.3; at 1-2 rows it is no faster
than that one (there the warp-shuffle decode, ~1.1 MIO ops a weight, binds both).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import pdl
from kernels.nf4 import decode_words


@triton.jit
def _x_pair(x_ptr, xrow, wcol, i: tl.constexpr, mask, X_KIND: tl.constexpr):
    """fp32 (x[2p], x[2p + 1]) for the pair p that byte i of (transposed) words wcol multiplies.

    After the transpose, byte i of 4 consecutive words multiplies 4 contiguous pairs: one
    16-byte load a thread.
    """
    p = (wcol // 4) * 16 + 4 * i + wcol % 4
    if X_KIND == 0:  # fp32 x
        lo = tl.load(x_ptr + xrow + 2 * p, mask=mask, other=0.0)
        hi = tl.load(x_ptr + xrow + 2 * p + 1, mask=mask, other=0.0)
    else:  # 16-bit x read as int32 pairs
        v = tl.load(x_ptr + xrow + p, mask=mask, other=0)
        if X_KIND == 1:
            lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # bf16 is the top half of an fp32
            lo = (v << 16).to(tl.float32, bitcast=True)
            hi = (v & -65536).to(tl.float32, bitcast=True)
    return lo, hi


_TRANSPOSE_PTX = tl.constexpr(
    "{ .reg .b32 t<4>; prmt.b32 t0, $4, $5, 0x5140; prmt.b32 t1, $6, $7, 0x5140; "
    "prmt.b32 t2, $4, $5, 0x7362; prmt.b32 t3, $6, $7, 0x7362; prmt.b32 $0, t0, t1, 0x5410; "
    "prmt.b32 $1, t0, t1, 0x7632; prmt.b32 $2, t2, t3, 0x5410; prmt.b32 $3, t2, t3, 0x7632; }"
)


@triton.jit
def _transpose_words(w, BKW: tl.constexpr, RB: tl.constexpr, ASM: tl.constexpr):
    """(BKW, RB, 1) words: each thread's 4 words (16 bytes) byte-transposed 4 x 4 in registers,
    so that new word u holds byte u of the old words 0..3 (8 PRMTs on the GPU, shifts in the
    interpreter)."""
    w4 = tl.reshape(tl.permute(tl.reshape(w, (BKW // 4, 4, RB)), (0, 2, 1)), (BKW // 4, RB, 2, 2))
    a, b = tl.split(w4)
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    if ASM:
        n0, n1, n2, n3 = tl.inline_asm_elementwise(
            _TRANSPOSE_PTX, "=r,=r,=r,=r,r,r,r,r", [w0, w1, w2, w3], (tl.int32,) * 4, True, 1
        )
    else:
        n0 = (w0 & 0xFF) | ((w1 & 0xFF) << 8) | ((w2 & 0xFF) << 16) | (w3 << 24)
        n1 = ((w0 >> 8) & 0xFF) | (w1 & 0xFF00) | ((w2 & 0xFF00) << 8) | ((w3 >> 8) << 24)
        n2 = ((w0 >> 16) & 0xFF) | ((w1 >> 8) & 0xFF00) | (w2 & 0xFF0000) | ((w3 >> 16) << 24)
        n3 = ((w0 >> 24) & 0xFF) | ((w1 >> 16) & 0xFF00) | ((w2 >> 8) & 0xFF0000) | (w3 & -16777216)
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # (BKW / 4, RB, u // 2, u % 2)
    return tl.reshape(tl.permute(tl.reshape(n, (BKW // 4, RB, 4)), (0, 2, 1)), (BKW, RB, 1))


@triton.jit
def lora_t(t_ptr, xm, M, T_SPLITS, R, RP: tl.constexpr, TSP: tl.constexpr, DTYPE: tl.constexpr):
    """t = x A^T (MP, RP) in fp32 from its partial sums (T_SPLITS, M, R), summed and rounded
    once to DTYPE, x's dtype (as cuBLAS returns x A^T). One load of every partial: a loop of
    dependent loads here cost each program ~0.6 us a split (H200). TSP: T_SPLITS rounded up to
    a power of two."""
    s = tl.arange(0, TSP)[:, None, None]
    m = xm[None, :, None]
    j = tl.arange(0, RP)[None, None, :]
    mask = (s < T_SPLITS) & (m < M) & (j < R)
    t = tl.sum(tl.load(t_ptr + (s * M + m) * R + j, mask=mask, other=0.0), axis=0)
    return t.to(DTYPE).to(tl.float32)


@triton.jit
def tile_rows(t, N_OUT, BN: tl.constexpr, SWIGLU: tl.constexpr):
    """Output features n of tile t, and the weight rows read for them (gate n, up n + N_OUT)."""
    n = t * BN + tl.arange(0, BN)
    if SWIGLU:
        rows = tl.reshape(tl.join(n, n + N_OUT), (2 * BN,))
        rmask = tl.reshape(tl.join(n < N_OUT, n < N_OUT), (2 * BN,))
    else:
        rows = n
        rmask = n < N_OUT
    return n, rows.to(tl.int64), rmask


@triton.jit
def _nf4_gemv_rows_kernel(
    x_ptr,  # (M, K) activations: fp32, or fp16/bf16 viewed as int32 pairs (M, K // 2)
    w_ptr,  # (N, K // 8) int32: the packed NF4 weight (bitsandbytes' bytes), 8 nibbles a word
    absmax_ptr,  # (N, K // 64) fp32 or fp16 block scales
    code_ptr,  # (16,) fp32 code table (interpreter decode only)
    t_ptr,  # (T_SPLITS, M, R) fp32 partial sums of the LoRA down-projection x A^T
    b_ptr,  # (N, R) LoRA up weight B, contiguous
    y_ptr,  # (M, N_OUT) output, x's dtype
    M,  # rows of x
    T_SPLITS,  # partial sums of t
    N_OUT,  # output features (I for SwiGLU, whose weight has 2I rows)
    kw,  # K // 8: words in a weight row
    kb,  # K // 64: absmax blocks in a weight row
    stride_xm,  # elements of x_ptr's type between rows of x
    stride_ym,  # elements between rows of y
    lora_scale,  # s in y += s * B (A x)
    MP: tl.constexpr,  # M rounded up to a power of two
    R: tl.constexpr,  # LoRA rank, 0 for none
    RP: tl.constexpr,  # R rounded up to a power of two
    TSP: tl.constexpr,  # T_SPLITS rounded up to a power of two
    BN: tl.constexpr,  # output features a tile
    BKW: tl.constexpr,  # words (8 elements each) of a row a loop step, >= 128 * num_warps
    X_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16
    SWIGLU: tl.constexpr,  # rows n and n + N_OUT combined as silu(g) * u
    DECODE_SHFL: tl.constexpr,  # shuffle decode and PRMT transpose (GPU) or plain ops (interpreter)
    EVEN_K: tl.constexpr,  # kw % BKW == 0: no K masks
    PDL: tl.constexpr,  # programmatic dependent launch; x was written two kernels back if R > 0
):
    RB: tl.constexpr = BN * (1 + SWIGLU)
    if R == 0:  # as kernels.nf4_gemv: with LoRA only t waits (kernels/pdl.py)
        pdl.wait(PDL)
        pdl.release(PDL)
    n, rows, rmask = tile_rows(tl.program_id(0), N_OUT, BN, SWIGLU)
    wrow = (rows * kw)[None, :, None]
    srow = (rows * kb)[None, :, None]
    rmask3 = rmask[None, :, None]
    xm = tl.arange(0, MP)
    xrow = (xm * stride_xm)[None, None, :]
    mmask = (xm < M)[None, None, :]
    acc = tl.zeros((BKW // 4, RB, MP), dtype=tl.float32)
    for w0 in range(0, kw, BKW):
        wcol = w0 + tl.arange(0, BKW)[:, None, None]
        chunk = w0 // 4 + tl.arange(0, BKW // 4)[:, None, None]
        if EVEN_K:
            wmask = rmask3
            smask = rmask3
            xmask = mmask
        else:
            wmask = rmask3 & (wcol < kw)
            smask = rmask3 & (chunk < kw // 4)
            xmask = mmask & (wcol < kw)
        w = tl.load(w_ptr + wrow + wcol, mask=wmask, other=0)  # (BKW, RB, 1)
        w = _transpose_words(w, BKW, RB, DECODE_SHFL)
        scale = tl.load(absmax_ptr + srow + chunk // 2, mask=smask, other=0.0)  # (BKW / 4, RB, 1)
        scale = scale.to(tl.float32)
        # the shuffle (1) or the interpreter's gather (0)
        c0, c1, c2, c3, c4, c5, c6, c7 = decode_words(w, code_ptr, 0, 1 if DECODE_SHFL else 0)
        # Nibble 2i is the low nibble of byte i: the second element of its x pair.
        lo, hi = _x_pair(x_ptr, xrow, wcol, 0, xmask, X_KIND)  # (BKW, 1, MP)
        s = c1 * lo
        s += c0 * hi
        lo, hi = _x_pair(x_ptr, xrow, wcol, 1, xmask, X_KIND)
        s += c3 * lo
        s += c2 * hi
        lo, hi = _x_pair(x_ptr, xrow, wcol, 2, xmask, X_KIND)
        s += c5 * lo
        s += c4 * hi
        lo, hi = _x_pair(x_ptr, xrow, wcol, 3, xmask, X_KIND)
        s += c7 * lo
        s += c6 * hi
        # A thread's 4 words are one chunk (half an absmax block): summed in registers, scaled.
        acc += tl.sum(tl.reshape(s, (BKW // 4, 4, RB, MP)), axis=1) * scale
    rows_epilogue(
        tl.sum(acc, axis=0), n, rows, rmask, xm, M, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT,
        stride_ym, lora_scale, R, RP, TSP, BN, SWIGLU, PDL,
    )  # fmt: skip


@triton.jit
def rows_epilogue(
    y, n, rows, rmask, xm, M, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT, stride_ym, lora_scale,
    R: tl.constexpr, RP: tl.constexpr, TSP: tl.constexpr, BN: tl.constexpr, SWIGLU: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Store y (RB, MP) fp32 (weight rows, x rows) + lora_scale * B t, SwiGLU-combined, as y^T."""
    MP: tl.constexpr = y.shape[1]
    if R > 0:
        pdl.wait(PDL)  # t comes from the kernel just before (kernels/pdl.py)
        pdl.release(PDL)
        j = tl.arange(0, RP)
        t = tl.trans(lora_t(t_ptr, xm, M, T_SPLITS, R, RP, TSP, y_ptr.dtype.element_ty))  # (RP, MP)
        b = tl.load(b_ptr + rows[:, None] * R + j[None, :], mask=rmask[:, None] & (j < R)[None, :], other=0.0)
        y += lora_scale * tl.sum(b.to(tl.float32)[:, :, None] * t[None, :, :], 1)
    if SWIGLU:
        g, u = tl.split(tl.permute(tl.reshape(y, (BN, 2, MP)), (0, 2, 1)))
        y = g * tl.sigmoid(g) * u
    ymask = (n < N_OUT)[:, None] & (xm < M)[None, :]
    tl.store(y_ptr + n[:, None] + (xm * stride_ym)[None, :], y.to(y_ptr.dtype.element_ty), mask=ymask)


# (weight rows a tile, BKW, num_warps) candidates, timed per shape at its first call by
# kernels.nf4_linear's tuner (a SwiGLU tile is half gate, half up rows). The H200 picks
# (bench/NOTES.md): 4 rows (8, 256, 2); 8 rows (4, 128, 1) or (4, 256, 2).
CONFIGS = {
    4: [(8, 256, 2), (4, 256, 2), (8, 128, 1), (4, 128, 1)],
    8: [(4, 256, 2), (4, 128, 1), (2, 128, 1), (2, 256, 2)],
}


def launch_gemv_rows(
    cfg, xv, words, scales, code, t, b, y, m, n_out, k, lora_scale, x_kind, swiglu, interpret,
    use_pdl=False,
):  # fmt: skip
    """One launch of the kernel above for config cfg; argument meanings as in the kernel."""
    rb, bkw, warps = cfg
    bn = rb // 2 if swiglu else rb
    kw = k // 8
    rank = 0 if t is None else t.shape[2]
    _nf4_gemv_rows_kernel[(triton.cdiv(n_out, bn),)](
        xv, words, scales, code, scales if t is None else t, scales if b is None else b, y,
        m, 0 if t is None else t.shape[0], n_out, kw, k // 64, xv.stride(0), y.stride(0),
        float(lora_scale),
        MP=triton.next_power_of_2(m), R=rank, RP=triton.next_power_of_2(max(rank, 1)),
        TSP=triton.next_power_of_2(1 if t is None else t.shape[0]), BN=bn,
        BKW=bkw, X_KIND=x_kind, SWIGLU=swiglu, DECODE_SHFL=not interpret, EVEN_K=kw % bkw == 0,
        PDL=use_pdl, num_warps=warps, num_stages=1, launch_pdl=use_pdl,
        enable_fp_fusion=True,
    )  # fmt: skip
