"""Our Llama against independent references: HF transformers unquantized, transformers with
bitsandbytes' Linear4bit for NF4, bitsandbytes' own dequantize_4bit for NF4Linear, and
transformers' logits processors for sampling.

NF4 references hold the bytes bitsandbytes itself produced from the same source weights, and
each test first checks that our packed bytes are those bytes, so a logits difference can only
come from the forward pass.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import (
    bnb_packed,
    bnb_reference,
    default_engine,
    default_hf,
    engine_over,
    hf_greedy,
    hf_logits,
    hf_model,
    our_greedy,
    our_logits,
    random_ids,
    tiny_config,
    tiny_tokenizer_dir,
    write_checkpoint,
)

from model import prompts
from model.config import ModelArgs
from model.engine import GenerationSettings
from model.loader import LoadedModel, build, load_model
from model.ops import REFERENCE_OPS
from model.quant import NF4Linear, quantize_nf4
from model.sampling import apply_repetition_penalty, draw, sample, sampling_weights

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain photosynthesis in one sentence."}],
    [{"role": "user", "content": "List three prime numbers."}],
    [
        {"role": "user", "content": "How do I reverse a list in Python?"},
        {"role": "assistant", "content": "Use slicing: my_list[::-1]."},
        {"role": "user", "content": "And in place?"},
    ],
]
NEW_TOKENS = 32
# (dtype, atol, rtol) for logits of the tiny random model (|logits| up to ~6). Both sides dequantize
# bit-identically and run the same ops, so on the CI CPU they agree exactly; the tolerance leaves
# room for another matmul blocking: fp32 rounding, and one bf16 ulp (1/32) at magnitudes 4-8.
DTYPE_TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1 / 32, 0)]
PROJECTIONS = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}


@pytest.fixture(scope="module")
def engine():
    return default_engine()


@pytest.fixture(scope="module")
def hf():
    return default_hf()


def chat_ids(tokenizer, messages) -> list[int]:
    return prompts.chat_prompt_ids(tokenizer, prompts.chat_messages(messages))


# ---- unquantized: the embedded default model against HF generate ----


@pytest.mark.slow
@pytest.mark.parametrize("messages", CHATS, ids=lambda m: m[-1]["content"][:20])
def test_default_greedy_tokens_and_text_match_hf_generate(engine, hf, messages):
    ids = chat_ids(engine.tokenizer, messages)
    theirs = hf_greedy(hf, ids, NEW_TOKENS)
    ours = our_greedy(engine, ids, NEW_TOKENS)  # EOS ignored: always 32
    assert len(ours) == NEW_TOKENS
    # HF stops at EOS (and keeps it); up to there the ids must be identical.
    assert ours[: len(theirs)] == theirs
    if len(theirs) < NEW_TOKENS:
        assert theirs[-1] in engine.stop_ids
    # The engine's own greedy text (which stops at EOS) is HF's decoded text.
    events = list(engine.chat(messages, GenerationSettings(temperature=0, max_new_tokens=NEW_TOKENS)))
    text = "".join(e.text for e in events)
    assert text == engine.tokenizer.decode(theirs, skip_special_tokens=True)
    assert events[-1].stats.stop_reason == ("eos" if len(theirs) < NEW_TOKENS else "length")


# ---- NF4: a small random Llama against transformers + bitsandbytes Linear4bit ----


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-fp32")
    return write_checkpoint(folder, tiny_tokenizer_dir(tmp_path_factory), tiny_config(), torch.float32)


def assert_same_nf4_bytes(model, reference) -> None:
    """Our packed bytes and expanded absmax are exactly what bitsandbytes produced."""
    for i in range(model.args.n_layers):
        for ours_name, theirs in PROJECTIONS.items():
            module = model.get_submodule(f"layers.{i}.{ours_name}")
            assert torch.equal(module.packed, bnb_packed(reference, i, theirs)), (i, ours_name)
            states = [reference.model.layers[i].get_submodule(n).weight.quant_state for n in theirs]
            absmax = torch.cat([bnbf.dequantize_blockwise(s.absmax, s.state2) + s.offset for s in states])
            assert torch.equal(module.absmax, absmax), (i, ours_name)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_tiny_nf4_logits_and_greedy_match_bitsandbytes(tiny_folder, dtype, atol, rtol):
    engine = engine_over(load_model(str(tiny_folder), quantize="nf4", device="cpu", dtype=dtype))
    ours = engine.model
    reference = bnb_reference(hf_model(tiny_folder, dtype), compute_dtype=dtype)
    assert_same_nf4_bytes(ours, reference)
    for seed in range(3):
        ids = random_ids(40, ours.args.vocab_size, seed)
        torch.testing.assert_close(our_logits(ours, ids), hf_logits(reference, ids), atol=atol, rtol=rtol)
    # NF4 must actually change the model, or the comparison above proves nothing.
    dense = hf_logits(hf_model(tiny_folder, dtype), ids)
    assert (dense - hf_logits(reference, ids)).abs().max() > 20 * atol
    for seed in range(2):
        ids = random_ids(12, ours.args.vocab_size, 10 + seed)
        theirs = hf_greedy(reference, ids, 16)
        assert our_greedy(engine, ids, 16)[: len(theirs)] == theirs
    engine.close()


@pytest.mark.slow
def test_default_model_nf4_matches_bitsandbytes(engine, hf):
    """The NF4 path on the real default model: the loader's build() on the weights transformers
    read from the GGUF (what load_model("default", quantize="nf4") does after reading)."""
    args = ModelArgs.from_hf_config(hf.config)
    state = hf.state_dict()
    cpu = torch.device("cpu")
    ours = build(args, state.__getitem__, True, False, cpu, torch.float32, False)
    reference = bnb_reference(hf)
    assert_same_nf4_bytes(ours, reference)
    ids = chat_ids(engine.tokenizer, CHATS[0])
    # Logits of this model reach ~40; fp32 rounding of two matmul orders stays far below 1e-3.
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(reference, ids), atol=1e-3, rtol=1e-4)
    # A few greedy steps through the engine (the reference NF4 path is slow on CPU: ~1 s a token).
    nf4_engine = engine_over(
        LoadedModel(ours, engine.tokenizer, args, "default", True, cpu, torch.float32, 0)
    )
    theirs = hf_greedy(reference, ids, 4)
    assert our_greedy(nf4_engine, ids, 4)[: len(theirs)] == theirs
    nf4_engine.close()


# ---- NF4Linear against bitsandbytes.functional.dequantize_4bit ----

ODD_SHAPES = [(5, 123), (123, 123), (1, 7), (3, 64), (64, 200), (257, 320), (96, 4160)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4linear_dequantize_equals_bitsandbytes(shape, dtype):
    n_out, n_in = shape
    generator = torch.Generator().manual_seed(n_out * 1000 + n_in)
    # Heavy tails and a zero block make the absmax statistics uneven, as in real weights.
    weight = torch.randn(shape, generator=generator) ** 3
    weight.view(-1)[:64] = 0
    weight = weight.to(dtype)
    packed_bnb, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    native = bnbf.dequantize_4bit(packed_bnb, state)  # in the weight's dtype
    state.dtype = torch.float32  # the same bytes and statistics, dequantized to fp32
    expected = bnbf.dequantize_4bit(packed_bnb, state)
    assert expected.shape == shape and expected.dtype == torch.float32

    layer = NF4Linear(n_in, n_out, REFERENCE_OPS)
    packed, absmax = quantize_nf4(weight)
    layer.packed.copy_(packed)
    layer.absmax.copy_(absmax)
    assert torch.equal(layer.packed, packed_bnb.reshape(-1))
    got = layer.dequantized(torch.float32)
    assert (got - expected).abs().max().item() <= 1e-6
    # In the weight's own dtype it is bitsandbytes' output exactly.
    assert torch.equal(layer.dequantized(dtype), native)
    # And the forward pass is x @ W^T with that weight.
    x = torch.randn(3, n_in, generator=generator)
    torch.testing.assert_close(layer(x), x @ expected.T, atol=1e-5, rtol=1e-5)


# ---- sampling against transformers' logits processors ----


def transformers_filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' top-k then top-p warpers (as generate applies them): -inf where filtered."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores.clone())
    return TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1.0 else scores


def tie_shared(scores: torch.Tensor, filtered: torch.Tensor) -> torch.Tensor:
    """The probabilities of transformers' filter over a random order of tied scores: of the n
    tokens of a value, m kept, each gets m / n of its probability."""
    keep, out = ~torch.isinf(filtered), torch.zeros_like(scores)
    for r in range(scores.shape[0]):
        for value in scores[r][keep[r]].unique():
            same = scores[r] == value
            out[r, same] = (keep[r] & same).sum() / same.sum() * torch.exp(value - scores[r].max())
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [(1.0, 0, 1.0, 1.0), (0.7, 50, 0.95, 1.0), (1.3, 5, 0.5, 1.2), (0.5, 0, 0.9, 0.8), (1.0, 999, 0.3, 1.1),
     (1.0, 1, 0.9, 1.0), (0.7, 64, 0.999, 1.0), (1.0, 300, 0.01, 1.0)],
)  # fmt: skip
def test_sampling_weights_match_transformers(temperature, top_k, top_p, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(3, 1000, generator=generator) * 4
    context = torch.randint(0, 1000, (3, 40), generator=generator)
    seen = torch.zeros(3, 1000, dtype=torch.bool).scatter(1, context, True)

    expected = (
        RepetitionPenaltyLogitsProcessor(penalty)(context, logits.clone()) if penalty != 1.0 else logits
    )
    expected = transformers_filter(TemperatureLogitsWarper(temperature)(context, expected), top_k, top_p)
    weights = sampling_weights(apply_repetition_penalty(logits, seen, penalty) / temperature, top_k, top_p)
    assert torch.equal(weights > 0, ~torch.isinf(expected))  # the same tokens kept
    probs = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, expected.softmax(-1), atol=0, rtol=2e-6)

    # Temperature 0 is greedy after the penalty; a seeded generator makes sampling repeatable and
    # never picks a filtered-out token.
    assert torch.equal(sample(logits, seen, 0, top_k, top_p, penalty, None), expected.argmax(-1))
    draws = [
        sample(logits, seen, temperature, top_k, top_p, penalty, torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.isinf(expected.gather(1, draws[0][:, None])).any()


@pytest.mark.parametrize("top_k, top_p", [(50, 0.95), (5, 0.5), (50, 1.0), (1, 0.9), (0, 0.9), (64, 0.001)])
@pytest.mark.parametrize("levels", [2, 8, 64])
def test_tied_scores_share_what_transformers_keeps_of_them(top_k, top_p, levels):
    """bf16 logits tie often, at the k-th score and at top-p's cut too: transformers keeps some
    of the tied tokens, in its sort's order; each of them gets that share here."""
    generator = torch.Generator().manual_seed(top_k + levels)
    scores = (torch.randn(4, 3000, generator=generator) * levels).round() / levels
    scores[1, :40] = torch.topk(scores[1], max(top_k, 1)).values[-1]  # 40 more ties at the k-th
    scores[2] = 1.5  # every score the same
    weights = sampling_weights(scores, top_k, top_p)
    expected = tie_shared(scores, transformers_filter(scores, top_k, top_p))
    assert torch.equal(weights > 0, expected > 0)
    torch.testing.assert_close(weights / weights.sum(-1, keepdim=True), expected, atol=0, rtol=2e-6)


