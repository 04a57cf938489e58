"""fp16 products for the 1-2 row NF4 GEMV (kernels/nf4_gemv.py, HALF configs, 16-bit x only).

    pair_sums[m, n, j] = 2^-4 * sum over words 2j, 2j + 1 of W's row n, of code(q) * x[m, k]

with the codes rounded to fp16 (the shared byte table of kernels.nf4_mma_block: an entry holds
both codes of a byte, element 8w + 2i in its low half) and x * 2^-4 rounded to fp16 (exact for
bf16 and fp16 x inside fp16's normal range), multiplied and summed in fp16, the result returned
in fp32 for the GEMV's fp32 accumulator (times the block's absmax * 2^4). Two adjacent words
share one absmax block, so each pair of words is one sum.

On the GPU an entry is already the A operand of a packed fused multiply-add: each byte costs a
shift, a LOP3, one shared load and one fma.rn.f16x2 (both its weights), and a pair of words ends
in one fp16 add and one conversion, where the fp32 path (kernels.nf4.decode_words) converts
each code to fp32 and multiplies them one by one. SASS (sm_90, triton 3.6 ptxas), loop
instructions a weight: 2.8 (gate+up SwiGLU, (16, 128, 4)) and 3.2 (one weight) against 4.1 and
4.3. The interpreter (no PTX) sums in the same order, unfused.

Range and error. |code| <= 1, so a pair's 16 products scaled by 2^-4 sum to at most |x|: finite
for any fp16 x and for bf16 x below 65504 (fp16's largest; a bf16 activation past it would make
the output inf). A product below 2^-10 in magnitude (|code * x|) falls into fp16's subnormals,
an absolute error of 2^-20 at most. Each product and sum rounds to fp16 (relative 2^-11). The
scale trades the two: 2^-8 (the first version) lost 10x more on small x. Measured under the
interpreter, 64 x 4096, relative error of y: bf16 x and output 3.0-3.9e-3, as the fp32 path
(the output's own rounding); fp16 x and output 5.4-6.4e-4 for x of RMS 0.002 to 1, against
2.0-2.4e-4 with exact fp32 codes and 2.5-3.0e-4 with the fp16 codes in fp32. The GPU tests hold
the GEMV to the fp32 path's bounds (bench/NOTES.md, session 14).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.nf4 import decode_words, lut_load_ptx


def _lut_pairs_ptx() -> str:
    """PTX: the 4 bytes of word $5 -> their byte-table entries in $0..$3 (fp16 pairs, element
    8w + 2i in the low half of $i, 8w + 2i + 1 in the high half), column $4 (4 * lane): the
    addressing of kernels.nf4's LUT decode, without the conversions."""
    lines = ["{", ".reg .b32 q, b;", "mov.u32 b, nf4lut;"]
    for i in range(4):
        lines += lut_load_ptx(i, "$5", "$4", f"${i}")
    return "\n".join([*lines, "}"])


_LUT_PAIRS_PTX = tl.constexpr(_lut_pairs_ptx())
# sum over two words' 8 fp16 pairs of c_i . x_i (products and sums in fp16, fused: a chain of 8
# in each half), the halves added in fp16 too, then to fp32: $0 = float(s.lo + s.hi)
_HFMA_PAIR_PTX = tl.constexpr(
    "{\n.reg .b32 s;\n.reg .b16 l, h;\n"
    "mul.rn.f16x2 s, $1, $9;\nfma.rn.f16x2 s, $2, $10, s;\nfma.rn.f16x2 s, $3, $11, s;\n"
    "fma.rn.f16x2 s, $4, $12, s;\nfma.rn.f16x2 s, $5, $13, s;\nfma.rn.f16x2 s, $6, $14, s;\n"
    "fma.rn.f16x2 s, $7, $15, s;\nfma.rn.f16x2 s, $8, $16, s;\n"
    "mov.b32 {l, h}, s;\nadd.rn.f16 l, l, h;\ncvt.f32.f16 $0, l;\n}"
)
_F16X2_PTX = tl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")  # (lo, hi) fp32 -> fp16 pair
X_SCALE = tl.constexpr(2.0**-4)  # x's scale into fp16
X_SCALE_INV = tl.constexpr(2.0**4)  # the block scale's factor that undoes it


@triton.jit
def _decode_pairs(w, lane):
    """int32 words -> 4 int32 tensors of w's shape: the byte table's entries for bytes 0..3 (GPU;
    lane is kernels.nf4_mma_block.lut_fill's column offset)."""
    return tl.inline_asm_elementwise(_LUT_PAIRS_PTX, "=r,=r,=r,=r,r,r", [lane, w], (tl.int32,) * 4, True, 1)


@triton.jit
def _x_pairs(lo, hi):
    """x's pair (lo, hi) (MP, BKW) fp32 -> packed fp16 pairs of x * 2^-4 (lo in the low half),
    split into even and odd words, (MP, 1, BKW // 2) each (GPU)."""
    pairs = tl.inline_asm_elementwise(_F16X2_PTX, "=r,r,r", [lo * X_SCALE, hi * X_SCALE], tl.int32, True, 1)
    even, odd = tl.split(tl.reshape(pairs, (lo.shape[0], lo.shape[1] // 2, 2)))
    return even[:, None, :], odd[:, None, :]


@triton.jit
def _x_halves(v):
    """x values (MP, BKW) fp32 -> v * 2^-4 in fp16, even and odd words (MP, 1, BKW // 2) each."""
    even, odd = tl.split(tl.reshape((v * X_SCALE).to(tl.float16), (v.shape[0], v.shape[1] // 2, 2)))
    return even[:, None, :], odd[:, None, :]


@triton.jit
def pair_sums(w, lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, code_ptr, lane, DECODE: tl.constexpr):
    """(MP, RB, BKW // 2) fp32: per pair of adjacent words of w (RB, BKW), 2^-4 times the sum of
    their 16 code * x products, in fp16. lo_i, hi_i (MP, BKW): fp32 x[8w + 2i], x[8w + 2i + 1].
    DECODE 2: the byte table (GPU); otherwise decode_words' gather of the fp16-rounded codes."""
    RB: tl.constexpr = w.shape[0]
    BKW: tl.constexpr = w.shape[1]
    we, wo = tl.split(tl.reshape(w, (RB, BKW // 2, 2)))  # even and odd words
    if DECODE == 2:
        e0, e1, e2, e3 = _decode_pairs(we, lane)
        o0, o1, o2, o3 = _decode_pairs(wo, lane)
        x0e, x0o = _x_pairs(lo0, hi0)
        x1e, x1o = _x_pairs(lo1, hi1)
        x2e, x2o = _x_pairs(lo2, hi2)
        x3e, x3o = _x_pairs(lo3, hi3)
        return tl.inline_asm_elementwise(
            _HFMA_PAIR_PTX, "=r" + ",r" * 16,
            [e0[None], e1[None], e2[None], e3[None], o0[None], o1[None], o2[None], o3[None],
             x0e, x1e, x2e, x3e, x0o, x1o, x2o, x3o],
            tl.float32, True, 1,
        )  # fmt: skip
    # element 8w + 2i is nibble 2i + 1 (code c(2i+1)) with lo_i; 8w + 2i + 1 nibble 2i with hi_i
    e0, e1, e2, e3, e4, e5, e6, e7 = decode_words(we, code_ptr, lane, DECODE)
    o0, o1, o2, o3, o4, o5, o6, o7 = decode_words(wo, code_ptr, lane, DECODE)
    l0e, l0o = _x_halves(lo0)
    h0e, h0o = _x_halves(hi0)
    l1e, l1o = _x_halves(lo1)
    h1e, h1o = _x_halves(hi1)
    l2e, l2o = _x_halves(lo2)
    h2e, h2o = _x_halves(hi2)
    l3e, l3o = _x_halves(lo3)
    h3e, h3o = _x_halves(hi3)
    f16: tl.constexpr = tl.float16
    s_lo = e1.to(f16)[None] * l0e
    s_hi = e0.to(f16)[None] * h0e
    s_lo += e3.to(f16)[None] * l1e
    s_hi += e2.to(f16)[None] * h1e
    s_lo += e5.to(f16)[None] * l2e
    s_hi += e4.to(f16)[None] * h2e
    s_lo += e7.to(f16)[None] * l3e
    s_hi += e6.to(f16)[None] * h3e
    s_lo += o1.to(f16)[None] * l0o
    s_hi += o0.to(f16)[None] * h0o
    s_lo += o3.to(f16)[None] * l1o
    s_hi += o2.to(f16)[None] * h1o
    s_lo += o5.to(f16)[None] * l2o
    s_hi += o4.to(f16)[None] * h2o
    s_lo += o7.to(f16)[None] * l3o
    s_hi += o6.to(f16)[None] * h3o
    return (s_lo + s_hi).to(tl.float32)
