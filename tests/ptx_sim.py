"""A small simulator of the PTX the NF4 GEMVs emit (kernels/nf4_mma_block.py, kernels/nf4_mma_lora.py
and the byte-table decode of kernels/nf4.py), so that CI runs the exact instruction strings a GPU
runs, on 32 lanes.

The interpreter path of those kernels emulates what the PTX computes; this runs the PTX itself:
the byte-table fill, the lane offsets, the table addressing and the MMA fragments. Only the
subset the kernels use: mov (32-bit, and a 64- or 32-bit value split into a pair), cvt.f32.f16,
shl / shr / and / or / add / mad.lo on 32 bits, setp.ne / selp (predicates as registers; %tid.x a
lane's given thread index), ld.shared.b32 and st.shared.v4.b32 on a
byte-addressed shared array (the table symbol nf4lut at TABLE_ADDRESS: on sm_90 a CTA's first 1 KB
of shared memory is reserved, so that is where the table sits, not at a 32 KB boundary),
mma.sync.aligned.m16n8k16.row.col.f32 with f16 or bf16 operands (products and sums in fp64,
fragments as the PTX ISA lays them out), fma.rn.f32 (in fp64), and the packed fp16
pair ops mul.rn.f16x2 / fma.rn.f16x2 (each half exact in fp64, then rounded to fp16 once),
add.rn.f16 and cvt.rn.f16x2.f32. Registers are per lane; %laneid is the lane's index.
"""

from __future__ import annotations

import re
import struct

import numpy as np

M32 = 0xFFFFFFFF
TABLE_ADDRESS = 0x400  # where ptxas put nf4lut (SASS: UMOV UR4, 0x400), after the reserved 1 KB


def half_to_float(bits: int, kind: str) -> float:
    """A 16-bit pattern as fp16 ("f16") or bf16 ("bf16")."""
    if kind == "f16":
        return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def float_to_half_bits(v: float) -> int:
    """fp32/fp64 value -> fp16 bits, round to nearest even (inf past fp16's range)."""
    return int(np.array(v, dtype=np.float64).astype(np.float16).view(np.uint16))


def _pairs(op, *operands: int) -> int:
    """A packed fp16 pair op on 32-bit registers, half by half (low half first)."""
    out = 0
    for e in range(2):
        values = [half_to_float(v >> 16 * e, "f16") for v in operands]
        out |= float_to_half_bits(op(*values)) << 16 * e
    return out


def _statements(ptx: str) -> list[str]:
    keep = []
    for line in ptx.replace("\\n", "\n").split("\n"):
        line = line.strip().rstrip(";")
        if line and line not in "{}" and not line.startswith((".reg", ".shared")):
            keep.append(line)
    return keep


def _operands(rest: str) -> list[str]:
    return [a.strip() for a in re.split(r",(?![^{]*\})", rest)]


def _group(text: str) -> list[str]:
    return [s.strip() for s in text.strip().strip("{}").split(",")]


def run(ptx: str, lanes: list[dict], smem: bytearray, kind: str = "bf16") -> list[dict]:
    """Run ptx on 32 lanes (lanes[l]: register name -> value, "$i" for the asm's operands);
    returns the lanes' registers after it. smem is read and written in place."""
    regs = [dict(r) for r in lanes]

    def value(lane: int, token: str):
        token = token.strip()
        if token in regs[lane]:
            return regs[lane][token]
        if token == "%laneid":
            return lane
        if token == "%tid.x":  # the lane's thread in its program: lanes[l]["%tid.x"], or the lane
            return regs[lane].get("%tid.x", lane)
        if token == "nf4lut":
            return TABLE_ADDRESS
        if token.startswith("0f"):
            return struct.unpack(">f", bytes.fromhex(token[2:]))[0]
        return int(token, 0)

    for line in _statements(ptx):
        op, rest = line.split(None, 1)
        args = _operands(rest)
        if op.startswith("mma.sync.aligned.m16n8k16.row.col.f32"):
            _mma(regs, [_group(a) for a in args], value, kind)
            continue
        for lane in range(32):
            r = regs[lane]
            if op == "mov.b64":
                lo, hi = _group(args[0])
                v = value(lane, args[1])
                r[lo], r[hi] = v & M32, (v >> 32) & M32
            elif op == "mov.b32" and args[0].startswith("{"):  # a 32-bit value split into 16-bit halves
                lo, hi = _group(args[0])
                v = value(lane, args[1])
                r[lo], r[hi] = v & 0xFFFF, (v >> 16) & 0xFFFF
            elif op in ("mov.u32", "mov.b32", "mov.f32"):
                r[args[0]] = value(lane, args[1])
            elif op == "cvt.f32.f16":
                r[args[0]] = half_to_float(value(lane, args[1]), "f16")
            elif op == "shl.b32":
                r[args[0]] = (value(lane, args[1]) << value(lane, args[2])) & M32
            elif op == "shr.u32":
                r[args[0]] = (value(lane, args[1]) & M32) >> value(lane, args[2])
            elif op == "and.b32":
                r[args[0]] = value(lane, args[1]) & value(lane, args[2])
            elif op == "or.b32":
                r[args[0]] = value(lane, args[1]) | value(lane, args[2])
            elif op == "add.u32":
                r[args[0]] = (value(lane, args[1]) + value(lane, args[2])) & M32
            elif op == "mad.lo.u32":
                r[args[0]] = (value(lane, args[1]) * value(lane, args[2]) + value(lane, args[3])) & M32
            elif op == "setp.ne.u32":  # predicates are registers holding a bool
                r[args[0]] = value(lane, args[1]) != value(lane, args[2])
            elif op == "selp.b32":
                r[args[0]] = value(lane, args[1]) if r[args[3]] else value(lane, args[2])
            elif op == "ld.shared.b32":
                address = value(lane, args[1].strip("[]"))
                assert address % 4 == 0 and 0 <= address < len(smem), address
                r[args[0]] = int.from_bytes(smem[address : address + 4], "little")
            elif op == "st.shared.v4.b32":
                address = value(lane, args[0].strip("[]"))
                assert address % 16 == 0 and 0 <= address < len(smem), address
                words = [value(lane, v) & M32 for v in _group(args[1])]
                smem[address : address + 16] = b"".join(w.to_bytes(4, "little") for w in words)
            elif op == "fma.rn.f32":
                r[args[0]] = value(lane, args[1]) * value(lane, args[2]) + value(lane, args[3])
            elif op == "mul.rn.f16x2":
                r[args[0]] = _pairs(lambda a, b: a * b, value(lane, args[1]), value(lane, args[2]))
            elif op == "fma.rn.f16x2":
                operands = [value(lane, a) for a in args[1:4]]
                r[args[0]] = _pairs(lambda a, b, c: a * b + c, *operands)
            elif op == "add.rn.f16":  # 16-bit registers (halves split off by mov.b32 {l, h})
                a, b = (half_to_float(value(lane, v), "f16") for v in args[1:3])
                r[args[0]] = float_to_half_bits(a + b)
            elif op == "cvt.rn.f16x2.f32":  # d = {a (high half), b (low half)}
                hi, lo = value(lane, args[1]), value(lane, args[2])
                r[args[0]] = float_to_half_bits(lo) | float_to_half_bits(hi) << 16
            else:
                raise ValueError(f"not simulated: {line}")
    return regs


def fill_table(ptx: str, warps: int, smem: bytearray) -> None:
    """Run a program's byte-table fill (kernels.nf4_mma_block.lut_fill_ptx for `warps` warps) warp
    by warp, each lane with its %tid.x."""
    for w in range(warps):
        run(ptx, [{"%tid.x": 32 * w + lane} for lane in range(32)], smem, "f16")


def _mma(regs, groups, value, kind) -> None:
    """One warp-wide m16n8k16: lane (g, t) holds A[g, 2t + e] (a0), A[g + 8, 2t + e] (a1),
    A[g, 2t + 8 + e] (a2), A[g + 8, 2t + 8 + e] (a3), B[2t + e, g] (b0), B[2t + 8 + e, g] (b1),
    C / D rows g (c0, c1) and g + 8 (c2, c3) at columns 2t, 2t + 1; e is the register's half."""
    d, a, b, c = groups
    A = [[0.0] * 16 for _ in range(16)]
    B = [[0.0] * 8 for _ in range(16)]
    C = [[0.0] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        av = [value(lane, x) for x in a]
        bv = [value(lane, x) for x in b]
        cv = [value(lane, x) for x in c]
        for e in range(2):
            A[g][2 * t + e] = half_to_float(av[0] >> 16 * e, kind)
            A[g + 8][2 * t + e] = half_to_float(av[1] >> 16 * e, kind)
            A[g][2 * t + 8 + e] = half_to_float(av[2] >> 16 * e, kind)
            A[g + 8][2 * t + 8 + e] = half_to_float(av[3] >> 16 * e, kind)
            B[2 * t + e][g] = half_to_float(bv[0] >> 16 * e, kind)
            B[2 * t + 8 + e][g] = half_to_float(bv[1] >> 16 * e, kind)
        C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1] = cv
    D = [[sum(A[i][k] * B[k][j] for k in range(16)) + C[i][j] for j in range(8)] for i in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out = (D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1])
        for name, v in zip(d, out):
            regs[lane][name] = v
