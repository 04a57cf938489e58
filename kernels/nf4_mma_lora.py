"""LoRA's up-projection inside the tensor-core NF4 GEMV (kernels/nf4_mma.py): y += s * t B^T as
MMA k-steps over the rank, added to the NF4 sums of one K share before the warps' sum.

t = x A^T arrives as kernels.nf4_lora's fp32 partial sums (T_SPLITS, M, R). For each 16 ranks
c, lane (g, q) of a warp holds the B operand's column g (x row g) at ranks 16c + 2q, +1, +8, +9:
the partials summed and rounded once to x's dtype, as kernels.nf4_gemv_rows.lora_t (and cuBLAS
for x A^T) round them; and the A operand's rows g and g + 8 of the tile at the same ranks of the
LoRA weight B (x's dtype already). One `mma.sync.m16n8k16` then gives the tile's 16 rows x 8 x
rows of t B^T in the accumulator layout of the NF4 sums, which get s times it. The products are
exact and summed in fp32, as the FMA epilogue's were; only the order of the sums differs.

This replaces an epilogue that multiplied (rows, x rows, ranks) tensors in registers, which cost
the MMA GEMV 20-30% at 8 rows (bench/NOTES.md). Under the interpreter the same registers go
through an emulation of the MMA's fragment layout (PTX ISA, m16n8k16 with 16-bit A and B).
"""

from __future__ import annotations

import triton
import triton.language as tl


def _mma_add_ptx(ab: str) -> str:
    """$0-$3 = $11-$14 + $10 * (A B) fragments; A = $4-$7, B = $8, $9 (16-bit pairs)."""
    return "\n".join(
        [
            "{",
            ".reg .f32 d<4>, z;",
            "mov.f32 z, 0f00000000;",
            f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{d0, d1, d2, d3}}, {{$4, $5, $6, $7}}, "
            "{$8, $9}, {z, z, z, z};",
            *[f"fma.rn.f32 ${i}, d{i}, $10, ${11 + i};" for i in range(4)],
            "}",
        ]
    )


_MMA_ADD_F16 = tl.constexpr(_mma_add_ptx("f16"))
_MMA_ADD_BF16 = tl.constexpr(_mma_add_ptx("bf16"))
_MMA_ADD_ARGS = tl.constexpr("=r,=r,=r,=r," + "r," * 6 + "r," * 4 + "r")


