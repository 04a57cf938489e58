"""The floor under a whole decode step: its bytes read a launch a phase, in one launch, or flat.

    python -m bench.step_floor

A Llama-3-8B decode step (NF4 weights with fp16 scales, LoRA r16 on all seven projections, the
bf16 lm_head, 124 positions of KV cache) reads its bytes in phases that each need the one before
(its x): a layer's norm and q/k/v LoRA A, q/k/v, attention, o, the second norm, gate + up, down;
then the final norm and the lm_head, 226 phases. Their weights do not depend on anything. This
reads the same bytes, laid out phase after phase in one buffer, with kernels that only read
(bench.read_ceiling's XOR), each way a CUDA graph replayed past the L2:

- one flat read of all the bytes: the floor of any design;
- a launch a phase: what the model's ~260 launches a step cost at best, their math aside;
- one persistent launch, every program reading its share of a phase (chunks dealt in turn, or
  one equal contiguous run) and then waiting at a grid-wide barrier (an atomic counter) before
  the next: a megakernel's floor; with AHEAD, each program's first chunks of the next phase are
  loaded before it waits (the weights do not depend on the previous phase), as a megakernel
  that prefetches across its syncs would.

Prints each one's time a step, its share of the copy bandwidth, and the tokens/s it would allow
if nothing else took time. The barrier needs every program resident at once: one program an SM
(of at most 16 warps, which always fits), and a program that waits past SPIN_LIMIT polls gives
up and counts itself in `stalls` (the run then stops with that count, not a time).

Measured (bench/NOTES.md, session 21, one H100, copy 2994-3000 GB/s, 4.86 GB a step): flat
1548 us (646 tok/s); a launch a phase 2114 us (473 tok/s, under issue 5's 490 with no math at
all); the best persistent shape 2018-2024 us with one chunk of the next phase ahead (494-496
tok/s), 2063-2081 us without; more ahead, or equal contiguous shares, slower. Each dependency
costs ~2.1-2.5 us, a launch or a grid barrier alike. With the norms folded into the phase after
them (161 phases): 1905-1907 us a launch a phase (524 tok/s), 1896-1899 the best persistent.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from bench.read_ceiling import read_xor, xor_all

SPIN_LIMIT = tl.constexpr(1 << 20)  # polls of the barrier counter before a program gives up
VARIANT = (2048, 8, 8)  # (BLOCK, ITERS, warps): bench.read_ceiling's best flat shape on a down weight
# the persistent kernel's (BLOCK, ITERS, warps, AHEAD, BALANCED), one program an SM: the chunks held ahead
# take AHEAD * BLOCK * ITERS / (32 * warps) registers a thread
PERSISTENT_VARIANTS = [
    (2048, 4, 16, 0, False), (2048, 4, 16, 1, False), (2048, 4, 16, 2, False),
    (2048, 4, 16, 0, True), (2048, 4, 16, 1, True), (1024, 4, 16, 1, True), (512, 8, 16, 1, True),
    (1024, 2, 16, 2, True), (4096, 2, 16, 1, True),
]  # fmt: skip


def llama3_8b_phases(rank: int = 16, positions: int = 124, fold_norms: bool = False) -> list[tuple[str, int]]:
    """(name, bytes) of each phase of one decode step, in order. fold_norms: each RMSNorm (and
    the LoRA A after it) joins the phase after it, as a design that computes the norm's sums in
    the phase before would (5 phases a layer, and the lm_head: 161 a step)."""
    dim, q, kv, inter, vocab, layers = 4096, 4096, 1024, 14336, 128256, 32

    def nf4(n: int, k: int) -> int:  # packed nibbles and one fp16 scale a 64-block
        return n * k // 2 + n * k // 64 * 2

    def lora_a(k: int, parts: int = 1) -> int:
        return parts * rank * k * 2

    def lora_b(n: int) -> int:
        return rank * n * 2

    layer = [
        ("norm + q/k/v LoRA A", dim * 2 + lora_a(dim, 3)),
        ("q/k/v", nf4(q + 2 * kv, dim) + lora_b(q) + 2 * lora_b(kv)),
        ("attention + o LoRA A", 2 * (kv // 128) * positions * 128 * 2 + lora_a(q)),
        ("o", nf4(dim, q) + lora_b(dim)),
        ("norm + gate/up LoRA A", dim * 2 + lora_a(dim, 2)),
        ("gate + up", nf4(2 * inter, dim) + 2 * lora_b(inter)),
        ("down", lora_a(inter) + nf4(dim, inter) + lora_b(dim)),
    ]
    steps = layer * layers + [("final norm", dim * 2), ("lm_head", vocab * dim * 2)]
    if not fold_norms:
        return steps
    folded, held = [], 0
    for name, nbytes in steps:
        if "norm" in name:
            held += nbytes
        else:
            folded.append((name, nbytes + held))
            held = 0
    return folded


def phase_bounds(phases: list[tuple[str, int]], align: int = 64) -> list[int]:
    """Word offsets of each phase's start in one buffer, then its end: each start a multiple of
    `align` words (a real tensor is at least 256-byte aligned); a phase reads up to the next."""
    bounds = [0]
    for _, nbytes in phases:
        bounds.append(triton.cdiv(bounds[-1] + triton.cdiv(nbytes, 4), align) * align)
    return bounds


@triton.jit
def _grid_barrier(counter_ptr, target, stalls_ptr):
    """Wait until `target` programs have arrived (the counter only grows within a launch)."""
    tl.debug_barrier()  # every thread of the program is done with the phase
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    polls = 0
    while (tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target) & (polls < SPIN_LIMIT):
        polls += 1
    if polls >= SPIN_LIMIT:
        tl.atomic_add(stalls_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _share(bounds_ptr, ph, pid, programs, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BALANCED: tl.constexpr):
    """(first word, end, step) of this program's part of phase ph: chunks pid, pid + programs, ...
    or (BALANCED) one contiguous run of an equal share, whole BLOCKs."""
    start = tl.load(bounds_ptr + ph)
    end = tl.load(bounds_ptr + ph + 1)
    if BALANCED:
        share = tl.cdiv(tl.cdiv(end - start, programs), BLOCK) * BLOCK
        first = start + pid * share
        return first, tl.minimum(first + share, end), (programs * 0 + CHUNK).to(tl.int64)
    return start + pid * CHUNK, end, programs.to(tl.int64) * CHUNK


@triton.jit
def _step_kernel(
    src_ptr,  # (words,) int32 the step's bytes, phase after phase
    bounds_ptr,  # (PHASES + 1,) int64 word offsets of each phase's start, then the end
    counter_ptr,  # (1,) int32 zero at launch: programs arrived at the barriers so far
    stalls_ptr,  # (1,) int32: programs that gave up waiting (must stay 0)
    out_ptr,  # (programs,) int32: each program's XOR of its words
    PHASES,  # phases in the step
    BLOCK: tl.constexpr,  # words a row of a chunk
    ITERS: tl.constexpr,  # rows a chunk: one load of ITERS x BLOCK words
    AHEAD: tl.constexpr,  # chunks of the next phase loaded before the barrier (0: none; a power of 2)
    BALANCED: tl.constexpr,  # each program reads an equal contiguous share of a phase
):
    """Program p reads chunks p, p + programs, ... of each phase (or its equal share), then waits
    for every program at a barrier; with AHEAD > 0 its first AHEAD chunks of the next phase are in
    flight meanwhile."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    CHUNK: tl.constexpr = BLOCK * ITERS
    HELD: tl.constexpr = AHEAD if AHEAD > 0 else 1  # chunks a phase starts with in registers
    lanes = tl.arange(0, ITERS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    acc = tl.zeros((BLOCK,), tl.int32)
    first, end, step = _share(bounds_ptr, 0, pid, programs, CHUNK, BLOCK, BALANCED)
    held = tl.arange(0, HELD).to(tl.int64)[:, None, None] * step + lanes[None, :, :]
    ahead = tl.load(src_ptr + first + held, mask=first + held < end, other=0)
    for ph in range(PHASES):
        first, end, step = _share(bounds_ptr, ph, pid, programs, CHUNK, BLOCK, BALANCED)
        if AHEAD == 0:
            if ph > 0:  # loaded only now that the barrier is behind
                held = tl.arange(0, HELD).to(tl.int64)[:, None, None] * step + lanes[None, :, :]
                ahead = tl.load(src_ptr + first + held, mask=first + held < end, other=0)
        acc ^= tl.xor_sum(tl.xor_sum(ahead, 0), 0)
        for c0 in range(first + HELD * step, end, step):
            acc ^= tl.xor_sum(tl.load(src_ptr + c0 + lanes, mask=c0 + lanes < end, other=0), 0)
        if ph + 1 < PHASES:
            if AHEAD > 0:  # the next phase's weights need nothing from this one
                nfirst, nend, nstep = _share(bounds_ptr, ph + 1, pid, programs, CHUNK, BLOCK, BALANCED)
                held = tl.arange(0, HELD).to(tl.int64)[:, None, None] * nstep + lanes[None, :, :]
                ahead = tl.load(src_ptr + nfirst + held, mask=nfirst + held < nend, other=0)
            _grid_barrier(counter_ptr, (ph + 1) * programs, stalls_ptr)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def step_xor(src, bounds, counter, stalls, out, programs, variant):
    """One persistent launch over every phase, variant (BLOCK, ITERS, warps, AHEAD, BALANCED);
    counter must be zero (the caller zeroes it, in the graph for a replay). Returns out cut to
    the programs."""
    block, iters, warps, ahead, balanced = variant
    _step_kernel[(programs,)](
        src, bounds, counter, stalls, out, bounds.numel() - 1, block, iters, ahead, balanced, num_warps=warps
    )
    return out[:programs]


def resident_programs(device) -> int:
    """One program an SM: the barrier needs every program resident at once, and one program of
    at most 16 warps always fits an SM. (The first run of this bench, sized at two an SM from the
    compiled kernel's resources, ran past its 150-s limit before printing; at one an SM every
    variant finishes in seconds.)"""
    return torch.cuda.get_device_properties(device).multi_processor_count


def main() -> None:
    from bench.decode import copy_bandwidth
    from bench.kernels import graph_time_us

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=124, help="KV-cache positions a layer reads")
    parser.add_argument("--fold-norms", action="store_true", help="each norm joins the phase after it")
    args = parser.parse_args()
    device = torch.device("cuda")
    phases = llama3_8b_phases(positions=args.positions, fold_norms=args.fold_norms)
    bounds_list = phase_bounds(phases)
    words = bounds_list[-1]
    src = torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device=device)
    bounds = torch.tensor(bounds_list, dtype=torch.int64, device=device)
    out = torch.empty(triton.cdiv(words, 1024), dtype=torch.int32, device=device)
    expect = xor_all(src)
    copy_bw = copy_bandwidth(device)
    nbytes = 4 * words

    print(f"{torch.cuda.get_device_name(device)}, copy {copy_bw / 1e9:.0f} GB/s; one step: "
          f"{len(phases)} phases, {nbytes / 1e9:.3f} GB", flush=True)  # fmt: skip
    print(f"{'how':<72} {'us a step':>10} {'of copy':>8} {'tok/s':>7}", flush=True)
    rows = []

    def report(name: str, us: float) -> None:
        share = nbytes / (us * 1e-6) / copy_bw
        print(f"{name:<72} {us:10.1f} {share:8.1%} {1e6 / us:7.1f}", flush=True)
        rows.append({"how": name, "us": us, "of_copy": share, "tok_s": 1e6 / us})

    if xor_all(read_xor(src, out, VARIANT)) != expect:
        raise SystemExit("the flat read missed or repeated words")
    report("one flat read", graph_time_us(lambda _: read_xor(src, out, VARIANT), 1))

    def per_phase(_):
        for i in range(len(bounds_list) - 1):
            read_xor(src[bounds_list[i] : bounds_list[i + 1]], out, VARIANT)

    got = 0
    for i in range(len(bounds_list) - 1):
        got ^= xor_all(read_xor(src[bounds_list[i] : bounds_list[i + 1]], out, VARIANT))
    if got != expect:
        raise SystemExit("the launches a phase missed or repeated words")
    report(f"a launch a phase ({len(phases)} launches)", graph_time_us(per_phase, 1))

    counter = torch.zeros(1, dtype=torch.int32, device=device)
    stalls = torch.zeros(1, dtype=torch.int32, device=device)
    programs = resident_programs(device)
    for variant in PERSISTENT_VARIANTS:

        def persistent(_, variant=variant):
            counter.zero_()
            step_xor(src, bounds, counter, stalls, out, programs, variant)

        counter.zero_()
        got = xor_all(step_xor(src, bounds, counter, stalls, out, programs, variant))
        if got != expect or int(stalls.item()):
            raise SystemExit(f"the persistent launch {variant} missed or repeated words, or "
                             f"{int(stalls.item())} programs gave up at a barrier")  # fmt: skip
        us = graph_time_us(persistent, 1)
        if int(stalls.item()):
            raise SystemExit(f"{int(stalls.item())} programs gave up at a barrier: not all were resident")
        block, iters, warps, ahead, balanced = variant
        split = "equal shares" if balanced else "chunks in turn"
        report(f"one launch, {programs} x ({block}, {iters}, {warps}), {split}, {ahead} ahead", us)
    print(json.dumps({"device": torch.cuda.get_device_name(device), "copy_gbs": copy_bw / 1e9,
                      "phases": len(phases), "bytes": nbytes, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
