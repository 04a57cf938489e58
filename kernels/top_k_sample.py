"""Sampling with top-k (up to TOP_K_MAX) and top-p on the GPU in three launches, no host sync.

Reference: model.sampling.sampling_weights, then a draw from those weights (the PyTorch path,
CPU and large k; model.sampling.draw searches the running total, here a race). The weights are
transformers' top-k then top-p filter's softmax, with the tokens tied at a cut sharing what it
keeps of their value:

    kth    = the k-th largest score;  kept = {s >= kth}  (every tie of the k-th)
    top-p  drops, in ascending order, the kept tokens whose cumulative probability is <= 1 - p,
           never the largest: values below a cut score go, above it stay, and of the n tokens
           at it n - d stay, each of the n weighted (n - d) / n
    token  = argmax_i w_i / E_i,  w_i = exp(s_i - max s) (times the share at the cut),
           E_i ~ Exp(1) from Philox: the exponential race, a draw from w / sum(w)

1. `_chunk_top_kernel`, a program a chunk of CHUNK scores: the chunk's k-th largest score t_c
   (`_kth_key`: 32 counting passes over the scores' order-preserving integer keys, a bit of
   the answer each), its scores above t_c (fewer than k) and t_c until k are listed, and how
   many of the chunk's scores equal t_c. Every one of the row's k largest is in its chunk's
   list, so the k-th largest of all the lists is the row's k-th score, exactly; and its ties
   in the row are the lists' copies, or a chunk's count where it is that chunk's t_c.
2. `_cut_kernel`, a program a row: the k-th score of the lists the same way, its ties, the
   scores above it (fewer than k, moved to the front of a KP-slot row through memory) and the
   k-th score once with its ties' weight; top-p over those KP slots (each value's smaller mass
   and its count as KP x KP masked sums): the largest score, the cut and the share.
3. `_race_kernel`, a program a chunk: weights, the race, each chunk's best; torch takes the
   best chunk (two small launches).

For one 128,256-token row on an H100 the reference is 86 small kernels, 182 us of GPU time
(torch's top-k alone 22 and 58 us), and the whole-vocabulary filter before it 68 and 171 us;
this path is 7 kernels and 38 us, the draw's random seed and the penalty and temperature
included (bench/NOTES.md, session 18). A first version sorted each chunk and the lists with
tl.sort: 16 + 73 us, the sorts' cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOP_K_MAX = 64  # the largest top-k taken here (KP x KP sums in one program's registers)
CHUNK = 2048  # scores a first-pass program takes


@triton.jit
def _order_key(x):
    """int64 keys that order as the fp32 x do (-0.0 as +0.0; NaN above +inf)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _kth_key(key, valid, k):
    """The k-th largest of key where valid (k <= the valid count): the largest t with at least k
    keys >= t, found a bit at a time from the top."""
    t = tl.full((), -(2**31), tl.int64)
    for b in tl.static_range(31, -1, -1):
        trial = t + (1 << b)
        t = tl.where(tl.sum((valid & (key >= trial)).to(tl.int32)) >= k, trial, t)
    return t