@triton.jit
def _bits(v):
    """16-bit floats -> their patterns in the low half of int32."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _halves(v, DT: tl.constexpr):
    """int32 (S,) of 16-bit pairs -> fp32 (S, 2): the low half, then the high half."""
    h = tl.join(v & 0xFFFF, (v >> 16) & 0xFFFF)
    return h.to(tl.int16).to(DT, bitcast=True).to(tl.float32)


@triton.jit
def _mma_emulated(A0, A1, A2, A3, b0, b1, DT: tl.constexpr):
    """The fragments D = A B of one m16n8k16 MMA a warp, from the lanes' registers (W * 32,).

    Lane (g, q) holds A[g, 2q + e] (A0), A[g + 8, 2q + e] (A1), A[g, 2q + 8 + e] (A2),
    A[g + 8, 2q + 8 + e] (A3), B[2q + e, g] (b0), B[2q + 8 + e, g] (b1), e the half; it gets
    D[g, 2q], D[g, 2q + 1], D[g + 8, 2q], D[g + 8, 2q + 1].
    """
    W: tl.constexpr = A0.shape[0] // 32
    top = tl.join(tl.reshape(_halves(A0, DT), (W, 8, 8)), tl.reshape(_halves(A2, DT), (W, 8, 8)))
    bottom = tl.join(tl.reshape(_halves(A1, DT), (W, 8, 8)), tl.reshape(_halves(A3, DT), (W, 8, 8)))
    top = tl.reshape(tl.permute(top, (0, 1, 3, 2)), (W, 8, 16))  # (row g, k)
    bottom = tl.reshape(tl.permute(bottom, (0, 1, 3, 2)), (W, 8, 16))
    a = tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (W, 16, 16))
    bt = tl.join(tl.reshape(_halves(b0, DT), (W, 8, 8)), tl.reshape(_halves(b1, DT), (W, 8, 8)))
    bt = tl.reshape(tl.permute(bt, (0, 1, 3, 2)), (W, 8, 16))  # (column n, k)
    d = tl.sum(a[:, :, None, :] * bt[:, None, :, :], axis=3)  # (W, 16, 8)
    d = tl.permute(tl.reshape(d, (W, 2, 8, 4, 2)), (0, 2, 3, 1, 4))  # (W, g, q, half, e)
    lo, hi = tl.split(d)  # columns 2q and 2q + 1, (W, 8, 4, 2)
    d0, d2 = tl.split(lo)
    d1, d3 = tl.split(hi)
    S: tl.constexpr = W * 32
    return tl.reshape(d0, (S,)), tl.reshape(d1, (S,)), tl.reshape(d2, (S,)), tl.reshape(d3, (S,))


@triton.jit
def _t_rank(t_ptr, g, j, M, T_SPLITS, R, TSP: tl.constexpr, mask):
    """t[x row g, rank j] from its partial sums, in fp32 (zeros where masked or j >= R)."""
    m = mask & (j < R)
    s = tl.load(t_ptr + g * R + j, mask=m, other=0.0)
    for i in tl.static_range(1, TSP):
        split = j * 0 + i  # a tensor: the interpreter rejects a tensor & scalar mask
        s += tl.load(t_ptr + (i * M + g) * R + j, mask=m & (split < T_SPLITS), other=0.0)
    return s


@triton.jit
def _b_pair(b_ptr, row, j, R, mask, DT: tl.constexpr):
    """B[row, j] and B[row, j + 1] (x's dtype) as one 16-bit pair (zeros past R or masked)."""
    lo = tl.load(b_ptr + row * R + j, mask=mask & (j < R), other=0.0)
    hi = tl.load(b_ptr + row * R + j + 1, mask=mask & (j + 1 < R), other=0.0)
    return _bits(lo.to(DT)) | (_bits(hi.to(DT)) << 16)


@triton.jit
def lora_mma(
    t_ptr, b_ptr, M, T_SPLITS, lora_scale, rowg, rmask, rmaskh, g, q, on, a0, a1, a2, a3,
    R: tl.constexpr, TSP: tl.constexpr, X_KIND: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """a0..a3 + lora_scale * (B t^T) fragments for lanes where `on` (one K share of each tile);
    the other lanes' operands are zeros, so their sums come back unchanged. rowg: weight row g
    (int64), rmask/rmaskh: rows g and g + 8 exist."""
    DT: tl.constexpr = tl.float16 if X_KIND == 1 else tl.bfloat16
    xm = on & (g < M)
    s = tl.zeros(a0.shape, tl.float32) + lora_scale
    for c in tl.static_range((R + 15) // 16):
        j = 16 * c + 2 * q
        t0 = _t_rank(t_ptr, g, j, M, T_SPLITS, R, TSP, xm).to(DT)
        t1 = _t_rank(t_ptr, g, j + 1, M, T_SPLITS, R, TSP, xm).to(DT)
        t8 = _t_rank(t_ptr, g, j + 8, M, T_SPLITS, R, TSP, xm).to(DT)
        t9 = _t_rank(t_ptr, g, j + 9, M, T_SPLITS, R, TSP, xm).to(DT)
        b0 = _bits(t0) | (_bits(t1) << 16)
        b1 = _bits(t8) | (_bits(t9) << 16)
        A0 = _b_pair(b_ptr, rowg, j, R, on & rmask, DT)
        A1 = _b_pair(b_ptr, rowg + 8, j, R, on & rmaskh, DT)
        A2 = _b_pair(b_ptr, rowg, j + 8, R, on & rmask, DT)
        A3 = _b_pair(b_ptr, rowg + 8, j + 8, R, on & rmaskh, DT)
        if ASM:
            regs = [A0, A1, A2, A3, b0, b1, s, a0, a1, a2, a3]
            if X_KIND == 1:
                a0, a1, a2, a3 = tl.inline_asm_elementwise(
                    _MMA_ADD_F16, _MMA_ADD_ARGS, regs, (tl.float32,) * 4, True, 1
                )
            else:
                a0, a1, a2, a3 = tl.inline_asm_elementwise(
                    _MMA_ADD_BF16, _MMA_ADD_ARGS, regs, (tl.float32,) * 4, True, 1
                )
        else:
            d0, d1, d2, d3 = _mma_emulated(A0, A1, A2, A3, b0, b1, DT)
            a0 += s * d0
            a1 += s * d1
            a2 += s * d2
            a3 += s * d3
    return a0, a1, a2, a3
