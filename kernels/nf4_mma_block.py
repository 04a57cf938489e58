"""One absmax block of the tensor-core NF4 GEMV (kernels/nf4_mma.py): a lane's loads for it, its
PTX, the shared byte table it decodes through, and the interpreter's emulation of what that PTX
computes from the same per-lane registers. The 1-2 row FMA GEMV (kernels/nf4_gemv.py) decodes
through the same table (kernels.nf4.decode_words); allow_table lets a kernel hold it next to
Triton's own shared memory.

A lane (g, t) holds, for one block of 64 k: 8 bytes of rows g and g + 8 (int64 each), the 4 int64
of x its k-steps multiply (B's b0 in the low word, b1 in the high word, x row g), and the two
rows' absmax. Each packed byte is one load from a 256-entry table in shared memory whose entry
holds the codes of the byte's two nibbles in x's 16-bit format (the high nibble, the even
element, in the low half): exactly one A-operand register, so a k-step is four loads and one
`mma.sync.m16n8k16`. The table is stored 32 times over, one copy a bank, so the 32 lookups of a
warp never conflict (32 KB a program). A byte costs a shift and a mask to address (ptxas folds
the table's address into the load): about 1 integer op and 1/2 shared load a weight, against one
warp shuffle a weight for a nibble table in registers (the first version here, 10-20% slower on
an H100: the shuffle pipe was the limit). The absmax times the fragments goes to the running
sums. The code is rounded to x's 16-bit format before the product with the absmax, close to the
reference, which rounds code * absmax once.
"""

from __future__ import annotations

import ctypes
import functools
import struct

import torch
import triton
import triton.language as tl

from kernels.reference import NF4_CODE


def code_bits(dtype: torch.dtype) -> list[int]:
    """NF4_CODE rounded to fp16 or bf16 (to nearest even), as 16-bit patterns. Plain Python: this
    runs at import, possibly under a meta-device context."""
    if dtype == torch.float16:
        return [struct.unpack("<H", struct.pack("<e", v))[0] for v in NF4_CODE]
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_CODE]
    return [(u + 0x7FFF + ((u >> 16) & 1)) >> 16 for u in bits]


def lut_words(dtype: torch.dtype) -> list[int]:
    """The byte table: entry b (a packed byte) holds the codes of its two nibbles in x's 16-bit
    format, the high nibble (the even element) in the low half: one A-operand register."""
    bits = code_bits(dtype)
    return [bits[b >> 4] | bits[b & 15] << 16 for b in range(256)]


def block_ptx(ab: str) -> str:
    """PTX for one absmax block of two weight rows: $0-$3 = $13-$16 + scale * (W x) fragments.

    Inputs: $4, $5 the 8 bytes of rows g and g + 8 (int64); $6-$9 the x pairs of k-steps 0-3
    (int64: B's b0 in the low word, b1 in the high word); $10 4 * lane, this lane's table column;
    $11, $12 the absmax of rows g and g + 8. Byte b of a word is the table entry at
    nf4lut + 128 * b + $10.
    """
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    lines = [
        "{",
        ".reg .b32 w<4>, x<8>, q, a<4>, b;",
        ".reg .f32 d<4>, z;",
        "mov.u32 b, nf4lut;",
        "mov.b64 {w0, w1}, $4;",
        "mov.b64 {w2, w3}, $5;",
        *[f"mov.b64 {{x{2 * j}, x{2 * j + 1}}}, ${6 + j};" for j in range(4)],
        "mov.f32 z, 0f00000000;",
    ]
    for j in range(4):  # k-step j: byte 2j (A cols 2t, 2t+1) and 2j + 1 (cols 2t+8, 2t+9) of the 8
        off = 16 * (j % 2)
        for i, word in enumerate((f"w{j // 2}", f"w{2 + j // 2}", f"w{j // 2}", f"w{2 + j // 2}")):
            byte = off + 8 * (i // 2)  # a0 and a1: byte 2j; a2 and a3: byte 2j + 1
            shift = f"shl.b32 q, {word}, 7;" if byte == 0 else f"shr.u32 q, {word}, {byte - 7};"
            lines += [shift, "and.b32 q, q, 0x7F80;", "or.b32 q, q, $10;", "add.u32 q, q, b;"]
            lines.append(f"ld.shared.b32 a{i}, [q];")
        c = "{z, z, z, z}" if j == 0 else "{d0, d1, d2, d3}"
        lines.append(f"{mma} {{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, {{x{2 * j}, x{2 * j + 1}}}, {c};")
    lines += [
        "fma.rn.f32 $0, d0, $11, $13;",
        "fma.rn.f32 $1, d1, $11, $14;",
        "fma.rn.f32 $2, d2, $12, $15;",
        "fma.rn.f32 $3, d3, $12, $16;",
        "}",
    ]
    return "\n".join(lines)


@functools.cache
def lut_fill_ptx(dtype: torch.dtype, threads: int) -> str:
    """PTX: thread %tid.x of `threads` computes table entries e = tid + k * threads (lut_words for
    dtype, from the 16 codes as immediates: no load) and stores each one's 32 copies, 16 bytes a
    store, the 8 stores of an entry in the order (g + e) % 8 so that the 8 lanes of a store
    phase hit 8 different bank quads. Entry e's copies 4g .. 4g + 3 sit at nf4lut + 128 e + 16 g.
    Past 256 threads, thread t repeats thread t % 256's stores (the same values). The code of
    nibble n: the n // 2-th word of code pairs (a select tree on bits 1-3), then its half n % 2."""
    bits = code_bits(dtype)
    pairs = [bits[2 * j] | bits[2 * j + 1] << 16 for j in range(8)]
    lines = ["{", ".reg .b32 t, e, n, c, lo, hi, v, a, b, q<8>, s<4>;", ".reg .pred p<4>;"]
    lines += ["mov.u32 t, %tid.x;", "and.b32 t, t, 255;", "mov.u32 b, nf4lut;"]
    lines += [f"mov.u32 q{j}, {pairs[j]:#010x};" for j in range(8)]

    def code(dst: str) -> list[str]:  # dst = bits[n]
        return [
            "and.b32 c, n, 2;", "setp.ne.u32 p1, c, 0;", "and.b32 c, n, 4;", "setp.ne.u32 p2, c, 0;",
            "and.b32 c, n, 8;", "setp.ne.u32 p3, c, 0;",
            "selp.b32 s0, q1, q0, p1;", "selp.b32 s1, q3, q2, p1;", "selp.b32 s2, q5, q4, p1;",
            "selp.b32 s3, q7, q6, p1;", "selp.b32 s0, s1, s0, p2;", "selp.b32 s2, s3, s2, p2;",
            "selp.b32 s0, s2, s0, p3;", "and.b32 c, n, 1;", "shl.b32 c, c, 4;", "shr.u32 s0, s0, c;",
            f"and.b32 {dst}, s0, 0xFFFF;",
        ]  # fmt: skip

    for k in range(max(1, 256 // threads)):
        lines += [f"add.u32 e, t, {k * threads};", "shr.u32 n, e, 4;", *code("lo"), "and.b32 n, e, 15;"]
        lines += [*code("hi"), "shl.b32 hi, hi, 16;", "or.b32 v, lo, hi;"]
        for g in range(8):
            lines += [f"add.u32 a, e, {g};", "and.b32 a, a, 7;", "shl.b32 a, a, 4;"]
            lines += ["mad.lo.u32 a, e, 128, a;", "add.u32 a, a, b;", "st.shared.v4.b32 [a], {v, v, v, v};"]
    return "\n".join([*lines, "mov.u32 $0, 0;", "}"])


# The byte table in shared memory: 256 entries x 32 copies (one a bank, so a warp's 32 lookups
# never conflict), declared once a kernel (the program-id argument makes it one instance), filled
# by lut_fill_ptx (the launch passes the string for its 16-bit format and thread count as a
# constexpr), and each lane's column offset. Computing the entries instead of loading them (as
# before session 19) took a global load's latency off every program's start: 0.5-1.1 us a GEMV
# launch on an H100 (bench/NOTES.md).
_LUT_DECL_PTX = tl.constexpr(".shared .align 16 .b8 nf4lut[32768];\nmov.u32 $0, 0;")
_LUT_LANE_PTX = tl.constexpr("{\n.reg .b32 l;\nmov.u32 l, %laneid;\nshl.b32 $0, l, 2;\n}")
_TID_PTX = tl.constexpr("mov.u32 $0, %tid.x;")
_BLOCK_F16 = tl.constexpr(block_ptx("f16"))
_BLOCK_BF16 = tl.constexpr(block_ptx("bf16"))
_BLOCK_ARGS = tl.constexpr("=r,=r,=r,=r," + "l," * 6 + "r," * 6 + "r")


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


_TABLE_READY: set[tuple] = set()  # (device, constexprs) of the kernels allow_table has set up
_SHARED_SIZE_BYTES, _MAX_DYNAMIC_SHARED_SIZE_BYTES = 1, 8  # CUfunction_attribute


def specialization(args: tuple) -> tuple:
    """What Triton tells compiled kernels apart by, besides the constexprs: each pointer's dtype
    and 16-byte alignment; each integer's width, whether it is 1, whether a multiple of 16."""
    return tuple(
        (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, torch.Tensor)
        else (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
        for a in args
        if isinstance(a, (torch.Tensor, int)) and not isinstance(a, bool)
    )


def allow_table(kernel, grid: tuple, args: tuple, consts: dict, device: torch.device) -> None:
    """Let the compiled `kernel` for `consts` (which fills the byte table: 32 KB of static shared
    memory) take its Triton-managed (dynamic) shared memory too: a block may hold only 48 KB of
    the two unless its function opts in, and Triton opts in only when its own share passes
    48 KB, so a pipelined kernel with 32 + 20 KB failed to launch (invalid argument). Once per
    compiled kernel (keyed by its constexprs and specialization): compiled here (warmup) if need
    be, then the attribute set."""
    key = (device, specialization(args), tuple(sorted(consts.items())))
    if key in _TABLE_READY:
        return
    compiled = kernel.warmup(*args, grid=grid, **consts)
    compiled._init_handles()
    dynamic = compiled.metadata.shared
    if dynamic:
        cuda = ctypes.CDLL("libcuda.so.1")
        static = ctypes.c_int()
        function = ctypes.c_void_p(compiled.function)
        if cuda.cuFuncGetAttribute(ctypes.byref(static), _SHARED_SIZE_BYTES, function) != 0:
            raise RuntimeError("cuFuncGetAttribute(SHARED_SIZE_BYTES) failed")
        limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        if static.value + dynamic > limit:
            raise triton.runtime.errors.OutOfResources(static.value + dynamic, limit, "shared memory")
        if cuda.cuFuncSetAttribute(function, _MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic) != 0:
            raise RuntimeError("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) failed")
    _TABLE_READY.add(key)


@triton.jit
def lut_fill(e, FILL: tl.constexpr):
    """Declare the shared byte table and fill it with FILL (lut_fill_ptx for the program's warps
    and x's 16-bit format), then a barrier. Returns each lane's column offset (4 * lane), shaped
    like e."""
    tl.inline_asm_elementwise(_LUT_DECL_PTX, "=r,r", [tl.program_id(0)], tl.int32, False, 1)
    tl.inline_asm_elementwise(FILL, "=r,r", [tl.program_id(0)], tl.int32, False, 1)  # once a thread
    tl.debug_barrier()
    return tl.inline_asm_elementwise(_LUT_LANE_PTX, "=r,r", [e], tl.int32, False, 1)


@triton.jit
def load_w(wg_ptr, sg_ptr, kq, kb, blk, rmask, rmaskh):
    """A lane's weight registers for absmax block blk: 8 bytes and the absmax of rows g and g + 8
    in fp32 (stored fp32 or fp16; zeros past K or past the rows of W)."""
    kmask = blk < kb
    wg = tl.load(wg_ptr + 4 * blk, mask=kmask & rmask, other=0)
    wh = tl.load(wg_ptr + 8 * kq + 4 * blk, mask=kmask & rmaskh, other=0)
    sg = tl.load(sg_ptr + blk, mask=kmask & rmask, other=0.0).to(tl.float32)
    sh = tl.load(sg_ptr + 8 * kb + blk, mask=kmask & rmaskh, other=0.0).to(tl.float32)
    return wg, wh, sg, sh


@triton.jit
def load_x(x_ptr, kb, blk, xmask):
    """The 4 int64 of x row g that block blk's k-steps multiply (zeros past K or the rows of x)."""
    xm = (blk < kb) & xmask
    x0 = tl.load(x_ptr + 16 * blk, mask=xm, other=0)
    x1 = tl.load(x_ptr + 16 * blk + 1, mask=xm, other=0)
    x2 = tl.load(x_ptr + 16 * blk + 2, mask=xm, other=0)
    x3 = tl.load(x_ptr + 16 * blk + 3, mask=xm, other=0)
    return x0, x1, x2, x3


@triton.jit
def thread_id(e):
    """%tid.x, shaped like e (its values are ignored)."""
    return tl.inline_asm_elementwise(_TID_PTX, "=r,r", [e], tl.int32, True, 1)


@triton.jit
def block(w, x, lane, code_ptr, a0, a1, a2, a3, X_KIND: tl.constexpr, ASM: tl.constexpr):
    """Running sums a0..a3 plus one block's scaled MMA fragments (PTX, or its emulation); lane is
    lut_fill's column offset (unused by the emulation)."""
    wg, wh, sg, sh = w
    x0, x1, x2, x3 = x
    if ASM:
        regs = [wg, wh, x0, x1, x2, x3, lane, sg, sh, a0, a1, a2, a3]
        if X_KIND == 1:
            return tl.inline_asm_elementwise(_BLOCK_F16, _BLOCK_ARGS, regs, (tl.float32,) * 4, True, 1)
        else:
            return tl.inline_asm_elementwise(_BLOCK_BF16, _BLOCK_ARGS, regs, (tl.float32,) * 4, True, 1)
    else:
        return mma_emulated(wg, wh, x0, x1, x2, x3, code_ptr, sg, sh, a0, a1, a2, a3, X_KIND)
