"""The loader against transformers on the checkpoint formats users bring: save_pretrained in bf16
(served unquantized or quantized to NF4 at load), a checkpoint quantized and saved by
transformers + bitsandbytes (served as stored), Llama-3.1 rope scaling, Llama-3.2 tied embeddings,
and sources that are not models at all."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_one_sentence,
    bnb_reference,
    engine_over,
    fp_reference_linears,
    hf_logits,
    hf_model,
    our_logits,
    random_ids,
    tiny_config,
    tiny_tokenizer_dir,
    word_tokenizer,
    write_checkpoint,
)
from safetensors import safe_open

from model import loader
from model.config import ModelArgs, UnsupportedModelError
from model.engine import GenerationSettings
from model.loader import ModelSourceError, load_model
from model.quant import expand_absmax, half_absmax

FP32 = dict(atol=1e-5, rtol=1e-5)  # same weights, same ops: fp32 rounding only (measured: exact)
HF_PROJECTIONS = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("bf16")
    return write_checkpoint(folder, tokenizer_dir, tiny_config(), torch.bfloat16, seed=2)


@pytest.fixture(scope="module")
def bnb_folder(tmp_path_factory, bf16_folder):
    """Quantized by transformers + bitsandbytes at load, then written by save_pretrained (on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(bf16_folder, quantization_config=config, device_map="cpu")
    folder = tmp_path_factory.mktemp("bnb-4bit")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bf16_folder / name, folder / name)
    return folder


def stored(folder, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def test_bf16_checkpoint_unquantized_matches_transformers(bf16_folder):
    assert stored(bf16_folder, "model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    loaded = load_model(str(bf16_folder), quantize="none", device="cpu")
    assert not loaded.quantized and loaded.dtype == torch.float32
    reference = hf_model(bf16_folder, torch.float32)
    for seed in range(2):
        ids = random_ids(32, loaded.args.vocab_size, seed)
        torch.testing.assert_close(our_logits(loaded.model, ids), hf_logits(reference, ids), **FP32)


def test_bf16_checkpoint_quantized_at_load_matches_bitsandbytes(bf16_folder):
    loaded = load_model(str(bf16_folder), quantize="nf4", device="cpu")
    assert loaded.quantized
    reference = bnb_reference(hf_model(bf16_folder, torch.float32))
    for i in range(loaded.args.n_layers):
        for ours, theirs in HF_PROJECTIONS.items():
            packed = torch.cat(
                [reference.model.layers[i].get_submodule(n).weight.data.reshape(-1) for n in theirs]
            )
            assert torch.equal(loaded.model.get_submodule(f"layers.{i}.{ours}").packed, packed)
    ids = random_ids(32, loaded.args.vocab_size, 5)
    torch.testing.assert_close(our_logits(loaded.model, ids), hf_logits(reference, ids), **FP32)


def test_bitsandbytes_checkpoint_loads_as_stored(bnb_folder, monkeypatch):
    config = json.loads((bnb_folder / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"]
    with safe_open(str(bnb_folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    prefix = "model.layers.1.mlp.down_proj.weight"
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        assert prefix + suffix in keys
    assert prefix + ".quant_state.bitsandbytes__nf4" in keys

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint was quantized again")

    monkeypatch.setattr(loader, "quantize_nf4", no_requantizing)
    loaded = load_model(str(bnb_folder), quantize="auto", device="cpu")
    assert loaded.quantized
    layer = loaded.model.layers[1].feed_forward.w2
    assert torch.equal(layer.packed, stored(bnb_folder, prefix).reshape(-1))
    state = json.loads(bytes(stored(bnb_folder, prefix + ".quant_state.bitsandbytes__nf4").tolist()))
    absmax = expand_absmax(
        stored(bnb_folder, prefix + ".absmax"),
        stored(bnb_folder, prefix + ".nested_quant_map"),
        stored(bnb_folder, prefix + ".nested_absmax"),
        state["nested_offset"],
    )
    assert torch.equal(layer.absmax, absmax)
    assert layer.absmax16 is None  # the fp16 scales are for the GPU's GEMVs (16-bit x) only

    # The reference: transformers reading the same saved checkpoint into bitsandbytes Linear4bit.
    reference = hf_model(bnb_folder, torch.float32, device_map="cpu")
    fp_reference_linears(reference, torch.float32)
    for seed in range(2):
        ids = random_ids(32, loaded.args.vocab_size, seed)
        torch.testing.assert_close(our_logits(loaded.model, ids), hf_logits(reference, ids), **FP32)


def test_unquantized_module_is_told_from_the_header(bf16_folder):
    # a weight without NF4 state (llm_int8_skip_modules leaves it in bf16) is refused by the
    # size its header gives, without reading the whole tensor
    reads = []

    class CountingReader(loader.SafetensorsReader):
        def __call__(self, name):
            reads.append(name)
            return super().__call__(name)

    reader = CountingReader(bf16_folder)
    with safe_open(str(bf16_folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            assert reader.shape(name) == tuple(f.get_slice(name).get_shape()), name
    config = json.loads((bf16_folder / "config.json").read_text())
    shape = (config["hidden_size"], config["intermediate_size"])
    with pytest.raises(ModelSourceError, match="left unquantized"):
        loader.read_prequantized(reader, f"{SKIPPED}.weight", shape, torch.device("cpu"))
    assert not reads


def test_half_absmax_rounds_to_fp16_within_its_range():
    absmax = torch.tensor([0.0, 1e-6, 0.0123456, 3.0, 65504.0])
    half = half_absmax(absmax)
    assert half.dtype == torch.float16 and torch.equal(half, absmax.half())
    assert ((half.float() - absmax).abs() <= absmax * 2**-11 + 2**-25).all()
    assert half_absmax(torch.tensor([1.0, 70000.0])) is None  # past fp16: the GEMVs keep fp32


def test_nf4_layer_hands_its_fp16_scales_to_the_ops():
    import dataclasses

    from model.ops import REFERENCE_OPS
    from model.quant import NF4Linear

    calls = []

    def spy(x, packed, absmax, shape, *lora, lora_t=None, absmax_half=None):
        calls.append((absmax, absmax_half))
        return x

    ops = dataclasses.replace(REFERENCE_OPS, nf4_linear=spy, nf4_linear_swiglu=spy)
    layer = NF4Linear(64, 8, ops)
    x = torch.zeros(1, 64)
    layer(x)
    layer.absmax16 = half_absmax(layer.absmax.uniform_())
    layer(x)
    layer.forward_swiglu(x)
    assert calls[0][1] is None and all(half is layer.absmax16 for _, half in calls[1:])
    assert all(absmax is layer.absmax for absmax, _ in calls)
    # a buffer (what moves absmax moves it too), not saved with the weights
    assert dict(layer.named_buffers())["absmax16"] is layer.absmax16
    assert "absmax16" not in layer.state_dict()


def test_bitsandbytes_checkpoint_cannot_be_served_unquantized(bnb_folder):
    with pytest.raises(ModelSourceError) as err:
        load_model(str(bnb_folder), quantize="none", device="cpu")
    assert_one_sentence(str(err.value))


def test_llama31_rope_scaling(tmp_path, tokenizer_dir):
    """A config.json as Llama-3.1 ships it (rope_theta and a "llama3" rope_scaling at top level),
    with an original context of 32 so that positions up to 120 exercise all three bands."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    folder = write_checkpoint(tmp_path / "llama31", tokenizer_dir, tiny_config(), torch.bfloat16, seed=3)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling=scaling)
    (folder / "config.json").write_text(json.dumps(config))

    loaded = load_model(str(folder), quantize="none", device="cpu")
    assert loaded.args.rope_theta == 500000.0
    assert loaded.args.rope_scaling == {k: v for k, v in scaling.items() if k != "rope_type"}
    reference = hf_model(folder, torch.float32)
    ids = random_ids(120, loaded.args.vocab_size, 4)
    ours = our_logits(loaded.model, ids)
    torch.testing.assert_close(ours, hf_logits(reference, ids), atol=1e-4, rtol=1e-4)
    # Without the scaling the logits are clearly different, so the comparison above means something.
    config.pop("rope_scaling")
    (folder / "config.json").write_text(json.dumps(config))
    assert (ours - hf_logits(hf_model(folder, torch.float32), ids)).abs().max() > 1e-2


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_tied_embeddings(tmp_path, tokenizer_dir, quantize):
    """Llama-3.2 style: lm_head is the embedding matrix and save_pretrained stores it once."""
    folder = write_checkpoint(
        tmp_path / "tied", tokenizer_dir, tiny_config(tie_word_embeddings=True), torch.bfloat16, seed=4
    )
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = load_model(str(folder), quantize=quantize, device="cpu")
    assert loaded.args.tie_word_embeddings and loaded.model.output is None
    reference = hf_model(folder, torch.float32)
    if quantize == "nf4":
        reference = bnb_reference(reference)
    ids = random_ids(32, loaded.args.vocab_size, 6)
    torch.testing.assert_close(our_logits(loaded.model, ids), hf_logits(reference, ids), **FP32)


def test_model_args_are_read_exactly(bf16_folder):
    from transformers import AutoConfig

    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(bf16_folder))
    expected = dict(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.intermediate_size == 512 and args.rope_scaling is None and not args.tie_word_embeddings
    assert args.eos_token_ids == (2,)


MEASURE_LOAD = """
import json, sys
from model.loader import load_model
load_model(sys.argv[3], quantize=sys.argv[2], device="cpu")  # imports what loading needs, once
loaded = load_model(sys.argv[1], quantize=sys.argv[2], device="cpu")
model = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
print(json.dumps([loaded.host_memory_before_bytes, loaded.peak_host_memory_bytes, model]))
"""


@pytest.fixture(scope="module")
def mid_folder(tmp_path_factory, tokenizer_dir):
    config = tiny_config(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=8192)
    config.num_attention_heads, config.num_key_value_heads = 8, 2
    folder = tmp_path_factory.mktemp("mid")
    return write_checkpoint(folder, tokenizer_dir, config, torch.bfloat16, seed=5)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_peak_host_memory_is_reported(mid_folder, bf16_folder, quantize):
    """A ~70 MB bf16 checkpoint, loaded in a fresh process (in this one, memory freed by earlier
    tests would be reused unseen) after a tiny one (so that imports are not counted). The loader
    reads one tensor at a time, not through a memory map whose touched pages would all count as
    resident: loading needs ~1.5x the final model."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(mid_folder), quantize, str(bf16_folder)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    before, peak, model_bytes = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = (mid_folder / "model.safetensors").stat().st_size
    growth = peak - before
    print(
        f"\n{quantize}: peak host memory while loading {peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB "
        f"over {before / 2**20:.0f} MiB before); model {model_bytes / 2**20:.0f} MiB, "
        f"checkpoint file {file_bytes / 2**20:.0f} MiB"
    )
    assert peak >= before > 0
    # Slack for the allocator and the tokenizer; a second copy of the model or the mapped file would not fit.
    assert growth < 1.5 * model_bytes + 24 * 2**20


# ---- sources that are not (supported) models ----


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError) as err:
        load_model(str(tmp_path), device="cpu")
    assert "config.json" in str(err.value)
    assert_one_sentence(str(err.value))


def test_non_llama_checkpoint_is_refused(tmp_path, bf16_folder):
    folder = tmp_path / "gpt2"
    shutil.copytree(bf16_folder, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1}))
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder), device="cpu")
    assert "gpt2" in str(err.value)
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize("source, quantize", [("bf16", "none"), ("bf16", "nf4"), ("bnb", "auto")])
def test_checkpoint_that_does_not_fit_its_config_is_refused(
    tmp_path, bf16_folder, bnb_folder, source, quantize
):
    """Tensors that disagree with config.json must not load into a silently wrong model."""
    folder = tmp_path / "mismatch"
    shutil.copytree(bf16_folder if source == "bf16" else bnb_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 448
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder), quantize=quantize, device="cpu")
    assert "model.layers.0.mlp.gate_proj.weight" in str(err.value)
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"num_attention_heads": 0}, "num_attention_heads 0"),
        ({"vocab_size": "512"}, 'vocab_size "512"'),
        ({"intermediate_size": -64}, "intermediate_size -64"),
        ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide"),
        ({"head_dim": -64}, "head_dim -64"),
        ({"max_position_embeddings": 0}, "max_position_embeddings 0"),
        ({"rms_norm_eps": "tiny"}, "Field 'rms_norm_eps' expected float"),  # transformers' check, whole
    ],
    ids=["gelu", "no heads", "vocab as text", "negative size", "kv heads", "head_dim", "no positions", "eps"],
)
def test_config_the_model_cannot_run_is_refused(tmp_path, bf16_folder, change, words):
    # read from config.json before transformers divides by a size or type-checks it, or from the
    # config it builds (a GELU Llama would otherwise run as SiLU: wrong output, no error)
    folder = tmp_path / "odd-config"
    shutil.copytree(bf16_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder), device="cpu")
    assert words in str(err.value)
    assert_one_sentence(str(err.value))


