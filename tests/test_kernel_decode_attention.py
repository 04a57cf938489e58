"""Decode attention (one new token per sequence, GQA, split over long contexts) against the
reference: SDPA with the causal mask over the cache rows."""

from __future__ import annotations

import pytest
import torch
from helpers import compile_for_hopper

from kernels import reference
from kernels.decode_attention import SPLIT_TOKENS, decode_attention

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


# The interpreter accepts what the compiler may reject: compile both kernels for sm_90 here too.
_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.decode_attention import _decode_attention_kernel, _merge_splits_kernel

target = GPUTarget("cuda", 90, 32)
sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", rows_ptr="*i64", o_ptr="*bf16",
           ml_ptr="*fp32", s_row="i64", s_head="i64", s_pos="i64", B="i32", scale="fp32")
for splits in (1, 4):
    const = dict(HQ=32, G=4, BLOCK_G=16, D=128, BLOCK_N=64, SPLITS=splits, SPLIT_LEN=512, PRECISION="tf32",
                 PDL=True)
    sig["o_ptr"] = "*bf16" if splits == 1 else "*fp32"
    triton.compile(ASTSource(_decode_attention_kernel, sig, const), target=target, options={"num_warps": 4})
merge = dict(part_ptr="*fp32", ml_ptr="*fp32", o_ptr="*bf16", BH="i32")
const = dict(D=128, SPLITS=4, PDL=True)
triton.compile(ASTSource(_merge_splits_kernel, merge, const), target=target, options={"num_warps": 1})
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)
