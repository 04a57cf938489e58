"""Token embedding lookup whose table may live in pinned host memory.

    out[..., :] = table[tokens[...], :]          (reference: kernels.reference.embedding)

Llama-3-8B's input embedding is 128256 x 4096 bf16, 1.05 GB, of which a decode step reads one
row (8 KB) a token. Kept in page-locked host memory (the loader does this for untied embeddings
on CUDA), the GPU reads that row over the bus through its mapped address: a few microseconds
inside the CUDA graph, 1.05 GB less GPU memory. A prefill of T tokens reads T rows (8 KB each).
The same kernel serves a table in GPU memory. A token outside [0, V) gives a zero row (the
tokenizer and the sampler never produce one; a kernel in a graph cannot raise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _embedding_kernel(
    tok_ptr,  # (T,) int64 token ids
    table_ptr,  # (V, D) embedding rows, contiguous; GPU or mapped pinned host memory
    out_ptr,  # (T, D) on the GPU, the table's dtype
    V,  # vocabulary size
    D,  # embedding width
    BLOCK_D: tl.constexpr,  # elements a step of a row
):
    i = tl.program_id(0).to(tl.int64)
    tok = tl.load(tok_ptr + i)
    valid = (tok >= 0) & (tok < V)
    row = table_ptr + tl.where(valid, tok, 0) * D
    width = tl.where(valid, D, 0)  # elements read from the row: none for an invalid token
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        values = tl.load(row + d, mask=d < width, other=0.0)
        tl.store(out_ptr + i * D + d, values, mask=d < D)


def embedding(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[tokens] on the tokens' device, for a table on that device or in pinned host memory."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError("the embedding table must be a contiguous (V, D) matrix")
    if table.device != tokens.device and not table.is_pinned():
        raise ValueError(
            f"an embedding table on {table.device} must be in pinned memory to be read from the GPU"
        )
    flat = tokens.reshape(-1).to(torch.int64)
    v, d = table.shape
    out = torch.empty((flat.numel(), d), dtype=table.dtype, device=tokens.device)
    if flat.numel():
        _embedding_kernel[(flat.numel(),)](
            flat, table, out, v, d, BLOCK_D=min(triton.next_power_of_2(d), 4096), enable_fp_fusion=True
        )
    return out.reshape(*tokens.shape, d)
