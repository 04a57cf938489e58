"""NF4 in Triton: dequantization of a whole weight, and the word decode the GEMV builds on.

Formula (reference: kernels.reference.nf4_dequantize, itself bitsandbytes' dequantize_4bit):

    byte j of packed holds flattened elements 2j (high nibble) and 2j + 1 (low nibble)
    w[i] = NF4_CODE[nibble(i)] * absmax[i // 64]        in fp32, then one cast to dtype

nf4_dequantize does the same single fp32 multiply the reference does, so its result is
bit-exact in every dtype. Blocks of 64 run over the flattened weight, so they may cross rows
when K % 64 != 0; indexing the flat weight handles that for free. It is the prefill path
(dequantize once, then cuBLAS) and is write-bound: 0.5 byte read + 1/16 byte of absmax for
every 2 bytes of bf16 written, so a program takes a long contiguous run of bytes and the two
nibbles' values leave interleaved in one wide store. The code value is gathered from a
64-byte table, a single L1 line; at 2.5 bytes of traffic an element the gather is far from
being the limit (bench/NOTES.md: 71% of the copy bandwidth on an H200).

decode_words is the GEMV's decode: 8 nibbles of an int32 word to 8 fp32 code values, one of
three ways (DECODE; kernels.nf4_half keeps the byte table's fp16 pairs packed instead):
- SHFL: exact fp32. A lane of every 16-lane half-warp holds one code value and `shfl.sync.idx`
  with a 16-lane segment (c = 0x101f) reads lane (q & 15) of the segment: one shuffle and one
  shift a value, no masking or address arithmetic (the segment mask drops the bits of q above
  the nibble). A table gather instead costs a 64-bit address a value, ~4 integer instructions
  (GPU.md: 6-7% of the bandwidth).
- LUT: the codes rounded to fp16 (relative error <= 2^-11, against the 2^-8 of the bf16 weight
  the reference multiplies). Each byte is one load from the shared byte table of
  kernels.nf4_mma_block (fp16 pairs, 32 copies, one a bank: conflict-free), then two fp16 -> fp32
  conversions: half a shared load and ~1 integer op a weight instead of one shuffle, whose pipe
  bound the 1-row GEMV (bench/NOTES.md). The kernel fills the table first (lut_fill).
- GATHER: the interpreter, which cannot run PTX: the same values (exact or fp16-rounded, as
  the table passed) gathered from code_ptr.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from kernels.reference import NF4_BLOCKSIZE, NF4_CODE, nf4_code_table


def _lane_table_ptx() -> str:
    """PTX leaving NF4_CODE[laneid % 16] in $0, by a 4-level select tree on the lane bits."""
    bits = lambda v: f"0f{struct.unpack('<I', struct.pack('<f', v))[0]:08X}"
    lines = ["{", ".reg .u32 l, b;", ".reg .pred p<4>;", ".reg .b32 t<14>;", "mov.u32 l, %laneid;"]
    for i in range(4):
        lines += [f"and.b32 b, l, {1 << i};", f"setp.ne.u32 p{i}, b, 0;"]
    for i in range(8):
        lines.append(f"selp.b32 t{i}, {bits(NF4_CODE[2 * i + 1])}, {bits(NF4_CODE[2 * i])}, p0;")
    lines += [f"selp.b32 t{8 + i}, t{2 * i + 1}, t{2 * i}, p1;" for i in range(4)]
    lines += ["selp.b32 t12, t9, t8, p2;", "selp.b32 t13, t11, t10, p2;"]
    return "\n".join([*lines, "selp.b32 $0, t13, t12, p3;", "}"])


def _shfl_decode_ptx() -> str:
    """PTX: nibble m of $9 (bits 4m..4m+3) -> the code value in $m, read from lane table $8."""
    lines = ["{", ".reg .b32 q;", "shfl.sync.idx.b32 $0, $8, $9, 0x101f, 0xffffffff;"]
    for m in range(1, 8):
        lines += [f"shr.u32 q, $9, {4 * m};", f"shfl.sync.idx.b32 ${m}, $8, q, 0x101f, 0xffffffff;"]
    return "\n".join([*lines, "}"])


def lut_load_ptx(i: int, word: str, lane: str, dest: str) -> list[str]:
    """PTX lines loading byte i of `word`'s entry of the shared byte table nf4lut (fp16 pairs, the
    high nibble's code in the low half) at column `lane` (4 * lane) into `dest`; registers q
    (b32) and b (b32, holding nf4lut's address) are the caller's."""
    return [
        f"shl.b32 q, {word}, 7;" if i == 0 else f"shr.u32 q, {word}, {8 * i - 7};",
        "and.b32 q, q, 0x7F80;",
        f"or.b32 q, q, {lane};",  # the lane's column, below bit 7: and + or is one LOP3
        "add.u32 q, q, b;",  # the table's address: ptxas folds it into the load
        f"ld.shared.b32 {dest}, [q];",
    ]


def _lut_decode_ptx() -> str:
    """PTX: the 4 bytes of word $9 -> the fp32 code values of its nibbles in $0..$7 (nibble m,
    bits 4m..4m+3, in $m), each byte one load from the shared byte table nf4lut (fp16 pairs, the
    high nibble's code in the low half) at column $8 (4 * lane)."""
    lines = ["{", ".reg .b32 q, p, b;", ".reg .b16 h, l;", "mov.u32 b, nf4lut;"]
    for i in range(4):  # byte i: nibbles 2i (low, in the entry's high half) and 2i + 1
        lines += lut_load_ptx(i, "$9", "$8", "p") + [
            "mov.b32 {l, h}, p;",
            f"cvt.f32.f16 ${2 * i}, h;",
            f"cvt.f32.f16 ${2 * i + 1}, l;",
        ]
    return "\n".join([*lines, "}"])


_BLOCK = tl.constexpr(NF4_BLOCKSIZE)
_LANE_TABLE_PTX = tl.constexpr(_lane_table_ptx())
_SHFL_DECODE_PTX = tl.constexpr(_shfl_decode_ptx())
_LUT_DECODE_PTX = tl.constexpr(_lut_decode_ptx())


@triton.jit
def decode_words(w, code_ptr, lane, DECODE: tl.constexpr):
    """int32 words -> 8 fp32 tensors of w's shape: the code values of nibbles 0..7, low first.

    DECODE: 1 warp shuffle (GPU, exact), 2 the shared byte table (GPU, fp16-rounded codes; lane
    is lut_fill's column offset, (1, 1)), 0 a gather from code_ptr (interpreter).
    """
    if DECODE == 1:
        table = tl.inline_asm_elementwise(
            _LANE_TABLE_PTX, "=r,r", [tl.zeros((1, 1), tl.int32)], tl.float32, True, 1
        )
        return tl.inline_asm_elementwise(
            _SHFL_DECODE_PTX, "=r," * 8 + "r,r", [table, w], (tl.float32,) * 8, True, 1
        )
    elif DECODE == 2:
        return tl.inline_asm_elementwise(
            _LUT_DECODE_PTX, "=r," * 8 + "r,r", [lane, w], (tl.float32,) * 8, True, 1
        )
    else:
        return (
            tl.load(code_ptr + (w & 15)),
            tl.load(code_ptr + ((w >> 4) & 15)),
            tl.load(code_ptr + ((w >> 8) & 15)),
            tl.load(code_ptr + ((w >> 12) & 15)),
            tl.load(code_ptr + ((w >> 16) & 15)),
            tl.load(code_ptr + ((w >> 20) & 15)),
            tl.load(code_ptr + ((w >> 24) & 15)),
            tl.load(code_ptr + ((w >> 28) & 15)),
        )


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,  # (numel + 1) // 2 uint8, two elements a byte, the first in the high nibble
    absmax_ptr,  # (ceil(numel / 64),) fp32, one scale per 64-element block of the flat weight
    code_ptr,  # (16,) fp32 NF4 code table
    out_ptr,  # (numel,) output, flat row-major (N, K)
    numel,  # N * K
    BLOCK_BYTES: tl.constexpr,  # packed bytes per program (2 * BLOCK_BYTES elements)
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    first = 2 * byte  # flat index of the high-nibble element
    q = tl.load(packed_ptr + byte, mask=first < numel, other=0).to(tl.int32)
    # A 64-block holds 32 whole bytes, so both nibbles of a byte share one absmax.
    scale = tl.load(absmax_ptr + first // _BLOCK, mask=first < numel, other=0.0)
    hi = tl.load(code_ptr + (q >> 4)) * scale
    lo = tl.load(code_ptr + (q & 15)) * scale
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK_BYTES,)).to(out_ptr.dtype.element_ty)
    offs = pid * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + offs, vals, mask=offs < numel)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Unpack a bitsandbytes NF4 weight of `shape` (N, K) into a dense `dtype` matrix.

    packed: uint8, (N*K + 1) // 2 bytes (any shape); absmax: fp32, one per 64 flattened elements,
    double quantization already expanded. Same values as kernels.reference.nf4_dequantize, bit
    for bit.
    """
    n, k = shape
    numel = n * k
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must hold {(numel + 1) // 2} uint8 bytes for shape {shape}")
    if absmax.numel() != -(-numel // NF4_BLOCKSIZE):
        raise ValueError(f"absmax must hold {-(-numel // NF4_BLOCKSIZE)} values for shape {shape}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    block = 2048  # bytes a program: 8 KiB of bf16 written, 2 KiB read
    _nf4_dequantize_kernel[(triton.cdiv(flat.numel(), block),)](
        flat.contiguous(),
        absmax.reshape(-1).float().contiguous(),
        nf4_code_table(packed.device),
        out,
        numel,
        BLOCK_BYTES=block,
        enable_fp_fusion=True,
    )
    return out
