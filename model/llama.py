"""The Llama-family transformer (Llama 3 / 3.1 / 3.2, SmolLM2) with a static KV cache.

Design decisions:
- Every fused op goes through `self.ops` (model/ops.py): Triton kernels on CUDA, the PyTorch
  references elsewhere. Nothing here patches another library.
- q/k/v and gate/up are stacked projections (model/quant.py explains why that is exact).
- The KV cache is pre-allocated, (slots, Hk, max_seq_len, D) per layer, and every row of a
  batch carries its own positions, so rows at different lengths can decode together.
- Attention reads the cache up to `attn_len`, a host-side bound on the longest row; a boolean
  mask built from the positions hides what each row must not see. A prefill from position 0
  (every prompt up to the runner's chunk) is plain causal attention and passes no mask.
- Prefill attention never uses cuDNN's SDPA: it builds an execution plan for every new (batch,
  length) shape, ~0.4 s each on Hopper (torch 2.11 prefers it for masked attention there), which
  a chat server would pay on almost every new prompt. Flash attention (causal, no mask) or the
  memory-efficient kernel (masked) run instead, with no per-shape setup.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.config import ModelArgs
from model.ops import Ops
from model.quant import LoRALinear, make_linear

_PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama-3.1 scaling (transformers' _compute_llama3_parameters)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with a residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def forward_lora_down(self, x: torch.Tensor, residual: torch.Tensor | None, then: LoRALinear):
        """forward(x, residual) and t, the LoRA x A^T of `then` (the projection reading the
        output) where the ops compute it in the same launch (decode on CUDA); else t is None."""
        lora_a = then.fused_lora_a()
        if lora_a is None or self.ops.rms_norm_lora_down is None:
            return (*self.forward(x, residual), None)
        return self.ops.rms_norm_lora_down(x, residual, self.weight, self.eps, lora_a)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, quantized: bool, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.wqkv = make_linear(args.dim, q_size + 2 * kv_size, ops, quantized, dtype)
        self.wo = make_linear(q_size, args.dim, ops, quantized, dtype)
        self.ops = ops
        self.k_cache: torch.Tensor | None = None  # (slots, Hk, S, D)
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        cos: torch.Tensor,  # (B, T, D/2)
        sin: torch.Tensor,
        positions: torch.Tensor,  # (B, T)
        slots: torch.Tensor | None,  # (B,) cache rows, or None for rows 0..B-1
        rows: torch.Tensor,  # (B, 1) the same rows as an index, made once per forward
        attn_len: int,  # attend to cache positions [0, attn_len)
        mask: torch.Tensor | None,  # (B, 1, T, L) for prefill; None for decode (its kernel masks)
        lora_t: torch.Tensor | None = None,  # x A^T of wqkv's adapter, from the norm, or None
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x, lora_t).split(self.split, dim=-1)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if seqlen == 1 and self.ops.rope_decode_attention is not None:  # decode on CUDA: one launch
            cache, lora_a = (self.k_cache, self.v_cache), self.wo.fused_lora_a()
            out, t = self.ops.rope_decode_attention(
                q, k, v, cos, sin, *cache, positions, rows, attn_len, lora_a
            )
            return self.wo(out, t)
        q = self.ops.rope_kv_cache(q, k, v, cos, sin, self.k_cache, self.v_cache, rows, positions)
        if seqlen == 1:
            out = self.ops.decode_attention(q, self.k_cache, self.v_cache, positions, slots, attn_len, rows)
            return self.wo(out)
        if slots is None:  # rows 0..B-1: views, no copy of the cache
            keys, values = self.k_cache[:bsz, :, :attn_len], self.v_cache[:bsz, :, :attn_len]
        else:
            keys, values = self.k_cache[slots, :, :attn_len], self.v_cache[slots, :, :attn_len]
        qt = q.transpose(1, 2)
        with sdpa_kernel(_PREFILL_SDPA):  # no cuDNN: see the module's docstring
            if mask is None:  # a prefill from position 0: causal, flash attention reads GQA as is
                out = F.scaled_dot_product_attention(qt, keys, values, is_causal=True, enable_gqa=True)
            else:  # a later chunk of a long prompt: the K/V heads repeated for the masked kernel
                rep = self.n_heads // self.n_kv_heads
                keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
                out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask)  # (B, Hq, T, D)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, quantized: bool, dtype: torch.dtype):
        super().__init__()
        self.w13 = make_linear(args.dim, 2 * args.intermediate_size, ops, quantized, dtype)
        self.w2 = make_linear(args.intermediate_size, args.dim, ops, quantized, dtype)

    def forward(self, x: torch.Tensor, lora_t: torch.Tensor | None = None) -> torch.Tensor:
        """lora_t: x A^T of w13's adapter, from the norm, or None."""
        return self.w2(self.w13.forward_swiglu(x, lora_t))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, quantized: bool, dtype: torch.dtype):
        super().__init__()
        self.attention = Attention(args, ops, quantized, dtype)
        self.feed_forward = FeedForward(args, ops, quantized, dtype)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, ops, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, ops, dtype)

    def forward(self, x, residual, cos, sin, positions, slots, rows, attn_len, mask):
        """Returns (the block's output, the residual stream before it is added)."""
        h, residual, t = self.attention_norm.forward_lora_down(x, residual, self.attention.wqkv)
        h = self.attention(h, cos, sin, positions, slots, rows, attn_len, mask, t)
        h, residual, t = self.ffn_norm.forward_lora_down(h, residual, self.feed_forward.w13)
        return self.feed_forward(h, t), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops, quantized: bool, dtype: torch.dtype):
        super().__init__()
        self.args, self.ops, self.quantized, self.dtype = args, ops, quantized, dtype
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.tok_embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            TransformerBlock(args, ops, quantized, dtype) for _ in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps, ops, dtype)
        # Tied models (Llama 3.2 1B/3B, SmolLM2) read the embedding matrix as lm_head.
        self.output = (
            None
            if args.tie_word_embeddings
            else nn.Linear(args.dim, args.vocab_size, bias=False, dtype=dtype)
        )
        if self.output is not None:
            self.output.weight.requires_grad_(False)
        self.max_seq_len = self.slots = 0
        self.active_adapter = None  # the LoRA adapter the projections apply (model/lora.py: activate)

    def setup_caches(self, slots: int, max_seq_len: int) -> None:
        """Allocate the static KV cache and the RoPE table for max_seq_len positions."""
        device = self.device
        shape = (slots, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        for layer in self.layers:
            layer.attention.k_cache = torch.zeros(shape, dtype=self.dtype, device=device)
            layer.attention.v_cache = torch.zeros(shape, dtype=self.dtype, device=device)
        angles = torch.outer(torch.arange(max_seq_len).float(), rope_frequencies(self.args))
        self.rope_cos = angles.cos().to(device)  # (S, D/2) float32
        self.rope_sin = angles.sin().to(device)
        self.max_seq_len, self.slots = max_seq_len, slots

    @property
    def device(self) -> torch.device:
        """Where the model computes (the input embedding may sit in pinned host memory)."""
        return self.norm.weight.device

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        positions: torch.Tensor,  # (B, T) each token's position in its own sequence
        attn_len: int,  # attend to cache positions [0, attn_len); > every position here
        slots: torch.Tensor | None = None,  # (B,) cache rows; None: rows 0..B-1
        last_only: bool = True,
        last: torch.Tensor | None = None,  # (B,) with last_only: each row's token to return
        from_start: bool = False,  # every row's positions are 0 .. T-1 and attn_len is T
    ) -> torch.Tensor:
        """Logits (B, 1, V) for the last token of each row (or token `last[b]` of row b), or
        (B, T, V)."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None  # decode: decode_attention masks by each row's position itself; from_start: causal
        if tokens.shape[1] > 1 and not from_start:
            key_pos = torch.arange(attn_len, device=tokens.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # (B, 1, T, L)
        rows = (torch.arange(tokens.shape[0], device=tokens.device) if slots is None else slots)[:, None]
        x, residual = self.ops.embedding(tokens, self.tok_embeddings.weight), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, positions, slots, rows, attn_len, mask)
        x, _ = self.norm(x, residual)
        if last_only:
            x = x[:, -1:] if last is None else x[torch.arange(x.shape[0], device=x.device), last][:, None]
        return self.lm_head(x)
