"""kernels/nf4_mma.py (NF4 GEMV on tensor cores, 1-8 rows of 16-bit x) against an fp64 oracle.

The kernel rounds each code value to x's 16-bit format before the absmax product (the reference
rounds code * absmax once, to the same format), so the tolerances are the dtype's. On CPU the
MMA is emulated from the same per-lane registers under TRITON_INTERPRET=1: that checks the data
arrangement (which bytes and x values each lane loads, which fragment lands where, the K shares'
sum, LoRA, SwiGLU); the GPU-marked tests run the PTX. A compile check for sm_90 pins what the
PTX relies on: every operand of the inline assembly has one element a thread in a 1-D layout.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import compile_for_hopper  # noqa: E402
from ptx_sim import TABLE_ADDRESS, fill_table  # noqa: E402
from ptx_sim import run as run_ptx  # noqa: E402

from kernels import nf4_mma, nf4_mma_block, reference  # noqa: E402
from kernels.nf4_lora import lora_down  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(n, k, rows, dtype, rank, swiglu, cfg, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g).to(DEVICE)
    absmax = (torch.rand(n * k // 64, generator=g) + 0.25).to(DEVICE)
    x = (torch.randn(rows, k, generator=g) / k**0.5).to(DEVICE, dtype)
    a = (torch.randn(rank, k, generator=g) * 0.3).to(DEVICE, dtype) if rank else None
    b = (torch.randn(n, rank, generator=g) * 0.3).to(DEVICE, dtype) if rank else None
    want = x.double() @ reference.nf4_dequantize(packed, absmax, (n, k), torch.float64).T
    if rank:
        want = want + (x.double() @ a.double().T) @ b.double().T * scale
    if swiglu:
        gate, up = want.chunk(2, dim=-1)
        want = F.silu(gate) * up
    n_out = n // 2 if swiglu else n
    y = torch.full((rows, n_out), float("nan"), dtype=dtype, device=DEVICE)
    t = lora_down(x, a, False) if rank else None
    x_kind = 1 if dtype == torch.float16 else 2
    interpret = not torch.cuda.is_available()
    nf4_mma.launch_mma(
        cfg, x.view(torch.int64), packed.view(torch.int64), absmax, t, b, y, rows, n_out, k, scale,
        x_kind, swiglu, interpret, False,
    )  # fmt: skip
    return y, want


# (N, K, rows): one tile and one block; N not a multiple of 16 and 5 blocks (odd against the
# K shares and the two-block step); all 8 MMA columns; SwiGLU with partial tiles.
SHAPES = [(16, 64, 1), (40, 320, 3), (48, 576, 8), (2 * 24, 192, 5)]


@pytest.mark.parametrize("n, k, rows", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("swiglu", [False, True])
def test_matches_oracle(n, k, rows, dtype, rank, swiglu):
    y, want = _run(n, k, rows, dtype, rank, swiglu, (2, 8, 0), seed=n + k + rows + rank)
    torch.testing.assert_close(y.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("cfg", nf4_mma.CONFIGS)
def test_every_config(cfg):
    y, want = _run(2 * 40, 320, 7, torch.bfloat16, 16, True, cfg, seed=3)
    torch.testing.assert_close(y.double(), want, atol=1.6e-2, rtol=1.6e-2, msg=str(cfg))


def test_code_bits_are_the_rounded_codes():
    for dtype in (torch.float16, torch.bfloat16):
        want = torch.tensor(reference.NF4_CODE, dtype=dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        assert nf4_mma_block.code_bits(dtype) == want.tolist()


@pytest.mark.parametrize("cfg", [(1, 4, 1), (1, 4, 2)])
def test_lora_over_several_partial_sums_and_ranks_past_16(cfg):
    """K > 1024: t arrives as two partial sums; rank 20: a second, partial 16-rank MMA step."""
    y, want = _run(2 * 32, 1280, 4, torch.float16, 20, True, cfg, seed=11)
    torch.testing.assert_close(y.double(), want, atol=TOL[torch.float16], rtol=TOL[torch.float16])


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_ptx_on_a_simulated_warp(dtype):
    """The GPU's PTX itself on 32 simulated lanes (tests/ptx_sim.py): the byte table's fill, the
    lanes' offsets, the addressing of one block of two rows' bytes, the MMA fragments; against
    fp64. (The interpreter path runs an emulation instead of the PTX.)"""
    kind = "f16" if dtype == torch.float16 else "bf16"
    gen = torch.Generator().manual_seed(1)
    smem = bytearray(TABLE_ADDRESS + 32768)
    fill_table(nf4_mma_block.lut_fill_ptx(dtype, 128), 4, smem)
    offsets = [r["$0"] for r in run_ptx(nf4_mma_block._LUT_LANE_PTX.value, [{}] * 32, smem, kind)]
    w = torch.randint(0, 256, (16, 32), generator=gen, dtype=torch.uint8)  # 16 rows, one block
    x = torch.randn(8, 64, generator=gen).to(dtype)
    scale = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
    acc = torch.rand(32, 4, generator=gen, dtype=torch.float64)
    xbits = _bits16(x)
    lanes = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs = {
            "$4": int.from_bytes(bytes(w[g, 8 * t : 8 * t + 8].tolist()), "little"),
            "$5": int.from_bytes(bytes(w[g + 8, 8 * t : 8 * t + 8].tolist()), "little"),
            "$10": offsets[lane], "$11": float(scale[g]), "$12": float(scale[g + 8]),
        }  # fmt: skip
        for j in range(4):  # k-step j's x: elements 16t + 4j .. 16t + 4j + 3 of x row g
            regs[f"${6 + j}"] = sum(int(xbits[g, 16 * t + 4 * j + h]) << (16 * h) for h in range(4))
        regs.update({f"${13 + i}": float(acc[lane, i]) for i in range(4)})
        lanes.append(regs)
    out = run_ptx(nf4_mma_block.block_ptx(kind), lanes, smem, kind)
    code = torch.tensor(reference.NF4_CODE, dtype=dtype).double()
    dense = torch.stack([code[(w >> 4).long()], code[(w & 15).long()]], -1).reshape(16, 64)
    d = (dense @ x.double().T) * scale[:, None]  # (weight rows, x rows)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        want = [d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]]
        got = [out[lane][f"${i}"] - acc[lane, i] for i in range(4)]
        assert max(abs(float(a - b)) for a, b in zip(got, want)) < 1e-9, lane


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_mma_ptx_on_a_simulated_warp(dtype):
    """LoRA's MMA k-step PTX on 32 simulated lanes: acc + s * (B t^T) fragments, against fp64."""
    from kernels.nf4_mma_lora import _mma_add_ptx

    kind = "f16" if dtype == torch.float16 else "bf16"
    gen = torch.Generator().manual_seed(2)
    b = torch.randn(16, 16, generator=gen).to(dtype)  # (weight rows, ranks)
    t = torch.randn(8, 16, generator=gen).to(dtype)  # (x rows, ranks)
    acc = torch.rand(32, 4, generator=gen, dtype=torch.float64)
    bb, tb = _bits16(b), _bits16(t)

    def pair(m, r, c):
        return int(m[r, c]) | int(m[r, c + 1]) << 16

    lanes = []
    for lane in range(32):
        g, q = lane // 4, lane % 4
        regs = {
            "$4": pair(bb, g, 2 * q), "$5": pair(bb, g + 8, 2 * q), "$6": pair(bb, g, 2 * q + 8),
            "$7": pair(bb, g + 8, 2 * q + 8), "$8": pair(tb, g, 2 * q), "$9": pair(tb, g, 2 * q + 8),
            "$10": 0.75,
        }  # fmt: skip
        regs.update({f"${11 + i}": float(acc[lane, i]) for i in range(4)})
        lanes.append(regs)
    out = run_ptx(_mma_add_ptx(kind), lanes, bytearray(0), kind)
    d = 0.75 * (b.double() @ t.double().T)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        want = [d[g, 2 * q], d[g, 2 * q + 1], d[g + 8, 2 * q], d[g + 8, 2 * q + 1]]
        got = [out[lane][f"${i}"] - acc[lane, i] for i in range(4)]
        assert max(abs(float(a - b)) for a, b in zip(got, want)) < 1e-9, lane