def test_a_tie_at_the_kth_score_keeps_every_tied_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0], [6.0, 5.0, 4.0, 2.0, 1.0, 0.0]])
    weights = sampling_weights(logits, 3, 1.0)
    assert (weights > 0).sum(-1).tolist() == [5, 3]
    assert torch.equal(weights > 0, ~torch.isinf(transformers_filter(logits, 3, 1.0)))
    draws = {int(sample(logits[:1], torch.zeros_like(logits[:1], dtype=torch.bool), 1.0, 3, 1.0, 1.0,
                        torch.Generator().manual_seed(s))) for s in range(200)}  # fmt: skip
    assert draws <= {0, 1, 2, 3, 4} and {2, 3, 4} & draws


def test_sampling_reads_nothing_on_the_host():
    """A host read in sampling would be a sync on a GPU, stopping the next decode step from being
    queued behind this one: the whole path runs on meta tensors, which have no values."""
    logits = torch.empty(2, 128256, device="meta")
    seen = torch.zeros(2, 128256, dtype=torch.bool, device="meta")
    for top_k, top_p, penalty in [(50, 0.95, 1.0), (0, 0.9, 1.1), (0, 1.0, 1.0), (300, 1.0, 1.0)]:
        assert sample(logits, seen, 0.7, top_k, top_p, penalty, None).shape == (2,)


