"""Generation: prompt -> streamed text and stats. Knows the tokenizer, nothing of Gradio.

Layers inside this file, bottom up:
- `Runner` (model/runner.py): prefill and one-token decode over the static KV cache; on CUDA
  the decode step is replayed from a CUDA graph.
- `generate_tokens`: the decode loop on token ids alone (sampling, EOS, length, cancel).
- `TextStream`: incremental detokenization (multi-byte characters, merged tokens) and stop
  strings.
- `Engine`: the public API: load, adapters, chat / instruct returning event iterators.

Context policy: a chat prompt that does not leave room for max_new_tokens loses its oldest
turns (user + assistant pairs) until it does, keeping the system prompt and the newest
message; if the newest message alone does not fit, the request is refused with a clear error.
An Alpaca prompt is never trimmed: it is refused if it does not fit. When the prompt fits but
not with all of max_new_tokens, generation stops at the end of the context (reason "length").

Requests go to model/scheduler.py's worker, which batches concurrent generations (continuous
batching over max_batch KV-cache slots); the caller's thread turns tokens into text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from model import lora, prompts
from model.loader import DEFAULT_SOURCE, LoadedModel, ModelSourceError, load_model, peak_rss_bytes
from model.runner import GraphRunner, Runner
from model.scheduler import BusyError, Request, Scheduler

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 4  # KV-cache slots: concurrent generations
DEFAULT_MAX_WAITING = 64  # requests queued beyond those before "busy"
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "</s>")
LIMITS = {"max_new_tokens": 8192, "top_k": 100_000, "seed": 2**63 - 1}


class EngineError(Exception):
    """A problem the user can fix; str(e) is one sentence fit for the UI."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    top_k: int = 50  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None  # None = random
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def validated(self) -> GenerationSettings:
        """This object if every value is in range, else EngineError naming the first one that is not."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise EngineError(message)

        def number(value, kind=(int, float)) -> bool:
            return isinstance(value, kind) and not isinstance(value, bool) and value == value

        check(
            number(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= LIMITS["max_new_tokens"],
            f"Max new tokens must be a whole number from 1 to {LIMITS['max_new_tokens']}.",
        )
        # Below 0.001 the scores overflow fp32 (a logit of 20 / 1e-40 is inf): the draw would be
        # NaN, and it gave token 0 to the end of the reply.
        check(
            number(self.temperature) and (self.temperature == 0 or 0.001 <= self.temperature <= 5),
            "Temperature must be 0 (greedy) or from 0.001 to 5.",
        )
        check(number(self.top_p) and 0 < self.top_p <= 1, "Top-p must be above 0 and at most 1.")
        check(
            number(self.top_k, int) and 0 <= self.top_k <= LIMITS["top_k"],
            f"Top-k must be a whole number from 0 (off) to {LIMITS['top_k']:,}.",
        )
        check(
            number(self.repetition_penalty) and 0.001 <= self.repetition_penalty <= 10,
            "Repetition penalty must be from 0.001 to 10 (1 is off).",
        )
        check(
            self.seed is None or (number(self.seed, int) and 0 <= self.seed <= LIMITS["seed"]),
            f"Seed must be a whole number from 0 to {LIMITS['seed']} (or empty for a random one).",
        )
        check(
            isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
            "Stop strings must be non-empty text.",
        )
        return self


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None  # tokens after the first / time after the first
    total_s: float = 0.0
    stop_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled"; None while running
    prompt_trimmed_turns: int = 0
    # the context's size when the reply stopped ("length") because the context was full rather
    # than at max new tokens; 0 otherwise
    context_full_at: int = 0

    def summary(self) -> str:
        """One line for the UI, e.g. '64 tokens · 512.3 tok/s · first token 41 ms'."""
        parts = [f"{self.new_tokens} token{'s' if self.new_tokens != 1 else ''}"]
        if self.decode_tokens_per_s is not None:
            parts.append(f"{self.decode_tokens_per_s:.1f} tok/s")
        if self.time_to_first_token_s is not None:
            parts.append(f"first token {self.time_to_first_token_s * 1000:.0f} ms")
        if self.prompt_trimmed_turns:
            parts.append(f"{self.prompt_trimmed_turns} oldest turn(s) left out to fit the context")
        if self.stop_reason == "cancelled":
            parts.append("stopped")
        return " · ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationEvent:
    text: str  # new text since the previous event (may be "")
    stats: GenerationStats  # running stats; final when done
    done: bool
    token_ids: tuple[int, ...] = ()  # the new tokens behind `text`


class CancelToken:
    """Thread-safe flag: a running generation stops within one decode step of cancel()."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def check_text(*texts) -> None:
    """Every prompt text must be a str that UTF-8 can encode (no lone surrogates)."""
    for text in texts:
        if not isinstance(text, str):
            raise EngineError("Messages must be text.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EngineError("Your message contains characters that are not valid Unicode.") from None


class EventStream(Iterator[GenerationEvent]):
    """A generation's events. Closing it, or dropping it unread, cancels the generation, even
    before the first event (a bare generator would not run its cleanup then)."""

    def __init__(self, events: Iterator[GenerationEvent], cancel: CancelToken):
        self._events, self._cancel = events, cancel

    def __next__(self) -> GenerationEvent:
        return next(self._events)

    def close(self) -> None:
        self._cancel.cancel()
        self._events.close()

    def __del__(self) -> None:
        self._cancel.cancel()


class TextStream:
    """Token ids in, text deltas out: whole characters only, stop strings cut and held back."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        # Only ids[prefix:] are decoded per token (cost independent of the reply's length); the
        # text of ids[prefix:read] is subtracted, so tokenizers that treat the first token of a
        # decode differently (leading spaces) give the same delta as a full decode.
        self.prefix = self.read = 0
        self.text = ""  # all decoded text so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, now = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or half a character
            return ""
        self.text += now[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        return self.release(final=self.stopped)

    def release(self, final: bool) -> str:
        """Text safe to show: all of it at the end, else all but a possible stop-string prefix."""
        end = len(self.text)
        if not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


@dataclass
class Engine:
    loaded: LoadedModel
    max_seq_len: int
    use_cuda_graphs: bool = True
    max_batch: int = DEFAULT_MAX_BATCH
    max_waiting: int = DEFAULT_MAX_WAITING
    adapter_weights: dict[str, lora.Adapter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.model.setup_caches(self.max_batch, self.max_seq_len)
        graphs = self.use_cuda_graphs and self.loaded.device.type == "cuda"
        self.runner = GraphRunner(self.model) if graphs else Runner(self.model)
        self.stop_ids = self._stop_ids()
        self.scheduler = Scheduler(
            self.runner, self.max_batch, self.max_waiting, self.stop_ids,
            self.loaded.args.vocab_size, self._activate,
        )  # fmt: skip

    def _activate(self, adapter: str | None) -> None:
        lora.activate(self.model, self.adapter_weights.get(adapter) if adapter else None)

    def close(self) -> None:
        """Stop the generation worker (generations in flight end)."""
        self.scheduler.close()

    @classmethod
    def load(
        cls,
        source: str = DEFAULT_SOURCE,
        *,
        adapters: Sequence[str] = (),
        quantize: str = "auto",
        device: str = "auto",
        dtype: str = "auto",
        max_seq_len: int | None = None,
        use_triton: bool = True,
        use_cuda_graphs: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> Engine:
        # Settings that need no model are checked before the (slow) load.
        if not 1 <= max_batch <= 64:
            raise EngineError("The number of concurrent generations must be between 1 and 64.")
        if max_seq_len is not None and max_seq_len < 16:
            raise EngineError("The context length must be at least 16 tokens.")
        try:
            loaded = load_model(source, quantize=quantize, device=device, use_triton=use_triton, dtype=dtype)
        except ModelSourceError as err:
            raise EngineError(str(err)) from None
        limit = loaded.args.max_position_embeddings
        if max_seq_len is not None and max_seq_len > limit:
            raise EngineError(f"The context length must be between 16 and {limit} tokens for this model.")
        engine = cls(loaded, max_seq_len or min(limit, 8192), use_cuda_graphs, max_batch, max_waiting)
        try:
            for adapter in adapters:
                engine.load_adapter(adapter)
            engine._warm_up()
        except BaseException:
            engine.close()
            raise
        return engine

    def _warm_up(self) -> None:
        """With CUDA graphs: tune the kernels and capture the decode step of every batch size and
        attention length now (sampling's and greedy's), for the base model and each adapter, so
        that no request waits for it (a batch size first met mid-generation stalled every stream
        while it tuned; the first start on a machine tunes for a minute or more); and the prefill
        of one prompt at every graph width. A prefill of several prompts is captured at its first
        use (model/runner.py), and so is an adapter loaded later. Runs before the engine serves
        anything, from the loading thread: the worker is idle."""
        if not isinstance(self.runner, GraphRunner):
            return
        runner = self.runner
        log.info(
            "Tuning kernels, capturing the decode step for batch sizes %s and attention lengths %s",
            runner.batch_sizes, runner.buckets,
        )  # fmt: skip
        for adapter in [None, *self.adapter_weights]:
            self.scheduler.use_adapter(adapter)
            for batch in runner.batch_sizes:
                for bucket in runner.buckets:  # the last position a bucket covers selects it
                    for greedy in (False, True):
                        runner.decode([0] * batch, [bucket - 1] * batch, adapter, greedy)
            for width in runner.prefill_widths():
                runner.prefill([0] * width)
        self.scheduler.use_adapter(None)

    def _stop_ids(self) -> frozenset[int]:
        ids = set(self.loaded.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
        return frozenset(ids)

    # ---- information and adapters ----

    def info(self) -> dict:
        loaded = self.loaded
        dtype = str(loaded.dtype).removeprefix("torch.")
        if loaded.device.type == "cuda":
            device = f"{loaded.device} ({torch.cuda.get_device_name(loaded.device)})"
            memory = f"{torch.cuda.memory_allocated(loaded.device) / 1e9:.2f} GB GPU"
            embed = self.model.tok_embeddings.weight
            if embed.device.type == "cpu":
                host_gb = embed.numel() * embed.element_size() / 1e9
                memory += f" (+ {host_gb:.2f} GB input embeddings in host memory)"
        else:
            device = "cpu"  # the peak since loading began, now: the KV cache comes after the load
            memory = f"{max(peak_rss_bytes(), loaded.peak_host_memory_bytes) / 1e9:.2f} GB peak RSS"
        return {
            "model": "SmolLM2-135M-Instruct (embedded)" if loaded.source == DEFAULT_SOURCE else loaded.source,
            "quantization": "NF4 (bitsandbytes layout, double quant)"
            if loaded.quantized
            else f"none ({dtype})",
            "dtype": dtype,
            "device": device,
            "kernels": self.model.ops.name,
            "cuda_graphs": isinstance(self.runner, GraphRunner),
            "adapters": self.adapters(),
            "max_seq_len": self.max_seq_len,
            "max_batch": self.max_batch,
            "memory": memory,
        }

    def adapters(self) -> list[str]:
        return list(self.adapter_weights)

    def load_adapter(self, source: str, name: str | None = None) -> str:
        """Load a PEFT LoRA adapter under `name` (default: the source); the model is unchanged."""
        name = name or source.rstrip("/")
        if name in self.adapter_weights:
            raise EngineError(f"An adapter named '{name}' is already loaded.")
        try:
            weights = lora.build_adapter(self.model, source)
        except lora.AdapterError as err:
            raise EngineError(str(err)) from None
        self.adapter_weights[name] = weights  # one dict store: atomic for the worker thread
        return name

    # ---- generation ----

    def chat(
        self,
        messages: list[dict],
        settings: GenerationSettings = GenerationSettings(),
        *,
        system_prompt: str | None = None,
        adapter: str | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[GenerationEvent]:
        settings = settings.validated()
        if (
            not messages
            or messages[-1].get("role") != "user"
            or not str(messages[-1].get("content", "")).strip()
        ):
            raise EngineError("Please type a message first.")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise EngineError("This model has no chat template; use the Instruct tab instead.")
        check_text(system_prompt or "", *(m.get("content") for m in messages))
        ids, trimmed = self._fit_chat(messages, system_prompt, settings.max_new_tokens)
        return self._run(ids, settings, adapter, cancel, trimmed)

    def instruct(
        self,
        instruction: str,
        input: str = "",
        settings: GenerationSettings = GenerationSettings(),
        *,
        adapter: str | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[GenerationEvent]:
        settings = settings.validated()
        check_text(instruction, input)
        if not instruction.strip():
            raise EngineError("Please write an instruction first.")
        ids = prompts.alpaca_prompt_ids(self.tokenizer, instruction, input)
        self._check_fits(len(ids), "Your instruction and input are")
        return self._run(ids, settings, adapter, cancel, 0)

    def _check_fits(self, n_tokens: int, subject: str) -> None:
        if n_tokens >= self.max_seq_len:
            raise EngineError(
                f"{subject} {n_tokens} tokens long, but the context holds {self.max_seq_len}; "
                "please shorten it."
            )

    def _fit_chat(
        self, messages: list[dict], system_prompt: str | None, max_new: int
    ) -> tuple[list[int], int]:
        """Prompt ids after dropping the fewest oldest turns that leave room for the reply:
        max_new tokens, or a quarter of the context when max_new asks for more (such a reply
        ends where the context does; the conversation is not given up for it).

        A turn is a user message with what follows it up to the next user message (any roles: a
        history need not alternate); a leading system message is kept. Dropping more turns never
        makes the prompt longer, so a binary search over how many to drop needs O(log n)
        renders of the template instead of one per dropped turn.
        """
        room = min(max_new, max(self.max_seq_len // 4, 1))
        pinned = 1 if messages and messages[0].get("role") == "system" else 0
        # where the kept conversation may begin: its start, then each later user message (the
        # newest at worst); only whole (user, assistant) pairs counted here once, so a history
        # that did not alternate kept all of it or nothing (and counted too few turns)
        starts = [pinned] + [i for i in range(pinned + 1, len(messages)) if messages[i].get("role") == "user"]

        def render(k: int) -> list[int]:
            kept = messages[:pinned] + messages[starts[k] :]
            return prompts.chat_prompt_ids(self.tokenizer, prompts.chat_messages(kept, system_prompt))

        lo, hi = 0, len(starts) - 1
        found = {}
        while lo < hi:  # the fewest turns dropped such that the prompt fits
            mid = (lo + hi) // 2
            found[mid] = render(mid)
            if len(found[mid]) + room <= self.max_seq_len:
                hi = mid
            else:
                lo = mid + 1
        ids = found[lo] if lo in found else render(lo)
        subject = "Your system prompt and message are" if system_prompt else "Your message is"
        self._check_fits(len(ids), subject)
        return ids, lo

    def generate_ids(
        self,
        ids: list[int],
        settings: GenerationSettings = GenerationSettings(),
        *,
        adapter: str | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[GenerationEvent]:
        """Generate after a prompt given as token ids (benchmarks, tests, API clients)."""
        settings = settings.validated()
        if not ids:
            raise EngineError("The prompt is empty.")
        if not all(isinstance(i, int) and 0 <= i < self.loaded.args.vocab_size for i in ids):
            raise EngineError("Token ids must be whole numbers inside the model's vocabulary.")
        self._check_fits(len(ids), "The prompt is")
        return self._run(ids, settings, adapter, cancel, 0)

    def _run(self, ids, settings, adapter, cancel, trimmed) -> Iterator[GenerationEvent]:
        if adapter is not None and adapter not in self.adapter_weights:
            raise EngineError(f"No adapter named '{adapter}' is loaded.")
        vocab, top = self.loaded.args.vocab_size, max(ids)
        if top >= vocab:  # a tokenizer larger than the weights' vocabulary
            raise EngineError(
                f"The tokenizer gave token id {top}, past the model's {vocab}-token vocabulary: "
                "this tokenizer does not belong to these weights."
            )
        room = self.max_seq_len - len(ids)
        request = Request(
            ids, settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty,
            settings.seed, min(settings.max_new_tokens, room), adapter, cancel or CancelToken(),
            settings.ignore_eos,
        )  # fmt: skip
        context = self.max_seq_len if room < settings.max_new_tokens else 0  # then "length" is the context
        start = time.perf_counter()
        try:
            self.scheduler.submit(request)
        except BusyError as err:
            waiting = f"{err.args[0]} requests are" if err.args[0] != 1 else "1 request is"
            raise EngineError(
                f"The server is busy ({waiting} waiting); please try again in a moment."
            ) from None
        return EventStream(self._events(request, settings, start, trimmed, context), request.cancel)

    def _events(
        self, request: Request, settings, start: float, trimmed: int, context: int
    ) -> Iterator[GenerationEvent]:
        """The worker's tokens as text events with running stats; closing it cancels the request.
        context: the context's size where it, not max new tokens, bounds the reply, else 0."""
        stats = GenerationStats(prompt_tokens=len(request.ids), prompt_trimmed_turns=trimmed)
        stream = TextStream(self.tokenizer, settings.stop)
        first, tail = None, ""
        try:
            while True:
                token, *rest = request.out.get()
                now = rest[-1]
                stats.total_s = now - start
                if token is None:
                    stats.stop_reason = rest[0]
                    break
                stats.new_tokens += 1
                if first is None:
                    first = now
                    stats.time_to_first_token_s = now - start
                elif now > first:
                    stats.decode_tokens_per_s = (stats.new_tokens - 1) / (now - first)
                delta = stream.push(token)
                if stream.stopped:  # the text before the stop string goes out with the final event
                    stats.stop_reason, tail = "stop", delta
                    break
                yield GenerationEvent(delta, replace(stats), False, (token,))
        finally:
            request.cancel.cancel()  # ends the row at the next step if it still runs
        if stats.stop_reason.startswith("error:"):
            raise EngineError(stats.stop_reason.removeprefix("error:"))
        if stats.stop_reason == "length":
            stats.context_full_at = context
        yield GenerationEvent(tail + stream.release(final=True), stats, True)
