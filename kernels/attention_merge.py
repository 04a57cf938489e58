"""The second launch of a split decode attention (flash-decoding): each split's partial result
merged into the output.

kernels/decode_attention.py splits a long context over SPLITS programs per (sequence, KV head);
each leaves its unnormalised output, running maximum m and sum of exponentials (base 2). Here one
program a (sequence, query head) rescales each split by 2^(m_i - m) against the largest m, adds
outputs and sums, and divides once: the softmax over the whole context. A split past the
row's length (m = -inf, sum 0) adds nothing. Reference: kernels.reference.decode_attention, which
tests/test_kernel_decode_attention.py holds the split path to (contexts past SPLIT_TOKENS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # (SPLITS, B, Hq, D) fp32 unnormalised partial outputs
    ml_ptr,  # (SPLITS, B, Hq, 2) fp32 max and sum of each split
    o_ptr,  # (B, Hq, D) output
    BH,  # B * Hq: distance between splits, in (sequence, head) pairs
    D: tl.constexpr,  # head dim
    SPLITS: tl.constexpr,  # number of splits
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    bh = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    pdl.wait(PDL)
    pdl.release(PDL)
    m = tl.full((1,), float("-inf"), tl.float32)
    for i in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(ml_ptr + (i * BH + bh) * 2 + tl.arange(0, 1)))
    denom = tl.zeros((1,), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for i in tl.static_range(SPLITS):
        mi = tl.load(ml_ptr + (i * BH + bh) * 2 + tl.arange(0, 1))
        w = tl.where(mi == float("-inf"), 0.0, tl.exp2(mi - m))  # (1,)
        denom += w * tl.load(ml_ptr + (i * BH + bh) * 2 + 1 + tl.arange(0, 1))
        acc += tl.sum(w) * tl.load(part_ptr + (i * BH + bh) * D + d)
    tl.store(o_ptr + bh * D + d, (acc / tl.sum(denom)).to(o_ptr.dtype.element_ty))


def merge_splits(part: torch.Tensor, ml: torch.Tensor, out: torch.Tensor, use_pdl: bool) -> None:
    """out (B, Hq, D) = the splits of part (SPLITS, B, Hq, D) fp32 merged with their maxima and
    sums ml (SPLITS, B, Hq, 2) fp32; one launch, PDL as the attention kernel before it."""
    splits, bsz, hq, d = part.shape
    _merge_splits_kernel[(bsz * hq,)](
        part, ml, out, bsz * hq, D=d, SPLITS=splits, PDL=use_pdl, num_warps=1,
        launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip
