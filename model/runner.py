"""Prefill and one-token decode over the model's static KV cache (one slot a sequence).

`Runner` runs both eagerly (CPU, or CUDA with graphs off). `GraphRunner` replays the whole
one-token decode step (all layers, the LoRA, the lm_head) from a CUDA graph: at batch 1 an
eager decode step is ~500 kernel launches, and their launch cost, not memory, sets the speed.
A graph replays them with no Python and no launch gaps.

A graph fixes its tensors' shapes, and attention must read the KV cache only up to the
longest sequence, so one graph is captured per attention-length bucket (powers of two from
256 up to max_seq_len): the cache read is at most twice what it must be, and short chats read
little. A graph also fixes the LoRA tensors it was captured with, so each (adapter, bucket)
pair gets its own graph; all of them share one memory pool. The engine captures every (adapter,
batch size, bucket) at load (model/engine.py: Engine._warm_up).

A short prefill is host-bound too (~1,100 launches for an 8B model, ~35 ms against ~15 ms of
kernels at 60 tokens), so prefills of up to PREFILL_GRAPH_TOKENS padded tokens replay a graph
per (adapter, prompts, width) as well, the width rounded up to PREFILL_WIDTH_STEP. Both runners
pad a CUDA prefill's width the same way, so graph and eager prefills run the same kernels on the
same shapes and give the same logits. Longer prefills run eagerly. At 1,000 tokens an eager
prefill was still host-bound on a slower host (H100, session 13: 57.1 ms to the first token
against 41-48 ms on other machines, the bf16 model 27 ms), so graphs go up to 1,024 tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from model.llama import Transformer
from model.sampling import argmax_rows

log = logging.getLogger(__name__)
MIN_BUCKET = 256
# Prompt tokens a prefill pass: bounds the attention scores' memory on long prompts. NF4 weights
# are dequantized once a pass, so a 1,000-token prompt in 512-token chunks paid that twice
# (H200: 75 ms to the first token against 32 ms for the bf16 model).
PREFILL_CHUNK = 2048
# On a CPU a 2,048-token pass takes seconds to tens of seconds: smaller passes let a cancelled
# prompt (Stop, a closed tab) end sooner; the weights are read once a pass either way.
PREFILL_CHUNK_CPU = 512
PREFILL_WIDTH_STEP = 64  # a CUDA prefill's width is rounded up to this (graph keys stay few)
PREFILL_GRAPH_TOKENS = 1024  # padded prompt tokens (prompts x width) up to which a prefill replays a graph


def attention_buckets(max_seq_len: int) -> list[int]:
    buckets, size = [], MIN_BUCKET
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return buckets + [max_seq_len]


class Runner:
    """Prefill and decode over the model's KV-cache slots, eagerly."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.device
        # what the last decode step fed: rows 0..width-1, token and position of each
        self.token = torch.zeros(max(model.slots, 1), 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros_like(self.token)
        self.width = self.max_position = 0

    def prefill(
        self, ids: list[int], slot: int = 0, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Logits (1, V) after the prompt, which fills positions 0 .. len(ids) - 1 of `slot`."""
        return self.prefill_many([(ids, slot)], stop)

    @torch.inference_mode()
    def prefill_many(
        self, prompts: list[tuple[list[int], int]], stop: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Logits (n, V) after each (ids, slot) prompt, all prefilled in shared passes; None if
        stop() said so before a pass (the slots may then hold part of the prompts, which the next
        prefill there overwrites).

        A prefill pass's fixed cost is the weights (NF4: dequantized once a pass), so requests
        that arrive together share it. Shorter prompts are padded at the end: their padding
        writes K/V past the prompt, which decode overwrites position by position before any
        step can attend to it (a row attends only up to its own position). As with batched
        decode, a row's logits may differ in their last bits from a lone prefill's on the GPU
        (more rows can change the kernel that runs: NF4 GEMV up to 8 rows, dequantize + cuBLAS
        above), not in what they mean.
        """
        tokens, slots, last = self.prefill_inputs(prompts)
        lengths = [len(ids) for ids, _ in prompts]
        width = tokens.shape[1]
        out: list[torch.Tensor | None] = [None] * len(prompts)
        chunk = PREFILL_CHUNK if self.device.type == "cuda" else min(PREFILL_CHUNK, PREFILL_CHUNK_CPU)
        for start in range(0, width, chunk):
            if stop is not None and stop():
                return None
            end = min(width, start + chunk)
            positions = torch.arange(start, end, device=self.device).expand(len(prompts), -1)
            here = (last - start).clamp(0, end - start - 1).to(self.device)
            logits = self.model(
                tokens[:, start:end], positions, attn_len=end, slots=slots, last=here, from_start=start == 0
            )
            for row, length in enumerate(lengths):
                if start < length <= end:
                    out[row] = logits[row, 0]
        return torch.stack(out)

    def prefill_width(self, n: int, width: int) -> int:
        """The width a prefill of n prompts, the longest `width` tokens, runs at: on CUDA rounded
        up to PREFILL_WIDTH_STEP when that stays within a graph's size and the cache."""
        padded = -(-width // PREFILL_WIDTH_STEP) * PREFILL_WIDTH_STEP
        small = n * padded <= PREFILL_GRAPH_TOKENS and padded <= self.model.max_seq_len
        return padded if self.device.type == "cuda" and small else width

    def prefill_widths(self) -> list[int]:
        """Every width a one-prompt prefill is padded to (GraphRunner: one graph each)."""
        most = min(PREFILL_GRAPH_TOKENS, self.model.max_seq_len)
        return list(range(PREFILL_WIDTH_STEP, most + 1, PREFILL_WIDTH_STEP))

    def prefill_inputs(
        self, prompts: list[tuple[list[int], int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(tokens (n, W) on the device, slots (n,) on the device or None for rows 0..n-1, each
        prompt's last index (n,) on the host): prompts padded at the end to the run's width."""
        width = self.prefill_width(len(prompts), max(len(ids) for ids, _ in prompts))
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, (ids, _) in enumerate(prompts):
            tokens[row, : len(ids)] = torch.tensor(ids)
        slots = [slot for _, slot in prompts]
        # rows 0..n-1 attend through views of the cache; other slots through a gathered copy
        slots = None if slots == list(range(len(prompts))) else torch.tensor(slots, device=self.device)
        return tokens.to(self.device), slots, torch.tensor([len(ids) - 1 for ids, _ in prompts])

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], positions: list[int], adapter: str | None = None, greedy: bool = False
    ) -> torch.Tensor:
        """Logits (width, V): row b reads tokens[b] at positions[b] in cache slot b; rows past
        len(tokens) up to the runner's width (rows_for) are free slots fed token 0 at position 0.
        `adapter` names the LoRA the model applies now (the scheduler activated it). greedy: each
        row's argmax (width,) instead, already fed to the next step (feed_greedy)."""
        self.width, self.max_position = self.rows_for(len(tokens)), max(positions)
        pad = [0] * (self.width - len(tokens))
        self.token[: self.width, 0].copy_(torch.tensor(tokens + pad))
        self.position[: self.width, 0].copy_(torch.tensor(positions + pad))
        return self.run(adapter, greedy)

    @torch.inference_mode()
    def decode_following(
        self, tokens: torch.Tensor, slots: torch.Tensor, adapter: str | None = None
    ) -> torch.Tensor:
        """The step after the last decode over the same rows, with nothing from the host: row
        slots[i] reads tokens[i] (device tensors) one position past where it read last; free
        slots (token 0 at position 0) read that again. So a step can be queued behind the one
        before it while the host has yet to read that one's tokens. The caller guarantees that
        every row at a position > 0 steps (the last decode fed one adapter's rows only)."""
        self.token[:, 0].index_copy_(0, slots, tokens)
        if len(slots) == self.width:  # no free slot: every row steps (one kernel, not two)
            self.position[: self.width] += 1
        else:
            self.position[: self.width] += self.position[: self.width] > 0
        self.max_position += 1
        return self.run(adapter)

    @torch.inference_mode()
    def decode_greedy_following(self, adapter: str | None = None) -> torch.Tensor:
        """The step after a greedy decode over the same rows, which fed its tokens and positions
        to this one (feed_greedy): its argmax (width,), fed on to the next. Nothing is launched
        between the two steps (a graph holds the feed): 20-40 us a token on an H100 before."""
        self.max_position += 1
        return self.run(adapter, greedy=True)

    def rows_for(self, n: int) -> int:
        """Rows a decode step of n sequences runs (graphs: the captured batch size)."""
        return n

    def run(self, adapter: str | None, greedy: bool = False) -> torch.Tensor:
        """The decode step for what the buffers hold: logits (width, V), or greedy's tokens."""
        return self.step(self.width, self.max_position + 1, greedy)

    def step(self, rows: int, attn_len: int, greedy: bool) -> torch.Tensor:
        """One decode step of buffer rows 0..rows-1 reading the cache up to attn_len: logits
        (rows, V), or with greedy each row's argmax, fed to the next step (feed_greedy)."""
        token, position = self.token[:rows], self.position[:rows]
        logits = self.model(token, position, attn_len=attn_len)[:, -1]
        return feed_greedy(logits, token, position) if greedy else logits


def feed_greedy(logits: torch.Tensor, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (rows,), written as its next input token, one position on; a free slot
    (position 0) stays where it is. The buffers then hold the next greedy step's inputs."""
    tokens = argmax_rows(logits)
    token[:, 0].copy_(tokens)
    position += position > 0
    return tokens


def batch_buckets(slots: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < slots:
        sizes.append(min(2 * sizes[-1], slots))
    return sizes


class GraphRunner(Runner):
    """Decode, and prefill up to PREFILL_GRAPH_TOKENS padded tokens, by replaying captured graphs."""

    def __init__(self, model: Transformer):
        super().__init__(model)
        self.buckets = attention_buckets(model.max_seq_len)
        self.batch_sizes = batch_buckets(model.slots)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # (adapter object's id, prompts, width, gathered slots) -> (graph, inputs, logits, adapter)
        self.prefill_graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # One side stream for every capture's warm-up runs: cuBLAS keeps a workspace (32 MB on
        # Hopper) for each stream it has run on, so a new stream a capture would add one each.
        self.side = torch.cuda.Stream()

    def record(self, step, reset=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Run `step` for real on a side stream (Triton compiles and tunes outside the capture),
        then capture it; returns the graph and its output. reset, if given, runs after each of
        those runs (a step that moves its own inputs on puts them back)."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(2):
                step()
                if reset is not None:
                    reset()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work meanwhile (an adapter loaded from the UI) is
        # neither captured nor refused
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step()
        return graph, out

    @torch.inference_mode()
    def prefill_many(
        self, prompts: list[tuple[list[int], int]], stop: Callable[[], bool] | None = None
    ) -> torch.Tensor | None:
        """Runner.prefill_many, replayed from a graph when the padded prompts are short. A graph
        bakes in the LoRA tensors active when it was captured: it is keyed by that adapter
        object (model.active_adapter, kept alive with the graph)."""
        n = len(prompts)
        width = self.prefill_width(n, max(len(ids) for ids, _ in prompts))
        if n * width > PREFILL_GRAPH_TOKENS or width % PREFILL_WIDTH_STEP:
            return super().prefill_many(prompts, stop)
        tokens, slots, last = self.prefill_inputs(prompts)
        adapter = self.model.active_adapter
        key = (id(adapter), n, width, slots is not None)
        if key not in self.prefill_graphs:
            log.info("Capturing the prefill of %d prompt(s) of up to %d tokens", n, width)
            # the graph reads these addresses at every replay: they live as long as it does
            inputs = (
                tokens.clone(), None if slots is None else slots.clone(), last.to(self.device),
                torch.arange(width, device=self.device).expand(n, -1),
            )  # fmt: skip
            step = lambda: self.model(  # noqa: E731
                inputs[0], inputs[3], attn_len=width, slots=inputs[1], last=inputs[2], from_start=True
            )[:, 0]
            self.prefill_graphs[key] = (*self.record(step), inputs, adapter)
        graph, logits, (static_tokens, static_slots, static_last, _), _ = self.prefill_graphs[key]
        static_tokens.copy_(tokens)
        if slots is not None:
            static_slots.copy_(slots)
        static_last.copy_(last)
        graph.replay()
        return logits.clone()  # the graph's buffer is rewritten by its next replay

    def capture(self, batch: int, attn_len: int, greedy: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode step of rows 0..batch-1 reading the cache up to attn_len (greedy: and
        the feed of its argmax to the next step).

        The warm-up runs execute the step for the token and position already set, so the K/V they
        write are the ones the replay writes again: capturing mid-generation changes nothing. A
        greedy step's feed moves its inputs on: each warm-up run puts them back (a run a position
        further could pass the end of the cache).
        """
        token, position = self.token[:batch], self.position[:batch]
        inputs = token.clone(), position.clone()

        def reset() -> None:
            token.copy_(inputs[0])
            position.copy_(inputs[1])

        return self.record(lambda: self.step(batch, attn_len, greedy), reset if greedy else None)

    def rows_for(self, n: int) -> int:
        """The captured batch size for n sequences; rows past n are free slots fed token 0 at
        position 0."""
        return next(b for b in self.batch_sizes if b >= n)

    def run(self, adapter: str | None, greedy: bool = False) -> torch.Tensor:
        """Replay the graph of (adapter, batch, attention bucket, greedy): logits (batch, V) or
        greedy's tokens (batch,). A graph bakes in the LoRA tensors of `adapter` (adapters are
        never replaced under a name, so the name identifies them)."""
        batch, attn_len = self.width, next(b for b in self.buckets if b > self.max_position)
        key = (adapter, batch, attn_len, greedy)
        if key not in self.graphs:
            what = "greedy decode step" if greedy else "decode step"
            log.info("Capturing the %s for batch %d, attention length %d", what, batch, attn_len)
            self.graphs[key] = self.capture(batch, attn_len, greedy)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits
