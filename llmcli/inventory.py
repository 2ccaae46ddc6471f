"""What `llmcli info` and `llmcli cache` report: versions, devices, engines, and the model cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from llmcli import __version__, models
from llmcli.errors import UsageError


@dataclass
class CacheEntry:
    name: str  # the file or directory name under the cache's gguf/ folder
    kind: str  # "safetensors" (hf engine's dequantized copy) | "F16 GGUF" (llama.cpp engine's conversion)
    #            | "hub model" (a model in the Hugging Face hub cache, where `-m org/name` finds it offline)
    size_mb: float
    source: str | None  # the GGUF file it was made from, when recorded; the hub cache's folder for a hub model


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cache_entries() -> list[CacheEntry]:
    folder = models.cache_root() / "gguf"
    entries = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith("."):  # locks and unfinished temporaries
            continue
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            try:
                source = json.loads((path / models.CACHE_MARKER).read_text()).get("source")
            except (OSError, ValueError):
                source = None
            entries.append(CacheEntry(path.name, "safetensors", round(size / 2**20, 1), source))
        elif path.suffix == ".gguf":
            try:  # the file it was converted from, in a marker beside it
                source = json.loads(path.with_suffix(".json").read_text()).get("source")
            except (OSError, ValueError):
                source = None
            entries.append(CacheEntry(path.name, "F16 GGUF", round(path.stat().st_size / 2**20, 1), source))
    return entries


def hub_entries() -> list[CacheEntry]:
    """The models in the Hugging Face hub cache (HF_HUB_CACHE), each under its repository id. They are
    listed, not managed: `hf cache rm` removes them."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    try:  # the folder transformers reads (scan_cache_dir's own default is fixed when it is imported)
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, CorruptedCacheException, OSError, ValueError):  # none, or a file in its place
        return []
    return [CacheEntry(repo.repo_id, "hub model", round(repo.size_on_disk / 2**20, 1), str(cache.cache_dir))
            for repo in sorted(cache.repos, key=lambda repo: repo.repo_id) if repo.repo_type == "model"]


def remove_cache_entries(name: str | None, everything: bool) -> list[str]:
    """Remove one entry by name (or a unique prefix of it), or all with `everything`; returns the names."""
    if (name is None) == (not everything):
        raise UsageError("name one cache entry, or pass --all", "See the names with: llmcli cache list")
    entries = cache_entries()
    chosen = entries if everything else [e for e in entries if e.name == name] or \
        [e for e in entries if e.name.startswith(name or "")]
    if not everything and len(chosen) != 1:
        found = "no cache entry" if not chosen else f"{len(chosen)} cache entries"
        if not chosen and any(e.name == name for e in hub_entries()):
            raise UsageError(f"{name!r} is in the Hugging Face hub cache, which llmcli lists but does not manage",
                             f"Remove it with: hf cache rm model/{name}")
        raise UsageError(f"{found} named {name!r}", "See the names with: llmcli cache list")
    folder = models.cache_root() / "gguf"
    for entry in chosen:
        path = folder / entry.name
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
