"""The app end to end through gradio_client, against `python app.py` on the default model (CPU),
plus its command line. The server is started once for the session (tests/conftest.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import assert_one_sentence

import app
from model.engine import GenerationEvent, GenerationStats

# Greedy decoding makes the replies (and so these checks) repeatable.
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
LONG_PROMPT = "Write a long essay about the history of the Roman Empire, century by century."


@pytest.fixture
def client(app_server) -> Client:
    """A new client, so a new session, for each test."""
    return Client(app_server.url, verbose=False)


def ask(client: Client, message: str, history: list | None = None, **settings) -> tuple[str, dict]:
    reply, stats = client.predict(message, history or [], **{**GREEDY, **settings}, api_name="/chat")
    return reply, stats


def assert_still_serving(client: Client) -> None:
    reply, stats = ask(client, "Say hello.", max_new_tokens=4)
    assert reply and stats["new_tokens"] >= 1


# --------------------------------------------------------------------------- API, on the running app


@pytest.mark.slow
def test_chat_streams_a_reply_with_its_stats(client):
    job = client.submit("Write a haiku about the sea.", [], max_new_tokens=24, **GREEDY, api_name="/chat")
    updates = list(job)
    reply, stats = job.result()

    assert "sea" in reply.lower(), reply
    partials = [text for text, _ in updates]
    assert len(set(partials)) >= 3, "the reply came in one piece, not streamed"
    assert all(reply.startswith(p) for p in partials)
    assert all(s["stop_reason"] is None for _, s in updates[:-1]), "running stats have no stop reason"
    assert stats["stop_reason"] in ("eos", "length")
    assert 1 <= stats["new_tokens"] <= 24 and stats["prompt_tokens"] > 0
    assert stats["decode_tokens_per_s"] > 0 and stats["time_to_first_token_s"] > 0
    assert re.search(r"\d+ tokens? · [\d.]+ tok/s · first token \d+ ms", stats["summary"])


@pytest.mark.slow
def test_instruct_names_the_planets(client):
    response, stats = client.predict(
        "Q:", "Name the planets in the solar system?", max_new_tokens=96, **GREEDY, api_name="/instruct"
    )
    named = [p for p in PLANETS if p in response]
    assert len(named) >= 6, response
    assert stats["new_tokens"] >= 1 and "tok/s" in stats["summary"]


@pytest.mark.slow
def test_second_turn_sees_the_first(client):
    first, _ = ask(client, "What is the capital of France?", max_new_tokens=24)
    # Gradio 6 chatbots hand history content over as a list of blocks: accept that shape too.
    history = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
    ]
    follow_up = "What is the population of that city?"
    with_history, stats = ask(client, follow_up, history, max_new_tokens=32)
    alone, alone_stats = ask(client, follow_up, max_new_tokens=32)

    assert "Paris" in with_history, with_history
    assert "Paris" not in alone, "the control must not know the city without the first turn"
    assert stats["prompt_tokens"] > alone_stats["prompt_tokens"] + 5


@pytest.mark.slow
def test_the_system_prompt_reaches_the_model(client):
    def prompt_tokens(system_prompt: str) -> int:
        _, stats = client.predict(
            "Who are you?", [], system_prompt, max_new_tokens=2, **GREEDY, api_name="/chat"
        )
        return stats["prompt_tokens"]

    # (No system prompt is no baseline: SmolLM2's chat template then puts in its own.)
    assert prompt_tokens("Be brief. " + "Talk like a pirate. " * 10) > prompt_tokens("Be brief.") + 30


@pytest.mark.slow
def test_stop_cancels_the_running_generation(client):
    job = client.submit(LONG_PROMPT, [], max_new_tokens=600, **GREEDY, api_name="/chat")
    deadline = time.monotonic() + 60
    while not (job.outputs() and len(job.outputs()[-1][0]) > 20):
        assert time.monotonic() < deadline and not job.done(), "no streamed text to stop"
        time.sleep(0.05)

    assert client.predict(api_name="/stop") >= 1
    reply, stats = job.result(timeout=30)

    assert stats["stop_reason"] == "cancelled", "the engine did not see the cancel"
    assert 1 <= stats["new_tokens"] < 600 and reply
    assert "stopped" in stats["summary"]


@pytest.mark.slow
def test_a_cancelled_job_closes_its_generation_early(app_server, client):
    closed_before = app_server.log().count("stop=closed by the client")
    job = client.submit(LONG_PROMPT, [], max_new_tokens=600, **GREEDY, api_name="/chat")
    deadline = time.monotonic() + 60
    while not job.outputs():
        assert time.monotonic() < deadline and not job.done(), "no streamed text to cancel"
        time.sleep(0.05)
    job.cancel()

    # The app logs a generation when it has closed the engine's iterator and cancelled its
    # CancelToken, which ends the engine's work on it.
    deadline = time.monotonic() + 20
    while app_server.log().count("stop=closed by the client") == closed_before:
        assert time.monotonic() < deadline, "the generation went on after the client cancelled"
        time.sleep(0.1)
    closed = [line for line in app_server.log().splitlines() if "stop=closed by the client" in line]
    assert int(re.search(r"api: (\d+) tokens?", closed[-1]).group(1)) < 600
    assert_still_serving(client)


@pytest.mark.slow
@pytest.mark.parametrize(
    "message, settings, expected",
    [
        ("", {}, "message"),
        ("   \n ", {}, "message"),
        ("Hello", {"max_new_tokens": 0}, "max new tokens"),
        ("Hello", {"temperature": -0.5}, "temperature"),
        ("Hello", {"top_p": 0.0}, "top-p"),
        ("hello " * (2 * 1024), {}, "context"),
    ],
    ids=["empty", "whitespace", "max_new_tokens_0", "negative_temperature", "top_p_0", "too_long"],
)
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, message, settings, expected):
    with pytest.raises(AppError) as error:
        ask(client, message, **{"max_new_tokens": 8, **settings})
    text = str(error.value)
    assert expected in text.lower(), text
    assert "Traceback" not in text and len(text) < 200
    assert_still_serving(client)


@pytest.mark.slow
def test_bad_history_and_unknown_adapter_are_refused_clearly(client):
    with pytest.raises(AppError, match="History"):
        ask(client, "Hello", ["not a message"], max_new_tokens=4)
    with pytest.raises(AppError, match="adapter"):
        client.predict("Hello", [], adapter="no-such-adapter", max_new_tokens=4, api_name="/chat")
    assert_still_serving(client)


@pytest.mark.slow
def test_model_info_describes_the_loaded_model(client):
    info = client.predict(api_name="/model_info")
    assert info["device"] == "cpu" and info["max_seq_len"] == 1024
    assert info["kernels"] and info["quantization"] and info["memory"]
    assert isinstance(info["adapters"], list)


# --------------------------------------------------------------------------- command line


ENV_FLAGS = ("MODEL_ID", "ADAPTER_ID", "QUANTIZE", "DEVICE", "DTYPE", "MAX_SEQ_LEN", "NO_TRITON")
ENV_FLAGS += ("QUEUE_SIZE",)
GRADIO_ENV = ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT", "GRADIO_SHARE", "GRADIO_AUTH")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_FLAGS + GRADIO_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_serve_the_embedded_model_on_port_7860(clean_env):
    args = app.parse_args([])
    assert (args.model, args.adapter, args.quantize, args.device) == ("default", [], "auto", "auto")
    assert args.dtype == "auto"
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.max_seq_len is None and args.no_triton is False


def test_every_flag_can_come_from_the_environment(clean_env):
    for name, value in {
        "MODEL_ID": "unsloth/llama-3-8b-Instruct-bnb-4bit",
        "ADAPTER_ID": "me/adapter-a, ./adapter-b",
        "QUANTIZE": "nf4",
        "DEVICE": "cuda",
        "DTYPE": "float16",
        "MAX_SEQ_LEN": "4096",
        "NO_TRITON": "1",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "PORT": "8080",
        "GRADIO_SHARE": "true",
        "GRADIO_AUTH": "ada:s3cret:x",
        "QUEUE_SIZE": "4",
    }.items():
        clean_env.setenv(name, value)
    args = app.parse_args([])
    assert args.model == "unsloth/llama-3-8b-Instruct-bnb-4bit"
    assert args.adapter == ["me/adapter-a", "./adapter-b"]
    assert (args.quantize, args.device, args.max_seq_len, args.no_triton) == ("nf4", "cuda", 4096, True)
    assert args.dtype == "float16"
    assert (args.host, args.port, args.share, args.queue_size) == ("0.0.0.0", 8080, True, 4)
    assert args.auth == ("ada", "s3cret:x")

    clean_env.setenv("GRADIO_SERVER_PORT", "9000")  # Gradio's own variable wins over PORT
    assert app.parse_args([]).port == 9000
    # A flag wins over its variable.
    args = app.parse_args(["--model", "./llama", "--adapter", "x", "--port", "7000", "--quantize", "none"])
    assert (args.model, args.adapter, args.port, args.quantize) == ("./llama", ["x"], 7000, "none")


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--quantize", "int8"], {}),
        ([], {"QUANTIZE": "int8"}),
        ([], {"DEVICE": "tpu"}),
        (["--dtype", "int8"], {}),
        ([], {"DTYPE": "fp64"}),
        ([], {"PORT": "http"}),
        (["--max-seq-len", "0"], {}),
        (["--auth", "nopassword"], {}),
    ],
)
def test_bad_flags_stop_with_a_usage_error(clean_env, capsys, argv, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        app.parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_share_without_auth_warns_and_a_bad_model_ends_in_one_sentence(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "app.py", "--share", "--model", str(missing), "--port", "1"],
        cwd=app.ASSETS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert app.SHARE_WITHOUT_AUTH in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Could not start: No model folder") and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- helpers


def test_history_accepts_text_and_gradio_blocks():
    messages, system = app.history_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "file", "file": {}}]},
            {"role": "assistant", "content": "Hello!"},
        ]
    )
    assert system == "Be brief."
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_history_nested_past_reason_gets_a_sentence():
    # 900 lists deep raised RecursionError, which reached the client as an error with no message
    deep: list = ["Hi"]
    for _ in range(900):
        deep = [deep]
    with pytest.raises(app.EngineError) as err:
        app.history_messages([{"role": "user", "content": deep}])
    assert_one_sentence(str(err.value))
    assert app.history_messages([{"role": "user", "content": [[["Hi"]]]}])[0][0]["content"] == "Hi"


def test_the_stats_line_follows_each_reply_and_says_when_it_is_live():
    running = GenerationStats(
        prompt_tokens=3, new_tokens=2, time_to_first_token_s=0.005, decode_tokens_per_s=9.0
    )
    final = GenerationStats(**{**running.as_dict(), "stop_reason": "length"})
    assert app.stats_html(running) == (
        '<span class="tok-stats live">2 tokens · 9.0 tok/s · first token 5 ms</span>'
    )
    assert app.stats_html(final) == (
        '<span class="tok-stats">2 tokens · 9.0 tok/s · first token 5 ms · max new tokens reached</span>'
    )
    full = GenerationStats(**{**final.as_dict(), "context_full_at": 8192})  # the context came first
    assert app.format_stats(full).endswith("first token 5 ms · the 8,192-token context is full")
    view = app.chatbot_view(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "stats": app.stats_html(final)},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert [m["role"] for m in view] == ["user", "assistant", "assistant", "user"]
    assert view[1]["content"] == "Hello" and view[2]["content"] == app.stats_html(final)


def test_settings_from_the_ui_reach_the_engine_as_it_expects():
    settings = app.make_settings(64.0, 0.0, 1.0, 0.0, 1.1, -1)
    assert (settings.max_new_tokens, settings.top_k, settings.seed) == (64, 0, None)
    assert app.make_settings(8, 0.7, 0.9, 40, 1.0, 1234.0).seed == 1234


def test_streaming_updates_are_throttled():
    stats = GenerationStats(prompt_tokens=3)
    events = [GenerationEvent("a", stats, False) for _ in range(1000)] + [GenerationEvent("!", stats, True)]
    updates = list(app.throttled(iter(events), interval_s=60.0))
    # 1001 events arriving at once: the first is shown at once, then only the last.
    assert [text for text, _ in updates] == ["a", "a" * 1000 + "!"]


def test_cancel_registry_reaches_queued_and_running_generations():
    registry = app.CancelRegistry()
    queued = registry.arm("s1", "chat")
    other_queued = registry.arm("s2", "chat")
    with registry.claim("s1", "instruct") as running:
        assert registry.cancel("s1") == 2  # the queued chat and the running instruct
        assert running.cancelled
    assert registry.cancel("s1") == 0  # nothing left that is not cancelled
    with registry.claim("s1", "chat", queued) as token:
        # Stop reached it in the queue: it used to be dropped, and the request ran with a new one
        assert token.cancelled
    with registry.claim("s1", "chat", registry.arm("s1", "chat")) as fresh:
        assert not fresh.cancelled  # a request sent after the Stop runs
    with registry.claim("s2", "chat", other_queued) as other:
        assert not other.cancelled
    assert other.cancelled, "a claim's token is cancelled when its handler ends"


def test_cancel_registry_keeps_few_armed_tokens_and_forgets_a_closed_tab():
    registry = app.CancelRegistry()
    ids = [registry.arm("s1", "chat") for _ in range(app.CancelRegistry.MAX_ARMED + 5)]
    with registry.claim("s1", "chat", ids[0]) as oldest:  # dropped from the armed set: a new token
        assert not oldest.cancelled
    registry.forget("s1")
    with registry.claim("s1", "chat", ids[-1]) as newest:
        assert not newest.cancelled and registry.cancel("s1") == 1
