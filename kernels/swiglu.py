"""SwiGLU activation, silu(gate) * up, in Triton.

Forward (reference: kernels.reference.swiglu, i.e. HF LlamaMLP's act_fn(gate) * up):

    a = gate / (1 + exp(-gate))     in fp32, rounded to the input dtype (torch's silu)
    y = a * up                      one rounding

Backward, with sig = sigmoid(gate) in fp32, recomputed rather than saved:

    dup   = dy * gate * sig
    dgate = dy * up * sig * (1 + gate * (1 - sig))

gate and up are handled as (M, I) row tensors with a row stride each, so the two halves of a
fused gate/up projection output (`y.chunk(2, -1)`) go in without a copy. Program (row, j)
takes BLOCK columns of one row; rows go on grid axis 0 (up to 2^31 - 1) because axis 1 is
limited to 65535 and a long prefill can have more tokens than that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_forward_kernel(
    g_ptr,  # (M, I) gate, last dim contiguous
    u_ptr,  # (M, I) up, last dim contiguous
    y_ptr,  # (M, I) out, contiguous
    stride_g,  # elements between rows of gate
    stride_u,  # elements between rows of up
    n_cols,  # columns (the intermediate size)
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    # torch rounds silu's result to the input dtype before the product with up.
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    dy_ptr,  # (M, I) gradient of the output, contiguous
    g_ptr,  # (M, I) gate from the forward, last dim contiguous
    u_ptr,  # (M, I) up from the forward, last dim contiguous
    dg_ptr,  # (M, I) out: gradient of gate, contiguous
    du_ptr,  # (M, I) out: gradient of up, contiguous
    stride_g,  # elements between rows of gate
    stride_u,  # elements between rows of up
    n_cols,  # columns (the intermediate size)
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    du = dy * g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * n_cols + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * n_cols + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


# 1024 columns = 4 warps x 32 threads x 8 values: 16-byte loads of bf16 per thread.
_BLOCK = 1024


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # A chunk of a fused (..., 2I) output flattens to (M, I) with row stride 2I, no copy.
    rows = t.reshape(-1, t.shape[-1])
    return rows.contiguous() if rows.stride(-1) != 1 else rows


def _grid(m: int, i: int, block: int) -> tuple[int, int]:
    return (m, triton.cdiv(i, block))


def _block(i: int) -> int:
    # Narrow rows would leave most of a 1024 tile masked off.
    return min(_BLOCK, max(128, triton.next_power_of_2(i)))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward; returns a new contiguous tensor of gate's shape."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} "
            f"{gate.dtype} and {tuple(up.shape)} {up.dtype}."
        )
    g2, u2 = _as_rows(gate), _as_rows(up)
    m, i = g2.shape
    y = torch.empty((m, i), dtype=gate.dtype, device=gate.device)
    if y.numel() > 0:
        block = _block(i)
        _swiglu_forward_kernel[_grid(m, i, block)](
            g2, u2, y, g2.stride(0), u2.stride(0), i, BLOCK=block, num_warps=4, enable_fp_fusion=True
        )
    return y.view(gate.shape)


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns contiguous (dgate, dup) of gate's shape."""
    g2, u2 = _as_rows(gate), _as_rows(up)
    m, i = g2.shape
    dy2 = dy.reshape(m, i).contiguous()
    dg = torch.empty((m, i), dtype=gate.dtype, device=gate.device)
    du = torch.empty((m, i), dtype=up.dtype, device=up.device)
    if dg.numel() > 0:
        block = _block(i)
        _swiglu_backward_kernel[_grid(m, i, block)](
            dy2,
            g2,
            u2,
            dg,
            du,
            g2.stride(0),
            u2.stride(0),
            i,
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=True,
        )
    return dg.view(gate.shape), du.view(up.shape)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype; matches kernels.reference.swiglu."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return swiglu_forward(gate, up)
