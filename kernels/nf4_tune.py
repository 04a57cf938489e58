"""The NF4 GEMVs' configurations and the tuner that picks one per shape (kernels/nf4_linear.py).

Each shape (device, N, K, rows of x rounded up, dtype, SwiGLU, LoRA rank rounded up or 0) is
timed once, outside CUDA-graph capture, over the candidates that fit its K; the fastest is kept
for the process. A candidate is timed as a decode step runs it: launches captured in a CUDA
graph, back to back, each on another copy of the weight (2 to 16 copies, more than twice the L2
together where 16 are enough; do_bench also clears the L2 before each replay), so every launch
streams its weight from memory and pays its start and tail as it will in the step.
(Timing single launches with do_bench instead, as before session 12, picked the tensor-core
kernel for q/k/v at one row on an H100, 12% slower than the FMA kernel inside a graph.) Under
the interpreter, during capture, or with NF4_GEMV_TUNE=0, a fixed default is used.

The picks also go to a small JSON file (NF4_TUNE_CACHE, by default
~/.cache/llama-nf4-chat/nf4_tune.json; empty: none), under a fingerprint of the GPU model, the
Triton and PyTorch versions and the source of every kernel here: a later start on the same
machine times nothing and compiles only the configs it uses (an 8B model's first start tunes for
a minute or more, mostly compiling every candidate). A file that cannot be read or written is
ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch
import triton
import triton.testing

from kernels import pdl
from kernels.nf4_gemv_rows import CONFIGS as ROWS_CONFIGS
from kernels.nf4_mma import CONFIGS as MMA_CONFIGS

# (BN, BKW, num_warps, num_stages, programs per SM (0: one program a tile), decode (0: warp
# shuffle, exact; 1: shared byte table, fp16-rounded codes: kernels.nf4.decode_words; 2: the
# table's fp16 pairs times x in fp16, packed: kernels.nf4_gemv's HALF)) tried at
# the first call of each shape; 2 rows get smaller tiles to stay in registers. The one-tile
# shuffle configs are the best of a 24-config sweep (bench/NOTES.md); the persistent ones are
# candidates the tuner weighs against them; the table ones are those of 7 that came within 3% of
# the best on some Llama shape (H100, session 13); the fp16 ones are those of 16 swept that
# were fastest or within 1% of it on some shape (H100, session 14). 4 and 8 rows (3-8 rows of x) run
# kernels.nf4_gemv_rows, with its configs. Every row count also weighs kernels.nf4_mma (tensor
# cores; 16-bit x on sm_80+ only).
CONFIGS = {
    1: [(16, 128, 4, 3, 0, 0), (16, 256, 4, 3, 0, 0), (16, 64, 2, 3, 0, 0), (16, 128, 8, 3, 0, 0),
        (8, 256, 2, 3, 0, 0), (16, 128, 4, 3, 2, 0), (16, 128, 4, 4, 2, 0), (16, 256, 4, 3, 2, 0),
        (8, 128, 4, 3, 4, 0), (8, 128, 2, 4, 6, 0), (16, 128, 8, 3, 2, 0),
        (16, 128, 4, 3, 0, 1), (16, 256, 4, 3, 0, 1), (16, 128, 8, 3, 0, 1),
        (16, 64, 2, 3, 0, 2), (16, 64, 4, 3, 0, 2), (16, 128, 4, 3, 0, 2), (16, 256, 4, 3, 0, 2),
        (8, 128, 2, 3, 0, 2), (32, 64, 4, 3, 0, 2)],
    2: [(16, 128, 4, 3, 0, 0), (8, 128, 4, 3, 0, 0), (8, 256, 4, 3, 0, 0), (16, 128, 4, 3, 2, 0),
        (8, 128, 4, 3, 4, 0), (16, 128, 4, 3, 0, 1), (8, 128, 4, 3, 0, 1), (16, 128, 4, 3, 0, 2),
        (16, 64, 2, 3, 0, 2), (8, 128, 2, 3, 0, 2)],
    4: ROWS_CONFIGS[4],
    8: ROWS_CONFIGS[8],
}  # fmt: skip
for _rows in CONFIGS:  # the tensor-core GEMV (kernels/nf4_mma.py), 16-bit x: ("mma", tiles, warps, ahead)
    CONFIGS[_rows] = CONFIGS[_rows] + [("mma", *c) for c in MMA_CONFIGS]
log = logging.getLogger(__name__)
_TIMING = threading.Lock()  # one timing at a time: the captures share one stream
# a config that cannot be built for this device (PTXASError: no RuntimeError, in triton >= 3.2)
_BUILD_ERRORS = tuple(
    error
    for error in (
        triton.runtime.errors.OutOfResources,
        triton.compiler.errors.CompilationError,
        getattr(triton.runtime.errors, "PTXASError", None),
    )
    if error is not None
)
TUNED: dict[tuple, tuple] = {}  # (BN, BKW, ...), (rows, BKW, warps) or ("mma", tiles, warps, ahead)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuning_enabled() -> bool:
    return os.environ.get("NF4_GEMV_TUNE", "1") != "0" and not interpreting()


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def grid(cfg: tuple, n_out: int, device: torch.device) -> int:
    tiles = triton.cdiv(n_out, cfg[0])
    return tiles if cfg[4] == 0 else min(tiles, cfg[4] * sm_count(device))


def cache_path() -> Path | None:
    value = os.environ.get("NF4_TUNE_CACHE")
    if value:
        return Path(value)
    try:
        return None if value == "" else Path.home() / ".cache" / "llama-nf4-chat" / "nf4_tune.json"
    except RuntimeError:  # no home directory (a container run as a user without one)
        return None


@functools.cache
def fingerprint(device: torch.device) -> str:
    """What a pick depends on besides its shape: the GPU model, the versions, the kernels."""
    digest = hashlib.sha256()
    props = torch.cuda.get_device_properties(device)  # the SM count too: MIG slices differ
    gpu = props.name, (props.major, props.minor), props.multi_processor_count
    digest.update(repr((gpu, triton.__version__, torch.__version__)).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:20]


def stored_key(key: tuple) -> str | None:
    """The file's name for a tuner key, or None for a key that is not a CUDA device's."""
    device, n_out, k, mp, dtype, swiglu, rank, scales = key
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    shape = f"{n_out}x{k} rows {mp} {str(dtype).removeprefix('torch.')} swiglu {int(swiglu)} rank {int(rank)}"
    shape += f" scales {str(scales).removeprefix('torch.')}"
    return f"{fingerprint(device)} {shape} pdl {int(pdl.pdl_enabled(device))}"


_UNREADABLE: set[Path] = set()  # files warned about once


def read_picks() -> dict:
    path = cache_path()
    if path is None:
        return {}
    try:
        picks = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        picks = None
    if not isinstance(picks, dict):
        if path not in _UNREADABLE:
            _UNREADABLE.add(path)
            log.warning("NF4 GEMV picks in %s not readable; tuning anew", path)
        return {}
    return picks


_UNSAVED: set[Path] = set()  # files a save failed for: warned once, not tried again


def store_pick(name: str, cfg: tuple) -> None:
    """Add one pick to the file: read, merge, write a temporary file of its own, rename it over
    (a concurrent writer's newest picks may be lost, never the file)."""
    path = cache_path()
    if path is None or path in _UNSAVED:
        return
    try:
        picks = read_picks() | {name: list(cfg)}
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(picks, out, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError as err:
        _UNSAVED.add(path)
        log.warning("NF4 GEMV picks not saved to %s (%s); each start will tune anew", path, err)


def weight_copies(weights: tuple) -> list[tuple]:
    """`weights` and clones of them: enough copies to hold more than twice the L2 (at most 16)."""
    nbytes = sum(t.nbytes for t in weights)
    if not nbytes:
        return [weights]
    l2 = torch.cuda.get_device_properties(weights[0].device).L2_cache_size
    count = min(16, max(2, -(-2 * l2 // nbytes)))
    return [weights] + [tuple(t.clone() for t in weights) for _ in range(count - 1)]


@functools.cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def time_config(launch, cfg: tuple, copies: list[tuple]) -> float:
    """ms a launch of cfg: one launch on each copy of the weight, captured in a CUDA graph and
    replayed (each launch reads its weight from memory, back to back, as in a decode step)."""
    for weights in copies:  # compiles the config; nothing may compile or allocate in capture
        launch(cfg, *weights)
    main = torch.cuda.current_stream()
    stream = _capture_stream(main.device)
    stream.wait_stream(main)  # x and the LoRA partials come from the current stream
    graph = torch.cuda.CUDAGraph()
    # capture_begin/end rather than torch.cuda.graph, which collects garbage and empties the
    # allocator's cache at every capture; "thread_local": other threads may use CUDA meanwhile
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for weights in copies:
                launch(cfg, *weights)
        finally:
            graph.capture_end()
    main.wait_stream(stream)
    return triton.testing.do_bench(graph.replay, warmup=3, rep=15) / len(copies)


def _time_candidates(launch, fits: list, weights: tuple) -> tuple[dict, bool]:
    """({config: ms} of the candidates that ran, whether a failure may have been transient: the
    device out of memory, a capture refused; such a pick is used but not stored)."""
    try:
        copies = weight_copies(weights)
    except torch.cuda.OutOfMemoryError:  # no room for copies: timed on the weight itself
        log.warning("NF4 GEMV tuner: no memory for weight copies; timing on one", exc_info=True)
        copies = [weights]
    times, unsure = {}, False
    for c in fits:
        try:
            times[c] = time_config(launch, c, copies)
        except _BUILD_ERRORS:
            log.warning("NF4 GEMV config %s does not compile for this device; skipped", c, exc_info=True)
        except RuntimeError:  # a launch or capture failure, maybe out of memory: maybe not for good
            log.warning("NF4 GEMV config %s did not run; skipped", c, exc_info=True)
            unsure = True
    return times, unsure


def pick_config(
    key: tuple, n_out: int, kw: int, mp: int, launch, candidates: list, weights: tuple = ()
) -> tuple:
    """Best config for this shape: timed once per shape outside graph capture, else a default.

    launch(cfg, *weights) runs the GEMV once; `weights` (the packed words and the absmax) are
    copied for the timing (time_config). The default is the first FMA candidate that still gives
    264 programs (two an H100/H200 SM), or the narrowest one for small N; never an MMA one. A
    candidate that fails to compile, launch or be captured on this device is skipped.
    """
    if key in TUNED:
        return TUNED[key]
    fits = [c for c in candidates if c[0] == "mma" or c[1] <= max(8, triton.next_power_of_2(kw))]
    # the default: one program a tile and exact fp32 codes (no byte table, no fp16 products)
    plain = [c for c in fits if c[0] != "mma" and (len(c) < 5 or c[4] == 0) and (len(c) < 6 or c[5] == 0)]
    if not plain:  # the staged kernel takes a narrow K step; the rows kernel masks a wide one
        plain = [(candidates[0][0], 8, 4, 2, 0, 0) if mp <= 2 else candidates[0]]
        fits.append(plain[0])
    default = next((c for c in plain if triton.cdiv(n_out, c[0]) >= 264), min(plain))
    if not tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return default
    try:
        name = stored_key(key)
    except Exception:  # a fingerprint that cannot be taken only costs the timing below
        log.warning("NF4 GEMV picks: no fingerprint for %s; not stored", key[0], exc_info=True)
        name = None
    stored = read_picks().get(name) if name else None
    if isinstance(stored, list) and tuple(stored) in fits:  # timed before: this GPU, these kernels
        TUNED[key] = tuple(stored)
        return TUNED[key]
    with _TIMING:
        times, unsure = _time_candidates(launch, fits, weights)
    TUNED[key] = min(times, key=times.get) if times else default
    if name and times and not unsure:  # a pick over every candidate that could run: kept
        store_pick(name, TUNED[key])
    return TUNED[key]
