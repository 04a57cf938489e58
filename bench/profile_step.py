"""Where a decode step's time goes: kernels of one eager step, and the graph replay alone.

    python -m bench.profile_step --model random-llama3-8b --adapter random-r16

Prints the kernels of one eager decode step grouped by name (count, total us), the time of one
CUDA-graph replay of the same step (device time, no host work), and the engine's per-token time
for comparison: the difference is the host's share (sampling, sync, queues). JSON line last.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from bench.decode import final_event, random_prompt
from bench.random_checkpoints import make_random_adapter, make_random_llama
from model import lora
from model.engine import Engine, GenerationSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-llama3-8b", help="model source or random-*")
    parser.add_argument("--adapter", default="random-r16", help="adapter source, random-r16, or none")
    parser.add_argument("--workdir", default="/tmp/bench-checkpoints", help="where random checkpoints go")
    parser.add_argument("--top", type=int, default=25, help="kernel names to list")
    parser.add_argument("--rows", type=int, default=1, help="tokens a step (sequences decoded at once)")
    parser.add_argument("--prefill", type=int, default=0, help="also list the kernels of a prefill this long")
    args = parser.parse_args()

    source = (
        str(make_random_llama(args.model, args.workdir)) if args.model.startswith("random-") else args.model
    )
    adapter = None
    if args.adapter == "random-r16":
        adapter = str(make_random_adapter(source, args.workdir, rank=16))
    elif args.adapter != "none":
        adapter = args.adapter
    engine = Engine.load(
        source, adapters=[adapter] if adapter else [], quantize="nf4", max_seq_len=8192, max_batch=args.rows
    )
    prompt = random_prompt(engine.loaded.args.vocab_size, 60, seed=0)
    settings = GenerationSettings(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    for _ in range(3):
        stats = final_event(engine.generate_ids(prompt, settings, adapter=adapter)).stats
    runner = engine.runner
    lora.activate(engine.model, engine.adapter_weights[adapter] if adapter else None)

    # One eager step under the profiler (graphs hide kernels from it).
    rows = args.rows
    eager = lambda: engine.model(runner.token[:rows], runner.position[:rows], attn_len=256)  # noqa: E731
    kernels = _kernels(eager)
    total_us = sum(sum(v) for v in kernels.values())
    launches = sum(len(v) for v in kernels.values())

    # The graph replay alone, device time.
    graph, _ = runner.graphs[(adapter, runner.rows_for(rows), runner.buckets[0])]  # rows' graph, adapter on
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):
        graph.replay()
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_us = start.elapsed_time(end) * 10  # ms over 100 -> us each

    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'kernel':80}{'count':>7}{'total us':>10}")
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{name:80}{len(times):7d}{sum(times):10.1f}")
    engine_us = 1e6 / stats.decode_tokens_per_s
    if args.prefill:
        ids = random_prompt(engine.loaded.args.vocab_size, args.prefill, seed=1)
        pre = _kernels(lambda: runner.prefill(ids, slot=0))
        print(f"prefill of {args.prefill} tokens: {sum(len(v) for v in pre.values())} kernels, "
              f"{sum(sum(v) for v in pre.values()):.0f} us of kernel time")  # fmt: skip
        for name, times in sorted(pre.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
            print(f"{name:80}{len(times):7d}{sum(times):10.1f}")
    print(f"eager step: {launches} kernels, {total_us:.0f} us of kernel time")
    host_us = engine_us - replay_us
    print(
        f"graph replay: {replay_us:.0f} us a step; engine: {engine_us:.0f} us a token (host {host_us:.0f} us)"
    )
    print(
        json.dumps(
            {"kernels": launches, "kernel_us": total_us, "replay_us": replay_us, "engine_us": engine_us}
        )
    )
    engine.close()


def _kernels(fn) -> dict[str, list[float]]:
    """Device times of the kernels one call of fn launches, grouped by name (after one warm-up)."""
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:80]].append(event.device_time)
    return kernels


if __name__ == "__main__":
    main()
