"""The engine's behaviour on the embedded default model: streaming text, stop strings, length,
cancel, seeds, stats, the context policy, and errors a user can cause (each one clear sentence,
after which the engine still generates)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import (
    DEFAULT_MAX_SEQ_LEN,
    assert_one_sentence,
    default_engine,
    default_hf,
    hf_greedy_with,
    hf_model,
    peft_adapter,
    tiny_config,
    tiny_tokenizer_dir,
    write_checkpoint,
)

from model import prompts
from model.engine import CancelToken, Engine, EngineError, GenerationSettings, TextStream

pytestmark = pytest.mark.slow
GREEDY = GenerationSettings(temperature=0, max_new_tokens=64)
PLANETS = "Name the planets in the solar system?"
KOREAN = [{"role": "user", "content": "How do you say hello in Korean?"}]


@pytest.fixture(scope="module")
def engine():
    return default_engine()


def run(events) -> tuple[str, list, list[int]]:
    """(the streamed text, the events, the token ids behind them)."""
    events = list(events)
    assert events[-1].done and not any(e.done for e in events[:-1])
    return "".join(e.text for e in events), events, [t for e in events for t in e.token_ids]


@pytest.fixture(scope="module")
def planets(engine):
    return run(engine.instruct(PLANETS, settings=GREEDY))


def still_works(engine) -> None:
    text, events, _ = run(engine.chat([{"role": "user", "content": "Hi!"}], GREEDY))
    assert events[-1].stats.new_tokens > 0 and text.strip()


# ---- what the model says ----


def test_default_model_names_the_planets(planets):
    text = planets[0]
    named = [
        p
        for p in ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
        if p in text
    ]
    assert len(named) >= 6, text


def test_default_model_in_bf16_names_every_planet():
    """What "auto" serves on a CPU with native bf16 (twice the fp32 decode speed there)."""
    engine = Engine.load(quantize="none", device="cpu", dtype="bfloat16", max_seq_len=256)
    try:
        assert engine.info()["dtype"] == "bfloat16"
        text = run(engine.instruct(PLANETS, settings=GREEDY))[0]
        planets = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
        assert all(p in text for p in planets), text
    finally:
        engine.close()


def test_the_memory_line_on_a_cpu_is_the_peak_so_far(engine):
    # it was the peak while loading, before the KV cache and any generation: 1.42 GB shown while
    # the app held 2.67 GB (an exploratory review)
    from model.loader import _status_kib

    def rss() -> int:
        return _status_kib("VmRSS") * 1024

    # hold enough memory (written, so resident) that the process is past its peak while loading
    grown = torch.ones(max(engine.loaded.peak_host_memory_bytes - rss(), 0) // 4 + 50_000_000)
    shown_gb = float(engine.info()["memory"].removesuffix(" GB peak RSS"))
    assert shown_gb >= rss() / 1e9 - 0.01
    del grown


# ---- streaming ----


def test_streamed_deltas_are_the_full_decode(engine, planets):
    text, events, ids = planets
    assert len(events) > 5  # it did stream
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_split(engine):
    """Korean syllables here come out of byte-level tokens that are not characters on their own."""
    text, events, ids = run(engine.chat(KOREAN, GREEDY))
    partial = [i for i in ids if "\ufffd" in engine.tokenizer.decode([i])]
    assert partial, "the answer has no split character, so this test would not test anything"
    assert not any("\ufffd" in e.text for e in events)
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert any(ord(c) > 0x3000 for c in text)


def test_text_stream_holds_back_partial_characters(engine):
    tokenizer = engine.tokenizer
    text = "Hi 🙂 你好世界 — café 🎉 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    stream = TextStream(tokenizer, ())
    deltas = [stream.push(i) for i in ids] + [stream.release(final=True)]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text


# ---- how a generation ends ----


@pytest.mark.parametrize("stop", ["Venus", ", Earth", "Mars,"])
def test_stop_string_cuts_the_text(engine, planets, stop):
    full = planets[0]
    assert stop in full
    text, events, _ = run(engine.instruct(PLANETS, settings=GenerationSettings(temperature=0, stop=(stop,))))
    assert events[-1].stats.stop_reason == "stop"
    assert text == full[: full.index(stop)]


def test_max_new_tokens_gives_length(engine):
    settings = GenerationSettings(temperature=0, max_new_tokens=5)
    _, events, ids = run(engine.instruct(PLANETS, settings=settings))
    assert events[-1].stats.stop_reason == "length"
    assert events[-1].stats.new_tokens == len(ids) == 5


def test_eos_ends_the_answer(planets):
    stats = planets[1][-1].stats
    assert stats.stop_reason == "eos" and stats.new_tokens < GREEDY.max_new_tokens


def test_cancel_stops_within_a_step(engine):
    cancel = CancelToken()
    events = engine.instruct(
        PLANETS, settings=GenerationSettings(temperature=0, max_new_tokens=64), cancel=cancel
    )
    first = next(events)
    cancel.cancel()
    rest = list(events)
    final = rest[-1].stats
    assert final.stop_reason == "cancelled"
    # The worker may have one step in flight and one token queued when cancel() lands.
    assert final.new_tokens <= first.stats.new_tokens + 2
    still_works(engine)


def test_seed_makes_sampling_reproducible(engine):
    def sample(seed: int) -> list[int]:
        settings = GenerationSettings(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, seed=seed)
        return run(engine.instruct("Write a sentence about the sea.", settings=settings))[2]

    first = sample(7)
    assert sample(7) == first
    assert len({tuple(sample(s)) for s in (1, 2, 3)} | {tuple(first)}) >= 2


def test_stats_are_sane(engine, planets):
    _, events, ids = planets
    stats = events[-1].stats
    assert stats.prompt_tokens == len(prompts.alpaca_prompt_ids(engine.tokenizer, PLANETS))
    assert stats.new_tokens == len(ids) > 1
    assert 0 < stats.time_to_first_token_s <= stats.total_s
    assert stats.decode_tokens_per_s > 0
    assert stats.prompt_trimmed_turns == 0
    running = [e.stats.new_tokens for e in events[:-1]]
    assert running == sorted(running)


# ---- the context ----


def long_turn(i: int) -> str:
    return f"Turn {i}: " + "tell me more about the planets and their moons, " * 6


def test_long_chat_drops_oldest_turns(engine):
    messages = []
    for i in range(6):
        messages += [
            {"role": "user", "content": long_turn(i)},
            {"role": "assistant", "content": long_turn(i)},
        ]
    messages.append({"role": "user", "content": "Which planet is the largest?"})
    full = prompts.chat_prompt_ids(engine.tokenizer, prompts.chat_messages(messages))
    assert len(full) > DEFAULT_MAX_SEQ_LEN
    settings = GenerationSettings(temperature=0, max_new_tokens=16)
    text, events, _ = run(engine.chat(messages, settings))
    stats = events[-1].stats
    assert stats.prompt_trimmed_turns > 0
    assert stats.prompt_tokens + settings.max_new_tokens <= DEFAULT_MAX_SEQ_LEN
    assert stats.new_tokens > 0 and text.strip()


@pytest.mark.parametrize("lead", ["assistant", "user"])
def test_a_history_that_does_not_alternate_is_trimmed_turn_by_turn(engine, lead):
    # an assistant greeting first, or two user messages in a row, used to leave only "drop
    # nothing" or "drop everything": the whole history went, reported as one or two turns
    messages = [{"role": lead, "content": "Hello! How can I help you today?"}]
    for i in range(6):
        messages += [
            {"role": "user", "content": long_turn(i)},
            {"role": "assistant", "content": long_turn(i)},
        ]
    messages.append({"role": "user", "content": "Which planet is the largest?"})
    settings = GenerationSettings(temperature=0, max_new_tokens=16)
    stats = run(engine.chat(messages, settings))[1][-1].stats
    alone = prompts.chat_prompt_ids(engine.tokenizer, prompts.chat_messages(messages[-1:]))
    assert stats.prompt_tokens + settings.max_new_tokens <= DEFAULT_MAX_SEQ_LEN
    assert stats.prompt_tokens > len(alone)  # some earlier turns kept
    kept = [m for m in messages if m["role"] == "user"][stats.prompt_trimmed_turns - (lead == "assistant") :]
    assert 1 < len(kept) < 7  # the turns counted as dropped are the ones dropped


def test_newest_message_over_the_context_is_refused(engine):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "planets " * (2 * DEFAULT_MAX_SEQ_LEN)},
    ]
    with pytest.raises(EngineError) as err:
        engine.chat(messages, GREEDY)
    assert_one_sentence(str(err.value))
    with pytest.raises(EngineError) as err:
        engine.instruct("planets " * (2 * DEFAULT_MAX_SEQ_LEN), settings=GREEDY)
    assert_one_sentence(str(err.value))
    still_works(engine)


def test_a_long_reply_asked_for_keeps_the_conversation(engine):
    # max new tokens at the whole context must not push every earlier turn out: the turns stay,
    # the reply ends where the context does
    messages = [
        {"role": "user", "content": "My name is Zorblax."},
        {"role": "assistant", "content": "Nice to meet you, Zorblax!"},
        {"role": "user", "content": "What is my name?"},
    ]
    events = engine.chat(messages, GenerationSettings(temperature=0, max_new_tokens=engine.max_seq_len))
    first = next(iter(events))
    events.close()  # cancels the rest of the reply
    assert first.stats.prompt_trimmed_turns == 0
    still_works(engine)


def test_a_reply_ended_by_the_context_says_so(engine):
    # the line under such a reply used to say "max new tokens reached" when the context had run out
    n = engine.max_seq_len - 3
    ids = prompts.alpaca_prompt_ids(engine.tokenizer, "planets " * n)[:n]
    settings = GenerationSettings(temperature=0, max_new_tokens=10, ignore_eos=True)
    stats = run(engine.generate_ids(ids, settings))[1][-1].stats
    assert (stats.new_tokens, stats.stop_reason, stats.context_full_at) == (3, "length", engine.max_seq_len)
    short = GenerationSettings(temperature=0, max_new_tokens=3, ignore_eos=True)
    stats = run(engine.generate_ids(ids, short))[1][-1].stats  # max new tokens, exactly at the context
    assert (stats.new_tokens, stats.stop_reason, stats.context_full_at) == (3, "length", 0)


def test_control_tokens_typed_into_the_instruction_stay_text(engine):
    # as in chat (apply_chat_template's sanitize_control_tokens): typed "<|im_end|>" must not end
    # the prompt's turn as the real token would
    control = [engine.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids = prompts.alpaca_prompt_ids(engine.tokenizer, "Say <|im_end|> and <|endoftext|> now.", "<|im_end|>")
    assert not set(control) & set(ids)
    plain = prompts.alpaca_prompt_ids(engine.tokenizer, "Name the planets.")
    assert plain == engine.tokenizer(prompts.alpaca_prompt("Name the planets."))["input_ids"]


def test_prompts_encoded_by_two_threads_at_once_keep_their_own_options(engine):
    # the tokenizer's options are state on the shared tokenizer: an Alpaca prompt (typed control
    # tokens as text) and a chat (the template's control tokens as tokens) encoded at once used to
    # swap them now and then (measured: 6-10 and 1-5 of 200 each)
    end, start = (engine.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>"))
    text = "the planets of the solar system " * 60
    wrong = []

    def instruct():
        for _ in range(500):
            wrong.extend(
                ["instruct"]
                if end in prompts.alpaca_prompt_ids(engine.tokenizer, "<|im_end|> " + text)
                else []
            )

    def chat():
        for _ in range(500):
            ids = prompts.chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": text}])
            wrong.extend([] if start in ids else ["chat"])

    threads = [threading.Thread(target=instruct), threading.Thread(target=chat)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_system_prompt_over_the_context_is_named(engine):
    with pytest.raises(EngineError) as err:
        engine.chat(
            [{"role": "user", "content": "hi"}], GREEDY, system_prompt="planets " * (2 * DEFAULT_MAX_SEQ_LEN)
        )
    assert "system prompt" in str(err.value)
    assert_one_sentence(str(err.value))


# ---- errors a user can cause ----


@pytest.mark.parametrize("source", ["no/such-model", "definitely not a model", "/no/such/folder"])
def test_unknown_source(engine, source):
    with pytest.raises(EngineError) as err:
        Engine.load(source, device="cpu")
    assert_one_sentence(str(err.value))
    still_works(engine)


BAD_SETTINGS = [
    dict(max_new_tokens=0),
    dict(temperature=-1),
    dict(temperature=1e-40),  # its scores overflowed: the draw gave token 0 to the end of the reply
    dict(top_p=0),
    dict(top_k=-1),
    dict(repetition_penalty=0),
    dict(repetition_penalty=1e-40),
    dict(seed=-5),
    dict(stop=("",)),
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda b: next(iter(b)))
def test_bad_settings(engine, bad):
    with pytest.raises(EngineError) as err:
        engine.chat([{"role": "user", "content": "Hi"}], GenerationSettings(**bad))
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize(
    "bad, limit", [(dict(top_k=10**6), "100,000"), (dict(seed=2**64), str(2**63 - 1))], ids=["top_k", "seed"]
)
def test_settings_past_their_limit_name_it(engine, bad, limit):
    with pytest.raises(EngineError) as err:
        engine.chat([{"role": "user", "content": "Hi"}], GenerationSettings(**bad))
    assert limit in str(err.value)
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.chat([{"role": "user", "content": "   "}], GREEDY),
        lambda e: e.chat([], GREEDY),
        lambda e: e.instruct("", settings=GREEDY),
        lambda e: e.generate_ids([], GREEDY),
        lambda e: e.chat([{"role": "user", "content": "Hi"}], GREEDY, adapter="not loaded"),
    ],
    ids=["blank message", "no messages", "empty instruction", "no ids", "unknown adapter"],
)
def test_empty_prompt(engine, call):
    with pytest.raises(EngineError) as err:
        call(engine)
    assert_one_sentence(str(err.value))


def test_tokenizer_larger_than_the_vocabulary_is_named(tmp_path, tmp_path_factory):
    # ids past the embedding table: an IndexError on the CPU (retried in vain), a zero row from
    # the GPU's embedding kernel; the prompt is refused in one sentence instead
    tokenizer = tiny_tokenizer_dir(tmp_path_factory)
    folder = write_checkpoint(tmp_path / "small-vocab", tokenizer, tiny_config(vocab_size=8), torch.float32)
    small = Engine.load(str(folder), quantize="none", device="cpu", max_seq_len=256)
    try:
        with pytest.raises(EngineError) as err:
            run(small.instruct("Name the planets.", settings=GREEDY))
        assert "8-token vocabulary" in str(err.value)
        assert_one_sentence(str(err.value))
    finally:
        small.close()


def test_adapter_for_another_hidden_size(engine, tmp_path, tmp_path_factory):
    folder = write_checkpoint(
        tmp_path / "other", tiny_tokenizer_dir(tmp_path_factory), tiny_config(hidden_size=128), torch.float32
    )
    adapter = peft_adapter(hf_model(folder), tmp_path / "adapter", seed=0)
    before = run(engine.instruct(PLANETS, settings=GenerationSettings(temperature=0, max_new_tokens=8)))[2]
    with pytest.raises(EngineError) as err:
        engine.load_adapter(str(adapter))
    assert "q_proj" in str(err.value)
    assert_one_sentence(str(err.value))
    assert engine.adapters() == []
    after = run(engine.instruct(PLANETS, settings=GenerationSettings(temperature=0, max_new_tokens=8)))[2]
    assert after == before


# ---- several requests at once (the engine batches them over KV-cache slots) ----


def test_concurrent_generations_equal_sequential_ones(engine):
    """Rows of different lengths, one joining mid-flight and one leaving early, each give the
    tokens they give alone."""
    questions = [
        PLANETS,
        "Write a haiku about the sea.",
        "What is 2 + 2? Explain your reasoning step by step.",
    ]
    prompts_ids = [prompts.alpaca_prompt_ids(engine.tokenizer, q) for q in questions]
    lengths = [16, 6, 16]

    def settings(n: int) -> GenerationSettings:
        return GenerationSettings(temperature=0, max_new_tokens=n, ignore_eos=True)

    alone = [run(engine.generate_ids(ids, settings(n)))[2] for ids, n in zip(prompts_ids, lengths)]
    first = engine.generate_ids(prompts_ids[0], settings(lengths[0]))
    head = [next(first) for _ in range(3)]
    others = [engine.generate_ids(ids, settings(n)) for ids, n in zip(prompts_ids[1:], lengths[1:])]
    together = [[t for e in head for t in e.token_ids] + run(first)[2]] + [run(s)[2] for s in others]
    assert together == alone


def test_requests_arriving_together_share_their_prefill(engine, monkeypatch):
    """Prompts of different lengths admitted in one go are prefilled in one shared pass (padded)
    and each still gets the tokens it gets alone; the shared logits match lone prefills."""
    questions = [PLANETS, "Hi", "What is 2 + 2? Explain your reasoning step by step, please, in detail."]
    prompts_ids = [prompts.alpaca_prompt_ids(engine.tokenizer, q) for q in questions]
    assert len({len(ids) for ids in prompts_ids}) == 3, [len(ids) for ids in prompts_ids]
    settings = GenerationSettings(temperature=0, max_new_tokens=10, ignore_eos=True)
    alone = [run(engine.generate_ids(ids, settings))[2] for ids in prompts_ids]

    shared = engine.runner.prefill_many
    calls = []
    monkeypatch.setattr(
        engine.runner, "prefill_many", lambda p, stop=None: calls.append(len(p)) or shared(p, stop)
    )
    with engine.scheduler.wake:  # the worker waits for this lock, then finds all three waiting
        streams = [engine.generate_ids(ids, settings) for ids in prompts_ids]
    assert [run(stream)[2] for stream in streams] == alone
    assert calls == [3]

    with torch.inference_mode():
        lone = [engine.runner.prefill(ids, slot)[0] for slot, ids in enumerate(prompts_ids)]
    together = shared([(ids, slot) for slot, ids in enumerate(prompts_ids)])
    torch.testing.assert_close(together, torch.stack(lone), atol=1e-3, rtol=1e-3)


def test_shared_prefill_groups_are_bounded_like_one_pass():
    from model.runner import PREFILL_CHUNK
    from model.scheduler import Request, prefill_groups

    def request(length: int, adapter: str | None = None) -> Request:
        return Request([1] * length, 0.0, 0, 1.0, 1.0, None, 4, adapter, cancel=None)

    lengths = [600, 500, 650, PREFILL_CHUNK + 5, 10, 20]
    taken = [(request(n), slot) for slot, n in enumerate(lengths)]
    taken.append((request(30, "other"), 9))
    taken.append((request(30), 10))
    groups = prefill_groups(taken)
    assert [[slot for _, slot in g] for g in groups] == [[0, 1, 2], [3], [4, 5], [9], [10]]
    # arrival order holds across adapters: a later request never goes first
    assert [slot for g in groups for _, slot in g] == [slot for _, slot in taken]
    for group in groups:  # rows x longest prompt within one pass, or a lone long prompt
        width = max(len(r.ids) for r, _ in group)
        assert len(group) == 1 or width * len(group) <= PREFILL_CHUNK


def test_cuda_prefill_widths_are_padded_to_few_graph_shapes():
    """On CUDA both runners pad a short prefill's width to a multiple of PREFILL_WIDTH_STEP (one
    graph per width step, and eager and graph prefills on the same shapes); never past the
    cache, never when the padded prompts exceed a graph's tokens, never on a CPU."""
    from types import SimpleNamespace

    from model.runner import PREFILL_GRAPH_TOKENS, PREFILL_WIDTH_STEP, Runner

    def width(n: int, w: int, device: str = "cuda", max_seq_len: int = 4096) -> int:
        runner = Runner(SimpleNamespace(device=torch.device("cpu"), max_seq_len=max_seq_len, slots=1))
        runner.device = torch.device(device)
        return runner.prefill_width(n, w)

    step, most = PREFILL_WIDTH_STEP, PREFILL_GRAPH_TOKENS
    assert width(1, 60) == width(1, step) == step and width(1, step + 1) == 2 * step
    assert width(most // step, step - 3) == step  # prompts x padded width == the limit
    assert width(most // step + 1, step - 3) == step - 3  # one prompt more: eager, unpadded
    assert width(1, most + 1) == most + 1
    assert width(1, 60, max_seq_len=62) == 60
    assert width(1, 60, device="cpu") == 60


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_decode_steps_are_queued_behind_each_other(engine, monkeypatch, temperature):
    """On a GPU, while the same rows go on, each decode step after the first is fed from the one
    before on the device (model/scheduler.py), none past the last token a length limit allows,
    with the same tokens; greedy steps feed their argmax to the next inside the step (the
    runner's feed_greedy). On a CPU, where it would only delay tokens, every step is fed anew."""
    calls = []
    for name in ("decode", "decode_following", "decode_greedy_following"):
        method = getattr(engine.runner, name)
        monkeypatch.setattr(engine.runner, name, lambda *a, m=method, n=name: calls.append(n) or m(*a))
    settings = GenerationSettings(temperature=temperature, max_new_tokens=8, ignore_eos=True, seed=5)
    ids = prompts.alpaca_prompt_ids(engine.tokenizer, PLANETS)
    assert not engine.scheduler.overlap
    alone = run(engine.generate_ids(ids, settings))[2]
    assert len(alone) == 8 and calls == ["decode"] * 7  # the first token from the prefill
    calls.clear()
    monkeypatch.setattr(engine.scheduler, "overlap", True)
    assert run(engine.generate_ids(ids, settings))[2] == alone
    following = "decode_greedy_following" if temperature == 0 else "decode_following"
    assert calls == ["decode"] + [following] * 6


def test_a_request_cancelled_while_another_prefills_is_not_prefilled(engine, monkeypatch):
    import model.scheduler

    ids = prompts.alpaca_prompt_ids(engine.tokenizer, PLANETS)
    monkeypatch.setattr(model.scheduler, "PREFILL_CHUNK", len(ids))  # one prompt a shared pass
    cancel = CancelToken()
    prefill, prefilled = engine.runner.prefill, []

    def cancelling(prompt, slot=0, stop=None):  # the second request is cancelled during the first's prefill
        prefilled.append(slot)
        cancel.cancel()
        return prefill(prompt, slot, stop)

    monkeypatch.setattr(engine.runner, "prefill", cancelling)
    settings = GenerationSettings(temperature=0, max_new_tokens=3, ignore_eos=True)
    with engine.scheduler.wake:
        first = engine.generate_ids(ids, settings)
        second = engine.generate_ids(ids, settings, cancel=cancel)
    assert len(run(first)[2]) == 3
    events = list(second)
    assert events[-1].stats.stop_reason == "cancelled" and not events[-1].token_ids
    assert len(prefilled) == 1


def test_a_long_prompt_cancelled_while_it_is_read_stops_between_passes(engine, monkeypatch):
    # Stop or a closed tab during a long prompt's prefill: the next pass does not run (on a CPU a
    # 2,048-token pass took tens of seconds), and the request ends cancelled, with no token
    monkeypatch.setattr("model.runner.PREFILL_CHUNK_CPU", 16)
    ids = prompts.alpaca_prompt_ids(engine.tokenizer, PLANETS)
    assert len(ids) > 32  # three passes or more
    answers = [False, True]  # go on before the first pass, stop before the second
    with torch.inference_mode():
        assert engine.runner.prefill(ids, 0, lambda: answers.pop(0)) is None
    assert answers == []  # asked twice: the third pass was not even asked about

    cancel = CancelToken()
    prefill = engine.runner.prefill

    def user_stops_during_the_first_pass(ids, slot=0, stop=None):
        return prefill(ids, slot, lambda: cancel.cancel() or stop())

    monkeypatch.setattr(engine.runner, "prefill", user_stops_during_the_first_pass)
    events = list(engine.generate_ids(ids, GREEDY, cancel=cancel))
    assert events[-1].stats.stop_reason == "cancelled" and events[-1].stats.new_tokens == 0
    monkeypatch.undo()
    still_works(engine)


def test_a_failed_shared_prefill_falls_back_to_one_by_one(engine, monkeypatch):
    """If the shared pass fails, each request is prefilled alone and still served."""
    shared = engine.runner.prefill_many

    def broken(prompts, stop=None):  # only passes of several prompts fail (a lone prefill is one prompt)
        if len(prompts) > 1:
            raise RuntimeError("out of memory, say")
        return shared(prompts, stop)

    monkeypatch.setattr(engine.runner, "prefill_many", broken)
    settings = GenerationSettings(temperature=0, max_new_tokens=3, ignore_eos=True)
    ids = [prompts.alpaca_prompt_ids(engine.tokenizer, q) for q in (PLANETS, "Hi")]
    with engine.scheduler.wake:
        streams = [engine.generate_ids(i, settings) for i in ids]
    assert [len(run(stream)[2]) for stream in streams] == [3, 3]


def test_repetition_penalty_matches_hf_generate(engine):
    ids = prompts.alpaca_prompt_ids(engine.tokenizer, "List ten fruits, separated by commas.")
    settings = GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.3, ignore_eos=True)
    ours = run(engine.generate_ids(ids, settings))[2]
    theirs = hf_greedy_with(default_hf(), ids, 24, repetition_penalty=1.3)
    assert ours[: len(theirs)] == theirs
    plain = run(
        engine.generate_ids(ids, GenerationSettings(temperature=0, max_new_tokens=24, ignore_eos=True))
    )
    assert plain[2] != ours  # the penalty changed the answer, so the comparison means something


def test_penalised_and_plain_rows_together_equal_alone(engine, monkeypatch):
    """Only steps with a penalised row write the seen record (model/scheduler.py): a penalised
    row decoded next to a plain one, with steps queued ahead as on a GPU, gives the tokens it
    gives alone, and so does the plain one; the penalised row alone runs in a slot plain rows
    have just used. 24 tokens: at 12 the penalised row repeats only prompt tokens, and skipping
    the record in mixed steps went unnoticed."""
    monkeypatch.setattr(engine.scheduler, "overlap", True)
    ids = [
        prompts.alpaca_prompt_ids(engine.tokenizer, q)
        for q in (PLANETS, "List ten fruits, separated by commas.")
    ]
    plain = GenerationSettings(temperature=0, max_new_tokens=24, ignore_eos=True)
    penalised = GenerationSettings(temperature=0, max_new_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    alone = [run(engine.generate_ids(ids[0], plain))[2], run(engine.generate_ids(ids[1], penalised))[2]]
    assert alone[1] != run(engine.generate_ids(ids[1], plain))[2]  # the penalty matters here
    with engine.scheduler.wake:
        streams = [engine.generate_ids(ids[0], plain), engine.generate_ids(ids[1], penalised)]
    assert [run(stream)[2] for stream in streams] == alone


def test_a_failed_prefill_fails_its_request_alone(engine, monkeypatch):
    """An exception inside the worker ends that request with one sentence; the worker lives on."""
    prefill = engine.runner.prefill

    def broken(ids, slot=0, stop=None):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    with pytest.raises(EngineError, match=r"Generation failed \(RuntimeError\)"):
        run(engine.chat([{"role": "user", "content": "Hello"}], GREEDY))
    monkeypatch.setattr(engine.runner, "prefill", prefill)
    settings = GenerationSettings(temperature=0, max_new_tokens=4)
    _, events, ids = run(engine.chat([{"role": "user", "content": "Hello"}], settings))
    assert events[-1].done and len(ids) == 4
