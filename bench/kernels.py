"""Kernel benchmark: each Triton kernel against its PyTorch / bitsandbytes counterpart.

    python -m bench.kernels [--sweep] [--copies-mb 256]

Llama-3-8B shapes: q/o 4096 -> 4096, k/v 4096 -> 1024, gate/up 4096 -> 14336, down
14336 -> 4096, gate+up stacked 4096 -> 2 x 14336 (nf4_linear_swiglu). Decode-sized calls run
inside a CUDA graph that calls the op on enough distinct weight copies to overflow the L2
(--copies-mb), as a decode step does; the median replay time (triton.testing.do_bench) is
divided by the number of calls. GB/s counts the bytes each implementation must move at least
(each weight byte, absmax, x, y and LoRA read or written once); the fraction is against a
device-to-device copy measured in the same run (bytes read + written); "x ours" compares with
the 1-row call (for the 2/4/8-row rows: how much a step grows with the batch). Each GEMV shape
also shows the call with fp16 block scales (as the model runs it) and bench.read_ceiling's
read-only launch over the same bytes: the floor under the GEMV's time on this device. Prints the
device, a table, and a JSON line last. --sweep also times every GEMV config the tuner would try.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from bench.read_ceiling import read_ceiling_us
from kernels import nf4_linear as gemv
from kernels import reference
from kernels.nf4 import nf4_dequantize
from model.quant import half_absmax

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / (ms * 1e-3)


def graph_time_us(call, copies: int) -> float:
    """Median time of one call(i), i cycling over `copies` weight sets, replayed in a graph."""
    for i in range(copies):  # warm-up and one-time tuning happen outside the capture
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200)
    return ms * 1e3 / copies


def quantized(n: int, k: int, copies: int, bnb):
    """`copies` NF4 weights of (n, k): ours (packed, absmax fp32) and bitsandbytes' states."""
    sets = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        sets.append((packed, absmax.float().contiguous(), state))
    return sets


def row(name, what, us, nbytes, copy_bw, base_us=None):
    gbps = nbytes / (us * 1e-6) / 1e9
    return {
        "kernel": name,
        "impl": what,
        "us": round(us, 2),
        "GBps": round(gbps, 1),
        "copy_fraction": round(gbps * 1e9 / copy_bw, 3),
        "speedup_vs_ours": None if base_us is None else round(us / base_us, 2),
    }


