"""Pure-PyTorch references for every fused op.

Each function here is three things at once: the CPU path of the model, the oracle the Triton
kernels are tested against, and the baseline the benchmarks time. They follow HF transformers'
Llama code operation for operation (same dtypes, same rounding points), so that the model on
this path produces the same tokens as transformers on the same weights.

Shapes use B = batch, T = tokens, H = heads, D = head dim, N = out features, K = in features.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

# bitsandbytes' NF4 code table (functional.py, get_4bit_type("nf4")), index 0..15.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCKSIZE = 64


@cache
def nf4_code_table(device: torch.device) -> torch.Tensor:
    """NF4_CODE as a float32 tensor, made once per device (a host copy cannot run in a CUDA graph)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@cache
def nf4_pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 values of each byte, high nibble first."""
    code = nf4_code_table(device)
    byte = torch.arange(256, device=device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=-1)


def embedding(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table[tokens]: the rows of the (V, D) embedding table, on the table's device."""
    return F.embedding(tokens, table)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)), the mean taken in fp32 (HF LlamaRMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual (rounded to x.dtype, as HF adds); returns (rms_norm(s), s)."""
    s = residual + x
    return rms_norm(s, weight, eps), s


def rms_norm_lora_down(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    lora_a: torch.Tensor,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, t): the norm (s = x without a residual) and t = y A^T as fp32 partial sums over
    `chunk`-wide slices of the features, (cdiv(N, chunk), rows, r): kernels.nf4_lora's format."""
    y, s = (rms_norm(x, weight, eps), x) if residual is None else add_rms_norm(x, residual, weight, eps)
    y2, a = y.reshape(-1, y.shape[-1]).float(), lora_a.float()
    t = torch.stack([y2[:, i : i + chunk] @ a[:, i : i + chunk].T for i in range(0, y.shape[-1], chunk)])
    return y, s, t


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, HF's rotate-half convention.

    q: (B, T, Hq, D), k: (B, T, Hk, D); cos, sin: (B, T, D // 2) float32, the angles of each
    token's own position (so rows of a batch may sit at different positions).
    out = x * cos + rotate_half(x) * sin, with cos/sin duplicated over the two halves and cast
    to x.dtype first, exactly as transformers does.
    """
    c = torch.cat((cos, cos), dim=-1).unsqueeze(2).to(q.dtype)  # (B, T, 1, D)
    s = torch.cat((sin, sin), dim=-1).unsqueeze(2).to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    return rotate(q), rotate(k)


def rope_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """rope(q, k), then k and v stored in the (slots, Hk, S, D) caches; returns the rotated q.

    rows: (B, 1) cache row of each sequence; positions: (B, T) cache position of each token.
    """
    q, k = rope(q, k, cos, sin)
    k_cache[rows, :, positions] = k  # advanced indices first: (B, T, Hk, D)
    v_cache[rows, :, positions] = v
    return q


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor | None,
    attn_len: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cache rows, as the model's prefill path.

    q: (B, 1, Hq, D); caches (slots, Hk, S, D); positions (B, 1); slots (B,) cache rows or None
    for rows 0..B-1; keys beyond each token's position are masked. Returns (B, 1, Hq * D).
    `rows` (the same rows as an index) is the kernel's; here slots decides, so rows 0..B-1 stay
    views of the cache.
    """
    bsz = q.shape[0]
    if slots is None:
        keys, values = k_cache[:bsz, :, :attn_len], v_cache[:bsz, :, :attn_len]
    else:
        keys, values = k_cache[slots, :, :attn_len], v_cache[slots, :, :attn_len]
    key_pos = torch.arange(attn_len, device=q.device)
    mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(bsz, 1, -1)


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    attn_len: int,
    lora_a: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rope_kv_cache, then decode_attention over the rows' caches: (out (B, 1, Hq * D), t), with
    t = out A^T for lora_a (r, Hq * D) as one fp32 partial sum (1, B, r), or None without it."""
    q = rope_kv_cache(q, k, v, cos, sin, k_cache, v_cache, rows.reshape(-1, 1), positions)
    out = decode_attention(q, k_cache, v_cache, positions, rows.reshape(-1), attn_len)
    t = None if lora_a is None else (out.reshape(out.shape[0], -1).float() @ lora_a.float().T)[None]
    return out, t


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, in the inputs' dtype (HF LlamaMLP)."""
    return F.silu(gate) * up


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Unpack a bitsandbytes NF4 weight.

    packed: uint8, (N*K + 1) // 2 bytes (any shape), two values a byte, the first in the HIGH
    nibble, over the row-major flattened (N, K) weight. absmax: float32, one per block of 64
    flattened elements (the double-quantized statistics already expanded). Each element is
    NF4_CODE[nibble] * absmax[i // 64] in fp32, then cast to dtype: bitsandbytes'
    dequantize_4bit bit for bit.
    """
    n = shape[0] * shape[1]
    if n % NF4_BLOCKSIZE == 0:  # whole blocks: one lookup a byte, one scale a block row
        pairs = nf4_pair_table(packed.device)[packed.reshape(-1)[: n // 2].long()]  # (n/2, 2)
        out = pairs.reshape(-1, NF4_BLOCKSIZE) * absmax[: n // NF4_BLOCKSIZE, None]
        return out.reshape(shape).to(dtype)
    flat = packed.reshape(-1)
    idx = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n].long()
    code = nf4_code_table(packed.device)
    blocks = torch.arange(n, device=packed.device) // NF4_BLOCKSIZE
    return (code[idx] * absmax[blocks]).reshape(shape).to(dtype)


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_t: torch.Tensor | None = None,
    absmax_half: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + lora_scale * (x A^T) B^T, W the (N, K) NF4 weight dequantized to x.dtype.

    x: (..., K); lora_a: (r, K), lora_b: (N, r) in x.dtype, or both None. This is peft's
    unmerged LoRA on top of bitsandbytes' Linear4bit (dropout off, as at inference). lora_t:
    x A^T given as fp32 partial sums (chunks, rows of x, r), summed and rounded to x.dtype once.
    absmax_half (the fp16 scales kernels.nf4_linear's GEMVs may read) is ignored: the reference
    computes with the exact absmax, as bitsandbytes does.
    """
    y = F.linear(x, nf4_dequantize(packed, absmax, shape, x.dtype))
    if lora_a is not None:
        down = F.linear(x, lora_a) if lora_t is None else lora_t.sum(0).to(x.dtype).reshape(*x.shape[:-1], -1)
        y = y + F.linear(down, lora_b) * lora_scale
    return y


def nf4_linear_swiglu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_t: torch.Tensor | None = None,
    absmax_half: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(g) * u where [g, u] = nf4_linear(x, ...) split in two halves along the last dim.

    The weight is the gate projection stacked on the up projection: shape (2I, K). LoRA, if
    given, is stacked the same way (lora_a: (r2, K), lora_b: (2I, r2), block-diagonal for two
    adapters). lora_t and absmax_half as for nf4_linear. Output: (..., I).
    """
    y = nf4_linear(x, packed, absmax, shape, lora_a, lora_b, lora_scale, lora_t)
    gate, up = y.chunk(2, dim=-1)
    return swiglu(gate, up)
