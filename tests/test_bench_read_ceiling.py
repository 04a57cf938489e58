"""bench/read_ceiling.py: the read-only kernel reads every word once, whatever the block shape.

A ceiling that skipped or repeated words would misstate the floor under the GEMVs' times, so the
XOR of its per-program results must equal the buffer's XOR (a skipped word or one read twice
changes it for random words), for sizes that are and are not multiples of a program's words.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import read_ceiling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", read_ceiling.VARIANTS + [(64, 3, 1)])
@pytest.mark.parametrize("numel", [1, 16384, 16384 * 3 + 77])
def test_read_covers_every_word_once(variant, numel):
    g = torch.Generator().manual_seed(numel)
    src = torch.randint(-(2**31), 2**31 - 1, (numel,), dtype=torch.int32, generator=g).to(DEVICE)
    out = torch.full((numel // 64 + 2,), 12345, dtype=torch.int32, device=DEVICE)
    got = read_ceiling.read_xor(src, out, variant)
    block, iters, _ = variant
    assert got.numel() == -(-numel // (block * iters))
    assert read_ceiling.xor_all(got) == read_ceiling.xor_all(src)
