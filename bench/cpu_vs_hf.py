"""CPU decode speed of our engine against HF transformers' generate, on the embedded default model.

    python -m bench.cpu_vs_hf [--quantize none|nf4] [--new-tokens 64] [--warmup 1] [--iters 3] [--threads N]

Both run the same weights (SmolLM2-135M-Instruct, read from the same GGUF file by transformers,
float32; unquantized by default, which is what quantize "auto" serves for a model this small;
with --quantize nf4, ours in NF4 against HF with bitsandbytes Linear4bit projections, as bnb runs
them on this CPU) on the same chat prompt, greedy, EOS ignored so every generation has exactly
--new-tokens tokens, one after the other in one process. Ours goes through Engine.generate_ids
(the app's path, stats from its final event); HF through model.generate(do_sample=False,
min_new_tokens=max_new_tokens). Reported: time to
first token, decode tokens/s (tokens after the first over the time after the first), end-to-end
tokens/s, and ours / HF. Also whether both produced the same tokens. JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from model import prompts
from model.engine import Engine, GenerationSettings
from model.loader import default_gguf_path

PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def time_ours(engine: Engine, ids: list[int], new_tokens: int, warmup: int, iters: int) -> tuple[dict, list]:
    settings = GenerationSettings(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    runs, tokens = [], []
    for i in range(warmup + iters):
        start = time.perf_counter()
        events = list(engine.generate_ids(ids, settings))
        total = time.perf_counter() - start
        tokens = [t for e in events for t in e.token_ids]
        stats = events[-1].stats
        assert stats.new_tokens == new_tokens, stats
        if i >= warmup:
            runs.append((stats.time_to_first_token_s, stats.decode_tokens_per_s, total))
    return summarise(runs, new_tokens), tokens


def time_hf(model, ids: list[int], new_tokens: int, warmup: int, iters: int) -> tuple[dict, list]:
    prompt = torch.tensor([ids])
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)

    def generate(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - start, out

    for _ in range(warmup):
        generate(new_tokens)
    ttft = statistics.median(generate(1)[0] for _ in range(3))
    runs = []
    for _ in range(iters):
        total, out = generate(new_tokens)
        runs.append((ttft, (new_tokens - 1) / (total - ttft), total))
    return summarise(runs, new_tokens), out[0, len(ids) :].tolist()


def summarise(runs: list[tuple[float, float, float]], new_tokens: int) -> dict:
    ttft, decode, total = (statistics.median(r[i] for r in runs) for i in range(3))
    return {"ttft_ms": 1000 * ttft, "decode_tok_s": decode, "e2e_tok_s": new_tokens / total}


def to_linear4bit(model) -> None:
    """HF + bitsandbytes: every projection a Linear4bit (nf4, blocksize 64, double quant), as
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True) builds them."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32
                    )
                    q.weight = bnb.nn.Params4bit(
                        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                    )._quantize("cpu")
                    setattr(parent, name, q)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(result: dict) -> None:
    ours, hf = result["ours"], result["hf"]
    print(f"device: {result['device']} ({result['threads']} torch threads), model: {result['model']}")
    n_prompt, n_new = result["prompt_tokens"], result["new_tokens"]
    print(f"prompt {n_prompt} tokens, {n_new} new tokens, median of {result['iters']} generations")
    print(f"{'':<22}{'ours':>10}{'HF generate':>14}{'ours / HF':>11}")
    for key, label in (
        ("ttft_ms", "time to first token ms"),
        ("decode_tok_s", "decode tokens/s"),
        ("e2e_tok_s", "end-to-end tokens/s"),
    ):
        print(f"{label:<22}{ours[key]:>10.1f}{hf[key]:>14.1f}{ours[key] / hf[key]:>11.2f}")
    print(f"same greedy tokens: {result['same_tokens']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens a generation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations first, each side")
    parser.add_argument("--iters", type=int, default=3, help="timed generations, each side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4"],
        help="projections unquantized or NF4, both sides",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    engine = Engine.load(quantize=args.quantize, device="cpu", dtype="float32", max_seq_len=512, max_batch=1)
    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    if args.quantize == "nf4":
        to_linear4bit(hf)
    ids = prompts.chat_prompt_ids(engine.tokenizer, prompts.chat_messages(PROMPT))

    ours, our_tokens = time_ours(engine, ids, args.new_tokens, args.warmup, args.iters)
    theirs, hf_tokens = time_hf(hf, ids, args.new_tokens, args.warmup, args.iters)
    engine.close()
    first_eos = next((i for i, t in enumerate(our_tokens) if t in engine.stop_ids), len(our_tokens))
    result = {
        "bench": "cpu_vs_hf",
        "device": f"cpu: {cpu_name()}",
        "threads": torch.get_num_threads(),
        "model": f"default (SmolLM2-135M-Instruct, fp32, projections {args.quantize})",
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "iters": args.iters,
        "ours": ours,
        "hf": theirs,
        "decode_ratio": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "e2e_ratio": ours["e2e_tok_s"] / theirs["e2e_tok_s"],
        # HF's min_new_tokens masks EOS while ours samples it and goes on: compare up to ours' first EOS.
        "same_tokens": our_tokens[:first_eos] == hf_tokens[:first_eos],
    }
    print_table(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
