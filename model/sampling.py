"""Next-token choice from logits, in the order transformers' generate applies its processors:
repetition penalty, then temperature, top-k, top-p. Temperature 0 is greedy (argmax)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ARGMAX_CHUNK = 256  # elements a first-pass maximum covers


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a 2-D x, the same index (the first maximum), in two passes when the
    rows are long: each chunk's maximum and its index, then the first chunk with the largest.
    On a GPU torch reduces one long row (128,256 logits) in one block: 28 us a token on an H100
    (bench/NOTES.md, session 14); chunks spread the first pass over the GPU."""
    rows, v = x.shape
    if v % ARGMAX_CHUNK or v < 4 * ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    best, where = x.view(rows, v // ARGMAX_CHUNK, ARGMAX_CHUNK).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return where.gather(-1, chunk).add_(chunk, alpha=ARGMAX_CHUNK).squeeze(-1)  # one kernel for both


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: scores of seen tokens / penalty if > 0 else * penalty.

    logits: (B, V) float32; seen: (B, V) bool, the tokens in each row's context so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sampling_weights(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) weights proportional to the probabilities transformers' top-k then top-p warpers
    leave (the softmax of the scores they keep), 0 where they filter; no host sync, and with
    top-k on no sort of the vocabulary, only of the k largest scores.

    Top-k keeps every score at or above the k-th largest (all its ties). Top-p sorts the kept
    scores ascending and drops those whose cumulative probability stays at or below 1 - top_p,
    never the last. So a value v is dropped wholly below some cut score, kept wholly above it,
    and at it m of its n tied tokens stay: transformers keeps which m its sort's order of ties
    says, here each of the n gets m / n of its weight, which is the draw's distribution over a
    random order of the ties. The k largest scores hold the k-th one as often as it ranks in
    them; it stands for all its ties in the vocabulary."""
    v = scores.shape[-1]
    if not 0 < top_k < v:
        return top_p_weights(scores, top_p)
    # ascending (torch's top-k beat a two-pass top-k of chunks on the CPU and an H100, session 18)
    top = scores.topk(top_k).values.flip(-1)
    kth, peak = top[:, :1], top[:, -1:]
    at_kth = top == kth
    ties = torch.where(at_kth, (scores == kth).sum(-1, keepdim=True), 0)  # the k-th score's, in V
    unit = (top - peak).exp()  # a token's weight, the largest score's 1
    first = torch.searchsorted(top, top).clamp_(max=top.shape[-1] - 1)  # each run's start (NaN: past)
    count = torch.where(at_kth, ties, torch.searchsorted(top, top, right=True) - first)
    mass = unit * torch.where(at_kth, ties / at_kth.sum(-1, keepdim=True), 1.0)
    below = F.pad(mass.cumsum(-1)[:, :-1], (1, 0)).gather(-1, first)  # mass of smaller values
    room = (1.0 - top_p) * mass.sum(-1, keepdim=True) - below  # what the run may drop
    dropped = torch.where(unit > 0, (room / unit).floor().clamp(min=0), count).minimum(count)
    dropped = torch.where(top == peak, dropped.minimum(count - 1), dropped)  # keep the last
    kept = (count - dropped) / count
    cut = (kept > 0).int().argmax(dim=-1, keepdim=True)  # the first value not dropped wholly
    at, share = top.gather(-1, cut), kept.gather(-1, cut)
    return cut_weights(scores, peak, at, share)


def cut_weights(
    scores: torch.Tensor, peak: torch.Tensor, cut: torch.Tensor, share: torch.Tensor
) -> torch.Tensor:
    """exp(scores - peak) above the cut score, share of it at the cut, 0 below (peak, cut and
    share (B, 1)): the weights of a top-k / top-p filter, also from kernels/top_k_sample.py's cut."""
    return (scores - peak).exp() * torch.where(scores > cut, 1.0, torch.where(scores == cut, share, 0.0))


def top_p_weights(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """sampling_weights without top-k, as transformers' top-p runs: the whole vocabulary sorted
    ascending, the tokens whose running mass stays at or below 1 - top_p dropped, never the last;
    the cut score's tokens share what is kept of them. (The run-by-run form of sampling_weights
    takes 76 small kernels for a 128,256-token vocabulary on an H100, this one about 20.)"""
    peak = scores.amax(dim=-1, keepdim=True)
    if top_p >= 1.0:
        return (scores - peak).exp()
    ascending = scores.sort(dim=-1).values
    total = (ascending - peak).exp().cumsum(dim=-1)
    dropped = total <= (1.0 - top_p) * total[:, -1:]
    dropped[:, -1] = False
    at = ascending.gather(-1, (~dropped).int().argmax(dim=-1, keepdim=True))  # the cut score
    tied = ascending == at
    share = (tied & ~dropped).sum(-1, keepdim=True) / tied.sum(-1, keepdim=True)
    return cut_weights(scores, peak, at, share)


def sample(
    logits: torch.Tensor,  # (B, V)
    seen: torch.Tensor,  # (B, V) bool
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None,
    fused: Callable | None = None,
) -> torch.Tensor:
    """The next token of each row, (B,) int64. fused: the model's Ops.sample_top_k (Triton, on
    CUDA): it draws where top-k is on, within its range, else this module's weights and draw."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return argmax_rows(logits)
    scores = logits / temperature
    tokens = None if fused is None else fused(scores, top_k, top_p, generator)
    return draw(sampling_weights(scores, top_k, top_p), generator).squeeze(-1) if tokens is None else tokens


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token a row, (B, 1), drawn with probability weights / their sum (weights >= 0 with a
    positive sum, as sampling_weights gives): the first token of positive weight whose running
    total reaches a point drawn uniformly in (0, the largest such total]. Tokens of weight 0 are
    masked out, not trusted to repeat the total before them: a GPU's cumsum of one row is a
    parallel scan that steps an ulp up or down there, and a search of it drew filtered tokens
    at 2e-7 to 5e-6 (a review, H100). One random number a row (an exponential race draws one a
    token: 0.7 ms a token for SmolLM2's 49k on two CPU cores), and no host read, which on a GPU
    would be a sync that stops the next decode step from being queued behind this one. Weights
    that are NaN (a broken model) give some token instead of an error, as greedy does."""
    reach = torch.where(weights > 0, weights.cumsum(dim=-1), float("-inf"))
    uniform = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device)
    point = (1.0 - uniform) * reach.amax(dim=-1, keepdim=True)  # in (0, the largest total]
    return argmax_rows((reach >= point).view(torch.uint8))[:, None]  # the first that reaches it
