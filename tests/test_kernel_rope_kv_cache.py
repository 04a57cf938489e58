"""The fused rope + KV-cache write against kernels.reference.rope_kv_cache (rope, then two cache
writes): the rotated q, and every cache entry, written or not, must match."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.rope import rope_kv_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "bsz, seq, hq, hk, d, slots, max_len",
    [(1, 1, 32, 8, 128, 1, 64), (3, 1, 9, 3, 64, 4, 40), (1, 7, 4, 2, 64, 2, 16), (2, 5, 6, 6, 32, 3, 9)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(bsz, seq, hq, hk, d, slots, max_len, dtype):
    gen = torch.Generator().manual_seed(bsz * 100 + seq)
    qkv = torch.randn(bsz, seq, (hq + 2 * hk) * d, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)  # views, as the model passes them
    q, k, v = (t.view(bsz, seq, -1, d) for t in (q, k, v))
    angles = torch.rand(bsz, seq, d // 2, generator=gen) * 100
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    rows = torch.randperm(slots, generator=gen)[:bsz].to(DEVICE)[:, None]
    starts = torch.randint(0, max_len - seq + 1, (bsz, 1), generator=gen)
    positions = (starts + torch.arange(seq)).to(DEVICE)
    cache = torch.randn(2, slots, hk, max_len, d, generator=gen).to(DEVICE, dtype)
    ours_k, ours_v = cache[0].clone(), cache[1].clone()
    ref_k, ref_v = cache[0].clone(), cache[1].clone()

    q_ours = rope_kv_cache(q, k, v, cos, sin, ours_k, ours_v, rows, positions)
    q_ref = reference.rope_kv_cache(q, k, v, cos, sin, ref_k, ref_v, rows, positions)

    # bf16 under the interpreter truncates instead of rounding: one bf16 step (see test_kernel_rope).
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(q_ours, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ours_k, ref_k, atol=tol, rtol=tol)
    assert torch.equal(ours_v, ref_v)  # v is copied, not computed
    untouched = torch.ones_like(ours_k, dtype=torch.bool)
    untouched[rows, :, positions] = False
    assert torch.equal(ours_k[untouched], cache[0][untouched])
