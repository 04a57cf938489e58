"""Decode benchmark: the seed's measurement as a command.

    python -m bench.decode --model random-llama3-8b --adapter random-r16 --baseline hf

Protocol (the seed's): a 60-token prompt, 5 warm-up then 10 timed generations of 64 new tokens,
greedy, EOS ignored so every generation has exactly 64 tokens. Prints the device, time to first
token, decode tokens/s (tokens after the first over the time after the first), end-to-end
tokens/s and generations/s, the bytes a decoded token reads and the bandwidth that implies
against a device-to-device copy measured in the same run; with --baseline hf the same figures
for HF transformers + bitsandbytes + peft on the same checkpoint and adapter. JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections import deque

import torch

from bench.random_checkpoints import make_random_adapter, make_random_llama
from model.engine import Engine, GenerationSettings
from model.quant import NF4Linear

DEFAULTS = GenerationSettings()  # what the app samples with


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy, bytes read + written per second (median of do_bench)."""
    if device.type != "cuda":
        return None
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bytes_per_token(engine: Engine, attn_len: int) -> int:
    """What one decode step must read: weights, absmax, LoRA, lm_head, norms and the KV cache."""
    model, total = engine.model, 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            scales = module.absmax if module.absmax16 is None else module.absmax16  # what the GEMV reads
            total += module.packed.numel() + scales.numel() * scales.element_size()
        elif (
            hasattr(module, "weight")
            and isinstance(module.weight, torch.Tensor)
            and module is not model.tok_embeddings
        ):
            total += module.weight.numel() * module.weight.element_size()
        lora_w = getattr(module, "lora", None)
        if lora_w is not None:
            total += (lora_w.a.numel() + lora_w.b.numel()) * lora_w.a.element_size()
    if model.output is None:  # tied lm_head reads the embedding matrix
        total += model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    args = model.args
    total += 2 * args.n_layers * args.n_kv_heads * args.head_dim * attn_len * model.dtype.itemsize
    return total


def final_event(events):
    """Run a generation to its end; its last event carries the final stats."""
    return deque(events, maxlen=1)[0]


def time_ours(
    engine: Engine, prompt: list[int], new_tokens: int, warmup: int, iters: int, adapter, greedy: bool = True
) -> dict:
    """The engine's own path (what the app shows): generate_ids, stats from its final event.

    greedy=False samples with the app's default settings (temperature, top-p, top-k).
    """
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    if greedy:
        settings = dataclasses.replace(settings, temperature=0.0)
    runs = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        stats = final_event(engine.generate_ids(prompt, settings, adapter=adapter)).stats
        if i >= warmup:
            runs.append((stats, time.perf_counter() - start))
    tokens = sum(s.new_tokens for s, _ in runs)
    total = sum(t for _, t in runs)
    return {
        "ttft_ms": 1000 * sum(s.time_to_first_token_s for s, _ in runs) / len(runs),
        "decode_tok_s": (tokens - len(runs)) / sum(s.total_s - s.time_to_first_token_s for s, _ in runs),
        "e2e_tok_s": tokens / total,
        "gen_s": len(runs) / total,
        "tokens": tokens,
    }


def time_concurrent(engine: Engine, prompt: list[int], new_tokens: int, streams: int, adapter) -> dict:
    """`streams` generations at once through the engine's batching: aggregate and per-stream rates."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    finals = []

    def one(offset: int) -> None:
        ids = prompt[offset:] + prompt[:offset]  # distinct prompts, same length
        finals.append(final_event(engine.generate_ids(ids, settings, adapter=adapter)).stats)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [1000 * s.time_to_first_token_s for s in finals]
    return {
        "streams": streams,
        "aggregate_tok_s": sum(s.new_tokens for s in finals) / wall,
        "per_stream_decode_tok_s": sum(s.decode_tokens_per_s for s in finals) / len(finals),
        "wall_s": wall,
        # where the wall time goes besides decode: waits for prefill passes
        "ttft_ms_mean": sum(ttfts) / len(ttfts),
        "ttft_ms_max": max(ttfts),
    }


def random_prompt(vocab_size: int, n_tokens: int, seed: int) -> list[int]:
    """Seeded token ids, clear of the low ids where special tokens usually sit."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size // 8, vocab_size, (n_tokens,), generator=gen).tolist()


