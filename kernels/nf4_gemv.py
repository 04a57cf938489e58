"""NF4 GEMV for 1-2 rows of x (decode), LoRA and SwiGLU in its epilogue.

    y = x W^T + lora_scale * t B^T   (t = x A^T: kernels.nf4_lora's partial sums, or the norm's)

Same contract as kernels.nf4_linear's dispatch (reference: kernels.reference.nf4_linear), which
sends 1-2 rows here (3-8 to kernels.nf4_gemv_rows, and any row count of 16-bit x may go to
kernels.nf4_mma, as the tuner finds fastest). The GEMV views W as int32 words (8 nibbles,
element 8w + 2i in the high nibble of byte i) and works a tile of BN output features (BN gate +
BN up rows for SwiGLU) at a time:

    acc[m, n] = sum_b absmax[n, b] * sum_{k in block b} NF4_CODE[q[n, k]] * x[m, k]     (fp32)

Each word is decoded by kernels.nf4.decode_words (per config: one warp shuffle a weight, exact
fp32, or half a load a weight from a shared byte table of fp16-rounded codes), an FMA chain a
word times its block's absmax goes to a per-word accumulator, reduced once per tile. HALF
configs (16-bit x) keep the table's fp16 code pairs packed and multiply them with x * 2^-4 in
fp16 pairs, one fused multiply-add per 2 weights, two words' 16 products summed in fp16 before
the fp32 accumulator (kernels/nf4_half.py): 2.8-3.2 instructions a weight in the loop against
4.1-4.3. The K loop is software-pipelined (cp.async, tl.range num_stages), which also lands the
x pairs in shared memory in the layout the FMAs need (without it Triton converted x's layout
every step, 18-22 barriers a step). With PERSISTENT a program walks a range of tiles in one
flattened loop, so the pipeline does not drain between tiles. LoRA: each tile adds lora_scale *
B[n, :] . t in its epilogue; SwiGLU combines the gate and up rows there too. All sums are fp32
(HALF: past a pair of words' 16 products); y is rounded once to x's dtype.

Measured (bench/NOTES.md, H200, copy 4.25 TB/s): 40-46% of the copy bandwidth on the Llama
shapes against bitsandbytes' 23-24%. H100 (session 13): 54-62% on the large shapes; the byte
table and unmasked loads (EVEN) took 2.5% off the GEMV's time a decode step; session 14's fp16
products 5-13% off each Llama shape (gate+up SwiGLU 35.8 -> 31.1 us, 70.8% of copy). A plain
read with the same tiles and pipeline streams at 75-85% of copy, so the loop's instructions and
their latency hold it, not the access pattern. Its cost grows with the rows of x (8 rows: 6.3x
the 1-row time), hence kernels.nf4_gemv_rows for 3-8 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import nf4_half, nf4_mma, pdl
from kernels.nf4 import decode_words
from kernels.nf4_gemv_rows import lora_t as sum_lora_t
from kernels.nf4_gemv_rows import tile_rows
from kernels.nf4_mma_block import allow_table, lut_fill, lut_fill_ptx
from kernels.nf4_tune import grid
from kernels.reference import NF4_BLOCKSIZE


@triton.jit
def _load_x_pair(x_ptr, xrow, wcol, i: tl.constexpr, mask, X_KIND: tl.constexpr):
    """fp32 (x[8w + 2i], x[8w + 2i + 1]) for rows xrow (MP, 1) and words wcol (1, C)."""
    if X_KIND == 0:  # fp32 x, read directly
        lo = tl.load(x_ptr + xrow + wcol * 8 + 2 * i, mask=mask, other=0.0)
        hi = tl.load(x_ptr + xrow + wcol * 8 + 2 * i + 1, mask=mask, other=0.0)
    else:  # 16-bit x read as int32 pairs: one 4-byte load (and one cp.async) for two values
        p = tl.load(x_ptr + xrow + wcol * 4 + i, mask=mask, other=0)
        if X_KIND == 1:
            lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # bf16 is the top half of an fp32
            lo = (p << 16).to(tl.float32, bitcast=True)
            hi = (p & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _gemv_step(
    acc, x_ptr, w_ptr, absmax_ptr, code_ptr, lane, rows, rmask, xrow, mmask, w0, kw, kb,
    BKW: tl.constexpr, X_KIND: tl.constexpr, DECODE: tl.constexpr, EVEN: tl.constexpr,
    HALF: tl.constexpr,
):  # fmt: skip
    """acc (MP, RB, BKW) += per word: absmax * sum of its 8 code * x products, words w0..
    EVEN: every tile row and K step is whole, so the weight loads need no masks (each masked
    cp.async cost ~4 integer instructions). HALF: acc (MP, RB, BKW // 2), a column per pair of
    words, their 16 products and sums in fp16."""
    NBLK: tl.constexpr = BKW // 8
    wcol = w0 + tl.arange(0, BKW)
    kmask = wcol < kw
    bcol = w0 // 8 + tl.arange(0, NBLK)
    if EVEN:
        w = tl.load(w_ptr + rows[:, None] * kw + wcol[None, :])
        scale = tl.load(absmax_ptr + rows[:, None] * kb + bcol[None, :]).to(tl.float32)
        xmask = mmask
    else:
        wmask = rmask[:, None] & kmask[None, :]
        w = tl.load(w_ptr + rows[:, None] * kw + wcol[None, :], mask=wmask, other=0)
        bmask = rmask[:, None] & (bcol < kb)[None, :]
        scale = tl.load(absmax_ptr + rows[:, None] * kb + bcol[None, :], mask=bmask, other=0.0).to(tl.float32)
        xmask = mmask & kmask[None, :]
    if HALF:  # (Triton would trace code after a return here too: an else, not a return)
        lo0, hi0 = _load_x_pair(x_ptr, xrow, wcol[None, :], 0, xmask, X_KIND)
        lo1, hi1 = _load_x_pair(x_ptr, xrow, wcol[None, :], 1, xmask, X_KIND)
        lo2, hi2 = _load_x_pair(x_ptr, xrow, wcol[None, :], 2, xmask, X_KIND)
        lo3, hi3 = _load_x_pair(x_ptr, xrow, wcol[None, :], 3, xmask, X_KIND)
        sums = nf4_half.pair_sums(w, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, code_ptr, lane, DECODE)
        acc += sums * _word_scale(scale * nf4_half.X_SCALE_INV, sums.shape[1:], 4)
    else:
        acc += _word_sums(w, x_ptr, xrow, wcol, xmask, code_ptr, lane, X_KIND, DECODE) * _word_scale(
            scale, w.shape, 8
        )
    return acc


@triton.jit
def _word_sums(w, x_ptr, xrow, wcol, xmask, code_ptr, lane, X_KIND: tl.constexpr, DECODE: tl.constexpr):
    """(MP, RB, BKW) fp32: per word, the sum of its 8 code * x products."""
    c0, c1, c2, c3, c4, c5, c6, c7 = decode_words(w, code_ptr, lane, DECODE)
    # Nibble 2i is element 8w + 2i + 1 (low nibble of byte i), nibble 2i + 1 is 8w + 2i. One
    # FMA chain a word; its sum times the word's block scale goes to a per-word accumulator,
    # so nothing is reduced across threads inside the loop.
    lo, hi = _load_x_pair(x_ptr, xrow, wcol[None, :], 0, xmask, X_KIND)
    s = c1[None, :, :] * lo[:, None, :]
    s += c0[None, :, :] * hi[:, None, :]
    lo, hi = _load_x_pair(x_ptr, xrow, wcol[None, :], 1, xmask, X_KIND)
    s += c3[None, :, :] * lo[:, None, :]
    s += c2[None, :, :] * hi[:, None, :]
    lo, hi = _load_x_pair(x_ptr, xrow, wcol[None, :], 2, xmask, X_KIND)
    s += c5[None, :, :] * lo[:, None, :]
    s += c4[None, :, :] * hi[:, None, :]
    lo, hi = _load_x_pair(x_ptr, xrow, wcol[None, :], 3, xmask, X_KIND)
    s += c7[None, :, :] * lo[:, None, :]
    s += c6[None, :, :] * hi[:, None, :]
    return s


@triton.jit
def _word_scale(scale, shape, PER_BLOCK: tl.constexpr):
    """(1,) + shape: each accumulator column's block scale, from the (RB, blocks) block scales;
    PER_BLOCK columns a block (8 words, or 4 word pairs)."""
    return tl.reshape(tl.broadcast_to(scale[:, :, None], scale.shape + (PER_BLOCK,)), shape)[None, :, :]


@triton.jit
def _gemv_epilogue(
    acc, n, rows, rmask, xm, M, mmask, yrow, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT, lora_scale,
    MP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TSP: tl.constexpr, BN: tl.constexpr,
    SWIGLU: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[:, n] = sum over words of acc, + lora_scale * t B^T, SwiGLU-combined, in y's dtype."""
    y = tl.sum(acc, axis=2)  # (MP, RB)
    pdl.wait(PDL)  # t comes from the kernel just before
    pdl.release(PDL)
    if R > 0:
        j = tl.arange(0, RP)
        t = sum_lora_t(t_ptr, xm, M, T_SPLITS, R, RP, TSP, y_ptr.dtype.element_ty)
        bmask = rmask[:, None] & (j < R)[None, :]
        b = tl.load(b_ptr + rows[:, None] * R + j[None, :], mask=bmask, other=0.0)
        y += lora_scale * tl.sum(t[:, None, :] * b.to(tl.float32)[None, :, :], 2)
    if SWIGLU:
        g, u = tl.split(tl.reshape(y, (MP, BN, 2)))
        y = g * tl.sigmoid(g) * u
    ymask = mmask & (n < N_OUT)[None, :]
    tl.store(y_ptr + yrow + n[None, :], y.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # (M, K) activations: fp32, or fp16/bf16 viewed as int32 pairs (M, K // 2)
    w_ptr,  # (N, K // 8) int32: the packed NF4 weight, 8 nibbles a word
    absmax_ptr,  # (N, K // 64) fp32 or fp16 block scales
    code_ptr,  # (16,) fp32 code table, fp16-rounded for a LUT config (interpreter decode only)
    t_ptr,  # (T_SPLITS, M, R) fp32 partial sums of the LoRA down-projection x A^T
    b_ptr,  # (N, R) LoRA up weight B; unused when R == 0
    y_ptr,  # (M, N_OUT) output, x's dtype
    M,  # rows of x
    T_SPLITS,  # partial sums of t (K split over the down-projection's programs)
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
    BKW: tl.constexpr,  # words (8 elements each) of a row a loop step
    X_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16
    SWIGLU: tl.constexpr,  # rows n and n + N_OUT combined as silu(g) * u
    DECODE: tl.constexpr,  # kernels.nf4.decode_words: 1 shuffle, 2 byte table (GPU); 0 gather
    EVEN: tl.constexpr,  # N_OUT % BN == 0 and kw % BKW == 0: no load masks
    HALF: tl.constexpr,  # fp16 codes times x * 2^-4 in fp16, a pair of words' sums too (16-bit x)
    NUM_STAGES: tl.constexpr,  # software pipeline depth of the loop
    PERSISTENT: tl.constexpr,  # a program walks a range of tiles in one pipelined loop
    PDL: tl.constexpr,  # programmatic dependent launch; x was written two kernels back if R > 0
    LUT_FILL: tl.constexpr,  # DECODE 2: the byte table's fill for num_warps (nf4_mma_block.lut_fill_ptx)
):
    RB: tl.constexpr = BN * (1 + SWIGLU)
    pid = tl.program_id(0)
    # With LoRA the down-projection runs just before and has read x after its own wait: the
    # weight stream starts now, alongside it, and waits only for t (kernels/pdl.py, rule 2).
    if R == 0:
        pdl.wait(PDL)
        pdl.release(PDL)
    if DECODE == 2:
        lane = lut_fill(tl.zeros((1, 1), tl.int32), LUT_FILL)
    else:
        lane = tl.zeros((1, 1), tl.int32)
    xm = tl.arange(0, MP)
    xrow = (xm * stride_xm)[:, None]
    yrow = (xm * stride_ym)[:, None]
    mmask = (xm < M)[:, None]
    ACC_W: tl.constexpr = BKW // 2 if HALF else BKW  # HALF: a column a pair of words
    acc = tl.zeros((MP, RB, ACC_W), dtype=tl.float32)
    if PERSISTENT:
        # Tiles t0..t1 and all their K steps as one loop: the pipeline keeps loading across
        # tile boundaries instead of draining and refilling at every tile.
        tiles = tl.cdiv(N_OUT, BN)
        t0 = pid * tiles // tl.num_programs(0)
        t1 = (pid + 1) * tiles // tl.num_programs(0)
        steps = tl.cdiv(kw, BKW)
        for it in tl.range(0, (t1 - t0) * steps, num_stages=NUM_STAGES):
            t = t0 + it // steps
            ks = it % steps
            n, rows, rmask = tile_rows(t, N_OUT, BN, SWIGLU)
            acc = _gemv_step(
                acc, x_ptr, w_ptr, absmax_ptr, code_ptr, lane, rows, rmask, xrow, mmask,
                ks * BKW, kw, kb, BKW, X_KIND, DECODE, EVEN, HALF,
            )  # fmt: skip
            if ks == steps - 1:
                _gemv_epilogue(
                    acc, n, rows, rmask, xm, M, mmask, yrow, t_ptr, T_SPLITS, b_ptr, y_ptr,
                    N_OUT, lora_scale, MP, R, RP, TSP, BN, SWIGLU, PDL,
                )  # fmt: skip
                acc = tl.zeros((MP, RB, ACC_W), dtype=tl.float32)
        pdl.wait(PDL)  # every program waits, even one without a tile (kernels/pdl.py, rule 1)
    else:
        n, rows, rmask = tile_rows(pid, N_OUT, BN, SWIGLU)
        for w0 in tl.range(0, kw, BKW, num_stages=NUM_STAGES):
            acc = _gemv_step(
                acc, x_ptr, w_ptr, absmax_ptr, code_ptr, lane, rows, rmask, xrow, mmask,
                w0, kw, kb, BKW, X_KIND, DECODE, EVEN, HALF,
            )  # fmt: skip
        _gemv_epilogue(
            acc, n, rows, rmask, xm, M, mmask, yrow, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT,
            lora_scale, MP, R, RP, TSP, BN, SWIGLU, PDL,
        )  # fmt: skip


def uses_table(cfg: tuple) -> bool:
    """Whether a 1-2 row config decodes through the fp16 byte table (its last field: 1 fp32
    products, 2 fp16 products)."""
    return cfg[0] != "mma" and len(cfg) == 6 and cfg[5] > 0


def uses_half(cfg: tuple) -> bool:
    """Whether a 1-2 row config multiplies in fp16 (kernels/nf4_half.py; 16-bit x, sm_80+)."""
    return cfg[0] != "mma" and len(cfg) == 6 and cfg[5] == 2


def kernel_constants(
    cfg, m, n_out, k, rank, t_splits, x_kind, swiglu, interpret, use_pdl
) -> dict:  # fmt: skip
    """The kernel's constexprs and launch options for config cfg: m rows of x, an (N, k) weight
    giving n_out outputs, LoRA rank (0: none) with t in t_splits partial sums."""
    bn, bkw, warps, stages, per_sm, lut = cfg
    decode = 0 if interpret else 1 + (lut > 0)
    return dict(
        MP=triton.next_power_of_2(m), R=rank, RP=triton.next_power_of_2(max(rank, 1)),
        TSP=triton.next_power_of_2(t_splits), BN=bn, BKW=bkw,
        X_KIND=x_kind, SWIGLU=swiglu, DECODE=decode,
        EVEN=n_out % bn == 0 and (k // 8) % bkw == 0, HALF=lut == 2,
        NUM_STAGES=stages, PERSISTENT=per_sm > 0, PDL=use_pdl,
        LUT_FILL=lut_fill_ptx(torch.float16, 32 * warps) if decode == 2 else "", num_warps=warps,
        launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip


def launch_gemv(
    cfg, xv, words, scales, code, t, b, y, m, n_out, k, lora_scale, x_kind, swiglu, interpret,
    use_pdl=False,
):  # fmt: skip
    """One launch of the kernel above for config cfg (kernels.nf4_tune.CONFIGS[1 or 2]); t and b
    None without LoRA; code the exact fp32 code table; other arguments as in the kernel."""
    lut = cfg[5]
    if lut and x_kind == 0:
        raise ValueError(f"config {cfg} rounds the codes to fp16: not for fp32 x")
    rank = 0 if t is None else t.shape[2]
    # codes rounded to fp16 for a table config: the interpreter's code table (the GPU computes
    # its byte table in each program, kernels.nf4_mma_block.lut_fill)
    codes = nf4_mma.code_table(torch.float16, y.device) if lut else code
    args = (
        xv, words, scales, codes, scales if t is None else t, scales if b is None else b, y,
        m, 0 if t is None else t.shape[0], n_out, k // 8, k // NF4_BLOCKSIZE, xv.stride(0),
        y.stride(0), float(lora_scale),
    )  # fmt: skip
    t_splits = 1 if t is None else t.shape[0]
    consts = kernel_constants(cfg, m, n_out, k, rank, t_splits, x_kind, swiglu, interpret, use_pdl)
    programs = (grid(cfg, n_out, y.device),)
    if consts["DECODE"] == 2:  # the byte table's static shared memory, next to Triton's
        allow_table(_nf4_gemv_kernel, programs, args, consts, y.device)
    _nf4_gemv_kernel[programs](*args, **consts)
