"""Seeded random Llama checkpoints and LoRA adapters, for speed work and device checks.

Decode speed does not depend on the weight values, so a Llama-3-8B-shaped model with random
weights, written with save_pretrained, stands in for the real one (no hub access on the device).
A word-level tokenizer over the 128,256 ids ("<t0>", "<t1>", ...) lets the whole engine run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    "random-llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "random-llama-small": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=2048,
    ),
}  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<t1>", eos_token="<t2>", unk_token="<t0>")


def make_random_llama(name: str, workdir: str, seed: int = 0) -> Path:
    """Write (once) the named random checkpoint in bf16 and return its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(workdir) / name
    if (folder / "config.json").is_file():
        return folder
    if name not in SHAPES:
        raise SystemExit(f"Unknown random model '{name}'; choose one of {', '.join(SHAPES)}.")
    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder, max_shard_size="5GB")
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    del model
    return folder


def make_random_adapter(model_folder: str, workdir: str, rank: int = 16, seed: int = 0) -> Path:
    """A PEFT LoRA adapter of rank `rank` on all seven projections, with non-zero B."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    folder = Path(workdir) / f"{Path(model_folder).name}-lora-r{rank}"
    if (folder / "adapter_config.json").is_file():
        return folder
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {  # (out, in)
        "self_attn.q_proj": (q, config.hidden_size), "self_attn.k_proj": (kv, config.hidden_size),
        "self_attn.v_proj": (kv, config.hidden_size), "self_attn.o_proj": (config.hidden_size, q),
        "mlp.gate_proj": (config.intermediate_size, config.hidden_size),
        "mlp.up_proj": (config.intermediate_size, config.hidden_size),
        "mlp.down_proj": (config.hidden_size, config.intermediate_size),
    }  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, (n_out, n_in) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "target_modules": list(PROJECTIONS), "bias": "none",
        "base_model_name_or_path": str(model_folder), "use_rslora": False, "fan_in_fan_out": False,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder
