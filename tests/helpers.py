"""Builders and references shared by the engine tests (test_model_fidelity, test_lora, test_loader,
test_engine).

Every reference here is independent of model/: HF transformers for the model, bitsandbytes'
Linear4bit for NF4 (quantized by bitsandbytes itself), peft for LoRA. Small checkpoints are
random Llamas written by `save_pretrained` with a tokenizer trained here, so the tests need
nothing from the network.

The embedded default model takes ~17 s to load, so it is loaded once per process
(`default_engine`, `default_hf` are memoized) and shared by every module that asks for it;
tests that load adapters into it remove them again.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

TINY_VOCAB = 512
# Words with ASCII, Latin accents, CJK and emoji, so the tokenizer has multi-byte merges and the
# byte-level fallback splits some characters over several tokens.
CORPUS_WORDS = (
    "the quick brown fox jumps over lazy dog planets mercury venus earth mars jupiter saturn "
    "uranus neptune name list solar system answer question hello world café naïve résumé über "
    "你好 世界 模型 🙂 🚀 python reverse prime numbers capital france haiku sea sentence"
).split()


def train_tiny_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer of exactly TINY_VOCAB entries with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Seeded pseudo-words add enough distinct pairs to fill the vocabulary with merges.
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéü"
    pseudo = ["".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(3000)]
    corpus = [" ".join(CORPUS_WORDS)] * 50 + [" ".join(pseudo[i : i + 12]) for i in range(0, 3000, 12)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)
    return folder


DEFAULT_MAX_SEQ_LEN = 256  # small, so context limits and chat trimming are cheap to reach


@functools.cache
def default_engine():
    """Our engine on the embedded default model, unquantized, on CPU, in fp32: the setting the
    fidelity tests compare with transformers in (the app's "auto" may pick bf16 on this CPU)."""
    from model.engine import Engine

    return Engine.load(quantize="none", device="cpu", dtype="float32", max_seq_len=DEFAULT_MAX_SEQ_LEN)


@functools.cache
def default_hf():
    """HF transformers' LlamaForCausalLM read from the same GGUF file, in float32."""
    from model.loader import default_gguf_path

    gguf = default_gguf_path()
    return hf_model(gguf.parent, torch.float32, gguf_file=gguf.name)


_TOKENIZER_DIR: list[Path] = []


def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer, trained once per process."""
    if not _TOKENIZER_DIR:
        _TOKENIZER_DIR.append(train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    return _TOKENIZER_DIR[0]


def word_tokenizer(folder: Path, specials: list[str], bos: str, eos: str) -> Path:
    """A word-level tokenizer whose ids are fixed: the special tokens first, in the order given,
    then a few words. With a Llama-3 style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + ["[UNK]"] + CORPUS_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in (bos, eos)]})
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
    )
    fast.save_pretrained(folder)
    return folder


