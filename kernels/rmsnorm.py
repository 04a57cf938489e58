"""RMSNorm and fused residual-add + RMSNorm in Triton.

Forward (reference: kernels.reference.rms_norm / add_rms_norm, i.e. HF LlamaRMSNorm):

    s    = x + residual                 rounded to s.dtype = promote(x, residual), as torch adds
    rstd = 1 / sqrt(mean(s^2) + eps)    in fp32
    n    = s * rstd                     in fp32, then rounded to s.dtype (HF casts before scaling)
    y    = weight * n                   in promote(weight, s), one rounding

so in every dtype the kernel rounds where transformers rounds; what is left is the order of
the fp32 sum inside mean(s^2) and the last bit of rsqrt, which flipped the rounding of 2.6e-5
of the outputs (fp16, a 5 x 123 x 123 input, interpreter).

Backward, with xhat = s * rstd unrounded (the roundings pass gradients straight through):

    dn     = dy * weight
    ds     = rstd * (dn - xhat * mean(dn * xhat)) + ds_out     ds_out: gradient of the s output
    dx     = dresidual = ds
    dw     = sum over rows of dy * n

One program normalises one row in the forward.

Decode fuses the norm with a LoRA down-projection too: kernels/rmsnorm_lora.py.

The backward runs one program per SM, each looping over rows with a stride and keeping its
share of dw in registers; the partial sums are added by torch afterwards, which avoids atomics
and keeps dw deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,  # (M, N) input rows, last dim contiguous
    r_ptr,  # (M, N) residual rows; unused unless HAS_RESIDUAL
    s_ptr,  # (M, N) out: x + residual, the next residual stream; unused unless HAS_RESIDUAL
    w_ptr,  # (N,) scale
    y_ptr,  # (M, N) out: normalised and scaled rows, contiguous
    rstd_ptr,  # (M,) fp32 out: 1 / rms of each row, saved for the backward; unused unless STORE_RSTD
    stride_x,  # elements between rows of x
    stride_r,  # elements between rows of residual
    N,  # row length
    eps,  # added to the mean square before the root
    HAS_RESIDUAL: tl.constexpr,  # fuse the residual add in front
    STORE_RSTD: tl.constexpr,  # whether a backward will follow
    BLOCK_N: tl.constexpr,  # power of two >= N: a whole row lives in registers
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    pdl.wait(PDL)
    pdl.release(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * N + cols, s, mask=mask)
    else:
        s = x
    h = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    n = (h * rstd).to(s.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (w * n).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,  # (M, N) gradient of y, contiguous
    dsout_ptr,  # (M, N) gradient of the s output, contiguous; unused unless HAS_DS_OUT
    s_ptr,  # (M, N) the normalised input saved by the forward, contiguous
    rstd_ptr,  # (M,) fp32 1 / rms of each row from the forward
    w_ptr,  # (N,) scale
    ds_ptr,  # (M, N) out: gradient of s (= of x and of residual), contiguous
    dw_partial_ptr,  # (programs, N) fp32 out: each program's share of dw
    M,  # number of rows
    N,  # row length
    HAS_DS_OUT: tl.constexpr,  # s was an output too (fused add) and has its own gradient
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # An int64 start makes the loop counter int64, so row * N cannot wrap.
    for row in range(pid.to(tl.int64), M, tl.num_programs(0)):
        s = tl.load(s_ptr + row * N + cols, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = s.to(tl.float32) * rstd
        dw += dy * xhat.to(s.dtype).to(tl.float32)
        dn = dy * w
        ds = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / N))
        if HAS_DS_OUT:
            ds += tl.load(dsout_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + row * N + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _block_and_warps(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"rms_norm keeps a row in registers; rows of {n} > 65536 do not fit.")
    # Liger-Kernel's calculate_settings: more warps as the row grows, so each thread keeps
    # at most a few dozen values in registers.
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) without a copy where the layout allows; last dim made contiguous."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def forward_buffers(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor):
    """(x2, r2, y, s) for a forward launch: x and residual as (M, N) rows (r2 = x2 without a
    residual), and y and s allocated (M, N) in the dtypes torch's ops give (s = x2 without one)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}.")
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, s_dtype), device=x.device)
    s = torch.empty(x2.shape, dtype=s_dtype, device=x.device) if residual is not None else x2
    return x2, r2, y, s


def rms_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    store_rstd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward: returns (y, s, rstd) with s = x when residual is None.

    y and s come back contiguous with x's shape; rstd is (M,) fp32, or None unless asked for.
    """
    shape, n = x.shape, x.shape[-1]
    x2, r2, y, s = forward_buffers(x, residual, weight)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device) if store_rstd else None
    if x2.shape[0] > 0:
        block, warps = _block_and_warps(n)
        use_pdl = pdl.pdl_enabled(x.device)
        _rms_norm_forward_kernel[(x2.shape[0],)](
            x2, r2, s, weight.contiguous(), y, rstd if store_rstd else y,
            x2.stride(0), r2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, STORE_RSTD=store_rstd,
            BLOCK_N=block, PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl, enable_fp_fusion=True,
        )  # fmt: skip
    return y.view(shape), s.view(shape) if residual is not None else x, rstd


def _num_programs(device: torch.device, rows: int) -> int:
    # One program per SM keeps the dw partial buffer small and every SM busy; the interpreter
    # runs programs one after another, so there a few are enough.
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    return max(1, min(rows, sms))


def rms_norm_backward(
    dy: torch.Tensor,
    ds_out: torch.Tensor | None,
    s: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: returns (ds, dw), ds in s's dtype and shape, dw in weight's dtype."""
    n = s.shape[-1]
    s2 = s.reshape(-1, n).contiguous()
    dy2 = dy.reshape(-1, n).contiguous()
    ds_out2 = ds_out.reshape(-1, n).contiguous() if ds_out is not None else dy2
    m = s2.shape[0]
    ds = torch.empty_like(s2)
    programs = _num_programs(s.device, m)
    dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=s.device)
    if m > 0:
        block, warps = _block_and_warps(n)
        _rms_norm_backward_kernel[(programs,)](
            dy2, ds_out2, s2, rstd, weight.contiguous(), ds, dw_partial, m, n,
            HAS_DS_OUT=ds_out is not None, BLOCK_N=block, num_warps=warps, enable_fp_fusion=True,
        )  # fmt: skip
    return ds.view(s.shape), dw_partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = rms_norm_forward(x, None, weight, eps, store_rstd=True)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, None, x, rstd, weight)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = rms_norm_forward(x, residual, weight, eps, store_rstd=True)
        ctx.save_for_backward(s, rstd, weight)
        ctx.dtypes = (x.dtype, residual.dtype)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds_out):
        s, rstd, weight = ctx.saved_tensors
        ds, dw = rms_norm_backward(dy, ds_out, s, rstd, weight)
        return ds.to(ctx.dtypes[0]), ds.to(ctx.dtypes[1]), dw, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)); matches kernels.reference.rms_norm."""
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_forward(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s), s) with s = residual + x; matches kernels.reference.add_rms_norm."""
    if _needs_grad(x, residual, weight):
        return _AddRMSNorm.apply(x, residual, weight, eps)
    y, s, _ = rms_norm_forward(x, residual, weight, eps)
    return y, s
