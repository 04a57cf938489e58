"""Linear layers: NF4 (bitsandbytes' layout) or dense, each with an optional unmerged LoRA.

NF4 weights keep bitsandbytes' packed bytes exactly (blocksize 64, two values a byte, first in
the high nibble). The double-quantized statistics are expanded once at load to one float32
absmax per block, computed the way bitsandbytes' dequantize_4bit does (code2[q] * absmax2 +
offset in fp32), so the dequantized weight is bit-identical and no GPU tensor (the offset) has
to be read on the host inside a captured decode step. The cost is 4 bytes per 64 weights instead
of ~1. On a GPU with 16-bit activations the layer also keeps absmax rounded to fp16
(half_absmax), which the decode GEMVs read instead: 2 bytes a block, 4.4% fewer bytes a decoded
token on Llama-3-8B (GEMV time -3.6%, a step -2.6% on an H100: bench/NOTES.md, session 16), for
0.22 GB more GPU memory. The dequantization (prefill chunks of more than 8 tokens) keeps the
exact fp32 absmax.

Projections that read the same input are stacked along N at load (q/k/v into one, gate/up into
one), so decode issues one launch per group. Stacking is exact: with K a multiple of 64 every
NF4 block lies inside one row, so concatenating packed bytes and absmax keeps the layout valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.ops import Ops

NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double quantization of absmax


@dataclass
class LoRAWeights:
    """One adapter on one (possibly stacked) projection: y += scale * (x A^T) B^T."""

    a: torch.Tensor  # (r, K)
    b: torch.Tensor  # (N, r)
    scale: float


def expand_absmax(
    absmax_q: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: float
) -> torch.Tensor:
    """Undo bitsandbytes' double quantization: absmax[i] = code2[q[i]] * absmax2[i // 256] + offset."""
    n = absmax_q.numel()
    scale = absmax2.float().repeat_interleave(ABSMAX_BLOCKSIZE)[:n]
    return code2.float()[absmax_q.reshape(-1).long()] * scale + offset


def half_absmax(absmax: torch.Tensor) -> torch.Tensor | None:
    """absmax rounded to fp16 for the decode GEMVs (kernels.nf4_linear's absmax_half), or None
    where a scale would overflow fp16. Relative error 2^-11 a scale (scales below 2^-14 lose
    precision to fp16's subnormals, an absolute error of 2^-25 at most), the size of the fp16
    rounding the GEMVs already apply to the codes."""
    if absmax.numel() and not bool(absmax.abs().max() <= torch.finfo(torch.float16).max):
        return None
    return absmax.to(torch.float16)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize like bitsandbytes' Linear4bit (nf4, blocksize 64, double quant).

    Returns (packed uint8 (N*K/2,), absmax float32 (N*K/64,)).
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    absmax = expand_absmax(state.absmax, state.state2.code, state.state2.absmax, float(state.offset))
    return packed.reshape(-1), absmax


class LoRALinear(nn.Module):
    """Shared by the dense and NF4 layers: shape bookkeeping and the active adapter."""

    def __init__(self, in_features: int, out_features: int, ops: Ops):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ops = ops
        self.lora: LoRAWeights | None = None

    def lora_args(self) -> tuple:
        lora = self.lora
        return () if lora is None else (lora.a, lora.b, lora.scale)

    def fused_lora_a(self) -> torch.Tensor | None:
        """The adapter's A if the op before this layer may compute x A^T for it (handed back as
        lora_t: the RMSNorm, Ops.rms_norm_lora_down, or decode attention, Ops.rope_decode_attention);
        None: this layer computes its LoRA itself."""
        return None


class NF4Linear(LoRALinear):
    """y = x dequant(W)^T (+ LoRA); W held as bitsandbytes NF4 bytes and expanded absmax."""

    def __init__(self, in_features: int, out_features: int, ops: Ops):
        super().__init__(in_features, out_features, ops)
        n = in_features * out_features
        self.register_buffer("packed", torch.empty((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax", torch.empty(-(-n // NF4_BLOCKSIZE), dtype=torch.float32))
        # absmax in fp16 for the GPU's decode GEMVs (half_absmax; set by the loader), or None; a
        # buffer, so that whatever moves absmax moves it too
        self.register_buffer("absmax16", None, persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def fused_lora_a(self) -> torch.Tensor | None:
        return None if self.lora is None else self.lora.a

    def forward(self, x: torch.Tensor, lora_t: torch.Tensor | None = None) -> torch.Tensor:
        """lora_t: x A^T from the op before (fused_lora_a), or None."""
        lora = self.lora_args()
        return self.ops.nf4_linear(
            x, self.packed, self.absmax, self.shape, *lora, lora_t=lora_t, absmax_half=self.absmax16
        )

    def forward_swiglu(self, x: torch.Tensor, lora_t: torch.Tensor | None = None) -> torch.Tensor:
        """For a stacked gate/up weight: silu(gate) * up in one launch."""
        lora = self.lora_args()
        return self.ops.nf4_linear_swiglu(
            x, self.packed, self.absmax, self.shape, *lora, lora_t=lora_t, absmax_half=self.absmax16
        )

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.ops.nf4_dequantize(self.packed, self.absmax, self.shape, dtype)


class DenseLinear(LoRALinear):
    """An unquantized projection (quantize="none"), with the same LoRA as NF4Linear."""

    def __init__(self, in_features: int, out_features: int, ops: Ops, dtype: torch.dtype):
        super().__init__(in_features, out_features, ops)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor, lora_t: None = None) -> torch.Tensor:
        """lora_t is always None here: fused_lora_a() is None, cuBLAS computes x A^T."""
        y = F.linear(x, self.weight)
        if self.lora is not None:
            y = y + F.linear(F.linear(x, self.lora.a), self.lora.b) * self.lora.scale
        return y

    def forward_swiglu(self, x: torch.Tensor, lora_t: None = None) -> torch.Tensor:
        gate, up = self(x).chunk(2, dim=-1)
        return self.ops.swiglu(gate, up)


def make_linear(
    in_features: int, out_features: int, ops: Ops, quantized: bool, dtype: torch.dtype
) -> LoRALinear:
    if quantized:
        return NF4Linear(in_features, out_features, ops)
    return DenseLinear(in_features, out_features, ops, dtype)
