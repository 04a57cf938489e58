"""Chat with a Llama-family model in the browser, with live tokens/s under every reply.

A thin Gradio layer over model.engine: text and settings go in, streamed text and stats come
out; nothing here touches tensors. Design decisions:

- The Chat tab's conversation lives in a gr.State of plain turns; the Chatbot is a view of it,
  so the tokens/s line drawn under each reply never reaches the model.
- Streaming is throttled to UPDATES_PER_SECOND: a model decoding hundreds of tokens a second
  would otherwise send the browser one message per token.
- Stop goes through the engine's CancelToken. Send first arms a token in an unqueued step and
  carries its id (a gr.State) to the queued handler, so Stop also reaches a request still
  waiting in the queue: it finds its own token cancelled and never starts. A client that
  cancels its job closes the handler's generator, whose `finally` cancels the token as well.
- Every generation runs in one concurrency group as wide as the engine's batch (its max_batch
  KV-cache slots; 1 for an engine that serialises): more would only park threads inside the
  engine, while Gradio's bounded queue shows each waiting user a true place.
- API: `chat` and `instruct` stream (reply, stats); `stop` cancels the caller's generations;
  `model_info` describes what is loaded. The UI's own events are private.
- Whatever a user sends is cleaned before the engine sees it (clean_text: text only, no control
  characters, lone surrogates replaced), and every message is drawn as text: the Chatbot renders
  Markdown, so `<` and entities outside code are escaped (shown_as_text) and a <script> in a
  message shows as those characters. Toasts render HTML too and get escaped messages.
- No code from a model or adapter repo ever runs (see model/loader.py), so there is no
  --trust-remote-code flag. --auth guards the page and the API alike; --share without it warns.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from model.engine import (
    CancelToken,
    Engine,
    EngineError,
    GenerationEvent,
    GenerationSettings,
    GenerationStats,
)

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_PORT = 7860
UPDATES_PER_SECOND = 15
GENERATION_GROUP = "generation"
NO_ADAPTER = "none"
DEFAULTS = GenerationSettings()
THEME = gr.themes.Soft(
    primary_hue="indigo",
    # System fonts: the page needs no font download, which also keeps it working offline.
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)

SHARE_WITHOUT_AUTH = (
    "Warning: --share publishes this app at a public gradio.live address that anyone can use; "
    "add --auth USER:PASS to require a password."
)

log = logging.getLogger("app")


# --------------------------------------------------------------------------- command line


def _env(name: str, default: str | None = None) -> str | None:
    """An environment variable, with unset and empty treated alike."""
    return os.environ.get(name) or default


def _env_flag(name: str) -> bool:
    return (_env(name, "") or "").strip().lower() in {"1", "true", "yes", "on"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags, each with an environment variable for Docker and Spaces (the flag wins)."""
    parser = argparse.ArgumentParser(
        description="Chat with a Llama-family model (NF4 + LoRA) in the browser, with live tokens/s.",
        epilog="Code shipped in a model or adapter repository is never run (trust_remote_code is "
        "always off: the model is this project's own Llama), so there is no flag to allow it.",
    )
    parser.add_argument(
        "--model",
        default=_env("MODEL_ID", "default"),
        metavar="SOURCE",
        help="'default' (the embedded SmolLM2-135M-Instruct), a hub id or a local folder "
        "[env MODEL_ID; default: %(default)s]",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="PATH_OR_ID",
        help="LoRA adapter to load at start, local folder or hub id; repeat for several, the "
        "first is selected [env ADAPTER_ID, comma separated]",
    )
    parser.add_argument(
        "--quantize",
        default=_env("QUANTIZE", "auto"),
        choices=["auto", "nf4", "none"],
        help="weights of the seven projections of each layer: nf4 (quantized at load), none "
        "(kept 16/32-bit) or auto (NF4 for models of 1B parameters or more); a pre-quantized "
        "4-bit checkpoint is served as stored [env QUANTIZE; default: %(default)s]",
    )
    parser.add_argument(
        "--device",
        default=_env("DEVICE", "auto"),
        choices=["auto", "cpu", "cuda"],
        help="where the model runs [env DEVICE; default: %(default)s]",
    )
    parser.add_argument(
        "--dtype",
        default=_env("DTYPE", "auto"),
        choices=["auto", "float32", "bfloat16", "float16"],
        help="activations and unquantized weights: auto is bfloat16 on a GPU and on CPUs with "
        "native bf16 (AVX512-BF16, AMX; ~1.5x the fp32 decode speed there), float32 on other CPUs "
        "[env DTYPE; default: %(default)s]",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=_env("MAX_SEQ_LEN"),
        metavar="N",
        help="context length (prompt + reply) of the KV cache; default: the engine's choice "
        "for the model [env MAX_SEQ_LEN]",
    )
    parser.add_argument(
        "--no-triton",
        action="store_true",
        default=_env_flag("NO_TRITON"),
        help="use the PyTorch reference ops instead of the Triton kernels on CUDA [env NO_TRITON=1]",
    )
    parser.add_argument(
        "--host",
        default=_env("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on; 0.0.0.0 for every interface "
        "[env GRADIO_SERVER_NAME; default: %(default)s]",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env("GRADIO_SERVER_PORT", _env("PORT", str(DEFAULT_PORT))),
        help="port to listen on [env GRADIO_SERVER_PORT or PORT; default: %(default)s]",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        default=_env_flag("GRADIO_SHARE"),
        help="also serve through a public gradio.live link; use it with --auth [env GRADIO_SHARE=1]",
    )
    parser.add_argument(
        "--auth",
        default=_env("GRADIO_AUTH"),
        metavar="USER:PASS",
        help="require this user name and password for the page and the API [env GRADIO_AUTH]",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=_env("QUEUE_SIZE", "32"),
        metavar="N",
        help="requests allowed to wait; more get a 'queue is full' message "
        "[env QUEUE_SIZE; default: %(default)s]",
    )
    args = parser.parse_args(argv)
    # argparse checks `choices` on the command line only, not on defaults from the environment.
    checks = (
        ("quantize", ("auto", "nf4", "none")),
        ("device", ("auto", "cpu", "cuda")),
        ("dtype", ("auto", "float32", "bfloat16", "float16")),
    )
    for flag, choices in checks:
        if getattr(args, flag) not in choices:
            parser.error(f"--{flag} must be one of {', '.join(choices)}")
    if args.adapter is None:
        args.adapter = [a.strip() for a in (_env("ADAPTER_ID", "") or "").split(",") if a.strip()]
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error("--max-seq-len must be a positive number of tokens")
    if args.queue_size < 1:
        parser.error("--queue-size must be at least 1")
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            parser.error("--auth takes USER:PASS")
        args.auth = (user, password)
    return args


# --------------------------------------------------------------------------- cancellation


class CancelRegistry:
    """The CancelTokens of each browser session's generations, per channel ("chat",
    "instruct", "api"), so Stop, a closed tab and the API's `stop` can reach them.
    Thread-safe: Gradio runs handlers in worker threads."""

    MAX_ARMED = 16  # tokens kept armed a session and channel (a Send Gradio drops never claims)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[tuple[str, str], dict[str, CancelToken]] = {}  # by id, oldest first
        self._running: dict[tuple[str, str], set[CancelToken]] = {}

    def arm(self, session: str, channel: str) -> str:
        """Make the token of a request that is about to enter the queue; the request carries the
        returned id to its claim, so Stop in between reaches exactly it."""
        armed_id = uuid.uuid4().hex
        with self._lock:
            armed = self._armed.setdefault((session, channel), {})
            armed[armed_id] = CancelToken()
            while len(armed) > self.MAX_ARMED:
                del armed[next(iter(armed))]
        return armed_id

    @contextmanager
    def claim(self, session: str, channel: str, armed_id: str | None = None) -> Iterator[CancelToken]:
        """The token armed under `armed_id` (cancelled if Stop came while the request waited), or
        a new one, while it runs; cancelled on exit, which ends the engine's generation if the
        handler was closed early."""
        key = (session, channel)
        with self._lock:
            armed = self._armed.get(key, {})
            token = armed.pop(armed_id, None) if armed_id else None
            if key in self._armed and not armed:
                del self._armed[key]
            token = token or CancelToken()
            self._running.setdefault(key, set()).add(token)
        try:
            yield token
        finally:
            token.cancel()
            with self._lock:
                running = self._running.get(key, set())
                running.discard(token)
                if not running:
                    self._running.pop(key, None)

    def cancel(self, session: str, channel: str | None = None) -> int:
        """Cancel the session's armed and running generations (of one channel, or all); returns
        how many were not cancelled yet. Armed tokens stay, cancelled, for their requests to
        claim when they leave the queue (dropped, a queued request ran later with a new one)."""
        with self._lock:
            keys = [k for k in {*self._armed, *self._running} if k[0] == session and channel in (None, k[1])]
            tokens = [t for k in keys for t in (*self._armed.get(k, {}).values(), *self._running.get(k, ()))]
            live = [t for t in tokens if not t.cancelled]
        for token in live:
            token.cancel()
        return len(live)

    def forget(self, session: str) -> None:
        """A closed tab: cancel its generations and drop its armed tokens."""
        self.cancel(session)
        with self._lock:
            for key in [k for k in self._armed if k[0] == session]:
                del self._armed[key]


# --------------------------------------------------------------------------- helpers


# C0 and C1 control characters except tab, newline and carriage return: they mean nothing to a
# model, and some terminals and logs act on them.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Fenced code (to its closing fence, or the end of a reply still streaming) and inline code.
MARKDOWN_CODE = re.compile(r"(?P<fence>`{3,}|~{3,})[\s\S]*?(?:(?P=fence)|\Z)|`[^`\n]+`")
HTML_START = re.compile(r"<|&(?=#?\w+;)")


def clean_text(value: Any, what: str) -> str:
    """User text as the engine may take it: None is "", anything but a string is refused in one
    sentence, lone surrogates (which no encoder accepts, so the tokenizer would fail) become
    U+FFFD and control characters other than tab and newlines are dropped."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EngineError(f"The {what} must be text.")
    text = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return CONTROL_CHARACTERS.sub("", text)


def shown_as_text(text: str) -> str:
    """Markdown whose HTML shows as the characters typed: `<` and entity-like `&` outside code are
    escaped (inside code Markdown shows them literally already, and escaping would show `&lt;`).
    The Chatbot's own sanitizer would drop a <script> silently; this shows it, inert. The cost:
    a message's copy button copies this text, so a `<` outside code is copied as `&lt;` (code
    blocks have their own copy button, which copies them as they are)."""
    out, last = [], 0
    for code in MARKDOWN_CODE.finditer(text):
        out += [HTML_START.sub(lambda m: html.escape(m.group()), text[last : code.start()]), code.group()]
        last = code.end()
    out.append(HTML_START.sub(lambda m: html.escape(m.group()), text[last:]))
    return "".join(out)


def _whole(value: Any) -> Any:
    """Sliders and JSON may send a whole number as a float (64.0); the engine wants an int.
    Anything else passes through for the engine's own check to name it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def make_settings(
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    top_k: float,
    repetition_penalty: float,
    seed: float | None,
) -> GenerationSettings:
    """Settings from UI or API values; EngineError with one sentence if one is out of range.
    An empty or negative seed means a random one."""
    seed = _whole(seed)
    if seed == "" or (isinstance(seed, int) and seed < 0):
        seed = None
    return GenerationSettings(
        max_new_tokens=_whole(max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=_whole(top_k),
        repetition_penalty=repetition_penalty,
        seed=seed,
    ).validated()


def content_text(content: Any, depth: int = 0) -> str:
    """The text of a chat message's content: a string, or Gradio 6's list of blocks
    ({"type": "text", "text": ...}; files and other media are skipped, the model reads text).
    Lists nest a few deep at most (900 deep raised RecursionError, which reached the client as
    an error without a message)."""
    if depth > 4:
        raise EngineError("A message's content must be text or a list of text blocks.")
    if content is None:
        return ""
    if isinstance(content, str):
        return clean_text(content, "content of a message")
    if isinstance(content, dict):
        if content.get("type", "text") != "text":
            return ""
        return clean_text(content.get("text"), "text of a message block")
    if isinstance(content, list | tuple):
        return "\n".join(t for t in (content_text(c, depth + 1) for c in content) if t)
    raise EngineError("A message's content must be text or a list of text blocks.")


def history_messages(history: Any) -> tuple[list[dict], str | None]:
    """API history (OpenAI / Gradio messages) -> the engine's messages and a system prompt."""
    if not history:
        return [], None
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise EngineError('History must be a list of {"role": ..., "content": ...} messages.')
    messages, system = [], None
    for m in history:
        role, text = m.get("role"), content_text(m.get("content"))
        if role == "system":
            system = text
        elif role in ("user", "assistant"):
            messages.append({"role": role, "content": text})
        else:
            raise EngineError(f"A history message has role {role!r}; use user or assistant.")
    return messages, system


def format_stats(stats: GenerationStats) -> str:
    """The line under a reply: the engine's summary, and a note when the reply was cut short (by
    max new tokens, or by the context when that came first)."""
    summary = stats.summary()
    if stats.stop_reason != "length":
        return summary
    if stats.context_full_at:
        return f"{summary} · the {stats.context_full_at:,}-token context is full"
    return f"{summary} · max new tokens reached"


def stats_dict(stats: GenerationStats) -> dict:
    return {**stats.as_dict(), "summary": format_stats(stats)}


def throttled(events: Iterator[GenerationEvent], interval_s: float) -> Iterator[tuple[str, GenerationStats]]:
    """(text so far, latest stats) at most once per interval_s, and always for the last event."""
    text, last = "", float("-inf")
    for event in events:
        text += event.text
        now = time.monotonic()
        if event.done or now - last >= interval_s:
            last = now
            yield text, event.stats


def stats_html(stats: GenerationStats | None) -> str:
    """The stats line as the page shows it (None: the prompt is being read); `live` marks a
    reply still streaming."""
    if stats is None:
        return '<span class="tok-stats live">reading the prompt</span>'
    live = " live" if stats.stop_reason is None else ""
    return f'<span class="tok-stats{live}">{html.escape(format_stats(stats))}</span>'


def chatbot_view(conversation: list[dict]) -> list[dict]:
    """The Chatbot's messages for a conversation: each reply followed by its stats line, as a
    message of its own that the Chatbot groups with the reply."""
    messages = []
    for turn in conversation:
        if turn["content"] or turn["role"] == "user":
            messages.append({"role": turn["role"], "content": shown_as_text(turn["content"])})
        if turn.get("stats"):
            messages.append({"role": "assistant", "content": turn["stats"]})
    return messages


def model_markdown(info: dict) -> str:
    rows = [
        ("Model", info.get("model")),
        ("Quantization", info.get("quantization")),
        ("Weights dtype", info.get("dtype")),
        ("Kernels", info.get("kernels")),
        ("Decode", "CUDA graph" if info.get("cuda_graphs") else "eager"),
        ("Device", info.get("device")),
        ("Memory", info.get("memory")),
        ("Context", f"{info['max_seq_len']} tokens" if info.get("max_seq_len") else None),
        ("Adapters loaded", ", ".join(info.get("adapters") or []) or "none"),
    ]
    return "\n".join(f"- **{k}:** {html.escape(str(v or 'unknown'))}" for k, v in rows)


def ui_updates(stream: Iterator[tuple], outputs: int) -> Iterator[tuple]:
    """A UI handler's updates from `stream`. A user error (EngineError, whenever it comes)
    becomes a warning; a handler that would yield nothing (refused, or stopped while queued)
    yields "no change" instead, because Gradio would otherwise blank its outputs, and the
    conversation must survive a refused message."""
    updated = False
    try:
        with closing(stream):
            for update in stream:
                updated = True
                yield update
    except EngineError as e:
        gr.Warning(html.escape(str(e)))  # a toast renders HTML; the message may quote user text
    if not updated:
        yield (gr.skip(),) * outputs


def _adapter_name(choice: Any) -> str | None:
    choice = clean_text(choice, "adapter name").strip()
    return None if choice in ("", NO_ADAPTER) else choice


def adapter_source(source: str) -> str:
    """An adapter's source as loaded, and so its name: a folder named like the no-adapter choice
    is loaded as "./none", the same folder (a hub id has a slash), or choosing it chose none."""
    return f"./{source}" if source.rstrip("/") == NO_ADAPTER else source


def active_generations(engine: Any) -> int | None:
    """Generations the engine is decoding or has waiting (None for an engine that does not say).
    It reads the scheduler's row and waiting counts: len() of a dict or deque is atomic."""
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is None:
        return None
    return len(scheduler.rows) + len(scheduler.waiting)


def _last_user_turn(conversation: list[dict]) -> int | None:
    return max((i for i, t in enumerate(conversation) if t["role"] == "user"), default=None)


def _session(request: gr.Request | None) -> str:
    # Only a direct Python call has no request; it gets one shared key.
    return getattr(request, "session_hash", None) or "local"


# --------------------------------------------------------------------------- handlers


class ChatService:
    """The handlers of the UI and the API, over one engine."""

    def __init__(self, engine: Engine, updates_per_second: float = UPDATES_PER_SECOND) -> None:
        self.engine = engine
        self.tokens = CancelRegistry()
        self.interval_s = 1.0 / updates_per_second
        # Engine.load(max_batch=...) sets how many generations the engine decodes together.
        slots = int(getattr(engine, "max_batch", 1))
        self.queue_options = dict(concurrency_id=GENERATION_GROUP, concurrency_limit=slots)

    # -- shared core ----------------------------------------------------------------------------

    def _generate(
        self,
        request: gr.Request | None,
        channel: str,
        start: Callable[..., Iterator[GenerationEvent]],
        armed: str | None = None,
    ) -> Iterator[tuple[str, GenerationStats | None]]:
        """Claim the request's CancelToken, call `start(cancel=token)` (an engine method, which
        raises EngineError before the first item) and stream (text so far, stats), throttled.
        The first item, ("", None), says the engine took the request: the page can show it
        before the prompt is processed. However this generator ends, the generation ends too."""
        with self.tokens.claim(_session(request), channel, armed) as token:
            if token.cancelled:  # Stop was pressed while the request waited in the queue
                return
            events = start(cancel=token)
            stream = throttled(events, self.interval_s)
            stats = None
            try:
                yield "", None
                for text, stats in stream:
                    yield text, stats
            finally:
                stream.close()
                events.close()  # ends the engine's request now, not whenever it is collected
                reason = stats.stop_reason if stats is not None else None
                log.info(
                    "%s: %s, stop=%s",
                    channel,
                    stats.summary() if stats is not None else "no token",
                    reason or "closed by the client",
                )

    def _chat(self, message, history, system_prompt, adapter, settings):
        """The engine call for a chat reply; raises EngineError at once for input that is not text."""
        messages = [*history, {"role": "user", "content": clean_text(message, "message")}]
        return partial(
            self.engine.chat,
            messages,
            settings,
            system_prompt=clean_text(system_prompt, "system prompt").strip() or None,
            adapter=_adapter_name(adapter),
        )

    def _instruct(self, instruction, input_text, adapter, settings):
        return partial(
            self.engine.instruct,
            clean_text(instruction, "instruction"),
            clean_text(input_text, "input"),
            settings,
            adapter=_adapter_name(adapter),
        )

    # -- API ------------------------------------------------------------------------------------

    def api_chat(
        self,
        message: str,
        history: list[dict] | None = None,
        system_prompt: str = "",
        adapter: str = "",
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        top_k: int = DEFAULTS.top_k,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        seed: int | None = None,
        request: gr.Request = None,
    ) -> Iterator[tuple[str, dict]]:
        """Stream a chat reply to `message` after `history` (a list of {"role", "content"}
        messages, content as text or Gradio's text blocks). Yields [reply so far, stats]; stats
        has prompt_tokens, new_tokens, time_to_first_token_s, decode_tokens_per_s, total_s,
        stop_reason (None until the last item), prompt_trimmed_turns, context_full_at and a one-line
        summary.
        seed: empty or -1 for a random one; adapter: empty for none."""
        try:
            past, history_system = history_messages(history)
            settings = make_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
            start = self._chat(message, past, system_prompt or history_system, adapter, settings)
            with closing(self._generate(request, "api", start)) as stream:
                for text, stats in stream:
                    if stats is not None:
                        yield text, stats_dict(stats)
        except EngineError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def api_instruct(
        self,
        instruction: str,
        input: str = "",
        adapter: str = "",
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        top_k: int = DEFAULTS.top_k,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        seed: int | None = None,
        request: gr.Request = None,
    ) -> Iterator[tuple[str, dict]]:
        """Stream the response to an instruction (with optional input) in the Alpaca template.
        Yields [response so far, stats] as `chat` does."""
        try:
            settings = make_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
            start = self._instruct(instruction, input, adapter, settings)
            with closing(self._generate(request, "api", start)) as stream:
                for text, stats in stream:
                    if stats is not None:
                        yield text, stats_dict(stats)
        except EngineError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def api_stop(self, request: gr.Request = None) -> int:
        """Stop the generations of this client's session that are running; returns how many.
        (An API job still waiting in the queue is cancelled by the client's own job.cancel().)"""
        return self.tokens.cancel(_session(request))

    def api_model_info(self) -> dict:
        """The loaded model: source, quantization, dtype, device, kernels, adapters,
        max_seq_len, max_batch and memory in use, and active_generations: how many
        generations the engine is running or has waiting right now."""
        return {**self.engine.info(), "active_generations": active_generations(self.engine)}

    # -- UI: chat -------------------------------------------------------------------------------

    def arm_chat(self, request: gr.Request) -> str:
        """The armed token's id, which the request then carries (a gr.State) to its claim."""
        return self.tokens.arm(_session(request), "chat")

    def stop_chat(self, request: gr.Request) -> None:
        self.tokens.cancel(_session(request), "chat")

    def stop_session(self, request: gr.Request) -> None:
        """A closed or reloaded tab: nobody is left to read its generations."""
        self.tokens.forget(_session(request))

    def _chat_turn(
        self, message, conversation, system_prompt, adapter, settings_values, request, textbox, armed=None
    ):
        """Stream (chatbot, conversation[, textbox]) for a reply to `message` after `conversation`;
        the textbox (when it is an output) empties once, when the engine takes the message, and is
        left alone after that: what the user types while the reply streams stays (it was wiped
        at every update)."""
        settings = make_settings(*settings_values)
        message = clean_text(message, "message")  # the conversation keeps what the model reads
        history = [{"role": t["role"], "content": t["content"]} for t in conversation]
        start = self._chat(message, history, system_prompt, adapter, settings)
        reply = {"role": "assistant", "content": "", "stats": ""}
        turns = [*conversation, {"role": "user", "content": message}, reply]
        with closing(self._generate(request, "chat", start, armed)) as stream:
            for n, (text, stats) in enumerate(stream):
                reply["content"], reply["stats"] = text, stats_html(stats)
                if not textbox:
                    yield chatbot_view(turns), turns
                else:
                    yield chatbot_view(turns), turns, "" if n == 0 else gr.skip()

    def respond(
        self,
        message: str,
        conversation: list[dict],
        system_prompt: str,
        adapter: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: float | None,
        armed: str | None = None,
        request: gr.Request = None,
    ):
        """Send: yields (chatbot, conversation, textbox). armed: the id arm_chat gave this request."""
        settings_values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        args = (message, conversation, system_prompt, adapter, settings_values, request)
        yield from ui_updates(self._chat_turn(*args, textbox=True, armed=armed), outputs=3)

    def regenerate(
        self,
        conversation: list[dict],
        system_prompt: str,
        adapter: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: float | None,
        armed: str | None = None,
        request: gr.Request = None,
    ):
        """A new reply to the last user message, in place of the old one: (chatbot, conversation)."""
        last = _last_user_turn(conversation)
        if last is None:
            gr.Warning("There is no message to answer again yet.")
            yield gr.skip(), gr.skip()
            return
        settings_values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        args = (conversation[last]["content"], conversation[:last], system_prompt, adapter, settings_values)
        yield from ui_updates(self._chat_turn(*args, request, textbox=False, armed=armed), outputs=2)

    def undo(self, conversation: list[dict], request: gr.Request):
        """Drop the last exchange and put its message back in the textbox."""
        self.tokens.cancel(_session(request), "chat")
        last = _last_user_turn(conversation)
        if last is None:
            return [], [], gr.skip()
        kept = conversation[:last]
        return chatbot_view(kept), kept, conversation[last]["content"]

    def clear(self, request: gr.Request):
        self.tokens.cancel(_session(request), "chat")
        return [], [], ""

    # -- UI: instruct ---------------------------------------------------------------------------

    def arm_instruct(self, request: gr.Request) -> str:
        return self.tokens.arm(_session(request), "instruct")

    def stop_instruct(self, request: gr.Request) -> None:
        self.tokens.cancel(_session(request), "instruct")

    def _instruct_turn(self, instruction, input_text, adapter, settings_values, request, armed=None):
        settings = make_settings(*settings_values)
        start = self._instruct(instruction, input_text, adapter, settings)
        with closing(self._generate(request, "instruct", start, armed)) as stream:
            for text, stats in stream:
                yield text, stats_html(stats)

    def respond_instruct(
        self,
        instruction: str,
        input_text: str,
        adapter: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: float | None,
        armed: str | None = None,
        request: gr.Request = None,
    ):
        """Generate: yields (response, stats line). armed: the id arm_instruct gave this request."""
        settings_values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        args = (instruction, input_text, adapter, settings_values, request, armed)
        yield from ui_updates(self._instruct_turn(*args), outputs=2)

    # -- UI: model panel ------------------------------------------------------------------------

    def adapter_choices(self) -> list[str]:
        return [NO_ADAPTER, *self.engine.adapters()]

    def model_panel(self) -> str:
        return model_markdown(self.engine.info())

    def refresh_panel(self):
        """(adapter choices, panel): adapters loaded from another page since this one was built
        become choices here too; the selection stays."""
        return gr.Dropdown(choices=self.adapter_choices()), self.model_panel()

    def load_adapter(self, source: str):
        """Load an adapter by path or hub id and select it: (dropdown, panel, textbox)."""
        try:
            source = clean_text(source, "adapter source").strip()
            if not source:
                raise EngineError("Type the adapter's local path or hub id first.")
            name = self.engine.load_adapter(adapter_source(source))
        except EngineError as e:
            gr.Warning(html.escape(str(e)))  # the message quotes the path, which may hold HTML
            return gr.skip(), gr.skip(), gr.skip()
        gr.Info(f"Adapter {html.escape(name)} is loaded and selected.")
        return gr.Dropdown(choices=self.adapter_choices(), value=name), self.model_panel(), ""


# --------------------------------------------------------------------------- layout


def load_examples() -> dict:
    return json.loads((ASSETS / "examples.json").read_text(encoding="utf-8"))


# UI-only steps skip the queue. The UI's events stay out of the API: clients use `chat`,
# `instruct`, `stop` and `model_info`.
INSTANT = dict(queue=False, api_visibility="private")


def generation_settings(context: int) -> list[gr.components.Component]:
    """The settings both tabs read, made unrendered so the tabs can wire them before the side
    column draws them. Order: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed."""
    return [
        gr.Slider(
            1,
            context,
            value=min(DEFAULTS.max_new_tokens, context),
            step=1,
            label="Max new tokens",
            elem_id="max-new-tokens",
            render=False,
        ),
        gr.Slider(
            0.0,
            2.0,
            value=DEFAULTS.temperature,
            step=0.05,
            label="Temperature",
            info="0 = greedy",
            elem_id="temperature",
            render=False,
        ),
        gr.Slider(0.01, 1.0, value=DEFAULTS.top_p, step=0.01, label="Top-p", render=False),
        gr.Slider(0, 200, value=DEFAULTS.top_k, step=1, label="Top-k", info="0 = off", render=False),
        gr.Slider(
            1.0, 2.0, value=DEFAULTS.repetition_penalty, step=0.01, label="Repetition penalty", render=False
        ),
        gr.Number(value=-1, precision=0, label="Seed", info="-1 = random", elem_id="seed", render=False),
    ]


def chat_tab(service: ChatService, settings: list, adapter: gr.Dropdown, examples: list[str]) -> None:
    conversation = gr.State([])
    armed = gr.State(None)  # the id of the token arm_chat made for the request it precedes
    chatbot = gr.Chatbot(
        label="Conversation",
        height=600,
        buttons=["copy"],
        feedback_options=None,
        placeholder="Ask anything. Replies stream here, with their speed under each one.",
        elem_id="chatbot",
    )
    with gr.Row():
        message = gr.Textbox(
            show_label=False,
            placeholder="Type a message and press Enter",
            lines=1,
            max_lines=8,
            scale=5,
            elem_id="message",
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=80)
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
    with gr.Row():
        regenerate = gr.Button("Regenerate", size="sm", elem_id="regenerate")
        undo = gr.Button("Undo", size="sm", elem_id="undo")
        clear = gr.Button("Clear", size="sm", elem_id="clear")
    with gr.Accordion("System prompt", open=False):
        system_prompt = gr.Textbox(
            show_label=False, placeholder="Optional, for example: You are a concise assistant.", lines=2
        )
    gr.Examples(examples, inputs=[message], label="Examples")

    outputs = [chatbot, conversation, message]
    events = [
        trigger(service.arm_chat, None, armed, **INSTANT).then(
            service.respond,
            [message, conversation, system_prompt, adapter, *settings, armed],
            outputs,
            **service.queue_options,
            api_visibility="private",
        )
        for trigger in (send.click, message.submit)
    ]
    events.append(
        regenerate.click(service.arm_chat, None, armed, **INSTANT).then(
            service.regenerate,
            [conversation, system_prompt, adapter, *settings, armed],
            [chatbot, conversation],
            **service.queue_options,
            api_visibility="private",
        )
    )
    stop.click(service.stop_chat, None, None, **INSTANT)
    # Undo and Clear rewrite the conversation: a reply still streaming must not write it back,
    # so they cancel the event as well as the engine's generation.
    undo.click(service.undo, [conversation], outputs, cancels=events, **INSTANT)
    for trigger in (clear.click, chatbot.clear):
        trigger(service.clear, None, outputs, cancels=events, **INSTANT)


def instruct_tab(service: ChatService, settings: list, adapter: gr.Dropdown, examples: list) -> None:
    instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction")
    input_text = gr.Textbox(label="Input", lines=2, placeholder="Optional", elem_id="instruct-input")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop")
    response = gr.Textbox(label="Response", lines=8, interactive=False, buttons=["copy"], elem_id="response")
    stats = gr.Markdown(elem_id="instruct-stats")
    gr.Examples(examples, inputs=[instruction, input_text], label="Examples")

    armed = gr.State(None)  # the id of the token arm_instruct made for the request it precedes
    generate.click(service.arm_instruct, None, armed, **INSTANT).then(
        service.respond_instruct,
        [instruction, input_text, adapter, *settings, armed],
        [response, stats],
        **service.queue_options,
        api_visibility="private",
    )
    stop.click(service.stop_instruct, None, None, **INSTANT)


def model_panel(service: ChatService, adapter: gr.Dropdown, info: dict) -> gr.Markdown:
    adapter.render()
    source = gr.Textbox(show_label=False, placeholder="Adapter path or hub id", elem_id="adapter-source")
    with gr.Row():
        load = gr.Button("Load adapter", size="sm")
        refresh = gr.Button("Refresh", size="sm")
    panel = gr.Markdown(model_markdown(info), elem_id="model-panel")

    for trigger in (load.click, source.submit):
        trigger(service.load_adapter, [source], [adapter, panel, source], api_visibility="private")
    refresh.click(service.refresh_panel, None, [adapter, panel], **INSTANT)
    return panel


def build_ui(service: ChatService) -> gr.Blocks:
    info = service.engine.info()
    examples = load_examples()
    settings = generation_settings(int(info.get("max_seq_len") or DEFAULTS.max_new_tokens))
    choices = service.adapter_choices()
    adapter = gr.Dropdown(
        choices,
        value=choices[1] if len(choices) > 1 else NO_ADAPTER,  # an adapter named at start is used
        label="Adapter",
        info="LoRA applied to each request; none = the base model",
        elem_id="adapter",
        render=False,
    )
    logo = (ASSETS / "logo.svg").read_text(encoding="utf-8")
    subtitle = " · ".join(html.escape(str(info.get(k))) for k in ("model", "quantization", "device"))

    with gr.Blocks(title="Llama NF4 chat", analytics_enabled=False) as demo:
        gr.HTML(f'<div id="title">{logo}<h1>Llama NF4 chat</h1><span>{subtitle}</span></div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        chat_tab(service, settings, adapter, examples["chat"])
                    with gr.Tab("Instruct", id="instruct"):
                        instruct_tab(service, settings, adapter, examples["instruct"])
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("Generation settings", open=True):
                    for component in settings:
                        component.render()
                with gr.Accordion("Model", open=True):
                    panel = model_panel(service, adapter, info)
        demo.load(service.refresh_panel, None, [adapter, panel], **INSTANT)
        demo.unload(service.stop_session)

        gr.api(service.api_chat, api_name="chat", **service.queue_options)
        gr.api(service.api_instruct, api_name="instruct", **service.queue_options)
        gr.api(service.api_stop, api_name="stop", queue=False, concurrency_limit=None)
        gr.api(service.api_model_info, api_name="model_info", queue=False, concurrency_limit=None)
    return demo


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    if args.share and not args.auth:
        print(SHARE_WITHOUT_AUTH, file=sys.stderr)
    try:
        engine = Engine.load(
            args.model,
            adapters=[adapter_source(a) for a in args.adapter],
            quantize=args.quantize,
            device=args.device,
            dtype=args.dtype,
            max_seq_len=args.max_seq_len,
            use_triton=not args.no_triton,
        )
    except EngineError as e:
        sys.exit(f"Could not start: {e}")
    serve(engine, args)


def serve(engine: Engine, args: argparse.Namespace, **launch_options: Any) -> gr.Blocks:
    """The app over `engine` as the command line configures it: a bounded queue (more waiting
    requests get Gradio's "busy" answer), the listening address, --share and --auth (which guards
    the page and every API route). Tests pass prevent_thread_lock=True to get control back."""
    demo = build_ui(ChatService(engine))
    demo.queue(max_size=args.queue_size)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        theme=THEME,
        css_paths=[ASSETS / "style.css"],
        favicon_path=ASSETS / "logo.svg",
        show_error=False,
        **launch_options,
    )
    return demo


if __name__ == "__main__":
    main()
