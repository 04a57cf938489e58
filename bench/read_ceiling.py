"""The fastest a Triton kernel reads a GEMV's bytes in one launch: the floor under its time.

    read_ceiling_us(nbytes, copies) -> (us, variant)

A GEMV of batch 1 must read each byte of its weight and scales once; nothing it does can make it
faster than a kernel that only reads those bytes. This kernel reads a flat int32 buffer of the
same size, BLOCK words a load, ITERS loads a program, and XOR-reduces them (so no load is dead
code) to one word a program. `read_ceiling_us` times a few block shapes the same way
bench.kernels times the GEMVs (one launch a weight copy, replayed in a CUDA graph, copies past
the L2) and returns the fastest.

Measured (bench/NOTES.md, session 20, H100, copy 3003 GB/s): a gate or down weight's 29.4 MB in
12.4-12.5 us at best, 78.6% of the copy bandwidth, the best of 19 variants (flat loads, 2-D tiles
with a cp.async pipeline, TMA descriptors, persistent programs); with its fp16 scales (31.2 MB,
bench.kernels' row) 78.1-78.2%; gate + up (58.7 MB) 84.6%. A launch has a fixed cost of a few
microseconds (its start, the first loads' latency, the last wave), so a lone launch's fraction of
the copy bandwidth grows with its bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK words a load, ITERS loads a program, num_warps): the fastest three of the probe's
VARIANTS = [(8192, 2, 16), (2048, 8, 8), (4096, 4, 8)]


@triton.jit
def _read_kernel(
    src_ptr,  # (numel,) int32 words to read
    out_ptr,  # (programs,) int32: each program's XOR of its words
    numel,  # words in src
    BLOCK: tl.constexpr,  # words a load
    ITERS: tl.constexpr,  # loads a program, unrolled (independent: all in flight at once)
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < numel, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def read_xor(src: torch.Tensor, out: torch.Tensor, variant: tuple) -> torch.Tensor:
    """One launch over the int32 words of src; out (at least the programs) takes the program
    XORs and is returned cut to them. XOR-ing them (xor_all) gives src's, which tests check."""
    block, iters, warps = variant
    programs = triton.cdiv(src.numel(), block * iters)
    _read_kernel[(programs,)](src, out, src.numel(), block, iters, num_warps=warps)
    return out[:programs]


def xor_all(t: torch.Tensor) -> int:
    """The XOR of all words of t (int32), folded on its device."""
    t = t.reshape(-1)
    while t.numel() > 1:
        if t.numel() % 2:
            t = torch.cat([t, t.new_zeros(1)])
        t = t[: t.numel() // 2] ^ t[t.numel() // 2 :]
    return int(t.item()) if t.numel() else 0


def read_ceiling_us(nbytes: int, copies: int) -> tuple[float, tuple]:
    """Fastest time (us) of one read-only launch over nbytes, and the variant that gave it."""
    from bench.kernels import graph_time_us  # bench.kernels imports this module

    words = nbytes // 4
    bufs = [torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device="cuda")]
    bufs += [torch.empty_like(bufs[0]).copy_(bufs[0]) for _ in range(copies - 1)]
    out = torch.empty(triton.cdiv(words, 1024), dtype=torch.int32, device="cuda")
    times = {v: graph_time_us(lambda i, v=v: read_xor(bufs[i], out, v), copies) for v in VARIANTS}
    best = min(times, key=times.get)
    return times[best], best
