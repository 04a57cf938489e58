"""Sampling with top-k (up to TOP_K_MAX) and top-p on the GPU in three launches, no host sync.

Reference: model.sampling.sampling_weights then model.sampling.draw (the PyTorch path, CPU and
large k). The weights are transformers' top-k then top-p filter's softmax, with the tokens tied
at a cut sharing what it keeps of their value:

    kth    = the k-th largest score;  kept = {s >= kth}  (every tie of the k-th)
    top-p  drops, in ascending order, the kept tokens whose cumulative probability is <= 1 - p,
           never the largest: values below a cut score go, above it stay, and of the n tokens
           at it n - d stay, each of the n weighted (n - d) / n
    token  = argmax_i w_i / E_i,  w_i = exp(s_i - max s) (times the share at the cut),
           E_i ~ Exp(1) from Philox: the exponential race, a draw from w / sum(w)

1. `_chunk_top_kernel`, a program a chunk of CHUNK scores: its KP (k rounded up to a power of
   two) largest, sorted. Every one of the row's k largest is among its chunk's KP largest, so
   the k-th largest of all the chunks' is the row's k-th score, exactly.
2. `_cut_kernel`, a program a row: sorts the chunks' candidates, takes the k-th score, counts
   its ties over the row, and runs top-p over the KP largest (each value's smaller mass as a
   KP x KP masked sum; the k-th score's entries stand for all its ties): the cut and the share.
3. `_race_kernel`, a program a chunk: weights, the race, each chunk's best; torch takes the
   best chunk (two small launches).

On the CPU and GPU alike the reference took a whole-vocabulary sort or top-k (torch: 22 to 68
small kernels, 170-220 us a token for a 128,256-token vocabulary on an H100); here the sorts are
of 2,048 and KP x chunks values inside three launches (bench/NOTES.md, session 18).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOP_K_MAX = 64  # the largest top-k taken here (KP x KP sums in one program's registers)
CHUNK = 2048  # scores a first-pass program sorts


@triton.jit
def _first(sorted_values, KP: tl.constexpr):
    """The first KP entries of a 1-D tensor whose length is a multiple of KP."""
    rows = tl.reshape(sorted_values, (sorted_values.shape[0] // KP, KP))
    at_first = tl.arange(0, sorted_values.shape[0] // KP)[:, None] == 0
    return tl.max(tl.where(at_first, rows, float("-inf")), axis=0)


@triton.jit
def _chunk_top_kernel(
    scores_ptr,  # (B, V) fp32 scores: logits after the repetition penalty and the temperature
    top_ptr,  # (B, NC, KP) fp32 out: each chunk's KP largest scores, descending
    V,  # vocabulary size
    NC,  # chunks a row, cdiv(V, CHUNK)
    stride_s,  # elements between rows of scores
    CHUNK: tl.constexpr,  # scores a program
    KP: tl.constexpr,  # top-k rounded up to a power of two
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(scores_ptr + row * stride_s + offs, mask=offs < V, other=float("-inf"))
    top = _first(tl.sort(x, descending=True), KP)
    tl.store(top_ptr + (row * NC + chunk) * KP + tl.arange(0, KP), top)


@triton.jit
def _cut_kernel(
    scores_ptr,  # (B, V) fp32 scores
    top_ptr,  # (B, NC, KP) fp32: _chunk_top_kernel's candidates
    cut_ptr,  # (B, 3) fp32 out: the largest score, the cut score, the share kept at the cut
    V,  # vocabulary size
    NC,  # chunks a row
    stride_s,  # elements between rows of scores
    k,  # top-k, 1 <= k <= KP
    drop,  # 1 - top_p: the cumulative probability top-p drops up to
    KP: tl.constexpr,  # k rounded up to a power of two
    NCP: tl.constexpr,  # NC rounded up to a power of two
    BLOCK: tl.constexpr,  # scores a step of the tie count
):
    row = tl.program_id(0)
    i = tl.arange(0, NCP * KP)
    candidates = tl.load(top_ptr + row * NC * KP + i, mask=i < NC * KP, other=float("-inf"))
    top = _first(tl.sort(candidates, descending=True), KP)  # the row's KP largest, descending
    idx = tl.arange(0, KP)
    kth = tl.max(tl.where(idx == k - 1, top, float("-inf")))
    peak = tl.max(tl.where(idx == 0, top, float("-inf")))
    ties = tl.zeros((BLOCK,), tl.int32)  # the k-th score's count in the row
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(scores_ptr + row * stride_s + offs, mask=offs < V, other=float("nan"))
        ties += (x == kth).to(tl.int32)
    ties_all = tl.sum(ties)
    valid = top >= kth
    at_kth = top == kth
    unit = tl.exp(top - peak)  # a token's weight
    mass = tl.where(valid, unit * tl.where(at_kth, ties_all / tl.sum(at_kth.to(tl.int32)), 1.0), 0.0)
    # for each value: the mass of the smaller kept values, and how many tokens hold it
    below = tl.sum(tl.where(top[None, :] < top[:, None], mass[None, :], 0.0), axis=1)
    same = tl.sum(((top[None, :] == top[:, None]) & valid[None, :]).to(tl.float32), axis=1)
    count = tl.where(at_kth, ties_all.to(tl.float32), same)
    room = drop * tl.sum(mass) - below
    fits = tl.floor(room / tl.where(unit > 0, unit, 1.0))  # tokens of this value the drop covers
    dropped = tl.where(unit > 0, tl.minimum(tl.maximum(fits, 0.0), count), count)
    dropped = tl.where(top == peak, tl.minimum(dropped, count - 1), dropped)  # keep the largest
    kept = tl.where(valid, (count - dropped) / tl.maximum(count, 1.0), 0.0)
    cut = tl.min(tl.where(kept > 0, top, float("inf")))
    share = tl.max(tl.where(top == cut, kept, 0.0))
    tl.store(cut_ptr + row * 3, peak)
    tl.store(cut_ptr + row * 3 + 1, cut)
    tl.store(cut_ptr + row * 3 + 2, share)


@triton.jit
def _race_kernel(
    scores_ptr,  # (B, V) fp32 scores
    cut_ptr,  # (B, 3) fp32: _cut_kernel's largest score, cut and share
    seed_ptr,  # (1,) int64: the Philox seed of this draw
    best_ptr,  # (B, NR) fp32 out: each chunk's largest w / E
    where_ptr,  # (B, NR) int64 out: its token (the first on a tie)
    V,  # vocabulary size
    NR,  # chunks a row, cdiv(V, BLOCK)
    stride_s,  # elements between rows of scores
    BLOCK: tl.constexpr,  # scores a program
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(scores_ptr + row * stride_s + offs, mask=offs < V, other=float("-inf"))
    peak, cut = tl.load(cut_ptr + row * 3), tl.load(cut_ptr + row * 3 + 1)
    share = tl.load(cut_ptr + row * 3 + 2)
    w = tl.exp(x - peak) * tl.where(x > cut, 1.0, tl.where(x == cut, share, 0.0))
    u = tl.rand(tl.load(seed_ptr), row.to(tl.int64) * V + offs)  # [0, 1): -log(u) ~ Exp(1)
    key = tl.where(offs < V, w / -tl.log(u), -1.0)
    best = tl.argmax(key, axis=0)
    tl.store(best_ptr + row * NR + chunk, tl.max(key, axis=0))
    tl.store(where_ptr + row * NR + chunk, chunk.to(tl.int64) * BLOCK + best)


def cut_scores(scores: torch.Tensor, top_k: int, top_p: float, chunk: int = CHUNK) -> torch.Tensor:
    """(B, 3) fp32: each row's largest score, the cut score and the share of its tokens kept
    (launches 1 and 2; 1 <= top_k <= TOP_K_MAX, top_k < V; scores (B, V) fp32, contiguous)."""
    rows, v = scores.shape
    kp = max(triton.next_power_of_2(top_k), 2)
    nc = triton.cdiv(v, chunk)
    top = torch.empty(rows, nc, kp, device=scores.device, dtype=torch.float32)
    cut = torch.empty(rows, 3, device=scores.device, dtype=torch.float32)
    _chunk_top_kernel[(rows, nc)](scores, top, v, nc, scores.stride(0), CHUNK=chunk, KP=kp, num_warps=8)
    _cut_kernel[(rows,)](
        scores, top, cut, v, nc, scores.stride(0), top_k, 1.0 - top_p,
        KP=kp, NCP=triton.next_power_of_2(nc), BLOCK=4096, num_warps=8,
    )  # fmt: skip
    return cut


def sample_top_k(
    scores: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None, chunk: int = CHUNK
) -> torch.Tensor | None:
    """The next token of each row of scores (B, V) fp32 (logits after the penalty and the
    temperature), (B,) int64, drawn from the top-k then top-p filtered softmax; None where top_k
    is not in 1..TOP_K_MAX (below V): the caller takes the reference then. The generator seeds
    the draw, on the device; chunk: scores a first-pass program sorts (tests take small ones)."""
    rows, v = scores.shape
    if not 0 < top_k <= TOP_K_MAX or top_k >= v:
        return None
    scores = scores.contiguous()
    cut = cut_scores(scores, top_k, top_p, chunk)
    nr = triton.cdiv(v, 2 * chunk)  # a race program weighs 2 chunks
    best = torch.empty(rows, nr, device=scores.device, dtype=torch.float32)
    where = torch.empty(rows, nr, device=scores.device, dtype=torch.int64)
    seed = torch.randint(2**62, (1,), device=scores.device, generator=generator)
    _race_kernel[(rows, nr)](
        scores, cut, seed, best, where, v, nr, scores.stride(0), BLOCK=2 * chunk, num_warps=8
    )  # fmt: skip
    return where.gather(-1, best.argmax(dim=-1, keepdim=True)).squeeze(-1)
