"""bench/step_floor.py: the persistent read reads every word of every phase once.

The step floor's barrier variants are only meaningful if each program reads its share of each
phase and nothing else, with or without the next phase's first chunk loaded before the barrier:
the XOR of the per-program results must equal the buffer's (a skipped or repeated word changes it
for random words). Under the interpreter programs run one after another, so a barrier can only
be passed by a single program: these checks run one program (several on a GPU).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import compile_for_hopper  # noqa: E402

from bench import read_ceiling, step_floor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_phases_are_a_llama3_8b_step():
    phases = step_floor.llama3_8b_phases()
    assert len(phases) == 7 * 32 + 2
    total = sum(b for _, b in phases)
    assert 4.8e9 < total < 4.9e9  # NF4 + fp16 scales 3.71 GB, LoRA ~0.08, lm_head 1.05, KV
    assert phases[-1] == ("lm_head", 128256 * 4096 * 2)
    bounds = step_floor.phase_bounds(phases)
    assert all(b % 64 == 0 for b in bounds) and len(bounds) == len(phases) + 1
    assert all(4 * (e - s) >= n for (_, n), s, e in zip(phases, bounds, bounds[1:]))
    folded = step_floor.llama3_8b_phases(fold_norms=True)
    assert len(folded) == 5 * 32 + 1 and sum(b for _, b in folded) == total
    assert not any("norm" in name for name, _ in folded)


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("ahead", [0, 1, 2, 4])
@pytest.mark.parametrize("sizes", [[5], [100, 1, 3000, 64, 7]])
def test_persistent_read_covers_every_word_once(sizes, ahead, balanced):
    bounds = step_floor.phase_bounds([("p", 4 * n) for n in sizes], align=8)
    g = torch.Generator().manual_seed(len(sizes))
    src = torch.randint(-(2**31), 2**31 - 1, (bounds[-1],), dtype=torch.int32, generator=g).to(DEVICE)
    b = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    stalls = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    programs = 1 if DEVICE == "cpu" else 4
    out = torch.full((programs,), 7, dtype=torch.int32, device=DEVICE)
    got = step_floor.step_xor(src, b, counter, stalls, out, programs, (16, 2, 1, ahead, balanced))
    assert read_ceiling.xor_all(got) == read_ceiling.xor_all(src)
    assert int(counter.item()) == programs * (len(sizes) - 1)  # one arrival a program a barrier
    assert int(stalls.item()) == 0


def test_xor_all():
    t = torch.tensor([1, 2, 4, 8, 16], dtype=torch.int32)
    assert read_ceiling.xor_all(t) == 31
    assert read_ceiling.xor_all(t[:0]) == 0


# The interpreter accepted a global the compiler rejects: compile both variants for sm_90 too,
# and check that one thread a program arrives at the barrier and polls it.
_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.step_floor import _step_kernel

sig = dict(src_ptr="*i32", bounds_ptr="*i64", counter_ptr="*i32", stalls_ptr="*i32", out_ptr="*i32",
           PHASES="i32")
for ahead, balanced in ((0, False), (2, False), (1, True)):
    const = dict(BLOCK=2048, ITERS=4, AHEAD=ahead, BALANCED=balanced)
    k = triton.compile(ASTSource(_step_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 16})
    ptx = [line.strip() for line in k.asm["ptx"].splitlines()]
    # the arrival (an atomic add, or a reduction where its result is unused) and the polls (an
    # atomic add of 0, or the acquire load LLVM makes of one), each by one thread of the program
    arrive = [line for line in ptx if ".global.gpu.release.add" in line]
    poll = [line for line in ptx if ".global.gpu.acquire" in line]
    assert len(arrive) == 1 and len(poll) == 1, ptx
    assert arrive[0].startswith("@%p") and poll[0].startswith("@%p"), (arrive, poll)
"""


def test_kernel_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)
