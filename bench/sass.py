"""The 1-2 row NF4 GEMV's loop in machine code, per config, without a GPU.

    python -m bench.sass [--shape 28672x4096] [--swiglu] [--rank 16] [--rows 1] [--scales fp16]

Compiles kernels/nf4_gemv.py for sm_90 with each config's constexprs (kernels.nf4_gemv's
kernel_constants) and the integer specializations a launch would give (1 as a constant,
multiples of 16 as divisibility hints), disassembles it with the nvdisasm that ships with
Triton and counts the instructions of its K loop (the longest backward branch): a thread's
instructions a loop step, a weight, and by opcode, with the registers and shared memory a program
takes. The loop is bound by its instructions (bench/NOTES.md, sessions 13-17), so this is the
first measure of a decode change, before device time. Prints a table, then a JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import nf4_gemv
from kernels.nf4_lora import LORA_BLOCK_K
from kernels.nf4_tune import CONFIGS

_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")
_USAGE = re.compile(r"REG:(\d+).*?SHARED:(\d+)")


def tool(name: str) -> str | None:
    """Path of one of CUDA's binary tools: the copy inside Triton's NVIDIA backend, else PATH's."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return shutil.which(name)
    bundled = Path(nvidia.__file__).parent / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _output(name: str, *args: str) -> str:
    path = tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (Triton's NVIDIA backend ships it)")
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the body of the longest loop (a label and the last backward branch to it)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best = None
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if (
            m
            and labels.get(m.group(1), i) < i
            and (best is None or i - labels[m.group(1)] > best[1] - best[0])
        ):
            best = (labels[m.group(1)], i)
    if best is None:
        raise ValueError("no loop found in the SASS")
    return collections.Counter(
        m.group(1) for line in lines[best[0] : best[1] + 1] if (m := _OPCODE.search(line))
    )


def report(
    cfg: tuple, n: int, k: int, rows: int = 1, swiglu: bool = True, rank: int = 16, dtype: str = "bf16",
    scales: str = "fp16",
) -> dict:  # fmt: skip
    """Loop instructions of config cfg (kernels.nf4_tune.CONFIGS[1 or 2], not "mma") for an
    (n, k) weight (n = gate + up rows with swiglu), rows of x, LoRA rank, x's dtype (fp32, fp16
    or bf16) and block scales (fp32 or fp16). A persistent config's loop holds its tile epilogue
    too (run once a tile), so its count a weight reads high."""
    x_kind = {"fp32": 0, "fp16": 1, "bf16": 2}[dtype]
    if x_kind == 0 and (cfg[5] or scales != "fp32"):
        raise ValueError("fp32 x runs with exact fp32 codes and scales (kernels.nf4_linear)")
    n_out = n // 2 if swiglu else n
    t_splits = -(-k // LORA_BLOCK_K) if rank else 0  # the launch passes 0 partial sums without LoRA
    consts = nf4_gemv.kernel_constants(
        cfg, rows, n_out, k, rank, max(t_splits, 1), x_kind, swiglu, False, False
    )
    options = {key: consts.pop(key) for key in ("num_warps", "enable_fp_fusion")}
    consts.pop("launch_pdl")
    io = "fp32" if x_kind == 0 else dtype
    pointers = dict(
        x_ptr="*fp32" if x_kind == 0 else "*i32", w_ptr="*i32", absmax_ptr=f"*{scales}", code_ptr="*fp32",
        t_ptr="*fp32", b_ptr=f"*{io}", y_ptr=f"*{io}",
    )  # fmt: skip
    # The integers as a launch passes them: Triton specializes each one that is 1 (a constant)
    # or a multiple of 16 (a divisibility hint, as for every 16-byte-aligned pointer); the hints
    # change the loop (vectorised copies), so they are given here as a launch would give them.
    x_stride = k if x_kind == 0 else k // 2
    ints = dict(
        M=rows, T_SPLITS=t_splits, N_OUT=n_out, kw=k // 8, kb=k // 64, stride_xm=x_stride, stride_ym=n_out
    )
    sig = {
        **pointers,
        **{name: "constexpr" if v == 1 else "i32" for name, v in ints.items()},
        "lora_scale": "fp32",
    }
    consts.update({name: 1 for name, v in ints.items() if v == 1})
    names = list(sig)
    hinted = list(pointers) + [name for name, v in ints.items() if v != 1 and v % 16 == 0]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in hinted}
    source = ASTSource(nf4_gemv._nf4_gemv_kernel, sig, consts, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        sass = _output("nvdisasm", "-c", cubin)
        usage = _output("cuobjdump", "--dump-resource-usage", cubin)
    ops = loop_opcodes(sass)
    regs, static = (int(v) for v in _USAGE.search(usage).groups())
    weights = cfg[0] * (1 + swiglu) * cfg[1] * 8 / (32 * options["num_warps"])
    total = sum(ops.values())
    return {
        "config": list(cfg), "shape": [n, k], "rows": rows, "swiglu": swiglu, "rank": rank, "dtype": dtype,
        "scales": scales, "loop_instructions": total, "weights_a_step": weights,
        "per_weight": round(total / weights, 3), "registers": regs, "static_shared": static,
        "dynamic_shared": compiled.metadata.shared, "opcodes": dict(ops.most_common()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", default="28672x4096", help="NxK of the weight (gate+up stacked by default)"
    )
    parser.add_argument(
        "--swiglu", action=argparse.BooleanOptionalAction, default=True, help="gate+up with SwiGLU"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, 0 for none")
    parser.add_argument("--rows", type=int, choices=[1, 2], default=1, help="rows of x")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="x's dtype")
    parser.add_argument(
        "--scales", choices=["fp16", "fp32"], default="fp16", help="the block scales' dtype (fp32 for fp32 x)"
    )
    args = parser.parse_args()
    n, k = (int(d) for d in args.shape.split("x"))
    scales = "fp32" if args.dtype == "fp32" else args.scales  # as kernels.nf4_linear hands them
    results = []
    print(f"{'config':28}{'loop':>7}{'/weight':>9}{'regs':>6}{'shared':>8}  top opcodes")
    for cfg in CONFIGS[args.rows]:
        if cfg[0] == "mma" or (cfg[5] and args.dtype == "fp32"):
            continue
        row = report(cfg, n, k, args.rows, args.swiglu, args.rank, args.dtype, scales)
        results.append(row)
        top = " ".join(f"{op} {count}" for op, count in list(row["opcodes"].items())[:6])
        shared = row["static_shared"] + row["dynamic_shared"]
        counts = f"{row['loop_instructions']:7d}{row['per_weight']:9.2f}{row['registers']:6d}{shared:8d}"
        print(f"{str(cfg):28}{counts}  {top}")
    print(json.dumps({"target": "sm_90", "triton": triton.__version__, "configs": results}))


if __name__ == "__main__":
    main()
