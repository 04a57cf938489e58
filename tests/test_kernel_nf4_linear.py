"""kernels/nf4_linear.py (the NF4 GEMV dispatch) and the GEMVs behind it (kernels/nf4_gemv.py,
nf4_gemv_rows.py), with LoRA and the SwiGLU epilogue, against references.

The oracle is the same computation in fp64 on the exactly dequantized weight. The kernel
accumulates in fp32 and rounds once to x's dtype, so the tolerances are the output dtype's
rounding (outputs are O(1): x is scaled by 1/sqrt(K)) plus fp32 sums; kernels.reference
(which rounds W to x's dtype first) and bitsandbytes are checked against the same bounds.
Rows 1..8 take a GEMV (1-2 rows the staged one, 3-8 rows kernels.nf4_gemv_rows); 17 rows and
K % 64 != 0 take the dequantize + matmul path. On CPU
everything runs under TRITON_INTERPRET=1, which decodes with a table gather instead of the
GPU's warp shuffle (the same fp32 values); the GPU-marked tests cover the shuffle path at
Llama sizes and inside a CUDA graph.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import nf4_linear as gemv  # noqa: E402
from kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, K, rows of x)
SHAPES = [
    (1, 64, 1),  # one output, one block
    (5, 123, 2),  # odd everything: K % 64 != 0, blocks cross rows (dequantize path)
    (33, 192, 3),  # N not a multiple of the tile, K = 3 blocks (24 words: a partial K tile)
    (16, 1024, 8),  # the most rows the GEMV takes
    (40, 4096, 5),  # the rows kernel over whole K steps (no K masks), 8 row slots for 5 rows
    (12, 256, 17),  # prefill path
    (48, 4096, 1),  # a Llama-3-8B row length
    (24, 3072, 1),  # LoRA partial sums over 3 K chunks (not a power of two), 1-2 row kernel
    (24, 3072, 5),  # the same through the rows kernel
]
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]
RANKS = [0, 3, 16]


def _problem(n, k, rows, dtype, rank, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    numel = n * k
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
    absmax = torch.rand(-(-numel // 64), generator=g) + 0.25
    x = torch.randn(2, rows, k, generator=g)[:1] / k**0.5  # a view with a leading dim
    lora = (None, None)
    if rank:
        lora = (torch.randn(rank, k, generator=g) * 0.3, torch.randn(n, rank, generator=g) * 0.3)
        lora = tuple(t.to(DEVICE, dtype) for t in lora)
    return packed.to(DEVICE), absmax.to(DEVICE), x.to(DEVICE, dtype), lora


def _oracle(x, packed, absmax, shape, lora, scale, swiglu):
    w = reference.nf4_dequantize(packed, absmax, shape, torch.float64)
    y = x.double() @ w.T
    if lora[0] is not None:
        y = y + (x.double() @ lora[0].double().T) @ lora[1].double().T * scale
    if swiglu:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    return y


@pytest.mark.parametrize("n, k, rows", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("swiglu", [False, True])
def test_linear_matches_oracle(n, k, rows, dtype, atol, rtol, rank, swiglu):
    n = 2 * n if swiglu else n
    packed, absmax, x, lora = _problem(n, k, rows, dtype, rank, seed=n * 7 + k + rows + rank)
    op = gemv.nf4_linear_swiglu if swiglu else gemv.nf4_linear
    ref_op = reference.nf4_linear_swiglu if swiglu else reference.nf4_linear
    ours = op(x, packed, absmax, (n, k), *lora, lora_scale=0.5)
    want = _oracle(x, packed, absmax, (n, k), lora, 0.5, swiglu)
    assert ours.shape == want.shape == (1, rows, n // 2 if swiglu else n)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), want, atol=atol, rtol=rtol)
    theirs = ref_op(x, packed, absmax, (n, k), *lora, lora_scale=0.5)
    torch.testing.assert_close(theirs.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("n, k, rows", [(5, 128, 1), (20, 320, 4), (7, 100, 2)])
def test_linear_matches_bitsandbytes(n, k, rows):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator(device="cpu").manual_seed(11)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    x = (torch.randn(rows, k, generator=g) / k**0.5).to(DEVICE)
    theirs = x @ bnb.functional.dequantize_4bit(packed, state).T
    ours = gemv.nf4_linear(x, packed, absmax, (n, k))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", sorted(gemv._CONFIGS))
@pytest.mark.parametrize("n, k", [(2 * 37, 320), (2 * 64, 2048)])
def test_every_tuner_config_matches_oracle(rows, n, k, monkeypatch):
    # The tuner may pick any candidate on some machine, so each one must be right: forced here
    # one by one, with LoRA and SwiGLU; N not a multiple of any tile and partial K tiles, then
    # whole tiles and K steps (the loads without masks).
    packed, absmax, x, lora = _problem(n, k, rows, torch.bfloat16, 5, seed=rows)
    want = _oracle(x, packed, absmax, (n, k), lora, 0.5, True)
    for cfg in gemv._CONFIGS[rows]:
        key = (x.device, n // 2, k, rows, x.dtype, True, 8, torch.float32)  # LoRA rank 5, compiled as 8
        monkeypatch.setitem(gemv._TUNED, key, cfg)
        ours = gemv.nf4_linear_swiglu(x, packed, absmax, (n, k), *lora, lora_scale=0.5)
        torch.testing.assert_close(ours.double(), want, atol=1.6e-2, rtol=1.6e-2, msg=str(cfg))


@pytest.mark.parametrize("rows", sorted(gemv._CONFIGS))
def test_every_tuner_config_matches_oracle_on_fp16_scales(rows, monkeypatch):
    # The model hands the GEMVs absmax rounded to fp16 (model.quant.half_absmax) for 16-bit x:
    # every candidate reads them (fp16 pointers) and stays within the bf16 bounds of the oracle,
    # which keeps the exact fp32 absmax.
    n, k = 2 * 37, 320
    packed, absmax, x, lora = _problem(n, k, rows, torch.bfloat16, 5, seed=rows + 40)
    want = _oracle(x, packed, absmax, (n, k), lora, 0.5, True)
    for cfg in gemv._CONFIGS[rows]:
        key = (x.device, n // 2, k, rows, x.dtype, True, 8, torch.float16)
        monkeypatch.setitem(gemv._TUNED, key, cfg)
        ours = gemv.nf4_linear_swiglu(
            x, packed, absmax, (n, k), *lora, lora_scale=0.5, absmax_half=absmax.half()
        )
        torch.testing.assert_close(ours.double(), want, atol=1.6e-2, rtol=1.6e-2, msg=str(cfg))


@pytest.mark.parametrize(
    "dtype, rows", [(torch.bfloat16, 1), (torch.float16, 5), (torch.float32, 1), (torch.bfloat16, 17)]
)
def test_gemv_reads_the_fp16_scales_for_16_bit_x_only(dtype, rows):
    # Scales that differ from absmax show which ones a path reads: the GEMVs read absmax_half
    # for 16-bit x; fp32 x (exact codes and scales) and the dequantize path (more rows than a
    # GEMV takes) read the exact absmax.
    n, k = 24, 256
    packed, absmax, x, _ = _problem(n, k, rows, dtype, 0, seed=rows + 3)
    want = _oracle(x, packed, absmax, (n, k), (None, None), 1.0, False)
    ours = gemv.nf4_linear(x, packed, absmax, (n, k), absmax_half=(2 * absmax).half()).double()
    reads_half = dtype != torch.float32 and rows <= gemv.GEMV_MAX_ROWS
    torch.testing.assert_close(ours, want * 2 if reads_half else want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "dtype, magnitude",  # fp16 x this large would overflow y itself
    [(torch.float16, 2e-3), (torch.float16, 1.0), (torch.bfloat16, 2e-3), (torch.bfloat16, 1e4)],
)
def test_fp16_products_hold_across_the_range_of_x(dtype, magnitude, monkeypatch):
    # The fp16 path scales x by 2^-4 into fp16 and sums a pair of words' 16 products there: tiny
    # x (fp16's subnormals) and large x must stay within the bounds the fp32 path keeps (bf16
    # output: its rounding dominates; fp16: a few times 2^-11). Without the scale the sum of 16
    # products of x near 6e4 (fp16's largest is 65504) would be inf.
    n, k, rows = 48, 4096, 1
    packed, absmax, x, lora = _problem(n, k, rows, dtype, 16, seed=13)
    x = (x.float() * k**0.5 * magnitude).to(dtype)  # entries ~N(0, magnitude)
    if magnitude > 1:
        x[0, 0, :64] = 6e4  # one block all near fp16's largest value
    want = _oracle(x, packed, absmax, (n, k), lora, 0.5, False)
    half = [c for c in gemv._CONFIGS[1] if c[0] != "mma" and c[5] == 2]
    assert half
    for cfg in half:
        monkeypatch.setitem(gemv._TUNED, (x.device, n, k, rows, x.dtype, False, 16, torch.float32), cfg)
        ours = gemv.nf4_linear(x, packed, absmax, (n, k), *lora, lora_scale=0.5).double()
        assert torch.isfinite(ours).all(), cfg
        scale = want.abs().max()
        torch.testing.assert_close(ours / scale, want / scale, atol=8e-3, rtol=0, msg=str(cfg))
        assert ((ours - want).norm() / want.norm()).item() < 6e-3, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_x_is_never_tuned_onto_fp16_codes(dtype, monkeypatch):
    # The byte table rounds the codes to fp16, the tensor cores x too: fine for 16-bit x, not for
    # fp32 x, which is held to 1e-5 on the GPU. The tuner must not be offered those configs.
    offered = []

    def record(key, n_out, kw, mp, launch, candidates, weights=()):
        offered.extend(candidates)
        return candidates[0]

    from kernels.nf4_gemv import uses_table

    monkeypatch.setattr(gemv, "pick_config", record)
    packed, absmax, x, _ = _problem(16, 128, 1, dtype, 0, seed=4)
    gemv.nf4_linear(x, packed, absmax, (16, 128))
    tables = [c for c in offered if uses_table(c) or c[0] == "mma"]
    assert offered and (not tables if dtype == torch.float32 else tables)


@pytest.mark.parametrize("n, k, rows", [(33, 192, 1), (24, 3072, 2), (40, 4096, 5), (5, 123, 2)])
@pytest.mark.parametrize("swiglu", [False, True])
def test_linear_takes_lora_t_from_the_norm(n, k, rows, swiglu):
    # x A^T handed in as partial sums (kernels.rmsnorm_lora.rms_norm_lora_down) gives what the GEMV
    # gives computing it itself: the 1-2 row kernel, the rows kernel and (K % 64 != 0) the
    # dequantize path, which sums the partials and rounds once as the GEMV does.
    from kernels.nf4_lora import lora_down

    n = 2 * n if swiglu else n
    packed, absmax, x, lora = _problem(n, k, rows, torch.bfloat16, 16, seed=n + k + rows)
    op = gemv.nf4_linear_swiglu if swiglu else gemv.nf4_linear
    t = lora_down(x.reshape(rows, k), lora[0], use_pdl=False)
    ours = op(x, packed, absmax, (n, k), *lora, lora_scale=0.5, lora_t=t)
    itself = op(x, packed, absmax, (n, k), *lora, lora_scale=0.5)
    want = _oracle(x, packed, absmax, (n, k), lora, 0.5, swiglu)
    torch.testing.assert_close(ours.double(), want, atol=1.6e-2, rtol=1.6e-2)
    ref_op = reference.nf4_linear_swiglu if swiglu else reference.nf4_linear
    theirs = ref_op(x, packed, absmax, (n, k), *lora, lora_scale=0.5, lora_t=t)
    torch.testing.assert_close(theirs.double(), want, atol=1.6e-2, rtol=1.6e-2)
    if k % 64 == 0:  # the same kernels with the same partials: the same result
        assert torch.equal(ours, itself)
    with pytest.raises(ValueError, match="partial sums"):
        op(x, packed, absmax, (n, k), *lora, lora_scale=0.5, lora_t=t[:, :, :8])
    with pytest.raises(ValueError, match="partial sums"):
        op(x, packed, absmax, (n, k), lora_t=t)


def test_linear_rejects_bad_arguments():
    packed, absmax, x, (a, b) = _problem(4, 64, 1, torch.float32, 2, seed=1)
    with pytest.raises(ValueError, match="features"):
        gemv.nf4_linear(x[..., :32], packed, absmax, (4, 64))
    with pytest.raises(ValueError, match="together"):
        gemv.nf4_linear(x, packed, absmax, (4, 64), a, None)
    with pytest.raises(ValueError, match="even"):
        gemv.nf4_linear_swiglu(x, packed, absmax, (3, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, k, swiglu", [(14336, 4096, False), (4096, 14336, False), (28672, 4096, True)])
@pytest.mark.parametrize("rows", [1, 8])
def test_llama_shapes_on_gpu(n, k, swiglu, rows):
    packed, absmax, x, lora = _problem(n, k, rows, torch.bfloat16, 16, seed=5)
    op = gemv.nf4_linear_swiglu if swiglu else gemv.nf4_linear
    ours = op(x, packed, absmax, (n, k), *lora, lora_scale=2.0)
    want = _oracle(x, packed, absmax, (n, k), lora, 2.0, swiglu)
    torch.testing.assert_close(ours.double(), want, atol=1.6e-2, rtol=1.6e-2)
    # bf16 output rounding alone is ~1.1e-3 relative; SwiGLU's product of two rounded halves
    # and the rounded x A^T roughly double that (4.0e-3 measured on an H200).
    assert ((ours.double() - want).norm() / want.norm()).item() < 6e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 3])
def test_cuda_graph_capture_and_replay(rows):
    n, k = 1024, 4096
    packed, absmax, x, lora = _problem(n, k, rows, torch.bfloat16, 16, seed=9)
    static_x = x.clone()
    gemv.nf4_linear(static_x, packed, absmax, (n, k), *lora)  # tunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = gemv.nf4_linear(static_x, packed, absmax, (n, k), *lora)
    for seed in range(3):
        fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) / k**0.5
        static_x.copy_(fresh)
        static_y.fill_(float("nan"))
        graph.replay()
        want = _oracle(static_x, packed, absmax, (n, k), lora, 1.0, False)
        torch.testing.assert_close(static_y.double(), want, atol=1.6e-2, rtol=1.6e-2)
