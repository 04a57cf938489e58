"""Programmatic dependent launch (PDL): a kernel starts while the one before it finishes.

On Hopper a kernel launched with the PDL attribute may start once every program of the kernel
before it in the stream has called `release` (griddepcontrol.launch_dependents), not when that
kernel exits; it then calls `wait` (griddepcontrol.wait), which returns when the previous kernel
has finished and its writes are visible. A decode step is ~400 small kernels in a CUDA graph:
PDL hides each one's launch latency, and lets the NF4 GEMV stream its weights while the LoRA
down-projection launched just before it runs (kernels/nf4_gemv.py).

The rules every kernel here keeps, so that "finished" stays transitive along the stream (a
kernel that has waited knows everything before its predecessor has finished too):
1. every program calls `wait` on every path before it exits;
2. a kernel reads and writes nothing another kernel wrote or reads before its `wait`, with one
   exception: the GEMV reads x before it, because x was written two kernels back (the LoRA
   down-projection launched right before the GEMV read the same x after its own wait, and
   released the GEMV only then);
3. `release` comes after `wait` (a GEMV that released at its start, before its epilogue's wait,
   ran 10-70% slower back to back on an H200: the next kernel's programs held its SMs' slots).

Off by default: KERNELS_PDL=1 turns it on (Hopper and later, never under the interpreter).
Measured on an H200 (bench/NOTES.md), the graph of a decode step replayed slower with it:
3913 us a step against 3083 us of kernel time, 262 decode tokens/s against 294 without. It
first gained 5% (281 against 267) while the LoRA down-projection was a long loop the GEMV
could overlap; once that kernel became one load a program there was little left to overlap,
and the waiting programs of each next kernel cost more than the launch latency they hide.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (pass as both the PDL constexpr and launch_pdl)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("KERNELS_PDL", "0") != "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release(PDL: tl.constexpr):
    """Let the next kernel in the stream launch once every program here has called this."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