def test_built_config_sizes_are_checked_too():
    # a config transformers built from elsewhere (GGUF metadata) has no config.json to check first
    config = tiny_config()
    config.num_attention_heads = 0
    message = "The config's num_attention_heads must be a positive whole number: 0."
    with pytest.raises(UnsupportedModelError) as err:
        ModelArgs.from_hf_config(config)
    assert str(err.value) == message


def bnb_variant(bf16_folder, folder, **settings) -> Path:
    """bf16_folder quantized by transformers + bitsandbytes with `settings`, saved to folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, **settings)
    model = AutoModelForCausalLM.from_pretrained(bf16_folder, quantization_config=config, device_map="cpu")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bf16_folder / name, folder / name)
    return folder


def test_bitsandbytes_checkpoint_with_bf16_storage_loads_the_same_bytes(tmp_path, bf16_folder, bnb_folder):
    # bnb_4bit_quant_storage=bfloat16 stores the packed bytes typed as bf16: read as bytes, they
    # are the uint8 checkpoint's (quantization is deterministic), and so is the model's output
    folder = bnb_variant(
        bf16_folder, tmp_path / "bf16-storage", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16,
    )  # fmt: skip
    assert stored(folder, "model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
    ours, base = (load_model(str(f), device="cpu") for f in (folder, bnb_folder))
    want = dict(base.model.named_buffers())
    for name, buffer in ours.model.named_buffers():
        if name.endswith(("packed", "absmax")):
            assert torch.equal(buffer, want[name]), name
    ids = random_ids(12, ours.args.vocab_size, seed=5)
    assert torch.equal(our_logits(ours.model, ids), our_logits(base.model, ids))


SKIPPED = "model.layers.1.mlp.down_proj"  # left in bf16 by llm_int8_skip_modules


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(bnb_4bit_quant_type="fp4"), "quantized to FP4"),
        (
            dict(
                bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "model.layers.1.mlp.down_proj"]
            ),
            "'model.layers.1.mlp.down_proj.weight' is left unquantized",
        ),
    ],
    ids=["fp4", "skipped module"],
)
def test_bitsandbytes_checkpoint_in_another_4_bit_form_is_refused_by_name(
    tmp_path, bf16_folder, settings, words
):
    folder = bnb_variant(bf16_folder, tmp_path / "variant", **settings)
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder), device="cpu")
    assert words in str(err.value)
    assert_one_sentence(str(err.value))


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
]


@pytest.mark.parametrize("emitted", ["<|eot_id|>", "<|end_of_text|>"])
def test_llama3_stops_on_eot_and_end_of_text(tmp_path, emitted):
    """Llama-3 Instruct ends a turn with <|eot_id|> and a text with <|end_of_text|>; config.json
    lists only one of them. A model whose final norm is zero gives all-zero logits, so greedy
    emits token 0: that token is put first in the vocabulary, and must end the generation."""
    specials = [emitted] + [t for t in LLAMA3_SPECIALS if t != emitted]
    tokenizer = word_tokenizer(tmp_path / "tokenizer", specials, bos="<|begin_of_text|>", eos="<|eot_id|>")
    other = "<|end_of_text|>" if emitted == "<|eot_id|>" else "<|eot_id|>"
    config = tiny_config(vocab_size=64, bos_token_id=specials.index("<|begin_of_text|>"))
    config.eos_token_id = specials.index(other)  # config.json names only the other stop token
    zero_norm = lambda m: m.model.norm.weight.zero_()  # noqa: E731
    folder = write_checkpoint(tmp_path / "llama3", tokenizer, config, torch.float32, edit=zero_norm)
    engine = engine_over(load_model(str(folder), quantize="none", device="cpu"), max_seq_len=64)
    events = list(
        engine.chat([{"role": "user", "content": "hello world"}], GenerationSettings(temperature=0))
    )
    stats = events[-1].stats
    assert (stats.stop_reason, stats.new_tokens) == ("eos", 0)
    # And with EOS ignored the model does emit that token, so the stop above was the stop token's.
    settings = GenerationSettings(temperature=0, max_new_tokens=2, ignore_eos=True)
    ids = engine.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert [t for e in engine.generate_ids(ids, settings) for t in e.token_ids] == [0, 0]
    engine.close()


def break_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()


def break_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", ')


def truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def drop_a_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_header(folder, edit):
    """Rewrite model.safetensors' JSON header with edit(header), the data left as it was."""
    data = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(edit(json.loads(data[8 : 8 + size]))).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size :])


def header_as_list(folder):
    edit_header(folder, lambda header: list(header.items()))


def shape_past_its_bytes(folder):  # the shape of twice the bytes the entry's offsets span
    def edit(header):
        entry = header["model.layers.0.self_attn.q_proj.weight"]
        entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]
        return header

    edit_header(folder, edit)


def entry_without_dtype(folder):
    def edit(header):
        del header["model.norm.weight"]["dtype"]
        return header

    edit_header(folder, edit)


@pytest.mark.parametrize(
    "damage, words",
    [
        (break_tokenizer, "no tokenizer"),
        (break_config, "not valid JSON"),
        (truncate_weights, "cut short"),
        (drop_a_tensor, "model.layers.1.mlp.up_proj.weight"),
        (header_as_list, "not a valid safetensors file"),
        (shape_past_its_bytes, "corrupt: its header entry 'model.layers.0.self_attn.q_proj.weight'"),
        (entry_without_dtype, "corrupt: its header entry 'model.norm.weight'"),
    ],
    ids=[
        "no tokenizer", "config not JSON", "truncated weights", "missing tensor", "header not a mapping",
        "shape past its bytes", "entry without dtype",
    ],
)  # fmt: skip
def test_broken_checkpoint_gives_one_sentence(tmp_path, bf16_folder, damage, words):
    folder = tmp_path / "broken"
    shutil.copytree(bf16_folder, folder)
    damage(folder)
    with pytest.raises(ModelSourceError) as err:
        load_model(str(folder), device="cpu")
    assert words in str(err.value)
    assert_one_sentence(str(err.value))


