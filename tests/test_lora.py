"""PEFT LoRA adapters on our model against peft's own PeftModel.

Adapters are made with peft's get_peft_model (init_lora_weights=False, so B is random and the
adapter changes the output) and save_pretrained on a small random Llama; ours reads the saved
folder. Unquantized bases compare at fp32 rounding; an NF4 base is compared with peft on top of
bitsandbytes' Linear4bit holding the same bytes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import (
    assert_one_sentence,
    bnb_reference,
    hf_greedy,
    hf_logits,
    hf_model,
    our_logits,
    peft_adapter,
    peft_model,
    random_ids,
    tiny_config,
    tiny_tokenizer_dir,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file

from model import lora
from model.engine import Engine, EngineError, GenerationSettings
from model.loader import load_model

# fp32, logits up to ~6 and adapters that move them by ~7: peft adds scale * B(Ax) per projection,
# we add (B * scale)(Ax) with the scale folded into B and q/k/v (gate/up) stacked. That only
# reorders fp32 rounding (measured max |diff| 4.5e-5, with rsLoRA's larger scale); a wrong scale
# or a missing module shows as differences of order 1.
ATOL, RTOL = 1e-4, 1e-4
ADAPTERS = {
    "all-linear": dict(target_modules="all-linear"),
    "all-linear-rslora": dict(target_modules="all-linear", use_rslora=True),
    "subset": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "subset-rslora": dict(target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True),
    "patterns": dict(
        target_modules="all-linear",
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, "model.layers.0.mlp.up_proj": 3},
    ),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("lora-base")
    return write_checkpoint(folder, tokenizer_dir, tiny_config(), torch.float32, seed=1)


@pytest.fixture(scope="module")
def hf(base):
    return hf_model(base)


@pytest.fixture(scope="module")
def ours(base):
    return load_model(str(base), quantize="none", device="cpu").model


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, hf):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: peft_adapter(hf, root / name, seed=i, **kwargs)
        for i, (name, kwargs) in enumerate(ADAPTERS.items())
    }


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_logits_match_peft(ours, hf, adapter_dirs, name):
    reference = peft_model(hf, adapter_dirs[name])
    adapter = lora.build_adapter(ours, str(adapter_dirs[name]))
    try:
        for seed in range(2):
            ids = random_ids(24, ours.args.vocab_size, seed)
            lora.activate(ours, adapter)
            with_lora = our_logits(ours, ids)
            torch.testing.assert_close(with_lora, hf_logits(reference, ids), atol=ATOL, rtol=RTOL)
            lora.activate(ours, None)
            base_logits = our_logits(ours, ids)
            torch.testing.assert_close(base_logits, hf_logits(hf, ids), atol=ATOL, rtol=RTOL)
            assert (with_lora - base_logits).abs().max() > 0.1  # the adapter really acts
    finally:
        lora.activate(ours, None)


def test_rank_and_alpha_patterns_are_read(ours, adapter_dirs):
    """The stacked B of a patterned module carries alpha/r of its own pattern entry."""
    config = json.loads((adapter_dirs["patterns"] / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    adapter = lora.build_adapter(ours, str(adapter_dirs["patterns"]))
    assert adapter["layers.1.feed_forward.w2"].a.shape[0] == 2
    assert adapter["layers.0.feed_forward.w2"].a.shape[0] == 8
    assert adapter["layers.0.attention.wqkv"].a.shape[0] == 4 + 8 + 8  # q r=4, k and v r=8


def test_nf4_base_with_adapter_matches_peft_on_bitsandbytes(base, hf, adapter_dirs):
    quantized = load_model(str(base), quantize="nf4", device="cpu").model
    for name in ("all-linear-rslora", "subset"):
        reference = peft_model(bnb_reference(hf), adapter_dirs[name])
        lora.activate(quantized, lora.build_adapter(quantized, str(adapter_dirs[name])))
        ids = random_ids(24, quantized.args.vocab_size, 7)
        torch.testing.assert_close(
            our_logits(quantized, ids), hf_logits(reference, ids), atol=ATOL, rtol=RTOL
        )


# ---- adapters that do not fit ----


NAN_TENSOR = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
# peft features this model does not apply, each made by peft itself: refused by name
UNSUPPORTED = {
    "lora_bias": dict(target_modules=["q_proj", "down_proj"], lora_bias=True),
    "embed_tokens": dict(target_modules=["q_proj", "embed_tokens"]),
    "lm_head": dict(target_modules=["v_proj", "lm_head"]),
    "trainable_token_indices": dict(target_modules=["q_proj"], trainable_token_indices=[3, 4, 5]),
    "aLoRA": dict(target_modules=["q_proj", "k_proj", "v_proj"], alora_invocation_tokens=[5, 6]),
}


@pytest.fixture(scope="module")
def wrong_adapters(tmp_path_factory, tokenizer_dir, hf, adapter_dirs):
    root = tmp_path_factory.mktemp("wrong")
    for i, (name, kwargs) in enumerate(UNSUPPORTED.items()):
        peft_adapter(hf, root / name, seed=10 + i, **kwargs)
    bad_pattern = root / "bad rank_pattern"
    shutil.copytree(adapter_dirs["patterns"], bad_pattern)
    config = json.loads((bad_pattern / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj[": 4}  # not a regular expression
    (bad_pattern / "adapter_config.json").write_text(json.dumps(config))
    nan = root / "NaN weights"
    shutil.copytree(adapter_dirs["subset"], nan)
    tensors = load_file(nan / "adapter_model.safetensors")
    tensors[NAN_TENSOR][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    other = write_checkpoint(root / "other", tokenizer_dir, tiny_config(hidden_size=128), torch.float32)
    cases = {"other hidden size": peft_adapter(hf_model(other), root / "other-adapter", seed=0)}
    (root / "no-config").mkdir()
    (root / "no-config" / "adapter_model.safetensors").write_bytes(b"")
    cases["no adapter_config.json"] = root / "no-config"
    pickled = root / "pickled"
    pickled.mkdir()
    config = json.loads((cases["other hidden size"] / "adapter_config.json").read_text())
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    cases["pickled adapter_model.bin"] = pickled
    cases["missing folder"] = root / "does-not-exist"
    cases.update({name: root / name for name in [*UNSUPPORTED, "bad rank_pattern", "NaN weights"]})
    return cases


EXPECTED_WORDS = {
    "other hidden size": "base_model.model.model.layers.0.self_attn.q_proj",  # the first mismatch
    "no adapter_config.json": "adapter_config.json",
    "pickled adapter_model.bin": "adapter_model.safetensors",
    "missing folder": "No adapter folder",
    "lora_bias": "(lora_bias) are not supported",
    "embed_tokens": "on the token embeddings or the lm_head are not supported",
    "lm_head": "on the token embeddings or the lm_head are not supported",
    "trainable_token_indices": "on the token embeddings or the lm_head are not supported",
    "aLoRA": "(aLoRA) adapters",
    "bad rank_pattern": "not a regular expression: 'q_proj['",
    "NaN weights": f"'{NAN_TENSOR}' holds values that are not finite",
}


@pytest.mark.parametrize("case", list(EXPECTED_WORDS))
def test_wrong_adapter_is_refused_and_model_unchanged(ours, adapter_dirs, wrong_adapters, case):
    active = lora.build_adapter(ours, str(adapter_dirs["subset"]))
    lora.activate(ours, active)
    ids = random_ids(16, ours.args.vocab_size, 3)
    before = our_logits(ours, ids)
    with pytest.raises(lora.AdapterError) as err:
        lora.build_adapter(ours, str(wrong_adapters[case]))
    assert EXPECTED_WORDS[case] in str(err.value)
    assert_one_sentence(str(err.value))
    assert torch.equal(our_logits(ours, ids), before)
    lora.activate(ours, None)


# ---- the engine: several adapters, one chosen per request ----


def test_engine_chooses_adapter_per_request(base, hf, adapter_dirs, wrong_adapters):
    engine = Engine.load(str(base), quantize="none", device="cpu", dtype="float32", max_seq_len=128)
    names = {engine.load_adapter(str(adapter_dirs["all-linear"]), name="a")}
    names.add(engine.load_adapter(str(adapter_dirs["subset-rslora"]), name="b"))
    assert sorted(engine.adapters()) == ["a", "b"] == sorted(names)
    with pytest.raises(EngineError) as err:
        engine.load_adapter(str(wrong_adapters["other hidden size"]), name="c")
    assert_one_sentence(str(err.value))
    assert sorted(engine.adapters()) == ["a", "b"]
    with pytest.raises(EngineError, match="No adapter named"):
        engine.chat([{"role": "user", "content": "hello"}], adapter="nope")

    messages = [{"role": "user", "content": "name the planets"}]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(ids, add_special_tokens=False)["input_ids"]
    references = {
        "a": peft_model(hf, adapter_dirs["all-linear"]),
        "b": peft_model(hf, adapter_dirs["subset-rslora"]),
        None: hf,
    }
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    texts = {}
    for adapter in ("a", None, "b", "a"):  # switching back and forth, no reload
        events = list(engine.chat(messages, settings, adapter=adapter))
        expected = hf_greedy(references[adapter], ids, 12)
        texts[adapter] = "".join(e.text for e in events)
        # The random model emits stray bytes; the engine never shows an unfinished character at
        # the end of a generation (U+FFFD of a partial UTF-8 sequence), HF's decode does.
        full = engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert texts[adapter] == full.rstrip("\ufffd"), adapter
    assert len(set(texts.values())) == 3


def test_a_step_queued_behind_an_admission_keeps_its_adapter(base, hf, adapter_dirs, monkeypatch):
    """A decode step queued behind another (model/scheduler.py, forced on here: it is the GPU's
    path) runs under its rows' adapter even when an admission in between activated another one
    (here a request for adapter "a" whose prefill fails)."""
    engine = Engine.load(str(base), quantize="none", device="cpu", dtype="float32", max_seq_len=128)
    engine.load_adapter(str(adapter_dirs["all-linear"]), name="a")
    monkeypatch.setattr(engine.scheduler, "overlap", True)
    prefill, follow = engine.runner.prefill, engine.runner.decode_greedy_following
    monkeypatch.setattr(
        engine.runner,
        "prefill",
        lambda ids, slot=0, stop=None: 1 / 0 if ids[0] == 7 else prefill(ids, slot, stop),
    )
    late = []

    def following(*args):
        if not late:  # while the base request decodes, one for "a" arrives and fails its prefill
            late.append(engine.generate_ids([7, 8, 9], GenerationSettings(max_new_tokens=2), adapter="a"))
        return follow(*args)

    monkeypatch.setattr(engine.runner, "decode_greedy_following", following)  # greedy's follow-up step
    ids = list(range(3, 20))
    settings = GenerationSettings(temperature=0, max_new_tokens=16, ignore_eos=True)
    tokens = [t for event in engine.generate_ids(ids, settings) for t in event.token_ids]
    assert tokens == hf_greedy(hf, ids, 16)
    with pytest.raises(EngineError, match=r"\(ZeroDivisionError\)"):  # the prefill's own failure
        list(late[0])
    engine.close()
