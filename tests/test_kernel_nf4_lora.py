"""kernels/nf4_lora.py: the LoRA down-projection's fp32 partial sums against x A^T in fp64.

Each program sums one K chunk of one rank index; the chunks together must give x A^T (the
GEMV's epilogue adds them, tests/test_kernel_nf4_linear.py checks that end to end). Odd K
(a partial last chunk), several rows, every activation dtype. CPU: TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.nf4_lora import LORA_BLOCK_K, lora_down  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, k, rank", [(1, 64, 1), (3, 1000, 5), (8, 2 * LORA_BLOCK_K + 7, 16)])
def test_partial_sums_add_up_to_x_a_t(rows, k, rank, dtype):
    g = torch.Generator(device="cpu").manual_seed(rows * k + rank)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    a = (torch.randn(rank, k, generator=g) / k**0.5).to(DEVICE, dtype)
    partials = lora_down(x, a, use_pdl=False)
    assert partials.shape == (-(-k // LORA_BLOCK_K), rows, rank) and partials.dtype == torch.float32
    want = x.double() @ a.double().T
    torch.testing.assert_close(partials.double().sum(0), want, atol=1e-5, rtol=1e-5)
    # each partial is its own chunk's sum, not a running total
    first = x[:, :LORA_BLOCK_K].double() @ a[:, :LORA_BLOCK_K].double().T
    torch.testing.assert_close(partials[0].double(), first, atol=1e-5, rtol=1e-5)


def test_strided_rows_of_x():
    x = torch.randn(4, 2 * 300).to(DEVICE)[:, :300]  # rows 600 apart
    a = torch.randn(3, 300).to(DEVICE)
    torch.testing.assert_close(lora_down(x, a, use_pdl=False).sum(0), x @ a.T, atol=1e-4, rtol=1e-4)