@triton.jit
def _chunk_top_kernel(
    scores_ptr,  # (B, V) fp32 scores: logits after the repetition penalty and the temperature
    top_ptr,  # (B, NC, KP) fp32 out: the chunk's scores above t_c, then t_c up to k, then -inf
    tie_ptr,  # (B, NC, 2) fp32 out: t_c, the chunk's k-th largest score, and its count there
    V,  # vocabulary size
    NC,  # chunks a row, cdiv(V, CHUNK)
    stride_s,  # elements between rows of scores
    k,  # top-k, 1 <= k <= min(KP, CHUNK)
    CHUNK: tl.constexpr,  # scores a program
    KP: tl.constexpr,  # top-k rounded up to a power of two
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    inside = offs < V
    x = tl.load(scores_ptr + row * stride_s + offs, mask=inside, other=float("-inf"))
    key = _order_key(x)
    kc = tl.minimum(k, V - chunk * CHUNK)  # the last chunk may hold fewer than k scores
    t = _kth_key(key, inside, kc)
    tc = tl.max(tl.where(inside & (key == t), x, float("-inf")))
    above = inside & (key > t)
    slot = tl.cumsum(above.to(tl.int32)) - 1
    base = top_ptr + (row * NC + chunk) * KP
    tl.store(base + slot, x, mask=above)
    i = tl.arange(0, KP)
    tl.store(base + i, tl.where(i < kc, tc, float("-inf")), mask=i >= tl.sum(above.to(tl.int32)))
    tl.store(tie_ptr + (row * NC + chunk) * 2, tc)
    tl.store(tie_ptr + (row * NC + chunk) * 2 + 1, tl.sum((inside & (key == t)).to(tl.float32)))


@triton.jit
def _cut_kernel(
    top_ptr,  # (B, NC, KP) fp32: _chunk_top_kernel's lists; the first KP slots are rewritten
    tie_ptr,  # (B, NC, 2) fp32: each chunk's t_c and its count
    cut_ptr,  # (B, 3) fp32 out: the largest score, the cut score, the share kept at the cut
    NC,  # chunks a row
    k,  # top-k, 1 <= k <= KP
    drop,  # 1 - top_p: the cumulative probability top-p drops up to
    KP: tl.constexpr,  # k rounded up to a power of two
    NCP: tl.constexpr,  # NC rounded up to a power of two
):
    row = tl.program_id(0)
    c, i = tl.arange(0, NCP), tl.arange(0, KP)
    listed = (c < NC)[:, None] & (i < KP)[None, :]
    lists = tl.load(top_ptr + row * NC * KP + c[:, None] * KP + i[None, :], mask=listed, other=float("-inf"))
    key = _order_key(lists)
    t = _kth_key(key, listed, k)
    kth = tl.max(tl.max(tl.where(listed & (key == t), lists, float("-inf")), axis=1))
    tc = tl.load(tie_ptr + row * NC * 2 + c * 2, mask=c < NC, other=float("nan"))
    tc_count = tl.load(tie_ptr + row * NC * 2 + c * 2 + 1, mask=c < NC, other=0.0)
    listed_ties = tl.sum((listed & (key == t)).to(tl.float32), axis=1)
    ties = tl.sum(tl.where(tc == kth, tc_count, listed_ties))  # the k-th score's count in the row
    above = listed & (key > t)
    flat_above = tl.reshape(above, (NCP * KP,))
    slot = tl.cumsum(flat_above.to(tl.int32)) - 1
    tl.debug_barrier()  # every list is read before its slots are rewritten
    base = top_ptr + row * NC * KP
    tl.store(base + slot, tl.reshape(lists, (NCP * KP,)), mask=flat_above)
    n_above = tl.sum(flat_above.to(tl.int32))
    tl.debug_barrier()
    top = tl.load(base + i, mask=i < n_above, other=kth)  # slot n_above: the k-th score
    valid = i <= n_above
    at_kth = i == n_above
    peak = tl.max(tl.where(valid, top, float("-inf")))
    unit = tl.exp(top - peak)  # a token's weight
    mass = tl.where(valid, unit * tl.where(at_kth, ties, 1.0), 0.0)
    # for each value: the mass of the smaller kept values, and how many tokens hold it
    below = tl.sum(tl.where(top[None, :] < top[:, None], mass[None, :], 0.0), axis=1)
    same = tl.sum(((top[None, :] == top[:, None]) & valid[None, :]).to(tl.float32), axis=1)
    count = tl.where(at_kth, ties, same)
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
    ties = torch.empty(rows, nc, 2, device=scores.device, dtype=torch.float32)
    cut = torch.empty(rows, 3, device=scores.device, dtype=torch.float32)
    _chunk_top_kernel[(rows, nc)](
        scores, top, ties, v, nc, scores.stride(0), top_k, CHUNK=chunk, KP=kp, num_warps=4
    )  # fmt: skip
    _cut_kernel[(rows,)](
        top, ties, cut, nc, top_k, 1.0 - top_p, KP=kp, NCP=triton.next_power_of_2(nc), num_warps=8
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
