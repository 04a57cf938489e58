"""Next-token choice from logits, in the order transformers' generate applies its processors:
repetition penalty, then temperature, top-k, top-p. Temperature 0 is greedy (argmax)."""

from __future__ import annotations

import torch

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


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.softmax(dim=-1) of a 2-D x. On a GPU, long rows take their maximum and their sum in two
    passes (each chunk's, then the row's), like argmax_rows: torch's softmax takes a row in one
    block, 55 us for a 128,256-logit row on an H100, and sampling ran two a token (bench/NOTES.md,
    session 15). The same values but for the last bits of the sum's order."""
    v = x.shape[-1]
    if x.device.type != "cuda" or x.dtype != torch.float32 or v % ARGMAX_CHUNK or v < 4 * ARGMAX_CHUNK:
        return x.softmax(dim=-1)
    return softmax_two_pass(x)


def softmax_two_pass(x: torch.Tensor) -> torch.Tensor:
    """softmax_rows' GPU path (any device; fp32 x, v a multiple of ARGMAX_CHUNK): exp(x - max) / sum."""
    chunks = (x.shape[0], x.shape[1] // ARGMAX_CHUNK, ARGMAX_CHUNK)
    e = (x - x.reshape(chunks).amax(dim=-1).amax(dim=-1, keepdim=True)).exp()
    return e / e.reshape(chunks).sum(dim=-1).sum(dim=-1, keepdim=True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: scores of seen tokens / penalty if > 0 else * penalty.

    logits: (B, V) float32; seen: (B, V) bool, the tokens in each row's context so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest nucleus of mass top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = softmax_rows(sorted_logits).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scores sampling draws from (-inf where filtered) and their token ids (None: the scores
    cover the whole vocabulary, (B, V)).

    With top-k on, the tokens at or above each row's k-th score (k of them, more on a tie at it,
    which transformers keeps) are the only ones filter_top_k_top_p can keep, so top-p sorts
    those instead of V (128k for Llama 3). Same scores kept, same probabilities; where tokens
    tie at the top-p cut, which of them is kept is as arbitrary as in the whole-vocabulary sort.
    That path counts the ties on the host, which on a GPU is a sync in the middle of sampling
    (the kernels after it can no longer be queued behind the decode step): there the whole
    vocabulary is filtered instead, a sort the GPU does in microseconds. The app's default
    sampling ran at 94% of the greedy decode rate that way on an H200 and at 87-88% with the sync
    on an H100 (bench/NOTES.md).
    """
    if 0 < top_k < logits.shape[-1] and logits.device.type == "cpu":
        values, index = torch.topk(logits, top_k, dim=-1)
        kth = values[..., -1:]
        reach = int((logits >= kth).sum(dim=-1).max())  # k, or more where tokens tie at the k-th
        if reach > top_k:
            values, index = torch.topk(logits, reach, dim=-1)
            values = values.masked_fill(values < kth, float("-inf"))  # rows with fewer ties
        return filter_top_k_top_p(values, 0, top_p), index
    return filter_top_k_top_p(logits, top_k, top_p), None


def sample(
    logits: torch.Tensor,  # (B, V)
    seen: torch.Tensor,  # (B, V) bool
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row, (B,) int64."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature == 0:
        return argmax_rows(logits)
    scores, index = candidates(logits / temperature, top_k, top_p)
    choice = draw(softmax_rows(scores), generator)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token a row, (B, 1): torch.multinomial(probs, 1)'s own draw (the exponential race,
    the same generator use, the same token), without its validity checks, which read the
    probabilities on the host: on a GPU a sync that would stop the next decode step from being
    queued behind this one (model/scheduler.py). Softmax output needs no check; logits that
    are NaN (a broken model) give some token instead of an error, as greedy always did."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return argmax_rows(probs / race)[:, None]
