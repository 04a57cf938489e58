"""One absmax block of the tensor-core NF4 GEMV (kernels/nf4_mma.py): its PTX, and the
interpreter's emulation of what that PTX computes from the same per-lane registers.

A lane (g, t) holds, for one block of 64 k: 8 bytes of rows g and g + 8 (int64 each), the 4 int64
of x its k-steps multiply (B's b0 in the low word, b1 in the high word, x row g), and the two
rows' absmax. The PTX decodes each nibble with one shift and one warp shuffle from a lane table
holding the code in the operand's 16-bit format (low half: even elements, the high nibbles; high
half: odd elements, the low nibbles; zero in the other half), runs two `mma.sync.m16n8k16` a
k-step (even and odd elements, two accumulator chains) and adds absmax times the fragments to
the running sums. The code is rounded to x's 16-bit format before the product with the absmax,
close to the reference, which rounds code * absmax once.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from kernels.nf4 import lane_table_ptx
from kernels.reference import NF4_CODE


def code_bits(dtype: torch.dtype) -> list[int]:
    """NF4_CODE rounded to fp16 or bf16 (to nearest even), as 16-bit patterns. Plain Python: this
    runs at import, possibly under a meta-device context."""
    if dtype == torch.float16:
        return [struct.unpack("<H", struct.pack("<e", v))[0] for v in NF4_CODE]
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_CODE]
    return [(u + 0x7FFF + ((u >> 16) & 1)) >> 16 for u in bits]


def block_ptx(ab: str) -> str:
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
    (x_kind, half): tl.constexpr(lane_table_ptx([(v << 16) if half else v for v in code_bits(dt)]))
    for x_kind, dt in ((1, torch.float16), (2, torch.bfloat16))
    for half in (0, 1)
}
_F16_LO = _TABLES_PTX[(1, 0)]
_F16_HI = _TABLES_PTX[(1, 1)]
_BF16_LO = _TABLES_PTX[(2, 0)]
_BF16_HI = _TABLES_PTX[(2, 1)]
_BLOCK_F16 = tl.constexpr(block_ptx("f16"))
_BLOCK_BF16 = tl.constexpr(block_ptx("bf16"))
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
def lane_tables(e, X_KIND: tl.constexpr):
    """The two lane tables (code in the low / high half) for x's 16-bit format, shaped like e."""
    if X_KIND == 1:
        tlo = tl.inline_asm_elementwise(_F16_LO, "=r,r", [e], tl.int32, True, 1)
        thi = tl.inline_asm_elementwise(_F16_HI, "=r,r", [e], tl.int32, True, 1)
    else:
        tlo = tl.inline_asm_elementwise(_BF16_LO, "=r,r", [e], tl.int32, True, 1)
        thi = tl.inline_asm_elementwise(_BF16_HI, "=r,r", [e], tl.int32, True, 1)
    return tlo, thi


@triton.jit
def thread_id(e):
    """%tid.x, shaped like e (its values are ignored)."""
    return tl.inline_asm_elementwise(_TID_PTX, "=r,r", [e], tl.int32, True, 1)


@triton.jit
def block(p, tlo, thi, code_ptr, a0, a1, a2, a3, X_KIND: tl.constexpr, ASM: tl.constexpr):
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
