"""NF4 linear layers for decode: a fused GEMV over bitsandbytes' packed layout, LoRA fused.

    y = x W^T + lora_scale * (x A^T) B^T                           (nf4_linear)
    y = silu(g) * u,   [g, u] = the above with W = [W_gate; W_up]   (nf4_linear_swiglu)

References: kernels.reference.nf4_linear / nf4_linear_swiglu (peft LoRA over bitsandbytes'
Linear4bit). For x with at most GEMV_MAX_ROWS rows a GEMV reads each packed byte and absmax once
and never writes the dequantized weight; with more rows, or a shape none handles (K % 64 != 0,
where blocks cross rows), this dequantizes and calls cuBLAS.

Which GEMV: 1-2 rows kernels.nf4_gemv (FMAs, W staged through shared memory), 3-8 rows
kernels.nf4_gemv_rows (W and x straight into registers), and for 16-bit x on sm_80 and later any
row count may go to kernels.nf4_mma (the decode into tensor-core operands; its cost barely grows
with rows). kernels.nf4_tune times each shape's candidates once and keeps the fastest. LoRA: t =
x A^T (r values) is one small kernel first (kernels.nf4_lora), or comes from the RMSNorm before
(kernels.rmsnorm_lora); each GEMV tile adds lora_scale * B[n, :] . t in its epilogue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from kernels import nf4_mma, pdl
from kernels.nf4 import nf4_dequantize
from kernels.nf4_gemv import launch_gemv, uses_half, uses_table
from kernels.nf4_gemv_rows import launch_gemv_rows
from kernels.nf4_lora import lora_down
from kernels.nf4_tune import CONFIGS as _CONFIGS
from kernels.nf4_tune import TUNED as _TUNED  # noqa: F401 (tests and bench.kernels force configs)
from kernels.nf4_tune import interpreting, pick_config
from kernels.reference import NF4_BLOCKSIZE, nf4_code_table
from kernels.reference import swiglu as _swiglu_reference

GEMV_MAX_ROWS = 8


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


def _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, swiglu, lora_t=None, absmax_half=None):
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
    # fp16 block scales (half the bytes) where the layer keeps them, for 16-bit x only: fp32 x
    # keeps exact codes and scales
    scales = absmax_half if absmax_half is not None and x_kind > 0 else absmax.float()
    scales = scales.reshape(-1).contiguous()
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
        launch_gemv(
            cfg, xv, words, scales, code, t if rank else None, b if rank else None, y, m, n_out, k,
            lora_scale, x_kind, swiglu, interpreting(), use_pdl,
        )  # fmt: skip

    # the LoRA rank as the kernels compile it (rounded up to a power of two; 0: none)
    key = (x.device, n_out, k, mp, x.dtype, swiglu, triton.next_power_of_2(rank) if rank else 0, scales.dtype)
    mma = x_kind > 0 and (interpreting() or nf4_mma.supported(x.device))  # 16-bit x, sm_80+
    byte_table = x_kind > 0  # fp32 x keeps exact fp32 codes: no fp16 byte table (nor tensor cores)
    # fp16 products (uses_half) convert x with cvt.rn.f16x2.f32: sm_80+, like the MMA kernel
    candidates = [
        c for c in _CONFIGS[mp]
        if (mma or c[0] != "mma") and (byte_table or not uses_table(c)) and (mma or not uses_half(c))
    ]  # fmt: skip
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
    absmax_half: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + lora_scale * (x A^T) B^T for the NF4 weight W of `shape` (N, K).

    Same arguments as kernels.reference.nf4_linear: x (..., K); packed uint8 in bitsandbytes'
    layout; absmax fp32, one per 64 flattened elements; lora_a (r, K) and lora_b (N, r) in x's
    dtype, or both None. lora_t: x A^T already computed, as fp32 partial sums (chunks, rows of
    x, r) (kernels.rmsnorm_lora.rms_norm_lora_down); None: computed here. absmax_half: absmax
    rounded to fp16 (model.quant.half_absmax), which the GEMVs read instead for 16-bit x (half
    the bytes of the scales, relative error 2^-11 on each); None: they read absmax. More rows
    than a GEMV takes dequantize with the exact absmax. Graph-capturable once each shape has
    been called outside capture.
    """
    return _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, False, lora_t, absmax_half)


def nf4_linear_swiglu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_t: torch.Tensor | None = None,
    absmax_half: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(g) * u where [g, u] = nf4_linear(x, ...) split in halves: W is gate stacked on up.

    shape is (2I, K); lora_b (2I, r2) stacked the same way; lora_t as for nf4_linear. Output
    (..., I); absmax_half as for nf4_linear. Same semantics as kernels.reference.nf4_linear_swiglu.
    """
    return _nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, True, lora_t, absmax_half)
