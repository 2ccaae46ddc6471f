"""LoRA adapters on the llama.cpp engine: a peft adapter directory runs as its base GGUF with the adapter's
GGUF applied by llama.cpp at run time (as `llama-cli -m BASE --lora ADAPTER` does), not merged, so one
loaded base serves the base model and any of its adapters.

Both GGUFs are made once into the cache, as the engine's other conversions: the adapter's by
`llmcli export --adapter` (F32: its factors are small, and no rounding is added), a base that is a
Hugging Face directory by `llmcli export` (F16, as llama.cpp's converter writes a full model).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

from llmcli import models

ADAPTER_FORMAT = 1  # the cached adapter file's own version


def adapter_base_source(adapter: models.ModelSource) -> models.ModelSource:
    return models.resolve_model(models.adapter_base(adapter.location))


def directory_key(directory: Path, patterns: tuple[str, ...]) -> str:
    """16 hex digits over the content keys of a directory's files matching `patterns`."""
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(directory.glob(pattern)):
            digest.update(f"{path.name}:{models.content_key(path)}".encode())
    return digest.hexdigest()[:16]


def cached_conversion(target: Path, source: Path, what: str, write: Callable[[Path], Any],
                      on_notice: Callable[[str], None]) -> Path:
    """`target` in the cache, written once by `write(temporary)` under a lock and renamed into place."""
    if target.is_file():
        return target
    lock = models.acquire_conversion_lock(target)
    try:
        if target.is_file():  # another process finished it while we waited
            return target
        on_notice(f"Converting {source.name} for llama.cpp once: {what}.")
        temporary = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            write(temporary)
            target.with_suffix(".json").write_text(json.dumps({"source": str(source.resolve())}))  # for cache list
            temporary.rename(target)
        finally:
            temporary.unlink(missing_ok=True)
    finally:
        lock.close()
    models.announce_cache_entry(target, f"The llama.cpp {what} of {source.name}")
    return target


def adapter_gguf(adapter: models.ModelSource, on_notice: Callable[[str], None]) -> Path:
    """The adapter directory's LoRA GGUF, exported once into the cache."""
    from llmcli.tasks.export_adapter import export_adapter

    directory = Path(adapter.location)
    key = directory_key(directory, ("adapter_config.json", "adapter_model.safetensors"))
    target = models.cache_root() / "gguf" / f"{directory.name}-{key}-v{ADAPTER_FORMAT}.lora-F32.gguf"
    return cached_conversion(target, directory, "LoRA adapter GGUF",
                             lambda path: export_adapter(str(directory), str(path), "f32"), on_notice)


def base_gguf(base: models.ModelSource, on_notice: Callable[[str], None]) -> models.ModelSource:
    """The adapter's base as a GGUF source: itself, or a Hugging Face directory exported once to F16."""
    from llmcli.errors import UsageError

    if base.kind == "gguf":
        return base
    if base.kind != "dir":
        raise UsageError(f"the llama.cpp engine runs an adapter on a .gguf or local model directory base, and its "
                         f"base is {base.name}", "Use --engine hf, or export the base and point the adapter at it.")
    from llmcli.tasks.export import export

    directory = Path(base.location)
    key = directory_key(directory, ("config.json", "*.safetensors", "tokenizer*.json"))
    target = models.cache_root() / "gguf" / f"{directory.name}-{key}.export-F16.gguf"
    cached_conversion(target, directory, "F16 GGUF export",
                      lambda path: export(str(directory), str(path), "f16", overwrite=True), on_notice)
    return models.ModelSource("gguf", str(target), base.name)
