"""Attention of one new token per sequence over its KV cache (decode), GQA, in one launch.

    out[b, h] = softmax(q[b, h] . K[row_b, h // G, :n_b]^T / sqrt(D)) V[row_b, h // G, :n_b]

with n_b = positions[b] + 1 (the token sees itself and everything before it) and G = Hq / Hk
query heads per KV head. Reference: kernels.reference.decode_attention (SDPA with the causal
mask the model builds from positions).

rope_decode_attention is a layer's whole decode attention in that one launch: it takes the new
token's q, k and v as the q/k/v projection wrote them, rotates q and k (kernels/rope.py's
arithmetic: each product and the sum rounded to the activations' dtype), writes k and v into the
cache, and hands the output projection's GEMV its LoRA down-projection t = out A^T as partial
sums, one a KV head (kernels.nf4_lora's format; unsplit contexts and small ranks). Reference:
kernels.reference.rope_decode_attention. On an H100 a Llama-3-8B layer's rope, attention and
LoRA down-projection took 7.63 us in three launches and take 5.64 in this one at 128 positions
(at 1,024, split, with lora_down after it: 18.66 and 16.36; CUDA-graph replay, bench/NOTES.md).

Why: at batch 1 the library SDPA kernel costs ~8 us a layer on an H200 (cuDNN's flash kernel
tiled for prefill), 7% of a Llama-3-8B decode step. Here one program takes one (sequence, KV
head) pair and all G query heads that share it, so each K/V row is read once; it loops only
up to the row's own length, read from `positions` on the device, so a CUDA graph captured
for a long attention bucket still reads no more than the real context. Long contexts are split
over SPLITS programs per pair (flash-decoding); partial results are merged in a second small
kernel (kernels/attention_merge.py). Softmax is online in fp32 (running max m, sum denom), the
output rounded once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import nf4_lora, pdl, rope
from kernels.attention_merge import merge_splits

SPLIT_TOKENS = 512  # keys per program before the work is split (decode at 8k: 16 splits)
# Elements of A a program holds through its loop for the LoRA partials: Llama-3-8B's 4 heads x 16
# ranks x 128. Larger slices spilled registers (25 KB of spill stores at 8 heads x 64 ranks,
# sm_90); the output projection computes its own x A^T then.
LORA_A_ELEMENTS = 8192


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # (B, Hq, D) queries of the new tokens (unrotated if ROPE), rows stride_qb apart
    k_ptr,  # (slots, Hk, S, D) key cache
    v_ptr,  # (slots, Hk, S, D) value cache, same strides as the key cache
    pos_ptr,  # (B,) int64 position of each new token
    rows_ptr,  # (B,) int64 cache row of each sequence
    o_ptr,  # (B, Hq, D) output (SPLITS == 1) or (SPLITS, B, Hq, D) fp32 partial outputs
    ml_ptr,  # (SPLITS, B, Hq, 2) fp32 running max and sum of each split (SPLITS > 1)
    kn_ptr,  # (B, Hk, D) the new tokens' keys, unrotated, rows stride_nb apart (ROPE)
    vn_ptr,  # (B, Hk, D) their values, rows stride_nb apart (ROPE)
    cos_ptr,  # (B, D / 2) fp32 cos of each new token's angles (ROPE)
    sin_ptr,  # (B, D / 2) fp32 sin (ROPE)
    a_ptr,  # (R, Hq * D) the output projection's LoRA A, x's dtype (R > 0)
    t_ptr,  # (Hk, B, R) fp32 out: partial sums of out A^T, one a KV head (R > 0; SPLITS == 1)
    s_row, s_head, s_pos,  # cache strides (row, head, position); the last dim is contiguous
    stride_qb,  # elements between rows of q
    stride_nb,  # elements between rows of kn and vn
    B,  # number of sequences
    scale,  # 1 / sqrt(D), folded with log2(e) for exp2
    HQ: tl.constexpr,  # query heads
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # >= G and >= 16 (tl.dot's smallest tile); rows past G are masked
    GP: tl.constexpr,  # G rounded up to a power of two
    D: tl.constexpr,  # head dim (a power of two)
    BLOCK_N: tl.constexpr,  # keys per loop step
    SPLITS: tl.constexpr,  # programs per (sequence, KV head)
    SPLIT_LEN: tl.constexpr,  # keys per split
    PRECISION: tl.constexpr,  # "ieee" for an fp32 cache; "tf32" for 16-bit ones (exact for fp16 inputs)
    ROPE: tl.constexpr,  # rotate q and the new k, write the new k and v into the cache first
    R: tl.constexpr,  # LoRA rank of the output projection, 0 for no t
    RP: tl.constexpr,  # R rounded up to a power of two
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
    hmask = (g < G)[:, None]
    base = row * s_row + kv_head * s_head
    start = split * SPLIT_LEN
    end = tl.minimum(n, start + SPLIT_LEN)
    if ROPE:
        HALF: tl.constexpr = D // 2
        dtype = q_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + b * HALF + d % HALF).to(dtype).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + b * HALF + d % HALF).to(dtype).to(tl.float32)[None, :]
        q = rope.rotated_heads(q_ptr + b * stride_qb, heads[:, None] * D, d, hmask, cos, sin, HALF)
        new = b * stride_nb + kv_head * D
        k_new = rope.rotated_heads(
            kn_ptr + new, tl.zeros((1, 1), tl.int64), d, d[None, :] < D, cos, sin, HALF
        )
        # The split that holds the new position writes it, then reads it back in its loop: the
        # barrier orders its threads' stores before their loads.
        last = n - 1 + 0 * d[None, :]  # (1, D): the new position (a mask the interpreter takes)
        own = (start <= last) & (last < end)
        slot = base + last * s_pos + d[None, :]
        tl.store(k_ptr + slot, k_new.to(k_ptr.dtype.element_ty), mask=own)
        tl.store(v_ptr + slot, tl.load(vn_ptr + new + d[None, :]), mask=own)
        tl.debug_barrier()
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * D + d[None, :], mask=hmask, other=0.0)
        q = q.to(tl.float32)
    if R > 0:  # (SPLITS == 1) this program's share of the output projection's x A^T
        a = nf4_lora.lora_a_heads(a_ptr, kv_head * G, G, GP, HQ, D, R, RP)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
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
    if SPLITS == 1:
        out = (acc / denom[:, None]).to(o_ptr.dtype.element_ty)
        cols = heads[:, None] * D + d[None, :]
        tl.store(o_ptr + b * HQ * D + cols, out, mask=hmask)
        if R > 0:
            nf4_lora.lora_partial_heads(out.to(tl.float32), a, t_ptr + (kv_head * B + b) * R, R)
    else:  # an empty split (past the row's length) leaves m = -inf, denom = 0: the merge skips it
        part = (split * B + b) * HQ + heads
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=hmask)
        tl.store(ml_ptr + part * 2, m, mask=g < G)
        tl.store(ml_ptr + part * 2 + 1, denom, mask=g < G)


def _attend(q, k_cache, v_cache, positions, rows, attn_len, new=None, lora_a=None):
    """The launches behind both public functions: (out (B, 1, Hq * D), t or None). new: None, or
    (k, v, cos, sin) of the new tokens for ROPE."""
    bsz, _, hq, d = q.shape
    hk = k_cache.shape[1]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or d & (d - 1):
        raise ValueError("decode_attention needs like-strided caches and a power-of-two head dim.")
    rows = rows.reshape(bsz)
    if q.stride(-1) != 1 or q.stride(-2) != d:
        q = q.contiguous()
    pos = positions.reshape(bsz).contiguous()
    out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    splits = max(1, math.ceil(attn_len / SPLIT_TOKENS))
    split_len = math.ceil(attn_len / splits)
    if splits == 1:
        part, ml = out, out  # the kernel writes the output directly; ml is unused
    else:
        part = torch.empty(splits, bsz, hq, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits, bsz, hq, 2, dtype=torch.float32, device=q.device)
    kn = vn = cos = sin = out  # unused without ROPE
    if new is not None:
        kn, vn, cos, sin = new
        if kn.stride() != vn.stride() or kn.stride(-1) != 1 or kn.stride(-2) != d:
            kn, vn = kn.contiguous(), vn.contiguous()
        cos, sin = (c.float().reshape(bsz, d // 2).contiguous() for c in (cos, sin))
    rank = 0 if lora_a is None or splits > 1 else lora_a.shape[0]  # t for unsplit contexts only
    t = None
    if rank:
        t = torch.empty((hk, bsz, rank), dtype=torch.float32, device=q.device)
        lora_a = lora_a.contiguous()
    group, rank_p2 = hq // hk, triton.next_power_of_2(max(rank, 1))
    use_pdl = pdl.pdl_enabled(q.device)
    scale = (1.0 / math.sqrt(d)) * 1.4426950408889634  # log2(e): the kernel uses exp2
    _decode_attention_kernel[(bsz, hk, splits)](
        q, k_cache, v_cache, pos, rows, part, ml, kn, vn, cos, sin,
        out if lora_a is None else lora_a, out if t is None else t,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q.stride(0), kn.stride(0), bsz, scale,
        HQ=hq, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), GP=triton.next_power_of_2(group),
        D=d, BLOCK_N=64,
        SPLITS=splits, SPLIT_LEN=split_len, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROPE=new is not None, R=rank, RP=rank_p2, PDL=use_pdl, num_warps=4,
        launch_pdl=use_pdl, enable_fp_fusion=new is None,
    )  # fmt: skip
    if splits > 1:
        merge_splits(part, ml, out, use_pdl)
    return out.reshape(bsz, 1, hq * d), t


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
    if rows is None:
        rows = torch.arange(q.shape[0], device=q.device) if slots is None else slots
    return _attend(q, k_cache, v_cache, positions, rows, attn_len)[0]


def rope_decode_attention(
    q: torch.Tensor,  # (B, 1, Hq, D) unrotated, heads contiguous (a view of the q/k/v output)
    k: torch.Tensor,  # (B, 1, Hk, D) the new tokens' keys, unrotated
    v: torch.Tensor,  # (B, 1, Hk, D) their values
    cos: torch.Tensor,  # (B, 1, D / 2) fp32 cos of each new token's angles
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # (slots, Hk, S, D)
    v_cache: torch.Tensor,
    positions: torch.Tensor,  # (B, 1) position of each new token
    rows: torch.Tensor,  # (B, 1) or (B,) int64 cache row of each sequence
    attn_len: int,  # a bound on positions + 1
    lora_a: torch.Tensor | None = None,  # (r, Hq * D) the output projection's LoRA A, or None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out (B, 1, Hq * D), t): rope, the cache write and decode attention in one launch (two
    past SPLIT_TOKENS), and t = out A^T as fp32 partial sums (Hk, B, r) for the output
    projection (kernels.nf4_linear's lora_t), or None, where the projection computes its own:
    no lora_a, or one it cannot take (another dtype or width, rank 0), a slice of A too large to
    hold in registers through the attention loop (LORA_A_ELEMENTS), a context split over
    programs, or PDL on (the GEMV would read out before its wait; kernels/pdl.py). Matches
    kernels.reference.rope_decode_attention."""
    d, hq, hk = q.shape[-1], q.shape[2], k_cache.shape[1]
    dtypes = {q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1 or d % 2:
        raise ValueError("rope_decode_attention needs q, k, v and the caches in one dtype, an even D.")
    if lora_a is not None and (
        lora_a.dim() != 2
        or lora_a.shape[0] == 0
        or lora_a.shape[1] != hq * d
        or lora_a.dtype != q.dtype
        or triton.next_power_of_2(hq // hk) * triton.next_power_of_2(lora_a.shape[0]) * d > LORA_A_ELEMENTS
        or pdl.pdl_enabled(q.device)
    ):
        lora_a = None
    return _attend(q, k_cache, v_cache, positions, rows, attn_len, (k[:, 0], v[:, 0], cos, sin), lora_a)
