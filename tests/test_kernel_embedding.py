"""kernels/embedding.py (token embedding lookup, table on the GPU or in pinned host memory).

Against kernels.reference.embedding (F.embedding): a lookup copies rows, so every dtype must
match bit for bit. On CPU the kernel runs under TRITON_INTERPRET=1; the GPU-marked test reads a
pinned host table from the GPU, as the loader arranges for untied embeddings on CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import compile_for_hopper  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.embedding import embedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, dim, tokens", [(50, 64, (1, 1)), (7, 123, (2, 5)), (300, 4100, (3,))])
def test_matches_reference_exactly(dtype, vocab, dim, tokens):
    g = torch.Generator().manual_seed(vocab + dim)
    table = torch.randn(vocab, dim, generator=g).to(DEVICE, dtype)
    ids = torch.randint(0, vocab, tokens, generator=g).to(DEVICE)
    ours = embedding(ids, table)
    assert ours.shape == (*tokens, dim) and ours.dtype == dtype
    assert torch.equal(ours, reference.embedding(ids, table))


def test_out_of_range_token_gives_a_zero_row_and_no_tokens_give_nothing():
    table = torch.randn(10, 8, device=DEVICE)
    out = embedding(torch.tensor([[3, 10, -1]], device=DEVICE), table)
    assert torch.equal(out[0, 0], table[3])
    assert not out[0, 1:].any()
    assert embedding(torch.zeros(0, 1, dtype=torch.long, device=DEVICE), table).shape == (0, 1, 8)


def test_rejects_a_table_it_cannot_read():
    with pytest.raises(ValueError, match="contiguous"):
        embedding(torch.zeros(1, dtype=torch.long, device=DEVICE), torch.randn(8, 10, device=DEVICE).T)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="pinned"):
            embedding(torch.zeros(1, dtype=torch.long, device="cuda"), torch.randn(8, 10))


def test_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from kernels.embedding import _embedding_kernel\n"
        "sig = dict(tok_ptr='*i64', table_ptr='*bf16', out_ptr='*bf16', V='i32', D='i32')\n"
        "src = ASTSource(_embedding_kernel, sig, dict(BLOCK_D=4096))\n"
        "triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})\n"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reads_a_pinned_host_table_from_the_gpu_inside_a_graph():
    table = torch.randn(1000, 4096, dtype=torch.bfloat16).pin_memory()
    ids = torch.tensor([[5]], device="cuda")
    embedding(ids, table)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = embedding(ids, table)
    for token in (0, 999, 123):
        ids.fill_(token)
        graph.replay()
        assert torch.equal(out[0, 0].cpu(), table[token])