def test_input_embeddings_stay_in_host_memory_only_untied_on_cuda_with_the_kernels():
    from model.loader import embeddings_in_host_memory, host_table_readable
    from model.ops import REFERENCE_OPS

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    untied, tied = (ModelArgs.from_hf_config(tiny_config(tie_word_embeddings=t)) for t in (False, True))
    assert embeddings_in_host_memory(untied, cuda, use_triton=True)
    assert not embeddings_in_host_memory(tied, cuda, use_triton=True)  # it is also the lm_head
    assert not embeddings_in_host_memory(untied, cuda, use_triton=False)  # F.embedding needs it on the GPU
    assert not embeddings_in_host_memory(untied, cpu, use_triton=True)
    table = torch.randn(5, 3)
    assert host_table_readable(REFERENCE_OPS, table, cpu)

    def broken(tokens, table):
        raise RuntimeError("no mapped memory")

    no_mapping = dataclasses.replace(REFERENCE_OPS, embedding=broken)
    assert not host_table_readable(no_mapping, table, cpu)


def test_dtype_choice(monkeypatch):
    from model.loader import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype(None, cpu) == torch.float32  # the fidelity tests' setting
    assert resolve_dtype(None, cuda) == resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype(torch.float32, cuda) == torch.float32
    for flags, want in (("fpu avx2 avx512f", torch.float32), ("fpu avx512f avx512_bf16", torch.bfloat16),
                        ("fpu amx_bf16 amx_tile", torch.bfloat16)):  # fmt: skip
        monkeypatch.setattr(loader.Path, "read_text", lambda self, flags=flags: f"flags\t: {flags}\n")
        assert resolve_dtype("auto", cpu) == want, flags
    with pytest.raises(ModelSourceError, match="dtype"):
        resolve_dtype("fp8", cpu)
