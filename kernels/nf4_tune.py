"""The NF4 GEMV's configurations and the tuner that picks one per shape (kernels/nf4_linear.py).

Each shape (device, N, K, rows of x rounded up, dtype, SwiGLU, LoRA) is timed once, outside
CUDA-graph capture, over the candidates that fit its K; the fastest is kept for the process.
Under the interpreter, during capture, or with NF4_GEMV_TUNE=0, a fixed default is used.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.testing

from kernels.nf4_gemv_rows import CONFIGS as ROWS_CONFIGS
from kernels.nf4_mma import CONFIGS as MMA_CONFIGS

# (BN, BKW, num_warps, num_stages, programs per SM; 0: one program a tile) tried at the first
# call of each shape; 2 rows get smaller tiles to stay in registers. The one-tile configs are
# the best of a 24-config sweep (bench/NOTES.md); the persistent ones are candidates the tuner
# weighs against them. 4 and 8 rows (3-8 rows of x) run kernels.nf4_gemv_rows, with its configs.
# Every row count also weighs kernels.nf4_mma (tensor cores; 16-bit x on sm_80+ only).
CONFIGS = {
    1: [(16, 128, 4, 3, 0), (16, 256, 4, 3, 0), (16, 64, 2, 3, 0), (16, 128, 8, 3, 0),
        (8, 256, 2, 3, 0), (16, 128, 4, 3, 2), (16, 128, 4, 4, 2), (16, 256, 4, 3, 2),
        (8, 128, 4, 3, 4), (8, 128, 2, 4, 6), (16, 128, 8, 3, 2)],
    2: [(16, 128, 4, 3, 0), (8, 128, 4, 3, 0), (8, 256, 4, 3, 0), (16, 128, 4, 3, 2),
        (8, 128, 4, 3, 4)],
    4: ROWS_CONFIGS[4],
    8: ROWS_CONFIGS[8],
}  # fmt: skip
for _rows in CONFIGS:  # the tensor-core GEMV (kernels/nf4_mma.py), 16-bit x: ("mma", tiles, warps, ahead)
    CONFIGS[_rows] = CONFIGS[_rows] + [("mma", *c) for c in MMA_CONFIGS]
log = logging.getLogger(__name__)
TUNED: dict[tuple, tuple] = {}  # (BN, BKW, ...), (rows, BKW, warps) or ("mma", tiles, warps, ahead)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuning_enabled() -> bool:
    return os.environ.get("NF4_GEMV_TUNE", "1") != "0" and not interpreting()


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def grid(cfg: tuple[int, int, int, int, int], n_out: int, device: torch.device) -> int:
    tiles = triton.cdiv(n_out, cfg[0])
    return tiles if cfg[4] == 0 else min(tiles, cfg[4] * sm_count(device))


def pick_config(key: tuple, n_out: int, kw: int, mp: int, launch, candidates: list) -> tuple:
    """Best config for this shape: timed once per shape outside graph capture, else a default.

    The default is the first FMA candidate that still gives 264 programs (two an H100/H200 SM),
    or the narrowest one for small N; never an MMA one. A candidate that fails to compile or
    launch on this device is skipped.
    """
    if key in TUNED:
        return TUNED[key]
    fits = [c for c in candidates if c[0] == "mma" or c[1] <= max(8, triton.next_power_of_2(kw))]
    # the staged kernel takes a narrow K step; the rows kernel masks a wide one
    if not [c for c in fits if c[0] != "mma"]:
        fits.append((candidates[0][0], 8, 4, 2, 0) if mp <= 2 else candidates[0])
    plain = [c for c in fits if c[0] != "mma" and (len(c) < 5 or c[4] == 0)]
    default = next((c for c in plain if triton.cdiv(n_out, c[0]) >= 264), min(plain))
    if not tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return default
    # do_bench clears the L2 between runs, so weights that fit the 50-60 MB L2 are timed from
    # memory, as in a decode step.
    times = {}
    for c in fits:
        try:
            times[c] = triton.testing.do_bench(lambda c=c: launch(c), warmup=3, rep=15)
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError, RuntimeError):
            log.warning("NF4 GEMV config %s does not run on this device; skipped", c, exc_info=True)
            continue
    TUNED[key] = min(times, key=times.get) if times else default
    return TUNED[key]
