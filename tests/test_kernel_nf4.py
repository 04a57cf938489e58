"""kernels/nf4.py (NF4 dequantization, the GEMV's byte-table decode) against kernels/reference.py
and bitsandbytes.

Dequantization is one fp32 multiply then one cast, exactly as the reference and bitsandbytes'
dequantize_4bit do, so every dtype must match bit for bit. The one exception is bf16 under
TRITON_INTERPRET=1: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even,
so there each value may be one bf16 ulp (2^-7 relative) off; on the GPU bf16 is exact too.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import compile_for_hopper  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.nf4 import nf4_dequantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [
    (1, 1),  # one element: one byte, half of it padding
    (5, 123),  # odd everything; blocks cross rows
    (1, 64),  # a single block
    (7, 100),  # K not a multiple of 64, odd byte count
    (33, 256),
    (3, 4096),  # a Llama-3-8B row length
    (600, 7),  # more bytes than one program handles, tiny rows
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_nf4(shape, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    numel = shape[0] * shape[1]
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-numel // 64), generator=g) * 3 + 0.01
    return packed.to(DEVICE), absmax.to(DEVICE)


def _assert_exact(ours, ref, dtype):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    if dtype == torch.bfloat16 and INTERPRETED:
        torch.testing.assert_close(ours, ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(shape, dtype):
    packed, absmax = _random_nf4(shape, seed=shape[0] * 1000 + shape[1])
    ours = nf4_dequantize(packed, absmax, shape, dtype)
    _assert_exact(ours, reference.nf4_dequantize(packed, absmax, shape, dtype), dtype)


@pytest.mark.parametrize("shape", [(5, 123), (16, 64), (3, 4096), (1, 100)])
def test_dequantize_matches_bitsandbytes(shape):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator(device="cpu").manual_seed(7)
    w = torch.randn(shape, generator=g).to(DEVICE)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    theirs = bnb.functional.dequantize_4bit(packed, state)
    ours = nf4_dequantize(packed, absmax, shape, torch.float32)
    assert (ours - theirs).abs().max().item() <= 1e-6
    # and the quantization itself is close to the weight (a check that the layouts agree)
    assert (ours - w).abs().max().item() <= absmax.max().item() * 0.2


def test_dequantize_rejects_wrong_sizes():
    packed, absmax = _random_nf4((4, 64), seed=0)
    with pytest.raises(ValueError, match="uint8 bytes"):
        nf4_dequantize(packed, absmax, (4, 65), torch.float32)
    with pytest.raises(ValueError, match="absmax"):
        nf4_dequantize(packed, absmax[:-1], (4, 64), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequantize_llama_size_exact_on_gpu():
    shape = (14336, 4096)
    packed, absmax = _random_nf4(shape, seed=3)
    for dtype in DTYPES:
        ours = nf4_dequantize(packed, absmax, shape, dtype)
        assert torch.equal(ours, reference.nf4_dequantize(packed, absmax, shape, dtype))


def test_lut_decode_ptx_on_a_simulated_warp():
    """The byte-table decode's PTX (kernels.nf4.decode_words, DECODE 2) on 32 simulated lanes
    (tests/ptx_sim.py), after the table fill's own PTX: each lane's word gives the codes of its 8
    nibbles, low nibble first, rounded to fp16."""
    from ptx_sim import TABLE_ADDRESS, fill_table
    from ptx_sim import run as run_ptx

    from kernels import nf4, nf4_mma_block

    smem = bytearray(TABLE_ADDRESS + 32768)
    fill_table(nf4_mma_block.lut_fill_ptx(torch.float16, 128), 4, smem)
    offsets = [r["$0"] for r in run_ptx(nf4_mma_block._LUT_LANE_PTX.value, [{}] * 32, smem, "f16")]
    code16 = torch.tensor(reference.NF4_CODE).half().float().tolist()
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        words = torch.randint(0, 2**32, (32,), generator=gen, dtype=torch.int64).tolist()
        lanes = [{"$8": offsets[lane], "$9": words[lane]} for lane in range(32)]
        out = run_ptx(nf4._LUT_DECODE_PTX.value, lanes, smem, "f16")
        for lane in range(32):
            want = [code16[(words[lane] >> (4 * m)) & 15] for m in range(8)]
            assert [out[lane][f"${m}"] for m in range(8)] == want, lane


def test_fp16_pair_products_ptx_on_a_simulated_warp():
    """The fp16 path of the 1-2 row GEMV (kernels/nf4_half.py) as PTX on 32 simulated lanes:
    each byte's table entry meets the fp16 pair of x it multiplies (element 8w + 2i in the low
    halves), so two words' sum is within fp16 rounding of the exact sum of their 16 code * x
    products, for x across fp16's range (times 2^-4, as the GEMV does)."""
    from ptx_sim import TABLE_ADDRESS, fill_table
    from ptx_sim import run as run_ptx

    from kernels import nf4_half, nf4_mma_block

    smem = bytearray(TABLE_ADDRESS + 32768)
    fill_table(nf4_mma_block.lut_fill_ptx(torch.float16, 128), 4, smem)
    offsets = [r["$0"] for r in run_ptx(nf4_mma_block._LUT_LANE_PTX.value, [{}] * 32, smem, "f16")]
    code16 = torch.tensor(reference.NF4_CODE).half().double()
    gen = torch.Generator().manual_seed(5)
    for magnitude in (1e-2, 1.0, 3e3):
        words = torch.randint(0, 2**32, (32, 2), generator=gen, dtype=torch.int64).tolist()
        x = (torch.randn(32, 16, generator=gen, dtype=torch.float64) * magnitude * 2**-4).tolist()
        codes, xs = [{} for _ in range(32)], [{} for _ in range(32)]
        for word in range(2):  # table pairs and x pairs of each lane's two words
            lanes = [{"$4": offsets[lane], "$5": words[lane][word]} for lane in range(32)]
            for lane, regs in enumerate(run_ptx(nf4_half._LUT_PAIRS_PTX.value, lanes, smem, "f16")):
                codes[lane].update({f"${1 + 4 * word + i}": regs[f"${i}"] for i in range(4)})
            for i in range(4):
                j = 8 * word + 2 * i
                lanes = [{"$1": x[lane][j], "$2": x[lane][j + 1]} for lane in range(32)]
                for lane, regs in enumerate(run_ptx(nf4_half._F16X2_PTX.value, lanes, smem, "f16")):
                    xs[lane][f"${9 + 4 * word + i}"] = regs["$0"]
        out = run_ptx(nf4_half._HFMA_PAIR_PTX.value, [{**codes[i], **xs[i]} for i in range(32)], smem, "f16")
        for lane in range(32):
            # element 8w + j of a word is nibble j ^ 1 (a byte's high nibble comes first)
            c = [code16[(words[lane][j // 8] >> (4 * (j % 8 ^ 1))) & 15].item() for j in range(16)]
            exact = sum(c[j] * x[lane][j] for j in range(16))
            scale = sum(abs(c[j] * x[lane][j]) for j in range(16))
            assert abs(out[lane]["$0"] - exact) <= 2**-8 * scale + 2**-24 * 16, (magnitude, lane)


# Compiled for an sm_90 target without a GPU: the interpreter runs kernels as plain Python, so
# it accepts what the compiler rejects (a non-constexpr global read inside a kernel once
# passed every CPU test and failed every GPU one). Every kernel and loop shape of the NF4 files.
_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.nf4 import _nf4_dequantize_kernel
from kernels.nf4_gemv_rows import _nf4_gemv_rows_kernel
from kernels.nf4_gemv import _nf4_gemv_kernel, kernel_constants
from kernels.nf4_lora import _lora_down_kernel
from kernels.nf4_mma_block import lut_fill_ptx
import torch

gemv = dict(x_ptr="*i32", w_ptr="*i32", absmax_ptr="*fp32", code_ptr="*fp32", t_ptr="*fp32",
            b_ptr="*bf16", y_ptr="*bf16", M="i32", T_SPLITS="i32", N_OUT="i32", kw="i32", kb="i32",
            stride_xm="i32", stride_ym="i32", lora_scale="fp32")
cases = [
    (_nf4_dequantize_kernel, dict(packed_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32",
                                  out_ptr="*bf16", numel="i32"), dict(BLOCK_BYTES=2048)),
    (_lora_down_kernel, dict(x_ptr="*bf16", a_ptr="*bf16", t_ptr="*fp32", M="i32", K="i32",
                             R="i32", stride_xm="i32"), dict(MP=1, BLOCK_K=2048, PDL=True)),
]
gemv_variants = ((False, 1, True, False), (True, 1, False, False), (False, 2, False, False),
                 (True, 2, True, True), (False, 2, True, True))
for persistent, decode, even, half in gemv_variants:
    cases.append((_nf4_gemv_kernel, gemv, dict(MP=2, R=16, RP=16, TSP=4,
                  LUT_FILL=lut_fill_ptx(torch.float16, 128) if decode == 2 else "",
                  BN=16, BKW=128, X_KIND=2, SWIGLU=True, DECODE=decode, EVEN=even, HALF=half,
                  NUM_STAGES=3, PERSISTENT=persistent, PDL=True)))
for fn, sig, const in cases:
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 3})
for warps in (2, 4, 8):  # a launch's byte-table fill is for its warp count, fp16 codes
    const = kernel_constants((16, 64 * warps, warps, 3, 0, 2), 1, 14336, 4096, 16, 4, 2, True, False, False)
    options = {key: const.pop(key) for key in ("num_warps", "enable_fp_fusion", "launch_pdl")}
    ptx = triton.compile(ASTSource(_nf4_gemv_kernel, gemv, const), target=GPUTarget("cuda", 90, 32),
                         options={**options, "num_stages": 3}).asm["ptx"]
    fill = lut_fill_ptx(torch.float16, 32 * warps).splitlines()
    assert ptx.count("add.u32 e, t, ") == 8 // warps
    assert all(line in ptx for line in fill if line.startswith("mov.u32 q"))
rows = dict(x_ptr="*i32", w_ptr="*i32", absmax_ptr="*fp32", code_ptr="*fp32", t_ptr="*fp32",
            b_ptr="*bf16", y_ptr="*bf16", M="i32", T_SPLITS="i32", N_OUT="i32", kw="i32", kb="i32",
            stride_xm="i32", stride_ym="i32", lora_scale="fp32")
for rank, swiglu, even in ((16, True, True), (0, False, False)):
    const = dict(MP=8, R=rank, RP=16, TSP=4, BN=2, BKW=256, X_KIND=2, SWIGLU=swiglu, DECODE_SHFL=True,
                 EVEN_K=even, PDL=True)
    triton.compile(ASTSource(_nf4_gemv_rows_kernel, rows, const),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 2, "num_stages": 1})
"""


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)
