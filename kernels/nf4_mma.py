"""NF4 GEMV on tensor cores for 3-8 rows of x: the decode lands in the MMA operand registers.

    y = x W^T + lora_scale * t B^T   (t = x A^T: kernels.nf4_lora's partial sums)

Same contract as kernels.nf4_linear's GEMV (reference: kernels.reference.nf4_linear), for 16-bit
x; kernels.nf4_linear's tuner weighs it against kernels.nf4_gemv_rows for 3-8 rows. One warp-wide
`mma.sync.m16n8k16` multiplies a 16-row x 16-k tile of W (operand A) by 16 k of up to 8 rows of
x (operand B, one x row a column n). With m16n8k16's fragments (PTX ISA), lane (g, t) =
(lane // 4, lane % 4) holds A's rows g and g + 8 at columns 2t, 2t + 1, 2t + 8, 2t + 9, and B's
column g at rows 2t, 2t + 1, 2t + 8, 2t + 9. The k order inside a tile is ours to choose as long
as A and B agree, so each lane loads 8 contiguous bytes of bitsandbytes' layout for each of its
two rows of an absmax block (64 k = 32 bytes = 4 lanes x 8 bytes) and the x values those bytes
multiply: byte 2j + s of the 8 (s = 0, 1) is A's column pair 2t + 8s of k-step j, x pair
8t + 2j + s of the block is B's matching pair. Nothing goes through shared memory and there is
no FMA a weight: the bytes in registers become operands.

Decode, per nibble: one shift and one warp shuffle (as kernels.nf4.decode_words) from a lane
table that holds the code already in the operand's 16-bit format, in the low half (the block's
even elements, high nibbles) or the high half (odd elements, low nibbles) with zero in the other
half. So an operand register carries one weight and a zero: two MMAs a k-step (even and odd
elements, two accumulator chains) against the same x registers; tensor cores have throughput to
spare and no instruction packs pairs. A block's four k-steps accumulate in fresh fp32 registers,
scaled once by the block's absmax into the running sums. SASS (sm_90): 3.4 instructions a weight
(1 shuffle, 7/8 shift, 1/4 MMA, 1/4 loads, 1/8 FFMA), the same for 1 or 8 rows of x. The code is
rounded to x's 16-bit format (bf16: 8 bits of mantissa), as the reference's dequantized weight
is; products and sums are fp32 (tensor-core accumulation).

Work split: a program has TILES tiles of 16 weight rows (SwiGLU: gate tiles, then the same up
tiles); warp w takes tile w % TILES and every (num_warps / TILES)-th absmax block, two blocks a
loop step (both loaded before either is multiplied); the K shares are added at the end and
kernels.nf4_gemv_rows' epilogue adds LoRA and SwiGLU. Every loop tensor is 1-D with one element
a thread: a 1-D blocked layout puts element i in thread i, which the MMA's lane semantics need (a
3-D (tiles, warps, lanes) shape let Triton 3.6 spread a warp's lanes over two dimensions, which
broke the warps' sum on the device). The lane and warp come from %tid.x, which also keeps the
loads scalar (8-byte) in that layout. Under the interpreter the MMA is emulated from the same
registers (mma_emulated), fragment by fragment.

Measured (bench/NOTES.md, H200, graph replay, no LoRA): 8 rows 1.6-2.1x faster than the rows
kernel on the Llama shapes (gate+up 57 us against 113), 4 rows 1.0-1.2x; 1-2 rows 0.65-0.9x of
the staged kernel (23-34% of copy against 31-48%), so those stay there.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.nf4 import lane_table_ptx
from kernels.nf4_gemv_rows import rows_epilogue, tile_rows
from kernels.reference import NF4_CODE


def _code_bits(dtype: torch.dtype) -> list[int]:
    """NF4_CODE rounded to fp16 or bf16 (to nearest even), as 16-bit patterns. Plain Python: this
    runs at import, possibly under a meta-device context."""
    if dtype == torch.float16:
        return [struct.unpack("<H", struct.pack("<e", v))[0] for v in NF4_CODE]
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_CODE]
    return [(u + 0x7FFF + ((u >> 16) & 1)) >> 16 for u in bits]


def _block_ptx(ab: str) -> str:
    """PTX for one absmax block of two weight rows: $0-$3 = $14-$17 + scale * (W x) fragments.

    Inputs: $4, $5 the 8 bytes of rows g and g + 8 (int64); $6-$9 the x pairs of k-steps 0-3
    (int64: B's b0 in the low word, b1 in the high word); $10, $11 the lane tables (code in the
    low / high half); $12, $13 the absmax of rows g and g + 8.
    """
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    lines = [
        "{",
        ".reg .b32 w<4>, x<8>, q, e<4>, o<4>;",
        ".reg .f32 d<4>, f<4>, z;",
        "mov.b64 {w0, w1}, $4;",
        "mov.b64 {w2, w3}, $5;",
        *[f"mov.b64 {{x{2 * j}, x{2 * j + 1}}}, ${6 + j};" for j in range(4)],
        "mov.f32 z, 0f00000000;",
    ]

    def shfl(dst: str, word: str, shift: int, table: str) -> list[str]:
        if shift == 0:
            return [f"shfl.sync.idx.b32 {dst}, {table}, {word}, 0x101f, 0xffffffff;"]
        return [f"shr.u32 q, {word}, {shift};", f"shfl.sync.idx.b32 {dst}, {table}, q, 0x101f, 0xffffffff;"]

    first = True
    for j in range(4):  # k-step j: byte 2j (A cols 2t, 2t+1) and 2j + 1 (cols 2t+8, 2t+9) of the 8
        off = 16 * (j % 2)
        for i, word in enumerate((f"w{j // 2}", f"w{2 + j // 2}", f"w{j // 2}", f"w{2 + j // 2}")):
            byte = off + 8 * (i // 2)  # a0 and a1: byte 2j; a2 and a3: byte 2j + 1
            lines += shfl(f"e{i}", word, byte + 4, "$10")  # high nibble: the even element
            lines += shfl(f"o{i}", word, byte, "$11")  # low nibble: the odd element
        # even and odd elements in two accumulator chains, half the dependent MMA latency
        b = f"{{x{2 * j}, x{2 * j + 1}}}"
        c, f = ("{z, z, z, z}",) * 2 if first else ("{d0, d1, d2, d3}", "{f0, f1, f2, f3}")
        lines.append(f"{mma} {{d0, d1, d2, d3}}, {{e0, e1, e2, e3}}, {b}, {c};")
        lines.append(f"{mma} {{f0, f1, f2, f3}}, {{o0, o1, o2, o3}}, {b}, {f};")
        first = False
    lines += [f"add.f32 d{i}, d{i}, f{i};" for i in range(4)]
    lines += [
        "fma.rn.f32 $0, d0, $12, $14;",
        "fma.rn.f32 $1, d1, $12, $15;",
        "fma.rn.f32 $2, d2, $13, $16;",
        "fma.rn.f32 $3, d3, $13, $17;",
        "}",
    ]
    return "\n".join(lines)


_TID_PTX = tl.constexpr("mov.u32 $0, %tid.x;")
_TABLES_PTX = {
    (x_kind, half): tl.constexpr(lane_table_ptx([(v << 16) if half else v for v in _code_bits(dt)]))
    for x_kind, dt in ((1, torch.float16), (2, torch.bfloat16))
    for half in (0, 1)
}
_F16_LO = _TABLES_PTX[(1, 0)]
_F16_HI = _TABLES_PTX[(1, 1)]
_BF16_LO = _TABLES_PTX[(2, 0)]
_BF16_HI = _TABLES_PTX[(2, 1)]
_BLOCK_F16 = tl.constexpr(_block_ptx("f16"))
_BLOCK_BF16 = tl.constexpr(_block_ptx("bf16"))
_BLOCK_ARGS = tl.constexpr("=r,=r,=r,=r," + "l," * 6 + "r," * 7 + "r")


@triton.jit
def _unpack16(v, X_KIND: tl.constexpr):
    """int64 (S,) -> fp32 (S, 4): its four 16-bit values (fp16 or bf16), low first."""
    h = (v[:, None] >> (16 * tl.arange(0, 4)).to(tl.int64)) & 0xFFFF
    h = h.to(tl.int32)
    if X_KIND == 1:
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (h << 16).to(tl.float32, bitcast=True)


@triton.jit
def mma_emulated(wg, wh, x0, x1, x2, x3, code_ptr, sg, sh, a0, a1, a2, a3, X_KIND: tl.constexpr):
    """What the block PTX computes, from the same registers (interpreter path).

    Every input has one element a thread (WARPS * 32,). A lane's 16 nibbles of a row and its 16
    x values are put in one k order (byte b: elements 2b, 2b + 1; x of k-step j: pairs 8t + 2j,
    8t + 2j + 1), then D[g, n] = sum over lanes (g, t') and (n, t') of the warp of that k range,
    as the MMA's fragments define it; lane (g, t) gets D[g, 2t], D[g, 2t + 1] (rows g) and the
    same for rows g + 8, each times its row's absmax, added to a0..a3.
    """
    W: tl.constexpr = wg.shape[0] // 32
    i = tl.arange(0, 16)
    shift = (8 * (i // 2) + 4 * (1 - i % 2)).to(tl.int64)  # element 2b + e: nibble of byte b
    xs = tl.reshape(
        tl.join(
            tl.join(_unpack16(x0, X_KIND), _unpack16(x1, X_KIND)),
            tl.join(_unpack16(x2, X_KIND), _unpack16(x3, X_KIND)),
        ),
        (W, 32, 4, 2, 2),
    )  # (..., h, j % 2, j // 2): x value 4j + h
    xs = tl.reshape(tl.permute(xs, (0, 1, 4, 3, 2)), (W, 8, 4, 16))  # (n, t', 4j + h)
    for half in tl.static_range(2):
        w = wg if half == 0 else wh
        q = ((w[:, None] >> shift) & 15).to(tl.int32)
        a = tl.reshape(tl.load(code_ptr + q), (W, 8, 4, 16))  # (g, t', 2b + e)
        d = tl.sum(tl.sum(a[:, :, None, :, :] * xs[:, None, :, :, :], axis=4), axis=3)  # (g, n)
        lo, hi = tl.split(tl.reshape(d, (W, 8, 4, 2)))  # n = 2t, 2t + 1
        s = sg if half == 0 else sh
        if half == 0:
            a0 += tl.reshape(lo, (W * 32,)) * s
            a1 += tl.reshape(hi, (W * 32,)) * s
        else:
            a2 += tl.reshape(lo, (W * 32,)) * s
            a3 += tl.reshape(hi, (W * 32,)) * s
    return a0, a1, a2, a3


@triton.jit
def _nf4_mma_kernel(
    x_ptr,  # (M, K) 16-bit activations viewed as int64 (4 values each)
    w_ptr,  # (N, K // 16) int64: the packed NF4 weight (bitsandbytes' bytes)
    absmax_ptr,  # (N, K // 64) fp32 block scales
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
    X_KIND: tl.constexpr,  # 1 fp16, 2 bf16
    SWIGLU: tl.constexpr,  # rows n and n + N_OUT combined as silu(g) * u
    ASM: tl.constexpr,  # PTX (GPU) or the emulation (interpreter)
    PDL: tl.constexpr,  # programmatic dependent launch, as kernels.nf4_linear's GEMV
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
        tid = tl.inline_asm_elementwise(_TID_PTX, "=r,r", [e], tl.int32, True, 1)
        if X_KIND == 1:
            tlo = tl.inline_asm_elementwise(_F16_LO, "=r,r", [e], tl.int32, True, 1)
            thi = tl.inline_asm_elementwise(_F16_HI, "=r,r", [e], tl.int32, True, 1)
        else:
            tlo = tl.inline_asm_elementwise(_BF16_LO, "=r,r", [e], tl.int32, True, 1)
            thi = tl.inline_asm_elementwise(_BF16_HI, "=r,r", [e], tl.int32, True, 1)
    else:
        tid = e
        tlo = e
        thi = e
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
    # Two blocks a step, both loaded before either is multiplied: twice the bytes in flight.
    for it in range(0, tl.cdiv(kb, 2 * KS)):
        blk = 2 * it * KS + ks
        p = _load_block(wg_ptr, sg_ptr, x_ptr, kq, kb, blk, rmask, rmaskh, xmask)
        q = _load_block(wg_ptr, sg_ptr, x_ptr, kq, kb, blk + KS, rmask, rmaskh, xmask)
        a0, a1, a2, a3 = _block(p, tlo, thi, code_ptr, a0, a1, a2, a3, X_KIND, ASM)
        a0, a1, a2, a3 = _block(q, tlo, thi, code_ptr, a0, a1, a2, a3, X_KIND, ASM)
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
        lora_scale, R, RP, TSP, 16 * H, SWIGLU, PDL,
    )  # fmt: skip


@triton.jit
def _rows_by_x(c0, c1, c2, c3):
    """MMA output fragments (TILES, 32 lanes) -> (TILES, 16 weight rows, 8 x rows): lane (g, t)
    holds rows g (c0, c1) and g + 8 (c2, c3) for x rows 2t (c0, c2) and 2t + 1 (c1, c3)."""
    T: tl.constexpr = c0.shape[0]
    top = tl.reshape(tl.join(tl.reshape(c0, (T, 8, 4)), tl.reshape(c1, (T, 8, 4))), (T, 8, 8))
    bottom = tl.reshape(tl.join(tl.reshape(c2, (T, 8, 4)), tl.reshape(c3, (T, 8, 4))), (T, 8, 8))
    return tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (T, 16, 8))


@triton.jit
def _load_block(wg_ptr, sg_ptr, x_ptr, kq, kb, blk, rmask, rmaskh, xmask):
    """A lane's registers for absmax block blk: 8 bytes and the absmax of rows g and g + 8, and
    the 4 int64 of x its k-steps multiply (zeros past K, past the rows of x or of W)."""
    kmask = blk < kb
    wg = tl.load(wg_ptr + 4 * blk, mask=kmask & rmask, other=0)
    wh = tl.load(wg_ptr + 8 * kq + 4 * blk, mask=kmask & rmaskh, other=0)
    sg = tl.load(sg_ptr + blk, mask=kmask & rmask, other=0.0)
    sh = tl.load(sg_ptr + 8 * kb + blk, mask=kmask & rmaskh, other=0.0)
    xm = kmask & xmask
    x0 = tl.load(x_ptr + 16 * blk, mask=xm, other=0)
    x1 = tl.load(x_ptr + 16 * blk + 1, mask=xm, other=0)
    x2 = tl.load(x_ptr + 16 * blk + 2, mask=xm, other=0)
    x3 = tl.load(x_ptr + 16 * blk + 3, mask=xm, other=0)
    return wg, wh, sg, sh, x0, x1, x2, x3


@triton.jit
def _block(p, tlo, thi, code_ptr, a0, a1, a2, a3, X_KIND: tl.constexpr, ASM: tl.constexpr):
    """Running sums a0..a3 plus one block's scaled MMA fragments (PTX, or its emulation)."""
    wg, wh, sg, sh, x0, x1, x2, x3 = p
    if ASM:
        regs = [wg, wh, x0, x1, x2, x3, tlo, thi, sg, sh, a0, a1, a2, a3]
        if X_KIND == 1:
            return tl.inline_asm_elementwise(_BLOCK_F16, _BLOCK_ARGS, regs, (tl.float32,) * 4, True, 1)
        else:
            return tl.inline_asm_elementwise(_BLOCK_BF16, _BLOCK_ARGS, regs, (tl.float32,) * 4, True, 1)
    else:
        return mma_emulated(wg, wh, x0, x1, x2, x3, code_ptr, sg, sh, a0, a1, a2, a3, X_KIND)


