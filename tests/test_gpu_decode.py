"""Device checks of the decode path (skipped without CUDA; run on the device machine).

- CUDA-graph decode gives exactly the tokens of eager decode (same kernels, same order).
- Our NF4 + LoRA model agrees with HF transformers + bitsandbytes Linear4bit + peft on a small
  random Llama with the same quantized weights, over 64 greedy tokens: HF's sequence is fed
  through our model and our argmax must equal HF's next token wherever HF's own top-1 margin
  is clear of bf16 rounding (random models have many near-ties).
- Prefill attention runs no cuDNN kernel (no per-shape plan builds), chunked or not.
- Short prefills replayed from graphs give the eager runner's logits bit for bit, each under the
  adapter that was active at its capture; the engine captured every batch size at load.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 64
MARGIN = 0.05  # logit gap under which bf16 rounding may legitimately swap the top two


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from bench.random_checkpoints import make_random_adapter, make_random_llama

    work = tmp_path_factory.mktemp("random")
    folder = make_random_llama("random-llama-small", str(work))
    return folder, make_random_adapter(str(folder), str(work), rank=16)


def greedy(engine, prompt: list[int]) -> list[int]:
    from model.engine import GenerationSettings

    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    events = engine.generate_ids(prompt, settings, adapter=engine.adapters()[0])
    return [t for event in events for t in event.token_ids]


def load(folder, adapter, graphs: bool, triton: bool = True, max_batch: int = 4):
    from model import lora
    from model.engine import Engine

    engine = Engine.load(
        str(folder), adapters=[str(adapter)], quantize="nf4", device="cuda", max_seq_len=512,
        use_cuda_graphs=graphs, use_triton=triton, max_batch=max_batch,
    )  # fmt: skip
    lora.activate(engine.model, engine.adapter_weights[str(adapter)])
    return engine


@pytest.mark.parametrize("triton", [True, False])
def test_graphs_equal_eager(checkpoint, triton):
    folder, adapter = checkpoint
    prompt = list(range(100, 160))
    eager = greedy(load(folder, adapter, graphs=False, triton=triton), prompt)
    graphed = greedy(load(folder, adapter, graphs=True, triton=triton), prompt)
    assert len(eager) == NEW_TOKENS
    assert graphed == eager


def test_greedy_steps_feed_themselves_across_a_capture(checkpoint):
    """Greedy steps feed their argmax to the next inside the step (model.runner.feed_greedy); a
    capture in the middle of such a chain (a new attention length, no warm-up) puts the inputs
    back after its warm-up runs. Eager, graphed, and graphed with the argmax outside the graph
    (the sampling path) give the same tokens across the 256-token attention bucket."""
    from model.runner import GraphRunner, Runner
    from model.sampling import argmax_rows

    folder, adapter = checkpoint
    engine = load(folder, adapter, graphs=False)
    name = engine.adapters()[0]
    prompt = list(range(100, 350))  # 250 tokens: the chain crosses position 256
    chains = []
    for runner, inside in ((Runner(engine.model), True), (GraphRunner(engine.model), True),
                           (GraphRunner(engine.model), False)):  # fmt: skip
        first = int(runner.prefill(prompt)[0].argmax())
        if inside:
            tokens = [runner.decode([first], [len(prompt)], adapter=name, greedy=True).clone()]
            tokens += [runner.decode_greedy_following(name).clone() for _ in range(12)]
        else:
            tokens = [argmax_rows(runner.decode([first], [len(prompt)], adapter=name))]
            for _ in range(12):
                slots = torch.zeros(1, dtype=torch.long, device="cuda")
                tokens.append(argmax_rows(runner.decode_following(tokens[-1], slots, name)))
        chains.append(torch.cat(tokens).tolist())
    assert len(chains[0]) == 13 and chains[1] == chains[0] and chains[2] == chains[0]
    engine.close()


def test_matches_hf_bnb_peft(checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, adapter = checkpoint
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda"
    )
    hf = PeftModel.from_pretrained(hf, str(adapter)).eval()
    prompt = list(range(100, 160))
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    sequence = out[0].tolist()
    with torch.no_grad():
        hf_logits = hf(out).logits[0, len(prompt) - 1 : -1].float()  # predicts each new token

    ours = load(folder, adapter, graphs=True)
    wqkv = ours.model.layers[0].attention.wqkv
    assert wqkv.packed.numel() > 0
    assert torch.equal(wqkv.absmax16, wqkv.absmax.half())  # the fp16 scales the decode GEMVs read
    assert ours.model.tok_embeddings.weight.is_pinned()  # untied: the table stays in host memory
    with torch.inference_mode():
        tokens = torch.tensor([sequence], device="cuda")
        positions = torch.arange(len(sequence), device="cuda")[None]
        our_logits = ours.model(tokens, positions, attn_len=len(sequence), last_only=False)[0]
    our_logits = our_logits[len(prompt) - 1 : -1].float()
    top2 = hf_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > MARGIN
    agree = our_logits.argmax(-1) == hf_logits.argmax(-1)
    assert clear.sum() >= NEW_TOKENS // 2, "too few clear decisions to compare"
    assert bool(agree[clear].all()), f"disagree at {torch.nonzero(clear & ~agree).flatten().tolist()}"
    rel = (our_logits - hf_logits).norm() / hf_logits.norm()
    assert rel < 0.02, f"relative logit error {rel:.4f}"
    # The generated sequence itself, with graphs on, agrees with HF's up to the first near-tie.
    generated = greedy(ours, prompt)
    first_tie = int(torch.nonzero(~clear).flatten()[0]) if (~clear).any() else NEW_TOKENS
    assert generated[:first_tie] == sequence[len(prompt) : len(prompt) + first_tie]


@pytest.mark.parametrize("graphs", [True, False])
def test_pdl_changes_no_logit(checkpoint, graphs, monkeypatch):
    """Programmatic dependent launch overlaps kernels (kernels/pdl.py); the logits of decode
    steps of 1, 2, 4 and 8 rows must be bit-identical with it on and off."""
    from model.runner import GraphRunner, Runner

    folder, adapter = checkpoint
    results = {}
    for on in ("1", "0"):
        monkeypatch.setenv("KERNELS_PDL", on)
        engine = load(folder, adapter, graphs=False, max_batch=8)
        runner = GraphRunner(engine.model) if graphs else Runner(engine.model)
        name = engine.adapters()[0]
        runner.prefill(list(range(100, 160)))
        for slot in range(1, 8):
            runner.prefill(list(range(100 + slot, 150 + slot)), slot=slot)
        steps = []
        for rows in (1, 2, 4, 8):
            tokens = [(7 * r + rows) % 500 + 1 for r in range(rows)]
            positions = [60 + r for r in range(rows)]
            steps.append(runner.decode(tokens, positions, adapter=name)[:rows].clone())
        results[on] = steps
        engine.close()
        del engine, runner
        torch.cuda.empty_cache()
    for with_pdl, without in zip(results["1"], results["0"]):
        assert torch.equal(with_pdl, without)


def test_prefill_attention_needs_no_per_shape_setup(checkpoint, monkeypatch):
    """Prefill attention never runs cuDNN's SDPA (an execution plan built for every new (batch,
    length) shape, ~0.4 s each on Hopper: model/llama.py); a prompt prefilled in chunks (the later
    chunks through the mask) gives the logits of one pass within bf16 rounding."""
    import model.runner

    folder, adapter = checkpoint
    engine = load(folder, adapter, graphs=False)
    prompt = list(range(100, 190))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        whole = engine.runner.prefill(prompt, slot=0).float()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names and not [n for n in names if "cudnn" in n.lower()], sorted(set(names))[:20]
    monkeypatch.setattr(model.runner, "PREFILL_CHUNK", 32)  # 90 tokens padded to 128: 4 chunks
    chunked = engine.runner.prefill(prompt, slot=0).float()
    assert ((chunked - whole).norm() / whole.norm()).item() < 2e-2
    engine.close()


def test_prefill_graphs_equal_eager_prefill(checkpoint):
    from model import lora
    from model.runner import Runner

    folder, adapter = checkpoint
    engine = load(folder, adapter, graphs=True)
    name, runner = engine.adapters()[0], engine.runner
    captured = set(runner.graphs)  # Engine._warm_up: every batch size and attention length, both kinds
    everything = [(None, name), (1, 2, 4), (256, 512), (False, True)]  # adapters, batches, lengths, greedy
    assert captured == set(itertools.product(*everything))
    one_prompt = {(n, width) for _, n, width, gathered in runner.prefill_graphs if not gathered}
    assert one_prompt == {(1, width) for width in runner.prefill_widths()}  # warmed too
    at_load = len(runner.prefill_graphs)
    eager, weights = Runner(engine.model), engine.adapter_weights[name]
    cases = [  # each graph replayed with other ids, lengths and slots than it was captured with
        [(list(range(100, 160)), 0)],
        [(list(range(300, 340)), 0)],
        [(list(range(200, 230)), 1), (list(range(300, 350)), 3)],
        [(list(range(400, 460)), 2), (list(range(5, 9)), 1)],
    ]
    for active in (weights, None, weights):  # a graph is keyed by the adapter it baked in
        lora.activate(engine.model, active)
        for prompts in cases:
            graphed = runner.prefill_many(prompts)
            expected = eager.prefill_many(prompts)
            assert torch.equal(graphed, expected), (graphed - expected).abs().max().item()
    assert len(runner.prefill_graphs) == at_load + 2  # two adapters x (2 gathered prompts, 64)
    engine.close()
