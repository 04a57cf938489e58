"""kernels/top_k_sample.py against model.sampling (sampling_weights, tested against transformers'
warpers in tests/test_model_fidelity.py).

The kernels' weights (the largest score, the cut and the share kept at it) must keep the same
tokens with the same probabilities as the reference, ties at the k-th score and at top-p's cut
included; the draw must follow them. On CPU under TRITON_INTERPRET=1, with small chunks (the
interpreter sorts slowly) so that rows span several; on the device at the Llama-3 vocabulary.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.top_k_sample import TOP_K_MAX, cut_scores, sample_top_k  # noqa: E402
from model.sampling import apply_repetition_penalty, cut_weights, sample, sampling_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 2048 if DEVICE == "cuda" else 256  # several chunks a row on the CPU


def kernel_weights(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The weights the race draws from, from the kernels' cut."""
    return cut_weights(scores, *cut_scores(scores, top_k, top_p, CHUNK).split(1, dim=-1))


def assert_same_probabilities(ours: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(
        ours / ours.sum(-1, keepdim=True), want / want.sum(-1, keepdim=True), atol=0, rtol=1e-5
    )


def random_scores(rows: int, vocab: int, levels: int | None, seed: int) -> torch.Tensor:
    """Logits at a temperature; with levels, rounded to so few values that many tie."""
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return (scores * levels).round() / levels if levels else scores


@pytest.mark.parametrize("vocab", [300, 1000, 4097])
@pytest.mark.parametrize(
    "top_k, top_p", [(1, 0.9), (5, 0.5), (50, 0.95), (TOP_K_MAX, 0.999), (3, 1.0), (17, 0.001), (50, 0.1)]
)
@pytest.mark.parametrize("levels", [None, 4])
def test_cut_keeps_what_the_reference_keeps(vocab, top_k, top_p, levels):
    """Random scores, or scores on few levels (many ties, at top-p's cut too; -0.0 and 0.0);
    300 and 4097 scores: the last chunk holds fewer than k."""
    scores = random_scores(3, vocab, levels, vocab + top_k)
    scores[0, vocab - vocab % CHUNK :] += 8  # a short last chunk (300, 4097) among the k largest
    scores[1, : vocab // 2] = float("-inf")  # a row with half its scores out already
    scores[2, 10:40] = torch.topk(scores[2], top_k).values[-1]  # 30 more ties at the k-th score
    want = sampling_weights(scores, top_k, top_p)
    ours = kernel_weights(scores.to(DEVICE), top_k, top_p).cpu()
    assert torch.equal(ours > 0, want > 0)
    torch.testing.assert_close(
        ours / ours.sum(-1, keepdim=True), want / want.sum(-1, keepdim=True), atol=0, rtol=1e-5
    )


def test_every_score_the_same():
    scores = torch.full((2, 500), 1.5)
    for top_k, top_p in [(5, 0.5), (1, 0.9), (64, 1.0)]:  # every token ties at the k-th score
        ours = kernel_weights(scores.to(DEVICE), top_k, top_p).cpu()
        torch.testing.assert_close(ours, sampling_weights(scores, top_k, top_p), atol=0, rtol=1e-6)


def test_draws_follow_the_weights():
    """300 rows of one score vector: each kept token drawn about as often as its probability
    says (5 standard deviations), none outside; a seed repeats its draws."""
    rows, vocab = 300, 200
    scores = (torch.arange(vocab, dtype=torch.float32) / 40).repeat(rows, 1).to(DEVICE)
    probs = sampling_weights(scores[:1].cpu(), 8, 0.9)[0]
    probs = probs / probs.sum()
    tokens = sample_top_k(scores, 8, 0.9, torch.Generator(DEVICE).manual_seed(0), CHUNK).cpu()
    counts = torch.bincount(tokens, minlength=vocab).float()
    assert counts[probs == 0].sum() == 0 and (counts > 0).sum() >= 4
    spread = (rows * probs * (1 - probs)).sqrt()
    assert ((counts - rows * probs).abs() <= 5 * spread + 1).all(), (counts, rows * probs)
    draw = lambda seed: sample_top_k(scores[:4], 8, 0.9, torch.Generator(DEVICE).manual_seed(seed), CHUNK)  # noqa: E731
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_out_of_range_top_k_is_left_to_the_reference():
    scores = torch.randn(1, 100, device=DEVICE)
    assert sample_top_k(scores, 0, 0.9, None) is None
    assert sample_top_k(scores, TOP_K_MAX + 1, 0.9, None) is None
    assert sample_top_k(scores, 100, 0.9, None) is None  # top-k at the vocabulary: no top-k


def test_sample_takes_the_fused_draw_within_its_range():
    """model.sampling.sample hands top-k within the kernel's range to it (penalty and temperature
    applied first), the rest to the reference."""
    calls = []

    def fused(scores, top_k, top_p, generator):
        calls.append(top_k)
        return sample_top_k(scores, top_k, top_p, generator, CHUNK)

    logits = random_scores(2, 500, None, 1).to(DEVICE)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, :250] = True
    for top_k in (5, TOP_K_MAX + 1):
        tokens = sample(logits, seen, 0.7, top_k, 0.9, 1.3, None, fused).cpu()
        kept = sampling_weights(apply_repetition_penalty(logits.cpu(), seen.cpu(), 1.3) / 0.7, top_k, 0.9) > 0
        assert kept.gather(1, tokens[:, None]).all()
    assert calls == [5, TOP_K_MAX + 1]


def test_nan_scores_give_some_token():
    scores = torch.randn(2, 300, device=DEVICE)
    scores[0, 7] = float("nan")
    assert sample_top_k(scores, 5, 0.9, None, CHUNK).shape == (2,)


@pytest.mark.skipif(DEVICE != "cuda", reason="the Llama-3 vocabulary at full chunk size: GPU only")
@pytest.mark.parametrize("top_k, top_p", [(50, 0.95), (1, 0.9), (64, 0.5)])
def test_llama3_vocabulary_on_the_gpu(top_k, top_p):
    scores = (torch.randn(2, 128256, device="cuda") * 3).bfloat16().float() / 0.7  # bf16 logits
    want = sampling_weights(scores, top_k, top_p)
    ours = kernel_weights(scores, top_k, top_p)
    assert torch.equal(ours > 0, want > 0)
    torch.testing.assert_close(
        ours / ours.sum(-1, keepdim=True), want / want.sum(-1, keepdim=True), atol=0, rtol=1e-5
    )
