"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), applied unmerged.

An adapter becomes one LoRAWeights per stacked projection of the model: for q/k/v (and
gate/up) the A matrices are stacked and the B matrices placed block-diagonally, each B
pre-multiplied by its own scale (alpha / r, or alpha / sqrt(r) with rsLoRA, per module when
rank_pattern / alpha_pattern say so). A projection the adapter does not target adds nothing.
Everything is checked and built before the model is touched, so a wrong adapter leaves the
model as it was. Only safetensors is read: a pickled adapter_model.bin is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from model.llama import Transformer
from model.quant import LoRALinear, LoRAWeights

# Our stacked module -> the HF projections it holds, in stacking order.
STACKS = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")

Adapter = dict[str, LoRAWeights]  # our module path -> its LoRA
# modules peft can adapt that this model applies no LoRA to (token embeddings, the output head)
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
UNSUPPORTED_TARGETS_MESSAGE = (
    "Adapters on the token embeddings or the lm_head are not supported, only on the seven "
    "attention and MLP projections."
)


class AdapterError(ValueError):
    """The adapter cannot be used with this model; the message is one sentence for the user."""


def adapter_files(source: str) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) from a local folder or a hub repo."""
    from model.loader import ModelSourceError, download, local_folder, looks_local, shown

    if not isinstance(source, str) or not source.strip():
        raise AdapterError("Name an adapter by its local folder or hub id (owner/name).")
    folder = local_folder(source)
    if folder is None:
        if looks_local(source):
            raise AdapterError(
                f"No adapter folder at '{shown(source)}', and it is not a hub id (owner/name)."
            )
        try:
            folder = download(source)
        except ModelSourceError as err:
            raise AdapterError(str(err)) from None
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config.is_file():
        raise AdapterError(f"'{shown(source)}' is not a PEFT adapter: it has no adapter_config.json.")
    if not weights.is_file():
        raise AdapterError(
            f"'{shown(source)}' has no adapter_model.safetensors (pickled .bin adapters are not read)."
        )
    return config, weights


def pattern_regex(key: str) -> str:
    """The regular expression of a rank_pattern / alpha_pattern key: it matches a module name's
    tail, as in peft."""
    return rf"(.*\.)?({key})$"


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a key matches the module name's tail."""
    for key, value in patterns.items():
        if re.match(pattern_regex(key), module):
            return value
    return default


def module_scale(config: dict, module: str) -> float:
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def check_config(config, source: str) -> dict:
    """adapter_config.json's values that the scales are computed from, checked."""
    if not isinstance(config, dict):
        raise AdapterError(f"'{source}' has an adapter_config.json that is not a JSON object.")
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise AdapterError("Only plain LoRA adapters are supported (not DoRA or other PEFT types).")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError("Adapters that train biases or whole modules (modules_to_save) are not supported.")
    if config.get("lora_bias"):
        raise AdapterError("Adapters with a bias on lora_B (lora_bias) are not supported.")
    if config.get("alora_invocation_tokens"):
        raise AdapterError(
            "Activated LoRA (aLoRA) adapters, which apply only after their invocation tokens, "
            "are not supported."
        )
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets if isinstance(targets, list) else []
    if config.get("trainable_token_indices") or any(t in UNSUPPORTED_TARGETS for t in targets):
        raise AdapterError(UNSUPPORTED_TARGETS_MESSAGE)
    patterns = [config.get(k) or {} for k in ("rank_pattern", "alpha_pattern")]
    if not all(isinstance(p, dict) for p in patterns):
        raise AdapterError(f"'{source}' has a rank_pattern or alpha_pattern that is not a mapping.")
    for key in [*patterns[0], *patterns[1]]:
        try:
            re.compile(pattern_regex(key))
        except re.error:
            raise AdapterError(
                f"'{source}' has a rank_pattern or alpha_pattern key that is not a regular "
                f"expression: '{key}'."
            ) from None
    values = [config.get("r"), config.get("lora_alpha"), *patterns[0].values(), *patterns[1].values()]
    if not all(positive(v) for v in values):
        raise AdapterError(f"'{source}' needs positive numbers for r and lora_alpha in adapter_config.json.")
    return config


def read_adapter(source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and the tensors of an adapter. The weights are read with safetensors,
    which holds plain arrays, never with torch.load: a pickle can run code when it is read."""
    config_path, weights_path = adapter_files(source)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.loader import shown

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        raise AdapterError(f"'{shown(source)}' has an adapter_config.json that is not valid JSON.") from None
    config = check_config(config, shown(source))
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError):
        raise AdapterError(
            f"'{shown(source)}' has an adapter_model.safetensors that is not a valid safetensors file."
        ) from None
    return config, tensors


def build_adapter(model: Transformer, source: str) -> Adapter:
    """Check an adapter against the model and build its stacked LoRA weights (model untouched)."""
    config, tensors = read_adapter(source)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = KEY.fullmatch(name)
        if any(f".{target}." in name for target in UNSUPPORTED_TARGETS):
            raise AdapterError(UNSUPPORTED_TARGETS_MESSAGE)
        if m is None or int(m.group(1)) >= model.args.n_layers:
            raise AdapterError(f"The adapter tensor '{name[:100]}' has no place in this model.")
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise AdapterError(f"The adapter tensor '{name}' is not a matrix of floating-point numbers.")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(
                f"The adapter tensor '{name}' holds values that are not finite (NaN or infinity)."
            )
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    args = model.args
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    out_sizes = {
        "attention.wqkv": (q, kv, kv),
        "attention.wo": (args.dim,),
        "feed_forward.w13": (args.intermediate_size, args.intermediate_size),
        "feed_forward.w2": (args.dim,),
    }
    device = model.device
    adapter: Adapter = {}
    for layer in range(args.n_layers):
        for target, parts in STACKS.items():
            path = f"layers.{layer}.{target}"
            module = model.get_submodule(path)
            lora = stack_parts(module.in_features, layer, parts, out_sizes[target], found, config)
            if lora is not None:
                adapter[path] = LoRAWeights(
                    lora.a.to(device, model.dtype), lora.b.to(device, model.dtype), 1.0
                )
    if not adapter:
        raise AdapterError(f"The adapter '{source}' holds no LoRA weights for this model.")
    return adapter


def stack_parts(
    in_features: int,
    layer: int,
    parts: tuple[str, ...],
    out_sizes: tuple[int, ...],
    found: dict,
    config: dict,
) -> LoRAWeights | None:
    """One layer's LoRA of the projections `parts`, stacked as their weights are (float32)."""
    a_list, b_list, rows = [], [], []
    for index, (part, n_out) in enumerate(zip(parts, out_sizes)):
        ab = found.get((layer, part))
        if ab is None:
            continue
        name = f"base_model.model.model.layers.{layer}.{part}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"The adapter has only one of lora_A / lora_B for '{name}'.")
        a, b = ab["A"].float(), ab["B"].float()
        if a.shape[1] != in_features or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"The adapter tensor '{name}.lora_A/B' has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                f"but this model's projection is {n_out}x{in_features}: "
                "the adapter was trained for another base model."
            )
        a_list.append(a)
        b_list.append(b * module_scale(config, f"model.layers.{layer}.{part}"))
        rows.append((sum(out_sizes[:index]), n_out))
    if not a_list:
        return None
    big_b = torch.zeros(sum(out_sizes), sum(a.shape[0] for a in a_list))
    col = 0
    for (row, n_out), b in zip(rows, b_list):
        big_b[row : row + n_out, col : col + b.shape[1]] = b
        col += b.shape[1]
    return LoRAWeights(torch.cat(a_list), big_b, 1.0)


def activate(model: Transformer, adapter: Adapter | None) -> None:
    """Make `adapter` the one every projection applies (None: the base model alone)."""
    model.active_adapter = adapter
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora = None if adapter is None else adapter.get(name)
