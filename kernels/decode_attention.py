"""Attention of one new token per sequence over its KV cache (decode), GQA, in one launch.

    out[b, h] = softmax(q[b, h] . K[row_b, h // G, :n_b]^T / sqrt(D)) V[row_b, h // G, :n_b]

with n_b = positions[b] + 1 (the token sees itself and everything before it) and G = Hq / Hk
query heads per KV head. Reference: kernels.reference.decode_attention (SDPA with the causal
mask the model builds from positions).

Why: at batch 1 the library SDPA kernel costs ~8 us a layer on an H200 (cuDNN's flash kernel
tiled for prefill), 7% of a Llama-3-8B decode step. Here one program takes one (sequence, KV
head) pair and all G query heads that share it, so each K/V row is read once; it loops only
up to the row's own length, read from `positions` on the device, so a CUDA graph captured
for a long attention bucket still reads no more than the real context. Long contexts are split
over SPLITS programs per pair (flash-decoding); partial results are merged in a second small
kernel. Softmax is online in fp32 (running max m, sum denom), the output rounded once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import pdl

SPLIT_TOKENS = 512  # keys per program before the work is split (decode at 8k: 16 splits)


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # (B, Hq, D) queries of the new tokens, contiguous
    k_ptr,  # (slots, Hk, S, D) key cache
    v_ptr,  # (slots, Hk, S, D) value cache, same strides as the key cache
    pos_ptr,  # (B,) int64 position of each new token
    rows_ptr,  # (B,) int64 cache row of each sequence
    o_ptr,  # (B, Hq, D) output (SPLITS == 1) or (SPLITS, B, Hq, D) fp32 partial outputs
    ml_ptr,  # (SPLITS, B, Hq, 2) fp32 running max and sum of each split (SPLITS > 1)
    s_row, s_head, s_pos,  # cache strides (row, head, position); the last dim is contiguous
    B,  # number of sequences
    scale,  # 1 / sqrt(D), folded with log2(e) for exp2
    HQ: tl.constexpr,  # query heads
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # >= G and >= 16 (tl.dot's smallest tile); rows past G are masked
    D: tl.constexpr,  # head dim (a power of two)
    BLOCK_N: tl.constexpr,  # keys per loop step
    SPLITS: tl.constexpr,  # programs per (sequence, KV head)
    SPLIT_LEN: tl.constexpr,  # keys per split
    PRECISION: tl.constexpr,  # "ieee" for an fp32 cache; "tf32" for 16-bit ones (exact for fp16 inputs)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    pdl.wait(PDL)
    pdl.release(PDL)
    n = tl.load(pos_ptr + b) + 1
    row = tl.load(rows_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kv_head * G + g  # (BLOCK_G,)
    q = tl.load(q_ptr + (b * HQ + heads)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    base = row * s_row + kv_head * s_head
    start = split * SPLIT_LEN
    end = tl.minimum(n, start + SPLIT_LEN)
    for k0 in range(start, end, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        valid = keys < end
        offs = base + keys[:, None].to(tl.int64) * s_pos + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)  # (N, D)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G, N) on the tensor cores
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    hmask = (g < G)[:, None]
    if SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(
            o_ptr + (b * HQ + heads)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=hmask
        )
    else:  # an empty split (past the row's length) leaves m = -inf, denom = 0: the merge skips it
        part = (split * B + b) * HQ + heads
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=hmask)
        tl.store(ml_ptr + part * 2, m, mask=g < G)
        tl.store(ml_ptr + part * 2 + 1, denom, mask=g < G)


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


def decode_attention(
    q: torch.Tensor,  # (B, 1, Hq, D)
    k_cache: torch.Tensor,  # (slots, Hk, S, D)
    v_cache: torch.Tensor,
    positions: torch.Tensor,  # (B, 1) position of each new token
    slots: torch.Tensor | None,  # (B,) cache rows, or None for rows 0..B-1
    attn_len: int,  # a bound on positions + 1 (sets the number of splits)
    rows: torch.Tensor | None = None,  # (B, 1) or (B,) int64 cache rows, made once a step by the model
) -> torch.Tensor:
    """(B, 1, Hq * D) attention output; matches kernels.reference.decode_attention.

    `rows` spares the per-call index tensor (one launch a layer) when the caller has it already;
    without it the rows are `slots`, or 0..B-1.
    """
    bsz, _, hq, d = q.shape
    hk = k_cache.shape[1]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or d & (d - 1):
        raise ValueError("decode_attention needs like-strided caches and a power-of-two head dim.")
    if rows is None:
        rows = torch.arange(bsz, device=q.device) if slots is None else slots
    rows = rows.reshape(bsz)
    q = q.reshape(bsz, hq, d).contiguous()
    pos = positions.reshape(bsz).contiguous()
    out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    splits = max(1, math.ceil(attn_len / SPLIT_TOKENS))
    split_len = math.ceil(attn_len / splits)
    if splits == 1:
        part, ml = out, out  # the kernel writes the output directly; ml is unused
    else:
        part = torch.empty(splits, bsz, hq, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits, bsz, hq, 2, dtype=torch.float32, device=q.device)
    group = hq // hk
    use_pdl = pdl.pdl_enabled(q.device)
    scale = (1.0 / math.sqrt(d)) * 1.4426950408889634  # log2(e): the kernel uses exp2
    _decode_attention_kernel[(bsz, hk, splits)](
        q, k_cache, v_cache, pos, rows, part, ml,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bsz, scale,
        HQ=hq, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=64,
        SPLITS=splits, SPLIT_LEN=split_len, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=use_pdl, num_warps=4, launch_pdl=use_pdl, enable_fp_fusion=True,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(bsz * hq,)](
            part, ml, out, bsz * hq, D=d, SPLITS=splits, PDL=use_pdl, num_warps=1,
            launch_pdl=use_pdl, enable_fp_fusion=True,
        )  # fmt: skip
    return out.reshape(bsz, 1, hq * d)
