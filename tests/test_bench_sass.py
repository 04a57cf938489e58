"""bench/sass.py: the GEMV loop's machine code, counted on the CPU (compiled for sm_90)."""

from __future__ import annotations

import pytest
from helpers import compile_for_hopper

from bench import sass

_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS R2, [R3+UR4] ;
        /*0020*/                   HFMA2 R4, R2, R5, R4 ;
        /*0030*/              @!P0 BRA `(.L_x_1) ;
        /*0040*/                   LOP3.LUT R3, R6, 0x7f80, R7, 0xf8, !PT ;
.L_x_1:
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""


def test_loop_opcodes_counts_the_longest_loop_body():
    # the body runs from the label to the backward branch: the forward branch's target inside it
    # starts no loop of its own, and what lies before and after is not counted
    assert sass.loop_opcodes(_LOOP) == {"LDS": 1, "HFMA2": 1, "BRA": 2, "LOP3": 1}
    with pytest.raises(ValueError):
        sass.loop_opcodes(_LOOP.replace("(.L_x_0)", "(.L_x_1)").replace(".L_x_1:\n", ""))


# The interpreter (CI's CPU runs) cannot compile for a GPU: the reports run in a process without it.
_REPORTS = """
from bench import sass
half = sass.report((16, 128, 4, 3, 0, 2), 28672, 4096)  # fp16 pairs (kernels/nf4_half.py)
fp32 = sass.report((16, 128, 4, 3, 0, 1), 28672, 4096)  # the same table, codes to fp32
assert half["weights_a_step"] == fp32["weights_a_step"] == 256
assert 1 < half["per_weight"] < fp32["per_weight"] < 10, (half["per_weight"], fp32["per_weight"])
# fp32 products: an FFMA a weight; fp16 pairs: an HFMA2 a byte (two weights), few FFMA
assert fp32["opcodes"]["FFMA"] >= 256 and half["opcodes"].get("FFMA", 0) < 64 <= half["opcodes"]["HFMA2"]
assert half["opcodes"]["LDS"] >= 128  # one byte-table load a byte: 128 bytes a thread a step
assert half["static_shared"] == fp32["static_shared"] >= 32768  # the table: 32 copies of 1 KB
"""


def test_fp16_products_take_fewer_loop_instructions_a_weight():
    pytest.importorskip("triton.backends.nvidia.compiler")
    if not all(sass.tool(name) for name in ("nvdisasm", "cuobjdump")):
        pytest.skip("nvdisasm and cuobjdump not found")
    compile_for_hopper(_REPORTS)
