"""NF4 GEMV on tensor cores for 1-8 rows of x: the decode lands in the MMA operand registers.

    y = x W^T + lora_scale * t B^T   (t = x A^T: kernels.nf4_lora's partial sums)

Same contract as kernels.nf4_gemv (reference: kernels.reference.nf4_linear), for fp16
or bf16 x on sm_80 and later; kernels.nf4_linear's tuner weighs it against the FMA kernels for
every row count. One warp-wide `mma.sync.m16n8k16` multiplies a 16-row x 16-k tile of W (operand
A) by 16 k of up to 8 rows of x (operand B, one x row a column). With its fragments (PTX ISA),
lane (g, t) = (lane // 4, lane % 4) holds A's rows g and g + 8 at columns 2t, 2t + 1, 2t + 8,
2t + 9, and B's column g at rows 2t, 2t + 1, 2t + 8, 2t + 9. The k order inside a tile is ours to
choose as long as A and B agree, so each lane loads 8 contiguous bytes of bitsandbytes' layout
for each of its two rows of an absmax block (64 k = 32 bytes = 4 lanes x 8 bytes) and the x
values those bytes multiply: byte 2j + s of the 8 (s = 0, 1) is A's column pair 2t + 8s of k-step
j, x pair 8t + 2j + s of the block is B's matching pair. No repack, no FMA a weight: each byte
becomes an operand register through a table in shared memory (kernels/nf4_mma_block.py: the
table, the PTX of one block and its emulation). SASS (sm_90): ~2.7 instructions a weight (1
integer, 1/2 shared load, 1/8 MMA, the loads and their masks), the same for 1 or 8 rows of x; the
code is rounded to x's 16-bit format before the absmax product (close to the reference, which
rounds code * absmax once); sums are fp32.

Work split: a program fills its byte table, then has TILES tiles of 16 weight rows (SwiGLU: gate
tiles, then the same up tiles); warp w takes tile w % TILES and every (num_warps / TILES)-th pair
of adjacent absmax blocks (64 bytes of a row), both loaded before either is multiplied, the
weights of AHEAD more steps in flight; the K shares are added at the end and
kernels.nf4_gemv_rows' epilogue adds LoRA and SwiGLU. Every loop tensor is 1-D with one element
a thread: a 1-D blocked layout puts element i in thread i, which the MMA's lane semantics need (a
3-D (tiles, warps, lanes) shape let Triton 3.6 spread a warp's lanes over two dimensions, which
broke the warps' sum on the device). The lane and warp come from %tid.x, which also keeps the
loads scalar (8-byte) in that layout. Under the interpreter the MMA is emulated from the same
registers, fragment by fragment.

Measured (bench/NOTES.md, H100, graph replay, no LoRA): 8 rows 1.9-2.3x faster than the FMA rows
kernel on the Llama shapes (gate+up 48.6 us against 113.4), 1 row 0.87-0.95x of the staged
kernel (gate+up 38.2 us against 36.1: both reach ~60% of the copy bandwidth there), so the tuner
keeps the staged kernel at 1 row on that card.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.nf4_gemv_rows import rows_epilogue, tile_rows
from kernels.nf4_mma_block import block, load_w, load_x, lut_fill, lut_fill_ptx, thread_id
from kernels.nf4_mma_lora import lora_mma
from kernels.reference import NF4_CODE


@triton.jit
def _nf4_mma_kernel(
    x_ptr,  # (M, K) 16-bit activations viewed as int64 (4 values each)
    w_ptr,  # (N, K // 16) int64: the packed NF4 weight (bitsandbytes' bytes)
    absmax_ptr,  # (N, K // 64) fp32 or fp16 block scales
    code_ptr,  # (16,) fp32 code table rounded to x's dtype (interpreter only)
    t_ptr,  # (T_SPLITS, M, R) fp32 partial sums of the LoRA down-projection x A^T
    b_ptr,  # (N, R) LoRA up weight B, contiguous; unused when R == 0
    y_ptr,  # (M, N_OUT) output, x's dtype
    M,  # rows of x (at most 8)
    T_SPLITS,  # partial sums of t
    N_OUT,  # output features (I for SwiGLU, whose weight has 2I rows)
    kq,  # K // 16: int64 words in a weight row
    kb,  # K // 64: absmax blocks in a weight row
    stride_xq,  # int64 words between rows of x
    stride_ym,  # elements between rows of y
    lora_scale,  # s in y += s * B (A x)
    R: tl.constexpr,  # LoRA rank, 0 for none
    RP: tl.constexpr,  # R rounded up to a power of two
    TSP: tl.constexpr,  # T_SPLITS rounded up to a power of two
    TILES: tl.constexpr,  # 16-row tiles a program (SwiGLU: TILES / 2 gate and as many up tiles)
    WARPS: tl.constexpr,  # num_warps: the warps split K
    AHEAD: tl.constexpr,  # steps (0-2) whose weights are loaded before this step's are multiplied
    X_KIND: tl.constexpr,  # 1 fp16, 2 bf16
    SWIGLU: tl.constexpr,  # rows n and n + N_OUT combined as silu(g) * u
    ASM: tl.constexpr,  # PTX (GPU) or the emulation (interpreter)
    PDL: tl.constexpr,  # programmatic dependent launch, as kernels.nf4_gemv
    LUT_FILL: tl.constexpr,  # ASM: the byte table's fill for WARPS and X_KIND (nf4_mma_block.lut_fill_ptx)
):
    if R == 0:
        pdl.wait(PDL)
        pdl.release(PDL)
    # One element a thread: 1-D tensors of WARPS * 32 have a single layout, element i in thread
    # i, so the reshape before the warps' sum below is exact (a 3-D shape let the compiler put the
    # lanes of a warp across two dimensions). Warp w takes tile w % TILES and K share w // TILES.
    KS: tl.constexpr = WARPS // TILES
    e = tl.arange(0, WARPS * 32)
    if ASM:
        tid = thread_id(e)
        lane = lut_fill(e, LUT_FILL)
    else:  # the emulation needs no table; element i is thread i
        tid = e
        lane = e
    tile = (tid // 32) % TILES
    ks = tid // (32 * TILES)
    g = (tid % 32) // 4
    t = tid % 4
    if SWIGLU:
        feat = (tl.program_id(0) * (TILES // 2) + tile % (TILES // 2)) * 16 + g
        rowg = feat + (tile // (TILES // 2)) * N_OUT
    else:
        feat = (tl.program_id(0) * TILES + tile) * 16 + g
        rowg = feat
    rmask = feat < N_OUT
    rmaskh = feat + 8 < N_OUT
    rowg = rowg.to(tl.int64)
    wg_ptr = w_ptr + rowg * kq + t
    sg_ptr = absmax_ptr + rowg * kb
    x_ptr += g * stride_xq + 4 * t
    xmask = g < M
    a0 = tl.zeros((WARPS * 32,), tl.float32)
    a1 = tl.zeros((WARPS * 32,), tl.float32)
    a2 = tl.zeros((WARPS * 32,), tl.float32)
    a3 = tl.zeros((WARPS * 32,), tl.float32)
    # Two adjacent blocks a step (64 bytes of a row), both loaded before either is multiplied. With
    # AHEAD = 1 or 2 the weight bytes and absmax of the next one or two steps are loaded before this
    # step's are multiplied (registers carried over the loop, 6 a block): up to six blocks in
    # flight a warp, the loads' latency behind the MMAs. x comes from L1/L2 at its step.
    if AHEAD > 0:
        blk = 2 * ks
        p = load_w(wg_ptr, sg_ptr, kq, kb, blk, rmask, rmaskh)
        q = load_w(wg_ptr, sg_ptr, kq, kb, blk + 1, rmask, rmaskh)
        if AHEAD == 2:
            pn = load_w(wg_ptr, sg_ptr, kq, kb, blk + 2 * KS, rmask, rmaskh)
            qn = load_w(wg_ptr, sg_ptr, kq, kb, blk + 2 * KS + 1, rmask, rmaskh)
        for _ in range(0, tl.cdiv(kb, 2 * KS)):
            nxt = blk + 2 * AHEAD * KS
            pa = load_w(wg_ptr, sg_ptr, kq, kb, nxt, rmask, rmaskh)
            qa = load_w(wg_ptr, sg_ptr, kq, kb, nxt + 1, rmask, rmaskh)
            a0, a1, a2, a3 = _two_blocks(
                p, q, x_ptr, kb, blk, xmask, lane, code_ptr, a0, a1, a2, a3, X_KIND, ASM
            )
            if AHEAD == 2:
                p = pn
                q = qn
                pn = pa
                qn = qa
            else:
                p = pa
                q = qa
            blk += 2 * KS
    else:
        for it in range(0, tl.cdiv(kb, 2 * KS)):
            blk = 2 * (it * KS + ks)
            p = load_w(wg_ptr, sg_ptr, kq, kb, blk, rmask, rmaskh)
            q = load_w(wg_ptr, sg_ptr, kq, kb, blk + 1, rmask, rmaskh)
            a0, a1, a2, a3 = _two_blocks(
                p, q, x_ptr, kb, blk, xmask, lane, code_ptr, a0, a1, a2, a3, X_KIND, ASM
            )
    if R > 0:  # LoRA: t B^T as MMA k-steps over the rank, on the first K share of each tile
        pdl.wait(PDL)  # t comes from the kernel just before (kernels/pdl.py)
        pdl.release(PDL)
        a0, a1, a2, a3 = lora_mma(
            t_ptr, b_ptr, M, T_SPLITS, lora_scale, rowg, rmask, rmaskh, g, t, ks == 0,
            a0, a1, a2, a3, R, TSP, X_KIND, ASM,
        )  # fmt: skip
    # The K shares added, then the fragments put in (weight row, x row) order for the epilogue.
    y = _rows_by_x(
        tl.sum(tl.reshape(a0, (KS, TILES, 32)), axis=0),
        tl.sum(tl.reshape(a1, (KS, TILES, 32)), axis=0),
        tl.sum(tl.reshape(a2, (KS, TILES, 32)), axis=0),
        tl.sum(tl.reshape(a3, (KS, TILES, 32)), axis=0),
    )  # (TILES, 16, 8)
    H: tl.constexpr = TILES // 2 if SWIGLU else TILES  # tiles of output features
    if SWIGLU:  # gate tiles then up tiles -> the epilogue's order: gate and up row of a feature
        y = tl.reshape(tl.permute(tl.reshape(y, (2, H, 16, 8)), (1, 2, 0, 3)), (32 * H, 8))
    else:
        y = tl.reshape(y, (16 * TILES, 8))
    n, rows, rmask = tile_rows(tl.program_id(0), N_OUT, 16 * H, SWIGLU)
    rows_epilogue(
        y, n, rows, rmask, tl.arange(0, 8), M, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT, stride_ym,
        lora_scale, 0, RP, TSP, 16 * H, SWIGLU, PDL,
    )  # fmt: skip


@triton.jit
def _two_blocks(
    p, q, x_ptr, kb, blk, xmask, lane, code_ptr, a0, a1, a2, a3, X_KIND: tl.constexpr, ASM: tl.constexpr
):
    """The running sums plus blocks blk (weights p) and blk + 1 (weights q), their x loaded now."""
    xp = load_x(x_ptr, kb, blk, xmask)
    xq = load_x(x_ptr, kb, blk + 1, xmask)
    a0, a1, a2, a3 = block(p, xp, lane, code_ptr, a0, a1, a2, a3, X_KIND, ASM)
    return block(q, xq, lane, code_ptr, a0, a1, a2, a3, X_KIND, ASM)


@triton.jit
def _rows_by_x(c0, c1, c2, c3):
    """MMA output fragments (TILES, 32 lanes) -> (TILES, 16 weight rows, 8 x rows): lane (g, t)
    holds rows g (c0, c1) and g + 8 (c2, c3) for x rows 2t (c0, c2) and 2t + 1 (c1, c3)."""
    T: tl.constexpr = c0.shape[0]
    top = tl.reshape(tl.join(tl.reshape(c0, (T, 8, 4)), tl.reshape(c1, (T, 8, 4))), (T, 8, 8))
    bottom = tl.reshape(tl.join(tl.reshape(c2, (T, 8, 4)), tl.reshape(c3, (T, 8, 4))), (T, 8, 8))
    return tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (T, 16, 8))


@functools.cache
def _sm80(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def supported(device: torch.device) -> bool:
    """fp16/bf16 mma.sync.m16n8k16 needs sm_80 or later (the interpreter emulates it anywhere)."""
    return device.type == "cuda" and _sm80(
        device.index if device.index is not None else torch.cuda.current_device()
    )


@functools.cache
def code_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NF4_CODE rounded to the MMA's 16-bit format, as fp32 (the interpreter's decode)."""
    return torch.tensor(NF4_CODE, dtype=dtype).float().to(device)


# (TILES, num_warps, AHEAD) candidates: TILES divides the warps; SwiGLU takes twice the tiles (a
# gate and an up tile for each tile of output features). Each was within 3% of the best on some
# Llama-3-8B shape at 1 or 8 rows, with or without LoRA (bench.gemv_probe, H100).
CONFIGS = [(1, 8, 0), (1, 8, 2), (2, 16, 2), (1, 4, 2), (2, 4, 2), (2, 8, 0)]


def launch_mma(
    cfg, xv, words64, scales, t, b, y, m, n_out, k, lora_scale, x_kind, swiglu, interpret, use_pdl
):
    """One launch of the kernel above; xv (M, K // 4) int64, words64 (N * K // 16,) int64."""
    tiles, warps, ahead = cfg
    tiles = 2 * tiles if swiglu else tiles
    warps = max(warps, tiles)
    rows = 16 * (tiles // 2 if swiglu else tiles)
    rank = 0 if t is None else t.shape[2]
    # The GPU decodes through its byte table (filled in each program); the code table is the
    # interpreter's.
    dtype = torch.float16 if x_kind == 1 else torch.bfloat16
    code = code_table(dtype, xv.device) if interpret else scales
    _nf4_mma_kernel[(triton.cdiv(n_out, rows),)](
        xv, words64, scales, code, scales if t is None else t, scales if b is None else b, y,
        m, 0 if t is None else t.shape[0], n_out, k // 16, k // 64, xv.stride(0), y.stride(0),
        float(lora_scale),
        R=rank, RP=triton.next_power_of_2(max(rank, 1)),
        TSP=triton.next_power_of_2(1 if t is None else t.shape[0]), TILES=tiles, WARPS=warps,
        AHEAD=ahead, X_KIND=x_kind, SWIGLU=swiglu, ASM=not interpret, PDL=use_pdl,
        LUT_FILL="" if interpret else lut_fill_ptx(dtype, 32 * warps), num_warps=warps,
        num_stages=1, launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip
