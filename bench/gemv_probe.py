"""Every GEMV candidate the tuner weighs, per Llama-3-8B shape and rows of x: error and time.

    python -m bench.gemv_probe [--rows 1 2 4 8] [--shapes 57344x4096 ...] [--scales fp32 fp16]

For each shape (bench.kernels.SHAPES and the stacked gate+up with SwiGLU), rows of x and LoRA
r=16 off/on (on for 1 and 8 rows), forces each config of kernels.nf4_tune.CONFIGS in turn:
first its max error relative to kernels.reference (bf16), then its time in a CUDA graph over
weight copies that overflow the L2 (bench.kernels.graph_time_us). Prints the best FMA kernel and
the best tensor-core (MMA) kernel with their fraction of the copy bandwidth, then each MMA config;
a JSON line of every config last.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from bench.kernels import SHAPES, copy_bandwidth, graph_time_us, quantized
from kernels import nf4_linear as gemv
from kernels import reference
from model.quant import half_absmax


def probe(bnb, bw, name, n, k, swiglu, rows_list, fma_only=False, half=False) -> list[dict]:
    op = gemv.nf4_linear_swiglu if swiglu else gemv.nf4_linear
    ref_op = reference.nf4_linear_swiglu if swiglu else reference.nf4_linear
    n_out = n // 2 if swiglu else n
    wbytes = n * k // 2 + n * k // 64 * (2 if half else 4)
    copies = max(2, -(-256 * 2**20 // wbytes))
    # with half, the GEMVs read fp16 scales as the model hands them; the reference the exact ones
    sets = quantized(n, k, copies, bnb)
    sets = [(p, a, s, {"absmax_half": half_absmax(a)} if half else {}) for p, a, s in sets]
    a = torch.randn(16, k, device="cuda", dtype=torch.bfloat16) * 0.01
    b = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16) * 0.01
    rows = []
    for m in rows_list:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for lora in (False, True) if m in (1, 8) else (False,):
            extra = (a, b, 2.0) if lora else ()
            scales = torch.float16 if half else torch.float32
            key = (x.device, n_out, k, triton.next_power_of_2(m), x.dtype, swiglu, 16 if lora else 0, scales)
            want = ref_op(x, sets[0][0], sets[0][1], (n, k), *extra).float()
            results = []
            for cfg in [c for c in gemv._CONFIGS[key[3]] if not (fma_only and c[0] == "mma")]:
                gemv._TUNED[key] = cfg
                y = op(x, sets[0][0], sets[0][1], (n, k), *extra, **sets[0][3]).float()
                err = ((y - want).abs().max() / want.abs().max()).item()
                us = graph_time_us(
                    lambda i, x=x, extra=extra: op(x, sets[i][0], sets[i][1], (n, k), *extra, **sets[i][3]),
                    copies,
                )
                results.append((us, cfg, err))
            gemv._TUNED.pop(key)
            results.sort(key=lambda r: r[0])
            nbytes = wbytes + 2 * k * m

            def pct(us, nbytes=nbytes):
                return nbytes / (us * 1e-6) / bw * 100

            fma = next(r for r in results if r[1][0] != "mma")
            line = f"{name:15s} {'fp16' if half else 'fp32'} rows {m} lora {int(lora)}: "
            line += f"fma {fma[0]:7.2f} us {pct(fma[0]):4.1f}% {fma[1]}"
            mma = next((r for r in results if r[1][0] == "mma"), None)
            if mma:
                line += f" | mma {mma[0]:7.2f} us {pct(mma[0]):4.1f}% {mma[1][1:]} x{fma[0] / mma[0]:.2f}"
            print(line, f"| worst error {max(r[2] for r in results):.1e}", flush=True)
            for us, cfg, err in results:
                print(f"    {cfg} {us:7.2f} us, error {err:.1e}")
                rows.append(
                    {"shape": name, "scales": str(scales).removeprefix("torch."), "rows": m, "lora": lora,
                     "config": list(cfg), "us": round(us, 2),
                     "copy_fraction": round(pct(us) / 100, 3), "max_rel_error": err}
                )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="rows of x")
    parser.add_argument(
        "--shapes", nargs="+", default=[], help="NxK weights instead of Llama-3-8B's (4x gate/up: 57344x4096)"
    )
    parser.add_argument("--fma", action="store_true", help="the FMA kernels' configs only, no MMA ones")
    parser.add_argument(
        "--scales",
        nargs="+",
        choices=["fp32", "fp16"],
        default=["fp32"],
        help="the block scales the GEMVs read: exact fp32, or rounded to fp16 (absmax_half)",
    )
    args = parser.parse_args()
    import bitsandbytes as bnb

    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, copy {bw / 1e9:.0f} GB/s")
    cases = [(key, shape, False) for key, shape in SHAPES.items()]
    cases.append(("gate+up swiglu", (2 * 14336, 4096), True))
    if args.shapes:
        cases = [(s, tuple(int(d) for d in s.split("x")), False) for s in args.shapes]
    rows = []
    for name, (n, k), swiglu in cases:
        for scales in args.scales:
            rows += probe(bnb, bw, name, n, k, swiglu, args.rows, args.fma, scales == "fp16")
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "configs": rows}))


if __name__ == "__main__":
    main()