def test_nan_or_infinite_logits_give_some_token():
    """A broken model (NaN logits) gives some token, as greedy does, instead of an error."""
    logits = torch.randn(3, 1000)
    logits[0, 5], logits[1, :500], logits[2] = float("nan"), float("-inf"), float("-inf")
    for top_k, top_p in [(50, 0.9), (0, 0.9), (600, 0.5), (0, 1.0)]:
        tokens = sample(logits, torch.zeros_like(logits, dtype=torch.bool), 0.7, top_k, top_p, 1.0, None)
        assert tokens.shape == (3,) and 500 <= tokens[1] < 1000


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_draw_follows_the_weights_and_never_takes_a_zero(device):
    """draw: each token about as often as its weight says (5 standard deviations over 4000 rows),
    weight-0 tokens never (first, last and between; on a GPU also in Llama-3 rows at top-p 0.9,
    where a parallel cumsum is not flat at them), a seed repeating its draws."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    weights = torch.tensor([0.0, 3.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 1e-3, 0.0], device=device)
    rows, probs = 4000, (weights / weights.sum()).cpu()
    seeded = lambda seed: torch.Generator(device).manual_seed(seed)  # noqa: E731
    tokens = draw(weights.repeat(rows, 1), seeded(0)).squeeze(-1).cpu()
    counts = torch.bincount(tokens, minlength=10).float()
    assert counts[probs == 0].sum() == 0
    assert ((counts - rows * probs).abs() <= 5 * (rows * probs * (1 - probs)).sqrt() + 1).all(), counts
    assert torch.equal(tokens, draw(weights.repeat(rows, 1), seeded(0)).squeeze(-1).cpu())
    for only in (0, 9):  # all the weight on the first or the last token
        one = torch.zeros(50, 10, device=device)
        one[:, only] = 1.0
        assert (draw(one, seeded(only)) == only).all()
    scores = (torch.randn(8, 128256, generator=torch.Generator().manual_seed(1)) * 3).bfloat16().float() / 0.7
    for row in scores.to(device).split(1):  # one row a call, as the scheduler samples
        weights = sampling_weights(row, 0, 0.9).repeat(512, 1)
        assert (weights.gather(1, draw(weights, seeded(2))) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 300])
def test_two_pass_argmax_is_torch_argmax(dtype, vocab):
    """Greedy decoding's argmax in two passes picks torch's token, the first maximum, ties
    included (bf16 logits tie often; here a few levels only, and rows whose maximum repeats)."""
    from model.sampling import argmax_rows

    gen = torch.Generator().manual_seed(vocab)
    for levels in (3, 50, None):
        x = torch.randn(6, vocab, generator=gen)
        if levels:
            x = (x * levels / 4).round()
        x = x.to(dtype)
        x[1, 7 * vocab // 8 :] = x[1].max() + 1  # the maximum, repeated, in the last chunks only
        x[2] = x[2].max()  # every entry the maximum
        x[3, vocab // 3 :: 7] = float("nan")  # torch takes the first NaN
        x[4, 5] = float("inf")
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1)), levels


def test_a_prompt_prefilled_in_chunks_gives_the_logits_of_one_pass(tiny_folder, monkeypatch):
    """The first chunk of a prefill is causal attention without a mask (flash attention on a GPU),
    a later chunk attends through the mask with the K/V heads repeated: both give one result."""
    import model.runner

    engine = engine_over(load_model(str(tiny_folder), quantize="none", device="cpu", dtype=torch.float32))
    ids = random_ids(40, engine.model.args.vocab_size, 7)
    whole = engine.runner.prefill(ids, slot=0)
    monkeypatch.setattr(model.runner, "PREFILL_CHUNK", 16)  # chunks of 16, 16 and 8 tokens
    chunked = engine.runner.prefill(ids, slot=0)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole[0].float(), our_logits(engine.model, ids)[-1], atol=1e-4, rtol=1e-4)
    engine.close()


def test_the_triton_path_gives_the_reference_path_logits_with_lora(tiny_folder):
    """The model on the Triton ops (the interpreter here, as on a GPU but for the decode), NF4
    and a LoRA on every projection, against the same model on the PyTorch references: a
    6-token prefill and two decode steps. The Triton side must take the RMSNorm fused with the
    LoRA down-projection before q/k/v and gate/up (kernels.rmsnorm_lora.rms_norm_lora_down), and
    at decode the attention fused with rope, the cache write and the output projection's LoRA
    down-projection (kernels.decode_attention.rope_decode_attention)."""
    import dataclasses

    from model.ops import triton_ops
    from model.quant import LoRAWeights

    model = load_model(str(tiny_folder), quantize="nf4", device="cpu", dtype=torch.float32).model
    g = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, NF4Linear):
            n, k = module.shape
            a, b = torch.randn(8, k, generator=g) / k**0.5, torch.randn(n, 8, generator=g) * 0.3
            module.lora = LoRAWeights(a, b, 0.5)
    fused, attended = [], []

    def spy(*args):
        out = triton_ops().rms_norm_lora_down(*args)
        fused.append(out[2] is not None)
        return out

    def attention_spy(*args):
        out = triton_ops().rope_decode_attention(*args)
        attended.append(out[1] is not None)
        return out

    def run(ops):
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        ids = random_ids(8, model.args.vocab_size, seed=4)
        model.setup_caches(1, 16)
        out = [our_logits(model, ids[:6])]
        for pos in (6, 7):
            tokens, positions = torch.tensor([[ids[pos]]]), torch.tensor([[pos]])
            out.append(model(tokens, positions, attn_len=pos + 1)[0].float())
        return torch.cat(out)

    want = run(REFERENCE_OPS)
    ours = run(dataclasses.replace(triton_ops(), rms_norm_lora_down=spy, rope_decode_attention=attention_spy))
    assert fused and all(fused) and len(fused) == 3 * 2 * model.args.n_layers
    assert attended and all(attended) and len(attended) == 2 * model.args.n_layers
    torch.testing.assert_close(ours, want, atol=2e-4, rtol=2e-4)
