"""Continuous batching: one worker thread owns the model and serves every request.

Each request gets a KV-cache slot. Between decode steps the worker admits waiting requests
(prefill into their slot, first token; requests of one adapter admitted together share their
prefill passes), then runs one decode step for the active rows together and hands each row its
token. Rows join and leave at any step; each keeps its own settings,
stops on its own (EOS, length, cancel) and carries its own timing.

Tokens are chosen on the device (greedy or sampled, the repetition penalty's record of seen
tokens kept there too), and on a GPU, while the same rows go on with nobody waiting who could
join, the next step is queued behind the current one, fed from the current one's tokens on the
device, before the host reads them: the host's work for a token (reading it, handing it out)
then overlaps the device's next step instead of leaving the GPU idle (~0.4 ms a token at batch
1 on an H100). A row that ends meanwhile (EOS, cancel) drops its one extra token.

A decode step covers rows 0..B-1, B one past the highest busy slot (the runner rounds B up to a
captured batch size). A free slot inside that range is fed token 0 at position 0: its own cache
row only, which the next request put there overwrites during its prefill. Rows of another
adapter than the step's are fed their real token and position: the K/V they write is rewritten
identically when their own adapter's step runs, and their logits are dropped. Adapters take
turns step by step, so one adapter cannot starve another.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.runner import PREFILL_CHUNK, Runner
from model.sampling import sample

log = logging.getLogger(__name__)


class BusyError(RuntimeError):
    """The waiting line is full."""


@dataclass
class Request:
    ids: list[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    max_new_tokens: int
    adapter: str | None
    cancel: object  # anything with a .cancelled property
    ignore_eos: bool = False
    # What the worker sends back: (token id, time) per token, then (None, stop reason, time).
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


@dataclass
class Row:
    request: Request
    slot: int
    position: int  # where the next token goes
    token: int  # the last token, the next step's input
    generated: int
    generator: torch.Generator


@dataclass
class Flight:
    """A decode step queued on the device whose tokens the host has not read yet."""

    rows: list[Row]  # the rows it steps, in the order of its tokens
    slots: torch.Tensor  # (n,) their cache slots, on the device
    adapter: str | None
    tokens: torch.Tensor  # (n,) each row's next token, on the device
    host: torch.Tensor  # the same in host memory once `ready` has passed
    ready: torch.cuda.Event | None  # None on a CPU: nothing to wait for
    greedy: bool  # its rows all take the argmax: the runner fed the tokens to the next step

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # this step only: a step queued behind it keeps running
        return self.host.tolist()


def prefill_groups(taken: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """Requests that can share prefill passes, in arrival order: runs of consecutive arrivals
    with one adapter, each with no more padded tokens (rows x longest prompt) than one lone
    prefill pass takes (PREFILL_CHUNK), so sharing never needs more activation memory than a
    long prompt alone and nobody waits behind a later arrival."""
    groups: list[list[tuple[Request, int]]] = []
    for request, slot in taken:
        group = groups[-1] if groups else []
        width = max([len(request.ids)] + [len(r.ids) for r, _ in group])
        if not group or group[0][0].adapter != request.adapter or width * (len(group) + 1) > PREFILL_CHUNK:
            groups.append([])
        groups[-1].append((request, slot))
    return groups


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        slots: int,
        max_waiting: int,
        stop_ids: frozenset[int],
        vocab_size: int,
        activate_adapter: Callable[[str | None], None],
    ):
        self.runner, self.slots, self.max_waiting = runner, slots, max_waiting
        self.stop_ids, self.vocab_size, self.activate_adapter = stop_ids, vocab_size, activate_adapter
        self.device = runner.device
        self.seen = torch.zeros(slots, vocab_size, dtype=torch.bool, device=self.device)
        self.waiting: deque[Request] = deque()
        self.rows: dict[int, Row] = {}
        self.turn = 0  # which adapter group steps next
        self.flight: Flight | None = None  # a step queued and not read yet
        # Queue the next step before reading this one's tokens only where that overlaps work: on
        # a CPU the next step would run to its end first and delay every token by a step.
        self.overlap = self.device.type == "cuda"
        self.true = torch.ones((), dtype=torch.bool, device=self.device)
        self.adapter: str | None = None  # the one the model applies now
        activate_adapter(None)
        self.wake = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.loop, name="generation-worker", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; BusyError (with the line's length) if the line is full."""
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise BusyError(len(self.waiting))
            self.waiting.append(request)
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=5)

    # ---- the worker ----

    def loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not self.rows:
                    self.wake.wait()
                if self.closed:
                    return
            try:
                self.admit()
                if self.rows:
                    self.step()
            except Exception as err:  # a failed step must not take the server down
                log.exception("Generation step failed")
                self.fail_all(f"Generation failed ({err.__class__.__name__}); please try again.")

    def fail_all(self, message: str) -> None:
        self.flight = None
        now = time.perf_counter()
        for row in self.rows.values():
            row.request.out.put((None, "error:" + message, now))
        self.rows.clear()

    def finish(self, slot: int, reason: str) -> None:
        self.rows.pop(slot).request.out.put((None, reason, time.perf_counter()))

    @torch.inference_mode()
    def admit(self) -> None:
        """Take as many waiting requests as there are free slots; those of one adapter share
        their prefill passes (model/runner.py: prefill_many)."""
        free = [s for s in range(self.slots) if s not in self.rows]
        taken: list[tuple[Request, int]] = []
        while len(taken) < len(free):
            with self.wake:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            if request.cancel.cancelled:
                request.out.put((None, "cancelled", time.perf_counter()))
                continue
            taken.append((request, free[len(taken)]))
        for group in prefill_groups(taken):
            logits = self.prefill_together(group) if len(group) > 1 else None
            for i, (request, slot) in enumerate(group):
                if request.cancel.cancelled:  # while an earlier group or its own group prefilled
                    request.out.put((None, "cancelled", time.perf_counter()))
                    continue
                try:
                    self.start(request, slot, None if logits is None else logits[i])
                except Exception as err:  # this request fails alone; the running rows go on
                    log.exception("Prefill failed")
                    self.rows.pop(slot, None)
                    message = f"Generation failed ({err.__class__.__name__}); please try again."
                    request.out.put((None, "error:" + message, time.perf_counter()))

    def prefill_together(self, group: list[tuple[Request, int]]) -> torch.Tensor | None:
        """Logits (n, V) of one adapter's new requests prefilled together, or None if that
        failed or all of them were cancelled meanwhile. admit() need not tell which: it reports
        each cancelled request and prefills the others alone (so one bad request fails only itself)."""
        try:
            self.use_adapter(group[0][0].adapter)
            prompts = [(request.ids, slot) for request, slot in group]
            return self.runner.prefill_many(prompts, lambda: all(r.cancel.cancelled for r, _ in group))
        except Exception:
            log.exception("Shared prefill failed; prefilling the requests one by one")
            return None

    def start(self, request: Request, slot: int, logits: torch.Tensor | None = None) -> None:
        """Prefill a request into `slot` (unless its logits (V,) are given: prefilled already)
        and hand it its first token."""
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(7), "little")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if request.repetition_penalty != 1.0:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(request.ids, device=self.device)] = True
        if logits is None:
            self.use_adapter(request.adapter)
            logits = self.runner.prefill(request.ids, slot, lambda: request.cancel.cancelled)
            if logits is None:  # cancelled between two passes of a long prompt
                request.out.put((None, "cancelled", time.perf_counter()))
                return
            logits = logits[0]
        row = Row(request, slot, len(request.ids), 0, 0, generator)
        self.rows[slot] = row
        token_id = int(self.pick(row, logits))
        self.seen[slot, token_id] = True
        self.emit(row, token_id)

    def use_adapter(self, adapter: str | None) -> None:
        if adapter != self.adapter:
            self.activate_adapter(adapter)
            self.adapter = adapter

    def pick(self, row: Row, logits: torch.Tensor) -> torch.Tensor:
        r = row.request
        seen = self.seen[row.slot : row.slot + 1]
        return sample(
            logits[None], seen, r.temperature, r.top_k, r.top_p, r.repetition_penalty, row.generator,
            self.runner.model.ops.sample_top_k,
        )  # fmt: skip

    def emit(self, row: Row, token_id: int) -> None:
        """Hand a sampled token to its request, or end the row."""
        request = row.request
        if token_id in self.stop_ids and not request.ignore_eos:
            return self.finish(row.slot, "eos")
        request.out.put((token_id, time.perf_counter()))
        row.token, row.generated = token_id, row.generated + 1
        if row.generated >= request.max_new_tokens:
            self.finish(row.slot, "length")

    @torch.inference_mode()
    def step(self) -> None:
        for slot in [s for s, row in self.rows.items() if row.request.cancel.cancelled]:
            self.finish(slot, "cancelled")
        if not self.rows:
            self.flight = None
            return
        flight = self.flight or self.launch()
        self.flight = self.follow(flight) if self.overlap and self.goes_on(flight) else None
        for row, token_id in zip(flight.rows, flight.read()):
            if self.rows.get(row.slot) is row:  # a row that ended meanwhile drops its token
                row.position += 1
                self.emit(row, token_id)
        if not self.rows:
            self.flight = None  # every row ended: the queued step's tokens are nobody's

    def goes_on(self, flight: Flight) -> bool:
        """Whether the step after `flight` is surely wanted as it would be fed: its rows are all
        the rows, none ends by length at this token, and nobody waits who could join."""
        return (
            not (self.waiting and len(self.rows) < self.slots)
            and len(flight.rows) == len(self.rows)
            and all(self.rows.get(row.slot) is row for row in flight.rows)
            and all(row.generated + 1 < row.request.max_new_tokens for row in flight.rows)
        )

    def launch(self) -> Flight:
        """Queue a decode step for one adapter's rows (adapters take turns) from the host's view."""
        groups = sorted({row.request.adapter or "" for row in self.rows.values()})
        adapter = groups[self.turn % len(groups)] or None
        self.turn += 1
        self.use_adapter(adapter)
        width = max(self.rows) + 1
        tokens, positions = [0] * width, [0] * width
        for slot, row in self.rows.items():
            tokens[slot], positions[slot] = row.token, row.position
        rows = [row for row in self.rows.values() if row.request.adapter == adapter]
        # a copy from the host waits for the stream: made before the step is queued, not after
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        greedy = all(row.request.temperature == 0 and row.request.repetition_penalty == 1 for row in rows)
        out = self.runner.decode(tokens, positions, adapter, greedy)
        return self.choose(rows, slots, adapter, out, greedy)

    def follow(self, flight: Flight) -> Flight:
        """Queue the step after `flight`, fed from its tokens on the device, under its adapter
        (an admission in between may have activated another one)."""
        self.use_adapter(flight.adapter)
        if flight.greedy:  # the runner fed the argmax already
            out = self.runner.decode_greedy_following(flight.adapter)
        else:
            out = self.runner.decode_following(flight.tokens, flight.slots, flight.adapter)
        return self.choose(flight.rows, flight.slots, flight.adapter, out, flight.greedy)

    def choose(
        self, rows: list[Row], slots: torch.Tensor, adapter: str | None, out: torch.Tensor, greedy: bool
    ) -> Flight:
        """Each row's next token, on the device, with no host sync: greedy rows without a penalty
        (greedy) took the argmax in the step (out: every slot's), the others sample one by one
        from the step's logits (out). The tokens join the seen record where a row has a penalty:
        only those rows read it, and each row's is reset at its start. A step's small launches
        outside the graph cost ~4 us each on an H100, so none is made that nothing reads."""
        if greedy:
            in_order = [row.slot for row in rows] == list(range(out.shape[0]))  # one stream: slot 0
            tokens = out if in_order else out.index_select(0, slots)
        else:
            tokens = torch.cat([self.pick(row, out[row.slot]) for row in rows])
        if any(row.request.repetition_penalty != 1 for row in rows):  # nobody else reads the record
            self.seen.index_put_((slots, tokens), self.true)
        if tokens.device.type != "cuda":
            return Flight(rows, slots, adapter, tokens, tokens, None, greedy)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Flight(rows, slots, adapter, tokens, host, ready, greedy)
