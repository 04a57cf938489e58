"""ModelArgs: the exact shape of a Llama-family model, read from a transformers config.

Fields come from the checkpoint's own config (config.json, or the GGUF metadata that
transformers turns into a LlamaConfig); nothing is guessed from file names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family model this project can run."""


SIZE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings",
)  # fmt: skip
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim")  # absent or null: derived from the above


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def bad_size(sizes: Mapping[str, Any]) -> str | None:
    """The first size field in `sizes` that is not a positive whole number (one absent from
    `sizes` is not checked; an optional one may be None), else None. Shared by the check of
    config.json (before transformers divides by its sizes) and of the config built from it."""
    for name in (*SIZE_FIELDS, *OPTIONAL_SIZE_FIELDS):
        value = sizes.get(name)
        optional = name in OPTIONAL_SIZE_FIELDS and value is None
        if name in sizes and not optional and not positive_int(value):
            return name
    return None


def _checked_sizes(config: Any) -> int:
    """Refuse what the Llama code cannot run (another activation, sizes that are not positive
    whole numbers, query heads not a multiple of the KV heads); return the KV heads."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # the feed-forward computes silu(gate) * up, nothing else
        raise UnsupportedModelError(f"The activation '{act}' is not supported; Llama models use SiLU.")
    sizes = {name: getattr(config, name, None) for name in (*SIZE_FIELDS, *OPTIONAL_SIZE_FIELDS)}
    if (name := bad_size(sizes)) is not None:
        raise UnsupportedModelError(f"The config's {name} must be a positive whole number: {sizes[name]!r}.")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv:
        raise UnsupportedModelError(
            f"The config's num_key_value_heads ({kv}) must divide num_attention_heads "
            f"({config.num_attention_heads})."
        )
    return kv


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None  # Llama-3.1 "llama3" scaling parameters
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArgs:
        """Build from a transformers LlamaConfig (v5: rope settings live in rope_parameters)."""
        if getattr(config, "model_type", None) != "llama":
            raise UnsupportedModelError(
                f"Only Llama-family models are supported; this checkpoint is "
                f"'{getattr(config, 'model_type', 'unknown')}'."
            )
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise UnsupportedModelError("Llama checkpoints with bias terms are not supported.")
        kv = _checked_sizes(config)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        legacy_scaling = getattr(config, "rope_scaling", None)
        if not rope and legacy_scaling:
            rope = dict(legacy_scaling)
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"RoPE type '{rope_type}' is not supported.")
        scaling = None
        if rope_type == "llama3":
            scaling = {
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            }
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
            max_position_embeddings=int(config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(config, "bos_token_id", None),
        )

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.intermediate_size
        embed = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + embed + self.dim