def bench_gemv_case(bnb, copy_bw, copies_mb, sweep, name, n, k, swiglu):
    """Ours with and without LoRA r=16, bitsandbytes, and with --sweep each tuner config."""
    rows, x_dtype, r = [], torch.bfloat16, 16
    wbytes = n * k // 2 + n * k // 64 * 4
    copies = max(2, -(-copies_mb * 2**20 // wbytes))
    sets = quantized(n, k, copies, bnb)
    x = torch.randn(1, k, device="cuda", dtype=x_dtype)
    a = torch.randn(r, k, device="cuda", dtype=x_dtype) * 0.01
    b = torch.randn(n, r, device="cuda", dtype=x_dtype) * 0.01
    op = gemv.nf4_linear_swiglu if swiglu else gemv.nf4_linear
    n_out = n // 2 if swiglu else n
    io = 2 * k + 2 * n_out
    ours = graph_time_us(lambda i: op(x, sets[i][0], sets[i][1], (n, k)), copies)
    rows.append(row(name, "triton", ours, wbytes + io, copy_bw))
    # as the model runs it: block scales rounded to fp16 (model.quant.half_absmax), 2 bytes each
    halves = [half_absmax(s[1]) for s in sets]
    hbytes = n * k // 2 + n * k // 64 * 2
    us = graph_time_us(lambda i: op(x, sets[i][0], sets[i][1], (n, k), absmax_half=halves[i]), copies)
    rows.append(row(name, "triton fp16 scales", us, hbytes + io, copy_bw, ours))
    # the floor under both: a Triton kernel that only reads as many bytes, in one launch
    ceiling, _ = read_ceiling_us(hbytes, copies)
    rows.append(row(name, "read-only, the same bytes", ceiling, hbytes, copy_bw, ours))
    lora = graph_time_us(lambda i: op(x, sets[i][0], sets[i][1], (n, k), a, b, 2.0), copies)
    rows.append(row(name, "triton +LoRA r16", lora, wbytes + io + 2 * r * (k + n), copy_bw))
    for m in (2, 4, 8):  # decode of m sequences at once: the same weight bytes, m x the FMAs
        xm = torch.randn(m, k, device="cuda", dtype=x_dtype)
        us = graph_time_us(lambda i, xm=xm: op(xm, sets[i][0], sets[i][1], (n, k)), copies)
        rows.append(row(name, f"triton {m} rows", us, wbytes + m * io, copy_bw, ours))

    def bnb_call(i):
        y = bnb.matmul_4bit(x, sets[i][0].t(), quant_state=sets[i][2])
        return reference.swiglu(*y.chunk(2, dim=-1)) if swiglu else y

    def bnb_lora_call(i):  # peft's unmerged LoRA over bitsandbytes, as HF runs it
        y = bnb.matmul_4bit(x, sets[i][0].t(), quant_state=sets[i][2])
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * 2.0
        return reference.swiglu(*y.chunk(2, dim=-1)) if swiglu else y

    bnb_bytes = n * k // 2 + n * k // 64 + io
    rows.append(
        row(name, "bitsandbytes gemv_4bit", graph_time_us(bnb_call, copies), bnb_bytes, copy_bw, ours)
    )
    bnb_lora = graph_time_us(bnb_lora_call, copies)
    rows.append(row(name, "bitsandbytes +LoRA (torch)", bnb_lora, bnb_bytes + 2 * r * (k + n), copy_bw, lora))
    if sweep:
        key = (x.device, n_out, k, 1, x_dtype, swiglu, 0, torch.float32)
        for cfg in gemv._CONFIGS[1]:
            gemv._TUNED[key] = cfg
            us = graph_time_us(lambda i: op(x, sets[i][0], sets[i][1], (n, k)), copies)
            rows.append(row(name, f"triton cfg {cfg}", us, wbytes + io, copy_bw, ours))
        gemv._TUNED.pop(key)
    return rows


def bench_gemv(bnb, copy_bw, copies_mb, sweep):
    cases = [(f"nf4_linear {key}", shape, False) for key, shape in SHAPES.items()]
    cases.append(("nf4_linear_swiglu gate+up", (2 * 14336, 4096), True))
    rows = []
    for name, (n, k), swiglu in cases:
        rows += bench_gemv_case(bnb, copy_bw, copies_mb, sweep, name, n, k, swiglu)
    return rows


def bench_dequantize(bnb, copy_bw):
    n, k = SHAPES["gate/up"]
    (packed, absmax, state) = quantized(n, k, 1, bnb)[0]
    out_bytes = n * k * 2
    ours = triton.testing.do_bench(lambda: nf4_dequantize(packed, absmax, (n, k), torch.bfloat16))
    theirs = triton.testing.do_bench(lambda: bnb.functional.dequantize_4bit(packed, state))
    torch_ref = triton.testing.do_bench(
        lambda: reference.nf4_dequantize(packed, absmax, (n, k), torch.bfloat16)
    )
    nbytes = n * k // 2 + n * k // 64 * 4 + out_bytes
    name = "nf4_dequantize 14336x4096 bf16"
    return [
        row(name, "triton", ours * 1e3, nbytes, copy_bw),
        row(name, "bitsandbytes", theirs * 1e3, n * k // 2 + n * k // 64 + out_bytes, copy_bw, ours * 1e3),
        row(name, "pytorch reference", torch_ref * 1e3, nbytes, copy_bw, ours * 1e3),
    ]


def bench_pointwise(copy_bw):
    """The other fused ops, where present, at a 4096-token prefill (decode sizes are launch-bound)."""
    rows, t, dt = [], 4096, torch.bfloat16
    cases = []
    try:
        from kernels.rmsnorm import add_rms_norm, rms_norm

        x = torch.randn(t, 4096, device="cuda", dtype=dt)
        res, w = torch.randn_like(x), torch.ones(4096, device="cuda", dtype=dt)
        cases.append(("rms_norm", rms_norm, reference.rms_norm, (x, w, 1e-5), 2 * x.nbytes))
        cases.append(("add_rms_norm", add_rms_norm, reference.add_rms_norm, (x, res, w, 1e-5), 4 * x.nbytes))
    except ImportError:
        pass
    try:
        from kernels.rope import rope

        q = torch.randn(1, t, 32, 128, device="cuda", dtype=dt)
        kk = torch.randn(1, t, 8, 128, device="cuda", dtype=dt)
        cos, sin = (torch.rand(1, t, 64, device="cuda") for _ in range(2))
        nb = 2 * (q.nbytes + kk.nbytes) + 2 * cos.nbytes
        cases.append(("rope", rope, reference.rope, (q, kk, cos, sin), nb))
    except ImportError:
        pass
    try:
        from kernels.swiglu import swiglu

        g = torch.randn(t, 14336, device="cuda", dtype=dt)
        cases.append(("swiglu", swiglu, reference.swiglu, (g, torch.randn_like(g)), 3 * g.nbytes))
    except ImportError:
        pass
    for name, ours, ref, args, nbytes in cases:
        us = triton.testing.do_bench(lambda f=ours, a=args: f(*a)) * 1e3
        ref_us = triton.testing.do_bench(lambda f=ref, a=args: f(*a)) * 1e3
        rows.append(row(f"{name} {t}x", "triton", us, nbytes, copy_bw))
        rows.append(row(f"{name} {t}x", "pytorch reference", ref_us, nbytes, copy_bw, us))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time every GEMV config")
    parser.add_argument(
        "--copies-mb", type=int, default=256, help="weight bytes cycled through per graph (> L2)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA device.")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    rows = bench_dequantize(bnb, copy_bw)
    rows += bench_gemv(bnb, copy_bw, args.copies_mb, args.sweep)
    rows += bench_pointwise(copy_bw)
    print(f"device: {device}   device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
    print(f"{'kernel':34} {'impl':34} {'us':>9} {'GB/s':>8} {'of copy':>8} {'x ours':>7}")
    for r in rows:
        rel = "" if r["speedup_vs_ours"] is None else f"{r['speedup_vs_ours']:.2f}"
        print(
            f"{r['kernel']:34} {r['impl']:34} {r['us']:9.2f} {r['GBps']:8.1f}"
            f" {r['copy_fraction']:8.1%} {rel:>7}"
        )
    print(json.dumps({"device": device, "copy_GBps": round(copy_bw / 1e9, 1), "rows": rows}))


if __name__ == "__main__":
    main()
