"""Rotary position embedding (HF rotate-half convention) for q and k in one Triton launch.

Forward (reference: kernels.reference.rope, i.e. transformers' apply_rotary_pos_emb), with
x = [x1, x2] the two halves of a head and c, s the token's cos/sin cast to x.dtype:

    out1 = x1 * c - x2 * s
    out2 = x2 * c + x1 * s

Each product is rounded to x.dtype before the sum is, as torch does in bf16/fp16, so the
result is bit for bit transformers' in every dtype.

Backward: the rotation is orthogonal, so the gradient is the rotation by the opposite angle,
i.e. the same kernel with s negated:

    dx1 = dout1 * c + dout2 * s
    dx2 = dout2 * c - dout1 * s

cos/sin are position tables, not parameters: they get no gradient.

One program takes one token (b, t) and rotates all of its q heads and then all of its k heads,
so cos/sin are read once per token and q and k need one launch. Strides are passed for every
operand (only the last dim must be contiguous), so q and k can be views into a fused qkv
projection output without a copy; outputs are fresh contiguous (B, T, H, D) tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _rotate_heads(
    x_ptr,  # first element of this token's heads in the input
    o_ptr,  # first element of this token's heads in the output
    stride_xh,  # elements between heads of the input
    stride_oh,  # elements between heads of the output
    c,  # (BLOCK_HALF,) fp32 cos of this token, already rounded to the input dtype
    s,  # (BLOCK_HALF,) fp32 sin of this token, rounded likewise (negated for the backward)
    H: tl.constexpr,  # number of heads
    HALF: tl.constexpr,  # head dim / 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    x_lo = x_ptr + heads * stride_xh + cols
    o_lo = o_ptr + heads * stride_oh + cols
    x1 = tl.load(x_lo, mask=mask, other=0.0)
    x2 = tl.load(x_lo + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    c = c[None, :]
    s = s[None, :]
    o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    tl.store(o_lo, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_lo + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotated_heads(ptr, heads, d, mask, c, s, HALF: tl.constexpr):
    """fp32 (rows of heads, D): whole heads at ptr + heads + d rotated as _rotate_heads does them
    in halves, x * c + rotate_half(x) * s, each product and the sum rounded to x's dtype (the
    caller's launch turns fp fusion off too); c, s: (1, D) cos and sin, fp32. For
    kernels/decode_attention.py, which needs the whole head in one tile for its dot."""
    x = tl.load(ptr + heads + d[None, :], mask=mask, other=0.0)
    other = tl.load(ptr + heads + ((d + HALF) % (2 * HALF))[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]  # rotate_half(x) = (-x2, x1)
    prod = (x.to(tl.float32) * c).to(dtype).to(tl.float32)
    rot = (other.to(tl.float32) * s).to(dtype).to(tl.float32)
    return (prod + sign * rot).to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(
    q_ptr,  # (B, T, HQ, D) queries, last dim contiguous
    k_ptr,  # (B, T, HK, D) keys, last dim contiguous
    qo_ptr,  # (B, T, HQ, D) out: rotated queries
    ko_ptr,  # (B, T, HK, D) out: rotated keys
    cos_ptr,  # (B, T, HALF) fp32 cos of each token's angles, last dim contiguous
    sin_ptr,  # (B, T, HALF) fp32 sin of each token's angles, last dim contiguous
    T,  # tokens per sequence: splits the program id into (b, t)
    sq_b, sq_t, sq_h,  # strides of q over batch, token, head
    sk_b, sk_t, sk_h,  # strides of k
    sqo_b, sqo_t, sqo_h,  # strides of the q output
    sko_b, sko_t, sko_h,  # strides of the k output
    sc_b, sc_t,  # strides of cos over batch, token (0 over a broadcast batch)
    ss_b, ss_t,  # strides of sin over batch, token
    v_ptr,  # (B, T, HK, D) values copied to vo_ptr (CACHE only)
    vo_ptr,  # value cache, addressed like the key output (CACHE only)
    sv_b, sv_t, sv_h,  # strides of v
    svo_h,  # head stride of the value cache (its row/position strides equal the key cache's)
    rows_ptr,  # (B,) int64 cache row of each sequence (CACHE only)
    pos_ptr,  # (B, T) int64 cache position of each token, contiguous (CACHE only)
    HQ: tl.constexpr,  # query heads
    HK: tl.constexpr,  # key heads
    HALF: tl.constexpr,  # head dim / 2
    BLOCK_HQ: tl.constexpr,  # power of two >= HQ
    BLOCK_HK: tl.constexpr,  # power of two >= HK
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
    BACKWARD: tl.constexpr,  # rotate by the opposite angle (the gradient)
    CACHE: tl.constexpr,  # write k and v into a KV cache at (rows[b], pos[b, t]) instead of (b, t)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    pdl.wait(PDL)
    pdl.release(PDL)
    b_out, t_out = b, t
    if CACHE:
        b_out = tl.load(rows_ptr + b)
        t_out = tl.load(pos_ptr + pid)
        for j in tl.static_range(0, 2):  # v is copied as two halves, like the rotated heads
            heads = tl.arange(0, BLOCK_HK)[:, None]
            cols = tl.arange(0, BLOCK_HALF)[None, :]
            mask = (heads < HK) & (cols < HALF)
            val = tl.load(v_ptr + b * sv_b + t * sv_t + heads * sv_h + j * HALF + cols, mask=mask)
            out = vo_ptr + b_out * sko_b + t_out * sko_t + heads * svo_h + j * HALF + cols
            tl.store(out, val, mask=mask)
    cols = tl.arange(0, BLOCK_HALF)
    # transformers casts the fp32 tables to the activations' dtype before multiplying.
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + b * sc_b + t * sc_t + cols, mask=cols < HALF, other=0.0)
    s = tl.load(sin_ptr + b * ss_b + t * ss_t + cols, mask=cols < HALF, other=0.0)
    c = c.to(dtype).to(tl.float32)
    s = s.to(dtype).to(tl.float32)
    if BACKWARD:
        s = -s
    _rotate_heads(
        q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, sq_h, sqo_h,
        c, s, HQ, HALF, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + b * sk_b + t * sk_t, ko_ptr + b_out * sko_b + t_out * sko_t, sk_h, sko_h,
        c, s, HK, HALF, BLOCK_HK, BLOCK_HALF,
    )  # fmt: skip


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool = False,
    cache: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation of q and k; returns new contiguous (q_out, k_out).

    q, k: (B, T, H, D) with any strides (a copy is made only if the last dim is strided);
    cos, sin: (B, T, D // 2) or (1, T, D // 2) float32. backward=True applies the inverse
    rotation, which is the gradient. With cache = (v, k_cache, v_cache, rows, positions) the
    rotated k and v go straight into the (slots, Hk, S, D) caches at (rows[b], :, positions[b, t])
    and k_out is the key cache.
    """
    if q.dtype != k.dtype:
        raise ValueError(f"rope needs q and k in one dtype, got {q.dtype} and {k.dtype}.")
    bsz, seq, hq, d = q.shape
    hk = k.shape[2]
    if d % 2 or k.shape[-1] != d or cos.shape[-1] != d // 2 or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}.")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos = _last_dim_contiguous(cos.float().expand(bsz, seq, d // 2))
    sin = _last_dim_contiguous(sin.float().expand(bsz, seq, d // 2))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cache is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        k_strides = (k_out.stride(0), k_out.stride(1), k_out.stride(2))
        v = v_out = rows = positions = q  # unused by the kernel
        v_strides, v_out_head = (0, 0, 0), 0
    else:
        v, k_out, v_out, rows, positions = cache
        v = _last_dim_contiguous(v)
        rows, positions = rows.reshape(bsz).contiguous(), positions.contiguous()
        k_strides = (k_out.stride(0), k_out.stride(2), k_out.stride(1))  # (row, position, head)
        v_strides, v_out_head = (v.stride(0), v.stride(1), v.stride(2)), v_out.stride(1)
    if bsz * seq > 0:
        half = d // 2
        # Tiles of up to 32 x 64 per half (Llama-3-8B's queries) need no more than 4 warps to
        # keep each thread at 16 values a half; larger tiles get 8.
        warps = 8 if triton.next_power_of_2(hq) * triton.next_power_of_2(half) > 2048 else 4
        use_pdl = pdl.pdl_enabled(q.device)
        _rope_kernel[(bsz * seq,)](
            q, k, q_out, k_out, cos, sin, seq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            *k_strides,
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            v, v_out, *v_strides, v_out_head, rows, positions,
            HQ=hq, HK=hk, HALF=half,
            BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_HALF=triton.next_power_of_2(half), BACKWARD=backward, CACHE=cache is not None,
            PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
            # Left on, fp fusion turns `round(x1*c) - round(x2*s)` into one fma that skips the
            # second rounding (seen in the sm_90 PTX: fma.rn.bf16), and the result drifts from
            # transformers'. Off, it is mul.rn + sub.rn, exactly torch's separate kernels.
            enable_fp_fusion=False,
        )  # fmt: skip
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_forward(dq_out, dk_out, cos, sin, backward=True)
        return dq, dk, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D); matches kernels.reference.rope."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, k, cos, sin)
    return rope_forward(q, k, cos, sin)


def rope_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Rotated q; rotated k and v written into the KV cache, all in one launch (inference only).

    Matches kernels.reference.rope_kv_cache: one launch instead of rope plus two cache writes.
    """
    return rope_forward(q, k, cos, sin, cache=(v, k_cache, v_cache, rows, positions))[0]