def test_byte_table_holds_both_nibbles_codes():
    for dtype in (torch.float16, torch.bfloat16):
        code = torch.tensor(reference.NF4_CODE, dtype=dtype)
        table = torch.tensor(nf4_mma_block.lut_words(dtype), dtype=torch.int64).to(torch.int32)
        pairs = table.view(dtype).reshape(256, 2)  # little-endian: the low half first
        b = torch.arange(256)
        assert torch.equal(pairs[:, 0], code[b >> 4])  # high nibble: the even element
        assert torch.equal(pairs[:, 1], code[b & 15])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("warps", [1, 2, 4, 8, 16])
def test_table_fill_ptx_on_simulated_warps(dtype, warps):
    """Each program computes its byte table (no load): the fill's PTX, run on every simulated warp
    of a program, leaves each of the 32 copies of every entry equal to lut_words, and writes
    nothing outside the table (16 warps: threads past 256 repeat the first 256's stores)."""
    smem = bytearray(b"\xaa" * (TABLE_ADDRESS + 32768 + 64))
    fill_table(nf4_mma_block.lut_fill_ptx(dtype, 32 * warps), warps, smem)
    table = nf4_mma_block.lut_words(dtype)
    want = b"".join(table[e].to_bytes(4, "little") * 32 for e in range(256))
    assert smem[TABLE_ADDRESS : TABLE_ADDRESS + 32768] == want
    assert smem[:TABLE_ADDRESS] == b"\xaa" * TABLE_ADDRESS
    assert smem[TABLE_ADDRESS + 32768 :] == b"\xaa" * 64


_COMPILE_CHECK = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import torch
from kernels.nf4_mma import _nf4_mma_kernel
from kernels.nf4_mma_block import lut_fill_ptx

sig = dict(x_ptr="*i64", w_ptr="*i64", absmax_ptr="*fp32", code_ptr="*fp32",
           t_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", M="i32", T_SPLITS="i32", N_OUT="i32", kq="i32",
           kb="i32", stride_xq="i32", stride_ym="i32", lora_scale="fp32")
for x_kind, ab in ((1, "f16"), (2, "bf16")):
    for tiles, warps, ahead, swiglu in ((1, 4, 0, False), (2, 8, 2, True), (4, 16, 1, False)):
        fill = lut_fill_ptx(torch.float16 if x_kind == 1 else torch.bfloat16, 32 * warps)
        const = dict(R=16, RP=16, TSP=4, TILES=tiles, WARPS=warps, AHEAD=ahead, X_KIND=x_kind,
                     SWIGLU=swiglu, ASM=True, PDL=False, LUT_FILL=fill)
        k = triton.compile(ASTSource(_nf4_mma_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 1})
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32" in k.asm["ptx"]
        assert k.asm["ptx"].count("nf4lut[") == 1  # the byte table is declared once
        # the fill for this warp count and 16-bit format: its entries a thread, its codes
        assert k.asm["ptx"].count("add.u32 e, t, ") == max(1, 8 // warps)
        assert all(line in k.asm["ptx"] for line in fill.splitlines() if line.startswith("mov.u32 q"))
        ttgir = k.asm["ttgir"]
        layouts = dict(re.findall(r"^(#\\w+) = (.*)$", ttgir, re.M))
        asm_types = re.findall(r"tt.elementwise_inline_asm .*", ttgir)
        assert asm_types
        for line in asm_types:
            for shape, enc in re.findall(r"tensor<(\\w+)x\\w+, (#\\w+)>", line.split(" : ", 1)[1]):
                assert shape == str(32 * warps), line[-200:]
                want = f"sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{warps}]"
                assert want in layouts[enc], (enc, layouts[enc])
"""


def test_compiles_for_hopper_with_one_element_a_thread():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", nf4_mma.CONFIGS)
@pytest.mark.parametrize("n, k, swiglu", [(14336, 4096, False), (4096, 14336, False), (28672, 4096, True)])
@pytest.mark.parametrize("rows", [1, 8])
def test_llama_shapes_on_gpu(cfg, n, k, swiglu, rows):
    y, want = _run(n, k, rows, torch.bfloat16, 16, swiglu, cfg, seed=5, scale=2.0)
    torch.testing.assert_close(y.double(), want, atol=1.6e-2, rtol=1.6e-2)
    assert ((y.double() - want).norm() / want.norm()).item() < 6e-3


def test_tuner_offers_the_mma_kernel_for_16_bit_x_and_any_rows(monkeypatch):
    from kernels import nf4_linear

    offered = []
    pick = nf4_linear.pick_config

    def spy(key, n_out, kw, mp, launch, candidates, weights):
        offered.append((key[3], key[4], any(c[0] == "mma" for c in candidates)))
        return pick(key, n_out, kw, mp, launch, candidates, weights)

    monkeypatch.setattr(nf4_linear, "pick_config", spy)
    packed = torch.randint(0, 256, (32 * 64 // 2,), dtype=torch.uint8).to(DEVICE)
    absmax = torch.ones(32, device=DEVICE)
    cases = (
        (4, torch.float32),
        (4, torch.bfloat16),
        (2, torch.bfloat16),
        (1, torch.float32),
        (8, torch.float16),
    )
    for rows, dtype in cases:
        nf4_linear.nf4_linear(torch.randn(rows, 64, device=DEVICE, dtype=dtype), packed, absmax, (32, 64))
    assert offered == [
        (4, torch.float32, False),
        (4, torch.bfloat16, True),
        (2, torch.bfloat16, True),
        (1, torch.float32, False),
        (8, torch.float16, True),
    ]


@pytest.mark.parametrize("rows", [4, 1])
def test_no_mma_candidate_before_sm80(rows, monkeypatch):
    # nor an fp16-product one (kernels/nf4_half.py converts x with cvt.rn.f16x2.f32, sm_80+)
    from kernels import nf4_linear
    from kernels.nf4_gemv import uses_half

    offered = []
    monkeypatch.setattr(nf4_linear, "interpreting", lambda: False)  # as on a GPU
    monkeypatch.setattr(nf4_linear.nf4_mma, "supported", lambda device: False)  # a T4 or V100
    monkeypatch.setattr(nf4_linear, "_gemv_supported", lambda *args: True)
    monkeypatch.setattr(
        nf4_linear, "pick_config", lambda key, n, kw, mp, launch, c, w: offered.append(c) or c[0]
    )
    monkeypatch.setattr(nf4_linear, "launch_gemv_rows", lambda *args: None)
    monkeypatch.setattr(nf4_linear, "launch_gemv", lambda *args: None)
    packed = torch.zeros(32 * 64 // 2, dtype=torch.uint8)
    nf4_linear.nf4_linear(torch.randn(rows, 64, dtype=torch.bfloat16), packed, torch.ones(32), (32, 64))
    assert offered and not any(c[0] == "mma" or uses_half(c) for c in offered[0])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n_out, kw", [(1024, 512), (4096, 1792), (14336, 512), (40, 8), (40, 64)])
def test_untuned_default_keeps_exact_codes(rows, n_out, kw, monkeypatch):
    """Without timing (tuning off, graph capture, the interpreter) the GEMV runs a default: one
    program a tile and exact fp32 codes, never the byte table's fp16 codes or fp16 products."""
    from kernels import nf4_tune

    monkeypatch.setattr(nf4_tune, "tuning_enabled", lambda: False)
    key = ("default-test", n_out, 8 * kw, rows)
    cfg = nf4_tune.pick_config(key, n_out, kw, rows, None, nf4_tune.CONFIGS[rows])
    assert cfg[0] != "mma" and cfg[4] == 0 and cfg[5] == 0, cfg


def test_tuner_skips_a_config_that_does_not_compile(monkeypatch):

    from kernels import nf4_tune

    monkeypatch.setattr(nf4_tune, "tuning_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(nf4_tune, "time_config", lambda launch, cfg, copies: launch(cfg) or 1.0)

    def launch(cfg):
        if cfg[0] == "mma":
            raise RuntimeError("PTX assembly failed for this target")

    key = ("test-device", 64, 128, 8, torch.bfloat16, False, False, torch.float32)
    cfg = nf4_tune.pick_config(key, 64, 16, 8, launch, nf4_tune.CONFIGS[8])
    assert cfg[0] != "mma" and nf4_tune.TUNED.pop(key) == cfg


def test_tuner_picks_are_kept_for_the_next_start(monkeypatch, tmp_path, caplog):
    """A pick is stored under the GPU's fingerprint and read back by a later process (TUNED
    cleared here) without timing anything; another fingerprint, or a stored config that is no
    longer a candidate, is timed anew; an unwritable file only warns."""
    import json

    from kernels import nf4_tune

    path = tmp_path / "picks.json"
    monkeypatch.setenv("NF4_TUNE_CACHE", str(path))
    monkeypatch.setattr(nf4_tune, "tuning_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(nf4_tune, "fingerprint", lambda device: "gpu-a")
    candidates = nf4_tune.CONFIGS[8]
    best, timed = candidates[-2], []  # a tensor-core config: it fits any K
    # the fake timer: the config just launched takes 0.5 ms if it is `best`, else 1 ms
    monkeypatch.setattr(
        nf4_tune, "time_config", lambda launch, cfg, copies: launch(cfg) or 0.5 + (timed[-1] != best) / 2
    )
    key = (torch.device("cuda", 0), 64, 128, 8, torch.bfloat16, False, True, torch.float32)

    def pick(offered=candidates) -> tuple:
        nf4_tune.TUNED.pop(key, None)  # a new process
        return nf4_tune.pick_config(key, 64, 16, 8, timed.append, offered)

    assert pick() == best and len(timed) > 1
    fits = len(timed)
    assert list(json.loads(path.read_text()).values()) == [list(best)]
    timed.clear()
    assert pick() == best and not timed  # read back: nothing timed
    others = (
        key[:3] + (4,) + key[4:], key[:5] + (True,) + key[6:], key[:6] + (64,) + key[7:],
        key[:7] + (torch.float16,),
    )  # fmt: skip
    for other in others:
        nf4_tune.TUNED.pop(other, None)  # another row count, SwiGLU, LoRA rank, scales: timed anew
        assert nf4_tune.pick_config(other, 64, 16, 8, timed.append, candidates) and timed
        timed.clear()
        nf4_tune.TUNED.pop(other)
    monkeypatch.setattr(nf4_tune, "fingerprint", lambda device: "gpu-b")
    assert pick() == best and len(timed) == fits  # another GPU: timed anew
    assert len(json.loads(path.read_text())) == 6
    timed.clear()
    assert pick(candidates[:-2]) != best and timed  # the stored pick is not offered: timed anew
    path.write_text("[1, 2]")  # not what the tuner wrote: ignored, then replaced
    assert pick() == best and json.loads(path.read_text())
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NF4_TUNE_CACHE", str(tmp_path / "a-file" / "picks.json"))
    assert pick() == best  # not saved there, not fatal: one warning
    assert "not saved" in caplog.text
    nf4_tune.TUNED.pop(key, None)


def test_tuner_times_each_config_on_copies_of_the_weight_beyond_the_l2(monkeypatch):
    """weight_copies: the weight itself first, then clones (equal values, their own memory)
    until the copies hold more than twice the L2, between 2 and 16 of them."""
    from types import SimpleNamespace

    from kernels import nf4_tune

    words, scales = torch.arange(1000, dtype=torch.int32), torch.rand(40)  # 4160 bytes
    for l2, count in ((1 << 20, 16), (4160, 2), (10_000, 5), (10, 2)):
        props = SimpleNamespace(L2_cache_size=l2)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        copies = nf4_tune.weight_copies((words, scales))
        assert len(copies) == count and copies[0][0] is words and copies[0][1] is scales
        for w, s in copies[1:]:
            assert torch.equal(w, words) and torch.equal(s, scales)
            assert w.data_ptr() != words.data_ptr() and s.data_ptr() != scales.data_ptr()
    assert nf4_tune.weight_copies(()) == [()]


def test_a_pick_after_a_failure_that_may_pass_is_used_but_not_stored(monkeypatch, tmp_path):
    """A config that fails to build (compile error, ptxas) is skipped and the pick stored; one
    that fails at launch or capture (out of memory, a refused capture) may run another time: the
    pick over the others is used in this process but not written for the next start."""
    import json

    import triton

    from kernels import nf4_tune

    path = tmp_path / "picks.json"
    monkeypatch.setenv("NF4_TUNE_CACHE", str(path))
    monkeypatch.setattr(nf4_tune, "tuning_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(nf4_tune, "fingerprint", lambda device: "gpu-a")
    monkeypatch.setattr(nf4_tune, "time_config", lambda launch, cfg, copies: launch(cfg) or 1.0)
    candidates = nf4_tune.CONFIGS[8]
    key = (torch.device("cuda", 0), 64, 128, 8, torch.bfloat16, False, 0, torch.float32)
    for error, stored in (
        (triton.runtime.errors.PTXASError("ptxas failed"), True),
        (RuntimeError("CUDA error: out of memory"), False),
    ):
        path.unlink(missing_ok=True)
        nf4_tune.TUNED.pop(key, None)

        def launch(cfg, error=error):
            if cfg[0] == "mma":
                raise error

        cfg = nf4_tune.pick_config(key, 64, 16, 8, launch, candidates)
        assert cfg[0] != "mma" and nf4_tune.TUNED.pop(key) == cfg
        assert path.exists() == stored
        if stored:
            assert list(json.loads(path.read_text()).values()) == [list(cfg)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_time_config_times_a_captured_launch_on_each_copy():
    """The tuner's timing on the device: a finite positive time, the output of the last copy's
    launch (each copy's weight read), no memory left behind but the copies the caller holds."""
    from kernels import nf4_tune

    n, k = 4096, 4096
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(n * k // 64, device="cuda") + 0.25
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    from kernels import nf4_linear

    cfg = nf4_tune.CONFIGS[1][0]
    key = (x.device, n, k, 1, x.dtype, False, 0, torch.float32)

    def forced(w, s):  # the config under test, not the tuner's pick (another config rounds apart)
        nf4_linear._TUNED[key] = cfg
        try:
            return nf4_linear.nf4_linear(x, w.view(torch.uint8), s, (n, k))
        finally:
            nf4_linear._TUNED.pop(key)

    want = forced(packed, absmax)
    words = packed.view(torch.int32)
    copies = nf4_tune.weight_copies((words, absmax))
    assert len(copies) >= 2
    seen = []

    def launch(config, w, s):
        assert config == cfg
        seen.append(w.data_ptr())
        y = forced(w, s)
        assert torch.cuda.is_current_stream_capturing() or torch.equal(y, want)

    before = torch.cuda.memory_allocated()
    ms = nf4_tune.time_config(launch, cfg, copies)
    assert 0 < ms < 1 and set(seen) == {w.data_ptr() for w, _ in copies}
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 2 * (1 << 20)  # the graph's outputs, freed or small


def test_table_opt_in_tells_apart_what_triton_compiles_apart():
    # allow_table sets the shared-memory opt-in once per compiled kernel; a key that merged two
    # of Triton's specializations (an fp32 LoRA B next to a bf16 one) left the second kernel
    # without it, and its launch failed on the GPU ("invalid argument").
    spec = nf4_mma_block.specialization
    bf16, fp32 = torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8)
    assert spec((bf16, 4096)) != spec((fp32, 4096))
    assert spec((bf16[1:], 4096)) != spec((bf16, 4096))  # 2-byte offset: not 16-byte aligned
    assert spec((bf16, 1)) != spec((bf16, 2)) != spec((bf16, 16)) != spec((bf16, 2**31 + 16))
    assert spec((bf16, 32, 0.5)) == spec((bf16, 48, 0.25))  # floats are not specialized
