"""The one dispatch point between the model and its fused ops.

`get_ops(device, use_triton)` returns the set of functions the model calls: the Triton kernels
of kernels/ for CUDA tensors, the PyTorch references of kernels/reference.py elsewhere (CPU,
or CUDA with use_triton=False, which the tests use to compare both paths on one device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass(frozen=True)
class Ops:
    name: str  # what the UI shows under "kernels"
    embedding: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    # (x, residual or None, weight, eps, lora_a) -> (y, s, t or None); None: no fused op (the
    # reference path, where each projection computes x A^T as peft does)
    rms_norm_lora_down: Callable | None
    rope: Callable
    rope_kv_cache: Callable
    decode_attention: Callable
    # (q, k, v, cos, sin, k_cache, v_cache, positions, rows, attn_len, lora_a) -> (out, t or None):
    # rope_kv_cache and decode_attention in one launch, with the output projection's x A^T; None:
    # no fused op (the reference path, two ops, and wo computes its x A^T as peft does)
    rope_decode_attention: Callable | None
    swiglu: Callable
    nf4_linear: Callable
    nf4_linear_swiglu: Callable
    nf4_dequantize: Callable
    # (scores, top_k, top_p, generator) -> next tokens, or None where top_k is out of its range;
    # None: no fused op (model.sampling's weights and draw)
    sample_top_k: Callable | None


REFERENCE_OPS = Ops(
    name="PyTorch reference",
    embedding=reference.embedding,
    rms_norm=reference.rms_norm,
    add_rms_norm=reference.add_rms_norm,
    rms_norm_lora_down=None,
    rope=reference.rope,
    rope_kv_cache=reference.rope_kv_cache,
    decode_attention=reference.decode_attention,
    rope_decode_attention=None,
    swiglu=reference.swiglu,
    nf4_linear=reference.nf4_linear,
    nf4_linear_swiglu=reference.nf4_linear_swiglu,
    nf4_dequantize=reference.nf4_dequantize,
    sample_top_k=None,
)


def triton_ops() -> Ops:
    """The Triton kernels; imported on demand so CPU-only installs never compile anything."""
    from kernels import (
        decode_attention,
        embedding,
        nf4,
        nf4_linear,
        rmsnorm,
        rmsnorm_lora,
        rope,
        swiglu,
        top_k_sample,
    )

    return Ops(
        name="Triton",
        embedding=embedding.embedding,
        rms_norm=rmsnorm.rms_norm,
        add_rms_norm=rmsnorm.add_rms_norm,
        rms_norm_lora_down=rmsnorm_lora.rms_norm_lora_down,
        rope=rope.rope,
        rope_kv_cache=rope.rope_kv_cache,
        decode_attention=decode_attention.decode_attention,
        rope_decode_attention=decode_attention.rope_decode_attention,
        swiglu=swiglu.swiglu,
        nf4_linear=nf4_linear.nf4_linear,
        nf4_linear_swiglu=nf4_linear.nf4_linear_swiglu,
        nf4_dequantize=nf4.nf4_dequantize,
        sample_top_k=top_k_sample.sample_top_k,
    )


def get_ops(device: torch.device, use_triton: bool = True) -> Ops:
    if device.type == "cuda" and use_triton:
        return triton_ops()
    return REFERENCE_OPS