def tiny_config(**overrides):
    """A small Llama: GQA (4 query heads, 2 KV heads of 64), sizes multiples of 64 for NF4."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def write_checkpoint(
    folder: Path,
    tokenizer_dir: Path,
    config,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    edit=None,
) -> Path:
    """A seeded random LlamaForCausalLM saved with save_pretrained (safetensors) plus the tokenizer;
    `edit(model)` may change weights before saving.

    Weights are drawn with a larger std than HF's 0.02 so that logits spread out and greedy
    choices are not near-ties that rounding could flip.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config.initializer_range = 0.08
    model = LlamaForCausalLM(config).to(dtype)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def hf_model(folder: Path, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


def fp_reference_linears(model, dtype: torch.dtype | None = None) -> None:
    """Make every bitsandbytes Linear4bit take bnb's canonical path: dequantize_4bit + matmul.

    On CPUs with AVX512-BF16, Linear4bit otherwise repacks its weight at the first forward and
    computes in bf16 (backends/cpu/ops.py casts inputs and absmax to bf16), which is a speed
    path, not the NF4 reference. With `dtype`, the model's 16-bit tensors and the dtype its NF4
    weights dequantize to are set to it: transformers keeps a bnb checkpoint's stored dtype
    (bf16) even when asked for float32, and would round each dequantized weight to bf16.
    """
    import bitsandbytes as bnb

    if dtype is not None:  # transformers refuses model.to(dtype) on a bnb model; the packed
        for tensor in model.parameters():  # uint8 weights are not floating and stay as they are
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            if dtype is not None:
                module.weight.quant_state.dtype = dtype
                module.compute_dtype = dtype


def bnb_reference(model, compute_dtype: torch.dtype = torch.float32):
    """A copy of an HF Llama whose seven projections per layer are bitsandbytes Linear4bit
    (nf4, blocksize 64, compress_statistics=True) quantized by bitsandbytes from the same weights."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                weight = bnb.nn.Params4bit(
                    linear.weight.data.clone(),
                    requires_grad=False,
                    blocksize=64,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = weight._quantize("cpu")
                setattr(parent, name, q)
    fp_reference_linears(model)
    return model


def bnb_packed(model, layer: int, names: tuple[str, ...]) -> torch.Tensor:
    """bitsandbytes' packed bytes of HF projections (e.g. ("self_attn.q_proj", ...)), concatenated."""
    block = model.model.layers[layer]
    return torch.cat([block.get_submodule(n).weight.data.reshape(-1) for n in names])


@torch.inference_mode()
def our_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of our Transformer for a whole sequence, from an empty cache."""
    if model.max_seq_len < len(ids):
        model.setup_caches(1, max(len(ids), 16))
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    return model(tokens, positions, attn_len=len(ids), last_only=False)[0].float()


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF generate's new tokens, greedy (it stops at the model's EOS like ours)."""
    return hf_greedy_with(model, ids, max_new_tokens)


def hf_greedy_with(model, ids: list[int], max_new_tokens: int, **generate_kwargs) -> list[int]:
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=model.generation_config.eos_token_id,
            **generate_kwargs,
        )
    return out[0, len(ids) :].tolist()


def engine_over(loaded, max_seq_len: int = 128):
    """An Engine (one KV-cache slot, no CUDA graphs) over an already loaded model."""
    from model.engine import Engine

    return Engine(loaded, max_seq_len=max_seq_len, use_cuda_graphs=False, max_batch=1)


def our_greedy(engine, ids: list[int], max_new_tokens: int, adapter: str | None = None) -> list[int]:
    """Our greedy tokens for a prompt of ids, through the engine; EOS does not stop it."""
    from model.engine import GenerationSettings

    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    events = engine.generate_ids(ids, settings, adapter=adapter)
    return [token for event in events for token in event.token_ids]


def peft_adapter(hf, folder: Path, seed: int, **lora_kwargs) -> Path:
    """Save a peft LoRA (r=8, alpha=16, random non-zero B unless overridden) made on a copy of hf;
    returns the folder. The PeftModel itself is built again from the folder by peft_model()."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(r=8, lora_alpha=16, init_lora_weights=False, target_modules="all-linear")
    kwargs.update(lora_kwargs)
    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(**kwargs))
    peft.save_pretrained(folder)
    return folder


def peft_model(hf, folder: Path):
    """peft's PeftModel over a copy of hf, loaded from an adapter folder (the LoRA reference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()


SENTENCE_END = re.compile(r"[.!?]\s+[A-Z]")


def assert_one_sentence(message: str) -> None:
    """A user-facing error: one line, one sentence, no traceback or repr noise."""
    assert message and "\n" not in message, message
    assert message.rstrip()[-1] in ".?)", message
    assert not SENTENCE_END.search(message), f"more than one sentence: {message}"
    assert "Traceback" not in message and "Error(" not in message, message
    assert len(message) < 300, message


def compile_for_hopper(script: str) -> None:
    """Run a script that compiles Triton kernels for sm_90, in a process without TRITON_INTERPRET.

    The interpreter runs kernels as plain Python and accepts what the compiler rejects, so each
    kernel file's tests also compile its kernels for the device's target.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
