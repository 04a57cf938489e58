"""Decode attention (one new token per sequence, GQA, split over long contexts) against the
reference: SDPA with the causal mask over the cache rows; and the fused rope + cache write +
attention + LoRA down-projection against the same ops one after another."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_for_hopper

from kernels import reference
from kernels.decode_attention import LORA_A_ELEMENTS, SPLIT_TOKENS, decode_attention, rope_decode_attention
from kernels.rope import rope_kv_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize(
    "bsz, hq, hk, d, slots, attn_len, use_slots",
    [
        (1, 32, 8, 128, 1, 96, False),  # Llama-3-8B heads
        (3, 9, 3, 64, 4, 70, True),  # SmolLM2 heads, rows out of order
        (2, 4, 4, 64, 2, 33, False),  # no grouping, a length that is no tile multiple
        (2, 8, 2, 32, 3, SPLIT_TOKENS + 37, True),  # split over two programs, merged
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(bsz, hq, hk, d, slots, attn_len, use_slots, dtype):
    gen = torch.Generator().manual_seed(attn_len + bsz)
    q = torch.randn(bsz, 1, hq, d, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(slots, hk, attn_len + 5, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(slots, hk, attn_len + 5, d, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, attn_len, (bsz, 1), generator=gen)
    positions[0, 0] = attn_len - 1  # one row uses the whole bound
    positions = positions.to(DEVICE)
    rows = torch.randperm(slots, generator=gen)[:bsz].to(DEVICE) if use_slots else None
    ours = decode_attention(q, k_cache, v_cache, positions, rows, attn_len)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), positions, rows, attn_len)
    assert ours.shape == (bsz, 1, hq * d) and ours.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), ref, atol=tol, rtol=tol)


def test_reads_nothing_past_each_rows_position():
    """Poisoned keys and values past a row's position must not change its output."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 1, 4, 64, generator=gen).to(DEVICE)
    k_cache = torch.randn(2, 2, 64, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(2, 2, 64, 64, generator=gen).to(DEVICE)
    positions = torch.tensor([[10], [40]], device=DEVICE)
    clean = decode_attention(q, k_cache, v_cache, positions, None, 64)
    k_cache[0, :, 11:] = float("nan")
    v_cache[1, :, 41:] = float("inf")
    assert torch.equal(decode_attention(q, k_cache, v_cache, positions, None, 64), clean)


@pytest.mark.parametrize(
    "bsz, hq, hk, d, slots, attn_len, rank",
    [
        (1, 32, 8, 128, 1, 96, 16),  # Llama-3-8B heads, LoRA r16
        (3, 9, 3, 64, 4, 70, 5),  # SmolLM2 heads, rows out of order, an odd rank
        (2, 4, 4, 64, 2, 33, 0),  # no grouping, no LoRA
        (2, 8, 2, 32, 3, SPLIT_TOKENS + 37, 4),  # split over two programs (the projection's own t)
        (2, 9, 3, 64, 2, 2 * SPLIT_TOKENS + 20, 0),  # three splits, a group of 3
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_decode_attention_matches_the_ops_it_fuses(bsz, hq, hk, d, slots, attn_len, rank, dtype):
    gen = torch.Generator().manual_seed(attn_len * 7 + bsz)
    qkv = torch.randn(bsz, 1, (hq + 2 * hk) * d, generator=gen).to(DEVICE, dtype)
    q, k, v = (t.view(bsz, 1, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    angles = torch.rand(bsz, 1, d // 2, generator=gen) * 100
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    cache = torch.randn(2, slots, hk, attn_len + 5, d, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, attn_len, (bsz, 1), generator=gen)
    positions[0, 0] = attn_len - 1  # one row uses the whole bound (its last split writes)
    positions[-1, 0] = 5  # another the first split's (the later ones are empty)
    positions = positions.to(DEVICE)
    rows = torch.randperm(slots, generator=gen)[:bsz].to(DEVICE)[:, None]
    lora_a = (torch.randn(rank, hq * d, generator=gen) / d).to(DEVICE, dtype) if rank else None
    ours_k, ours_v, ref_k, ref_v = cache[0].clone(), cache[1].clone(), cache[0].clone(), cache[1].clone()

    out, t = rope_decode_attention(q, k, v, cos, sin, ours_k, ours_v, positions, rows, attn_len, lora_a)
    ref_out, ref_t = reference.rope_decode_attention(
        q, k, v, cos, sin, ref_k, ref_v, positions, rows, attn_len, lora_a
    )

    tol = TOLERANCE[dtype]
    assert torch.equal(ours_v, ref_v)  # v is copied, not computed
    # the rotated k: kernels/rope.py's arithmetic, bit for bit (each product rounded: fp fusion
    # off), and the reference's up to the interpreter's bf16 truncation (test_kernel_rope)
    rope_k, rope_v = cache[0].clone(), cache[1].clone()
    rope_kv_cache(q, k, v, cos, sin, rope_k, rope_v, rows, positions)
    assert torch.equal(ours_k, rope_k)
    torch.testing.assert_close(ours_k, ref_k, atol=tol, rtol=tol)
    untouched = torch.ones_like(ours_k, dtype=torch.bool)
    untouched[rows[:, 0], :, positions[:, 0]] = False
    assert torch.equal(ours_k[untouched], cache[0][untouched])
    assert out.shape == (bsz, 1, hq * d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    if not rank:
        assert t is None
        return
    if attn_len > SPLIT_TOKENS:  # split: the output projection computes its own x A^T
        assert t is None
        return
    assert t.shape == (hk, bsz, rank) and t.dtype == torch.float32
    # t is out A^T from our own out (as stored), summed over its partials
    want = out.reshape(bsz, -1).float() @ lora_a.float().T
    torch.testing.assert_close(t.sum(0), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.sum(0), ref_t.sum(0), atol=20 * tol, rtol=20 * tol)


def test_rope_decode_attention_leaves_t_to_the_projection_when_it_cannot_take_a():
    """A of another dtype or width, rank 0, or a slice too large for registers: no t (the
    projection computes its own x A^T)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, h, 32, generator=gen).to(DEVICE) for h in (4, 2, 2))
    cos, sin = torch.ones(1, 1, 16, device=DEVICE), torch.zeros(1, 1, 16, device=DEVICE)
    cache = torch.zeros(2, 1, 2, 8, 32, device=DEVICE)
    pos, rows = torch.tensor([[3]], device=DEVICE), torch.tensor([[0]], device=DEVICE)
    too_many = LORA_A_ELEMENTS // (2 * 32) * 2  # ranks: 2 heads a group x 32 dims
    for a in (
        torch.randn(4, 128, dtype=torch.float16),
        torch.randn(4, 96),
        torch.randn(0, 128),
        torch.randn(too_many, 128),
    ):
        out, t = rope_decode_attention(q, k, v, cos, sin, cache[0], cache[1], pos, rows, 8, a.to(DEVICE))
        assert t is None and out.shape == (1, 1, 128)
    with pytest.raises(ValueError, match="one dtype"):
        rope_decode_attention(q.half(), k, v, cos, sin, cache[0], cache[1], pos, rows, 8)


# The interpreter accepts what the compiler may reject: compile both kernels for sm_90 here too.
_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.attention_merge import _merge_splits_kernel
from kernels.decode_attention import _decode_attention_kernel

target = GPUTarget("cuda", 90, 32)
sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", rows_ptr="*i64", o_ptr="*bf16",
           ml_ptr="*fp32", kn_ptr="*bf16", vn_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", a_ptr="*bf16",
           t_ptr="*fp32", s_row="i64", s_head="i64", s_pos="i64", stride_qb="i32", stride_nb="i32", B="i32",
           scale="fp32")
for splits, rope, rank in ((1, False, 0), (4, False, 0), (1, True, 16), (4, True, 0)):
    const = dict(HQ=32, G=4, BLOCK_G=16, GP=4, D=128, BLOCK_N=64, SPLITS=splits, SPLIT_LEN=512,
                 PRECISION="tf32", ROPE=rope, R=rank, RP=16, PDL=False)
    sig["o_ptr"] = "*bf16" if splits == 1 else "*fp32"
    triton.compile(ASTSource(_decode_attention_kernel, sig, const), target=target,
                   options={"num_warps": 4, "enable_fp_fusion": not rope})
merge = dict(part_ptr="*fp32", ml_ptr="*fp32", o_ptr="*bf16", BH="i32")
const = dict(D=128, SPLITS=4, PDL=True)
triton.compile(ASTSource(_merge_splits_kernel, merge, const), target=target, options={"num_warps": 1})
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)