@functools.cache
def code_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NF4_CODE rounded to the MMA's 16-bit format, as fp32 (the interpreter's decode)."""
    return torch.tensor(NF4_CODE, dtype=dtype).float().to(device)


# (TILES, num_warps) candidates: TILES divides the warps; SwiGLU takes twice the tiles (a gate
# and an up tile for each tile of output features).
CONFIGS = [(1, 4), (1, 8), (2, 8), (1, 16), (2, 16), (4, 16)]


def launch_mma(
    cfg, xv, words64, scales, t, b, y, m, n_out, k, lora_scale, x_kind, swiglu, interpret, use_pdl
):
    """One launch of the kernel above; xv (M, K // 4) int64, words64 (N * K // 16,) int64."""
    tiles, warps = cfg
    tiles = 2 * tiles if swiglu else tiles
    warps = max(warps, tiles)
    rows = 16 * (tiles // 2 if swiglu else tiles)
    rank = 0 if t is None else t.shape[2]
    # The GPU decodes from lane tables; the table in memory is the interpreter's.
    code = code_table(torch.float16 if x_kind == 1 else torch.bfloat16, xv.device) if interpret else scales
    _nf4_mma_kernel[(triton.cdiv(n_out, rows),)](
        xv, words64, scales, code, scales if t is None else t, scales if b is None else b, y,
        m, 0 if t is None else t.shape[0], n_out, k // 16, k // 64, xv.stride(0), y.stride(0),
        float(lora_scale),
        R=rank, RP=triton.next_power_of_2(max(rank, 1)),
        TSP=triton.next_power_of_2(1 if t is None else t.shape[0]), TILES=tiles, WARPS=warps, X_KIND=x_kind,
        SWIGLU=swiglu, ASM=not interpret, PDL=use_pdl, num_warps=warps,
        num_stages=1, launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip
