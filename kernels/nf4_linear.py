"""NF4 linear layers for decode: a fused GEMV over bitsandbytes' packed layout, LoRA fused.

    y = x W^T + lora_scale * (x A^T) B^T                           (nf4_linear)
    y = silu(g) * u,   [g, u] = the above with W = [W_gate; W_up]   (nf4_linear_swiglu)

References: kernels.reference.nf4_linear / nf4_linear_swiglu (peft LoRA over bitsandbytes'
Linear4bit). For x with at most GEMV_MAX_ROWS rows the GEMV below reads each packed byte and
absmax once and never writes the dequantized weight; with more rows, or a shape it does not
handle (K % 64 != 0, where blocks cross rows), it dequantizes and calls cuBLAS.

The GEMV views W as int32 words (8 nibbles, element 8w + 2i in the high nibble of byte i) and
works a tile of BN output features (BN gate + BN up rows for SwiGLU) at a time:

    acc[m, n] = sum_b absmax[n, b] * sum_{k in block b} NF4_CODE[q[n, k]] * x[m, k]     (fp32)

Each word is decoded by kernels.nf4.decode_words (per config: one warp shuffle a weight, exact
fp32, or half a load a weight from a shared byte table of fp16-rounded codes), an FMA chain a
word times its block's absmax goes to a per-word accumulator, reduced once per tile. The K loop
is software-pipelined (cp.async, tl.range num_stages), which also lands the x pairs in shared
memory in the layout the FMAs need (without it Triton converted x's layout every step, 18-22
barriers a step). With PERSISTENT a program walks a range of tiles in one flattened loop, so
the pipeline does not drain between tiles. LoRA: t = x A^T (r values) is one small kernel first,
then each tile adds lora_scale * B[n, :] . t in its epilogue; SwiGLU combines the gate and up
rows there too. All sums are fp32; y is rounded once to x's dtype.

Measured (bench/NOTES.md, H200, copy 4.25 TB/s): 40-46% of the copy bandwidth on the Llama
shapes against bitsandbytes' 23-24%. H100 (session 13): 54-62% on the large shapes; the byte
table and unmasked loads (EVEN) took 2.5% off the GEMV's time a decode step. A plain read with
the same tiles and pipeline streams at 75-85% of copy, so the loop's instructions and their
latency hold it, not the access pattern. Its cost grows with the rows of x (8 rows: 6.3x the
1-row time), so 3-8 rows run kernels.nf4_gemv_rows instead (W and x straight into registers,
FMAs). For any rows of fp16/bf16 x on sm_80 and later the tuner also weighs kernels.nf4_mma (the
decode into tensor-core operands; its cost barely grows with rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import nf4_mma, pdl
from kernels.nf4 import decode_words, nf4_dequantize
from kernels.nf4_gemv_rows import launch_gemv_rows, tile_rows
from kernels.nf4_gemv_rows import lora_t as sum_lora_t
from kernels.nf4_lora import lora_down
from kernels.nf4_mma_block import allow_table, lut_fill
from kernels.nf4_tune import CONFIGS as _CONFIGS
from kernels.nf4_tune import TUNED as _TUNED  # noqa: F401 (tests and bench.kernels force configs)
from kernels.nf4_tune import grid, interpreting, pick_config
from kernels.reference import NF4_BLOCKSIZE, nf4_code_table
from kernels.reference import swiglu as _swiglu_reference

GEMV_MAX_ROWS = 8


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
):  # fmt: skip
    """acc (MP, RB, BKW) += per word: absmax * sum of its 8 code * x products, words w0..
    EVEN: every tile row and K step is whole, so the weight loads need no masks (each masked
    cp.async cost ~4 integer instructions)."""
    NBLK: tl.constexpr = BKW // 8
    wcol = w0 + tl.arange(0, BKW)
    kmask = wcol < kw
    bcol = w0 // 8 + tl.arange(0, NBLK)
    if EVEN:
        w = tl.load(w_ptr + rows[:, None] * kw + wcol[None, :])
        scale = tl.load(absmax_ptr + rows[:, None] * kb + bcol[None, :])
        xmask = mmask
    else:
        wmask = rmask[:, None] & kmask[None, :]
        w = tl.load(w_ptr + rows[:, None] * kw + wcol[None, :], mask=wmask, other=0)
        bmask = rmask[:, None] & (bcol < kb)[None, :]
        scale = tl.load(absmax_ptr + rows[:, None] * kb + bcol[None, :], mask=bmask, other=0.0)
        xmask = mmask & kmask[None, :]
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
    word_scale = tl.reshape(tl.broadcast_to(scale[:, :, None], scale.shape + (8,)), w.shape)
    return acc + s * word_scale[None, :, :]


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
    absmax_ptr,  # (N, K // 64) fp32 block scales
    code_ptr,  # (16,) fp32 code table, fp16-rounded for a LUT config (interpreter decode only)
    lut_ptr,  # (256,) int32 byte table of fp16 code pairs (nf4_mma_block.lut_words; DECODE 2 only)
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
    NUM_STAGES: tl.constexpr,  # software pipeline depth of the loop
    PERSISTENT: tl.constexpr,  # a program walks a range of tiles in one pipelined loop
    PDL: tl.constexpr,  # programmatic dependent launch; x was written two kernels back if R > 0
):
    RB: tl.constexpr = BN * (1 + SWIGLU)
    pid = tl.program_id(0)
    # With LoRA the down-projection runs just before and has read x after its own wait: the
    # weight stream starts now, alongside it, and waits only for t (kernels/pdl.py, rule 2).
    if R == 0:
        pdl.wait(PDL)
        pdl.release(PDL)
    if DECODE == 2:
        lane = lut_fill(lut_ptr, tl.zeros((1, 1), tl.int32))
    else:
        lane = tl.zeros((1, 1), tl.int32)
    xm = tl.arange(0, MP)
    xrow = (xm * stride_xm)[:, None]
    yrow = (xm * stride_ym)[:, None]
    mmask = (xm < M)[:, None]
    acc = tl.zeros((MP, RB, BKW), dtype=tl.float32)
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
                ks * BKW, kw, kb, BKW, X_KIND, DECODE, EVEN,
            )  # fmt: skip
            if ks == steps - 1:
                _gemv_epilogue(
                    acc, n, rows, rmask, xm, M, mmask, yrow, t_ptr, T_SPLITS, b_ptr, y_ptr,
                    N_OUT, lora_scale, MP, R, RP, TSP, BN, SWIGLU, PDL,
                )  # fmt: skip
                acc = tl.zeros((MP, RB, BKW), dtype=tl.float32)
        pdl.wait(PDL)  # every program waits, even one without a tile (kernels/pdl.py, rule 1)
    else:
        n, rows, rmask = tile_rows(pid, N_OUT, BN, SWIGLU)
        for w0 in tl.range(0, kw, BKW, num_stages=NUM_STAGES):
            acc = _gemv_step(
                acc, x_ptr, w_ptr, absmax_ptr, code_ptr, lane, rows, rmask, xrow, mmask,
                w0, kw, kb, BKW, X_KIND, DECODE, EVEN,
            )  # fmt: skip
        _gemv_epilogue(
            acc, n, rows, rmask, xm, M, mmask, yrow, t_ptr, T_SPLITS, b_ptr, y_ptr, N_OUT,
            lora_scale, MP, R, RP, TSP, BN, SWIGLU, PDL,
        )  # fmt: skip


def _uses_table(cfg: tuple) -> bool:
    """Whether a 1-2 row config decodes through the fp16 byte table (its last field)."""
    return cfg[0] != "mma" and len(cfg) == 6 and cfg[5] == 1


def _gemv_supported(x2: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Shapes the GEMV handles: few rows, whole 64-blocks per weight row, word-aligned bytes."""
    n, k = shape
    return (
        0 < x2.shape[0] <= GEMV_MAX_ROWS
        and k % NF4_BLOCKSIZE == 0
        and n > 0
        and x2.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and packed.dtype == torch.uint8
        and packed.is_contiguous()
        and packed.data_ptr() % 16 == 0
        and (x2.is_cuda or interpreting())
    )


def _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, swiglu, lora_t=None):
    n, k = shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    if swiglu and n % 2:
        raise ValueError(f"a gate/up weight needs an even number of rows, got {n}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    x2 = x.reshape(-1, k)
    if lora_t is not None and (lora_a is None or lora_t.shape[1:] != (x2.shape[0], lora_a.shape[0])):
        raise ValueError("lora_t must be x A^T's partial sums (chunks, rows of x, rank) for lora_a")
    n_out = n // 2 if swiglu else n
    if not _gemv_supported(x2, packed, shape):
        y = F.linear(x2, nf4_dequantize(packed, absmax, shape, x.dtype))
        if lora_a is not None:
            down = F.linear(x2, lora_a) if lora_t is None else lora_t.sum(0).to(x.dtype)
            y = y + F.linear(down, lora_b) * lora_scale
        if swiglu:
            y = _swiglu_reference(*y.chunk(2, dim=-1))
        return y.reshape(*x.shape[:-1], n_out)

    m = x2.shape[0]
    mp = triton.next_power_of_2(m)
    if not x2.is_contiguous() or x2.data_ptr() % 8:  # int32 pairs, int64 for the MMA kernel
        x2 = x2.clone(memory_format=torch.contiguous_format)
    x_kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x2.dtype]
    xv = x2 if x_kind == 0 else x2.view(torch.int32)
    words = packed.reshape(-1).view(torch.int32)  # little-endian: byte i of a word is bits 8i..8i+7
    scales = absmax.reshape(-1).float().contiguous()
    rank = 0 if lora_a is None else lora_a.shape[0]
    b = lora_b.contiguous() if rank else scales
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    code = nf4_code_table(x.device)
    use_pdl = pdl.pdl_enabled(x.device)
    # The down-projection launches last, right before the GEMV, which reads x while it runs;
    # or the RMSNorm before has computed it (kernels.rmsnorm_lora.rms_norm_lora_down, PDL off only).
    if rank and lora_t is not None and use_pdl:
        raise ValueError("lora_t with PDL on: the GEMV would read x before the kernel writing it ends")
    t = (lora_down(x2, lora_a, use_pdl) if lora_t is None else lora_t.contiguous()) if rank else scales

    def launch(cfg, words=words, scales=scales):  # the tuner passes copies of the weight
        if cfg[0] == "mma":
            nf4_mma.launch_mma(
                cfg[1:], x2.view(torch.int64), words.view(torch.int64), scales, t if rank else None,
                b if rank else None, y, m, n_out, k, lora_scale, x_kind, swiglu, interpreting(), use_pdl,
            )  # fmt: skip
            return
        if mp > 2:
            launch_gemv_rows(
                cfg, xv, words, scales, code, t if rank else None, b if rank else None, y, m,
                n_out, k, lora_scale, x_kind, swiglu, interpreting(), use_pdl,
            )  # fmt: skip
            return
        bn, bkw, warps, stages, per_sm, lut = cfg
        codes, table = code, scales
        if lut:  # codes rounded to fp16: the byte table (GPU), the rounded code table (interpreter)
            codes = nf4_mma.code_table(torch.float16, x.device)
            table = nf4_mma.byte_table(torch.float16, x.device)
        args = (
            xv, words, scales, codes, table, t, b, y,
            m, t.shape[0] if rank else 0, n_out, k // 8, k // NF4_BLOCKSIZE, xv.stride(0),
            y.stride(0), float(lora_scale),
        )  # fmt: skip
        consts = dict(
            MP=mp, R=rank, RP=triton.next_power_of_2(max(rank, 1)),
            TSP=triton.next_power_of_2(t.shape[0] if rank else 1), BN=bn, BKW=bkw,
            X_KIND=x_kind, SWIGLU=swiglu, DECODE=0 if interpreting() else 1 + lut,
            EVEN=n_out % bn == 0 and (k // 8) % bkw == 0,
            NUM_STAGES=stages, PERSISTENT=per_sm > 0, PDL=use_pdl, num_warps=warps,
            launch_pdl=use_pdl, enable_fp_fusion=True,
        )  # fmt: skip
        programs = (grid(cfg, n_out, x.device),)
        if consts["DECODE"] == 2:  # the byte table's static shared memory, next to Triton's
            allow_table(_nf4_gemv_kernel, programs, args, consts, x.device)
        _nf4_gemv_kernel[programs](*args, **consts)

    # the LoRA rank as the kernels compile it (rounded up to a power of two; 0: none)
    key = (x.device, n_out, k, mp, x.dtype, swiglu, triton.next_power_of_2(rank) if rank else 0)
    mma = x_kind > 0 and (interpreting() or nf4_mma.supported(x.device))  # 16-bit x, sm_80+
    byte_table = x_kind > 0  # fp32 x keeps exact fp32 codes: no fp16 byte table (nor tensor cores)
    candidates = [c for c in _CONFIGS[mp] if (mma or c[0] != "mma") and (byte_table or not _uses_table(c))]
    launch(pick_config(key, n_out, k // 8, mp, launch, candidates, (words, scales)))
    return y.reshape(*x.shape[:-1], n_out)


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + lora_scale * (x A^T) B^T for the NF4 weight W of `shape` (N, K).

    Same arguments as kernels.reference.nf4_linear: x (..., K); packed uint8 in bitsandbytes'
    layout; absmax fp32, one per 64 flattened elements; lora_a (r, K) and lora_b (N, r) in x's
    dtype, or both None. lora_t: x A^T already computed, as fp32 partial sums (chunks, rows of
    x, r) (kernels.rmsnorm_lora.rms_norm_lora_down); None: computed here. Graph-capturable once each
    shape has been called outside capture.
    """
    return _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, False, lora_t)


def nf4_linear_swiglu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(g) * u where [g, u] = nf4_linear(x, ...) split in halves: W is gate stacked on up.

    shape is (2I, K); lora_b (2I, r2) stacked the same way; lora_t as for nf4_linear. Output
    (..., I). Same semantics as kernels.reference.nf4_linear_swiglu.
    """
    return _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, True, lora_t)
