"""Programmatic dependent launch (kernels/pdl.py): when it is on, and what the kernels compile to.

Whether PDL changes any result is a device question (tests/test_gpu_decode.py compares decode
with it on and off); here: it stays off where it cannot run, and every kernel that the decode
step launches with it compiles for sm_90 with both grid-dependency instructions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import compile_for_hopper

from kernels import pdl


def test_off_unless_asked_and_never_on_cpu_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("KERNELS_PDL", raising=False)
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # off by default (slower, bench/NOTES.md)
    monkeypatch.setenv("KERNELS_PDL", "1")
    assert not pdl.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # decided before asking for a device


_COMPILE_CHECK = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.decode_attention import _decode_attention_kernel
from kernels.nf4_gemv_rows import _nf4_gemv_rows_kernel
from kernels.nf4_gemv import _nf4_gemv_kernel
from kernels.nf4_lora import _lora_down_kernel
from kernels.nf4_mma import _nf4_mma_kernel
from kernels.nf4_mma_block import lut_fill_ptx
from kernels.rmsnorm import _rms_norm_forward_kernel
from kernels.rope import _rope_kernel

target = GPUTarget("cuda", 90, 32)
norm = dict(x_ptr="*bf16", r_ptr="*bf16", s_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16",
            rstd_ptr="*fp32", stride_x="i32", stride_r="i32", N="i32", eps="fp32")
rope = {name: "i64" for name in ("T", "sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "sqo_b",
        "sqo_t", "sqo_h", "sko_b", "sko_t", "sko_h", "sc_b", "sc_t", "ss_b", "ss_t", "sv_b",
        "sv_t", "sv_h", "svo_h")}
rope.update(q_ptr="*bf16", k_ptr="*bf16", qo_ptr="*bf16", ko_ptr="*bf16", cos_ptr="*fp32",
            sin_ptr="*fp32", v_ptr="*bf16", vo_ptr="*bf16", rows_ptr="*i64", pos_ptr="*i64")
gemv = dict(x_ptr="*i32", w_ptr="*i32", absmax_ptr="*fp32", code_ptr="*fp32", t_ptr="*fp32",
            b_ptr="*bf16", y_ptr="*bf16", M="i32", T_SPLITS="i32", N_OUT="i32", kw="i32", kb="i32",
            stride_xm="i32", stride_ym="i32", lora_scale="fp32")
attn = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", rows_ptr="*i64",
            o_ptr="*bf16", ml_ptr="*fp32", kn_ptr="*bf16", vn_ptr="*bf16", cos_ptr="*fp32",
            sin_ptr="*fp32", a_ptr="*bf16", t_ptr="*fp32", s_row="i64", s_head="i64", s_pos="i64",
            stride_qb="i32", stride_nb="i32", B="i32", scale="fp32")
cases = {
    "rms_norm": (_rms_norm_forward_kernel, norm, dict(HAS_RESIDUAL=True, STORE_RSTD=False,
                 BLOCK_N=4096)),
    "rope_kv_cache": (_rope_kernel, rope, dict(HQ=32, HK=8, HALF=64, BLOCK_HQ=32, BLOCK_HK=8,
                      BLOCK_HALF=64, BACKWARD=False, CACHE=True)),
    "decode_attention": (_decode_attention_kernel, attn, dict(HQ=32, G=4, BLOCK_G=16, GP=4, D=128,
                         BLOCK_N=64, SPLITS=1, SPLIT_LEN=512, PRECISION="tf32", ROPE=True, R=0, RP=1)),
    "lora_down": (_lora_down_kernel, dict(x_ptr="*bf16", a_ptr="*bf16", t_ptr="*fp32", M="i32",
                  K="i32", R="i32", stride_xm="i32"), dict(MP=1, BLOCK_K=2048)),
    "gemv": (_nf4_gemv_kernel, gemv, dict(MP=1, R=16, RP=16, TSP=4, BN=16,
             LUT_FILL=lut_fill_ptx(torch.float16, 128),
             BKW=128, X_KIND=2, SWIGLU=False, DECODE=2, EVEN=True, HALF=True, NUM_STAGES=3,
             PERSISTENT=False)),
    "gemv_no_lora": (_nf4_gemv_kernel, gemv, dict(MP=1, R=0, RP=1, TSP=4, LUT_FILL="",
                     BN=16, BKW=128, X_KIND=2, SWIGLU=False, DECODE=1, EVEN=False, HALF=False, NUM_STAGES=3,
                     PERSISTENT=True)),
    "gemv_rows": (_nf4_gemv_rows_kernel, gemv, dict(MP=8, R=16, RP=16, TSP=4, BN=2, BKW=512, X_KIND=2,
                  SWIGLU=True, DECODE_SHFL=True, EVEN_K=True)),
    "gemv_mma": (_nf4_mma_kernel, {**{k: v for k, v in gemv.items() if k not in ("kw", "stride_xm")},
                 "x_ptr": "*i64", "w_ptr": "*i64", "kq": "i32", "stride_xq": "i32"},
                 dict(R=16, RP=16, TSP=4, TILES=1, WARPS=4, AHEAD=2, X_KIND=2, SWIGLU=False, ASM=True,
                      LUT_FILL=lut_fill_ptx(torch.bfloat16, 128))),
}
for name, (fn, sig, const) in cases.items():
    for on in (True, False):
        ptx = triton.compile(ASTSource(fn, sig, {**const, "PDL": on}), target=target,
                             options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
        for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents"):
            assert (op in ptx) == on, (name, op, on)
"""


def test_decode_kernels_compile_with_grid_dependency_control():
    pytest.importorskip("triton.backends.nvidia.compiler")
    compile_for_hopper(_COMPILE_CHECK)