def time_prefill(engine: Engine, n_tokens: int, iters: int = 5) -> float:
    """Median milliseconds to the first token's logits for an n_tokens prompt."""
    ids = random_prompt(engine.loaded.args.vocab_size, n_tokens, seed=1)
    times = []
    for _ in range(iters + 1):
        sync(engine.runner.device)
        start = time.perf_counter()
        engine.runner.prefill(ids)
        sync(engine.runner.device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


def time_hf(
    path: str,
    adapter: str | None,
    prompt: list[int],
    new_tokens: int,
    warmup: int,
    iters: int,
    device: torch.device,
) -> dict:
    """HF transformers + bitsandbytes NF4 (double quant) + peft, the seed's baseline."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, dtype=torch.bfloat16, device_map=str(device)
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def timed(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed(new_tokens)
    totals = [timed(new_tokens) for _ in range(iters)]
    ttft = sorted(timed(1) for _ in range(3))[1]
    total = sum(totals)
    result = {
        "ttft_ms": 1000 * ttft,
        "decode_tok_s": iters * (new_tokens - 1) / (total - iters * ttft),
        "e2e_tok_s": iters * new_tokens / total,
        "gen_s": iters / total,
        "tokens": iters * new_tokens,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="model source, or random-llama3-8b / random-llama-small"
    )
    parser.add_argument("--adapter", default=None, help="PEFT adapter source, or random-r16")
    parser.add_argument("--quantize", default="nf4", choices=["auto", "nf4", "none"], help="weights' format")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (the app's), float32, bfloat16 or float16")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens a generation")
    parser.add_argument("--prompt-tokens", type=int, default=60, help="prompt length")
    parser.add_argument("--warmup", type=int, default=5, help="untimed generations first")
    parser.add_argument("--iters", type=int, default=10, help="timed generations")
    parser.add_argument("--max-seq-len", type=int, default=8192, help="KV-cache length")
    parser.add_argument(
        "--long-prompt", type=int, default=1000, help="prompt length for the long-prefill row"
    )
    parser.add_argument("--bf16-prefill", action="store_true", help="also time prefill of the bf16 model")
    parser.add_argument("--baseline", choices=["hf"], default=None, help="also time HF + bnb + peft")
    parser.add_argument("--concurrency", type=int, default=0, help="also time N streams at once")
    parser.add_argument("--no-graphs", action="store_true", help="decode eagerly, without CUDA graphs")
    parser.add_argument("--no-triton", action="store_true", help="PyTorch reference ops instead of Triton")
    parser.add_argument("--workdir", default="/tmp/bench-checkpoints", help="where random checkpoints go")
    args = parser.parse_args(argv)

    source = args.model
    if source.startswith("random-"):
        source = str(make_random_llama(source, args.workdir))
    adapter = args.adapter
    if adapter == "random-r16":
        adapter = str(make_random_adapter(source, args.workdir, rank=16))

    def load(**overrides) -> Engine:
        kwargs = dict(
            adapters=[adapter] if adapter else [], quantize=args.quantize, device=args.device,
            dtype=args.dtype, max_seq_len=args.max_seq_len, max_batch=1, use_triton=not args.no_triton,
            use_cuda_graphs=not args.no_graphs,
        )  # fmt: skip
        return Engine.load(source, **{**kwargs, **overrides})

    if torch.cuda.is_available():  # the random checkpoint was built on the GPU: count only ours
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = load()
    adapter_name = engine.adapters()[0] if adapter else None
    device = engine.runner.device
    prompt = random_prompt(engine.loaded.args.vocab_size, args.prompt_tokens, seed=0)
    ours = time_ours(engine, prompt, args.new_tokens, args.warmup, args.iters, adapter_name)
    ours["app_defaults_decode_tok_s"] = time_ours(
        engine, prompt, args.new_tokens, 2, args.iters, adapter_name, greedy=False
    )["decode_tok_s"]
    ours["ttft_long_ms"] = time_prefill(engine, args.long_prompt)
    # Read before the copy test below, whose two 1 GiB buffers are the benchmark's, not ours.
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    buckets = getattr(engine.runner, "buckets", [args.prompt_tokens + args.new_tokens])
    step_bytes = bytes_per_token(engine, buckets[0])
    copy_bw = copy_bandwidth(device)
    result = {
        "device": device_name(device),
        "model": args.model,
        "adapter": args.adapter,
        "info": engine.info(),
        "ours": ours,
        "bytes_per_token": step_bytes,
        "copy_GBps": copy_bw and copy_bw / 1e9,
        "achieved_GBps": step_bytes * ours["decode_tok_s"] / 1e9,
    }
    if device.type == "cuda":  # one KV-cache slot of max_seq_len, as a lone user has
        result["peak_gpu_GB"] = peak
        result["bandwidth_fraction"] = step_bytes * ours["decode_tok_s"] / copy_bw
    engine.close()
    del engine
    if args.concurrency:
        engine = load(max_batch=args.concurrency, max_seq_len=min(args.max_seq_len, 1024))
        time_concurrent(engine, prompt, args.new_tokens, args.concurrency, adapter_name)  # captures graphs
        result["concurrent"] = time_concurrent(
            engine, prompt, args.new_tokens, args.concurrency, adapter_name
        )
        result["concurrent"]["one_stream"] = time_ours(engine, prompt, args.new_tokens, 1, 3, adapter_name)
        result["concurrent_speedup"] = (
            result["concurrent"]["aggregate_tok_s"] / result["concurrent"]["one_stream"]["decode_tok_s"]
        )
        engine.close()
        del engine
    if args.bf16_prefill:
        dense = load(quantize="none", adapters=[])
        result["bf16_ttft_long_ms"] = time_prefill(dense, args.long_prompt)
        dense.close()
        del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.baseline == "hf":
        result["hf"] = time_hf(source, adapter, prompt, args.new_tokens, args.warmup, args.iters, device)
        result["speedup_vs_hf"] = ours["decode_tok_s"] / result["hf"]["decode_tok_s"]
        result["e2e_speedup_vs_hf"] = ours["e2e_tok_s"] / result["hf"]["e2e_tok_s"]
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    print(f"device: {r['device']}   model: {r['model']}   adapter: {r['adapter']}")
    print(f"{'':28}{'ttft ms':>10}{'decode tok/s':>14}{'e2e tok/s':>11}{'gen/s':>8}")
    rows = [("ours", r["ours"])] + ([("HF + bnb + peft", r["hf"])] if "hf" in r else [])
    for name, m in rows:
        print(
            f"{name:28}{m['ttft_ms']:10.1f}{m['decode_tok_s']:14.1f}{m['e2e_tok_s']:11.1f}{m['gen_s']:8.3f}"
        )
    sampled = r["ours"]["app_defaults_decode_tok_s"]
    print(
        f"decode with the app's default sampling (temperature {DEFAULTS.temperature}, top-p "
        f"{DEFAULTS.top_p}, top-k {DEFAULTS.top_k}): {sampled:.1f} tok/s"
        f" ({sampled / r['ours']['decode_tok_s']:.0%} of greedy)"
    )
    print(f"ttft at long prompt: {r['ours']['ttft_long_ms']:.1f} ms", end="")
    print(f" (bf16 model: {r['bf16_ttft_long_ms']:.1f} ms)" if "bf16_ttft_long_ms" in r else "")
    print(
        f"bytes a token: {r['bytes_per_token'] / 1e9:.3f} GB, achieved {r['achieved_GBps']:.0f} GB/s", end=""
    )
    if r.get("copy_GBps"):
        print(
            f", copy {r['copy_GBps']:.0f} GB/s, fraction {r['bandwidth_fraction']:.1%}"
            f", peak GPU {r['peak_gpu_GB']:.2f} GB"
        )
    else:
        print()
    if "concurrent" in r:
        c = r["concurrent"]
        print(
            f"{c['streams']} concurrent streams: {c['aggregate_tok_s']:.1f} tok/s aggregate "
            f"({r['concurrent_speedup']:.1f}x one stream), {c['per_stream_decode_tok_s']:.1f} tok/s each, "
            f"first token {c['ttft_ms_mean']:.0f} ms on average, {c['ttft_ms_max']:.0f} ms at most"
        )
    if "speedup_vs_hf" in r:
        print(f"decode speedup vs HF: {r['speedup_vs_hf']:.1f}x, end-to-end {r['e2e_speedup_vs_hf']:.1f}x")


if __name__ == "__main__":
    main()
