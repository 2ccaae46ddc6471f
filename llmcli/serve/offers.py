"""Which models a server offers: `-m` (repeatable), `--models-dir DIR` and `--models FILE` (TOML) become
a list of `Offer`s, checked at startup without loading anything. The router (router.py) loads them.

A models file is a TOML array of tables, one per model:

    [[model]]
    name = "chat"                 # the id clients send (default: the file or directory name)
    model = "models/qwen.gguf"    # what -m takes: a .gguf file, a directory, an adapter, a hub id
    engine = "llama.cpp"          # auto (default), hf, llama.cpp
    ctx_size = 4096               # llama.cpp: KV-cache tokens (serve's --ctx-size)
    parallel = 4                  # llama.cpp: sequences decoded together (serve's --parallel)
    threads = 4
    keep_alive = "10m"            # how long it stays loaded while idle (-1: always, 0: unloaded at once)
    aliases = ["qwen"]            # other names clients may send
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmcli.errors import UsageError

FOREVER = math.inf  # a keep-alive of -1: never unloaded while the server runs


@dataclass(frozen=True)
class Offer:
    """A model the server offers; what to load and how, read before anything is loaded."""

    name: str  # the id /v1/models lists and requests send
    model: str | None  # the -m value (None: the embedded model)
    engine: str = "auto"
    ctx_size: int | None = None
    parallel: int | None = None
    threads: int | None = None
    keep_alive: float | None = None  # seconds idle before it unloads; None: the server's --keep-alive
    aliases: frozenset[str] = frozenset()
    parent: str | None = None  # an adapter's base model (vLLM's field); None for a model of its own
    # serve --adapter NAME=DIR: a LoRA adapter run per request on its parent's engine (the offered model
    # `parent` names), which loads it beside the base; other adapters load merged, as -m ADAPTER_DIR does
    on_parent: bool = False

    @property
    def adapter(self) -> bool:
        return self.parent is not None


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_keep_alive(value: str | float | int, what: str = "--keep-alive") -> float:
    """ollama's keep_alive: a number of seconds, or a duration such as 30s, 5m, 1h30m; any negative value
    keeps the model loaded (FOREVER), 0 unloads it as soon as it is idle."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return FOREVER if value < 0 else float(value)
    text = str(value).strip()
    if text.startswith("-"):
        return FOREVER
    try:
        return float(text)
    except ValueError:
        pass
    parts = DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise UsageError(f"{what} {value!r} is not a duration", "Use seconds or a duration such as 30s, 5m, 1h "
                         "(-1: keep loaded, 0: unload when idle).")
    return sum(float(number) * UNITS[unit] for number, unit in parts)


def offer_for(model: str | None, name: str | None = None, **options: Any) -> Offer:
    """An Offer for a -m value, named as a server running it alone names it (serve.model_id)."""
    from llmcli.models import resolve_model
    from llmcli.serve import source_aliases, source_id

    source = resolve_model(model)  # a missing file or directory is an error now, not at the first request
    own = source_id(source)
    parent = adapter_base(Path(source.location)) if source.kind == "adapter" else None
    aliases = source_aliases(source) | ({model} if model else set()) | ({Path(own).stem} if source.kind == "gguf" else set())
    return Offer(name=name or own, model=model, parent=parent, aliases=frozenset(aliases) - {name or own},
                 **options)


def adapter_base(directory: Path) -> str:
    return json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path") or "unknown"


def offers_in_directory(directory: str) -> list[Offer]:
    """Every .gguf file and model directory (config.json) or adapter directory (adapter_config.json) in
    `directory`, by name; anything else there is left alone."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UsageError(f"--models-dir {directory} is not a directory", "Pass a folder of .gguf files and models.")
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and any(
                (path / marker).is_file() for marker in ("config.json", "adapter_config.json"))):
            found.append(offer_for(str(path)))
    if not found:
        raise UsageError(f"--models-dir {directory} holds no .gguf file and no model directory",
                         "Put models there, or pass -m.")
    return found


KEYS = {"name", "model", "engine", "ctx_size", "parallel", "threads", "keep_alive", "aliases"}


def offers_in_file(path: str) -> list[Offer]:
    """The models of a --models TOML file (see the module's docstring)."""
    import tomllib

    try:
        tables = tomllib.loads(Path(path).expanduser().read_text(encoding="utf-8")).get("model")
    except OSError as exc:
        raise UsageError(f"cannot read --models {path}: {exc.strerror}", "Pass a TOML file of [[model]] tables.")
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--models {path}: {exc}", "Fix the TOML.") from None
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"--models {path} has no [[model]] table", "Add one per model: [[model]] model = \"...\"")
    offers = []
    for number, table in enumerate(tables, 1):
        where = f"--models {path} model {number}"
        unknown = sorted(set(table) - KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}", f"Use {', '.join(sorted(KEYS))}.")
        if not isinstance(table.get("model"), str):
            raise UsageError(f"{where}: no model", "Set model = \"a .gguf file, a directory or a hub id\".")
        for key in ("ctx_size", "parallel", "threads"):
            if key in table and (not isinstance(table[key], int) or table[key] < 1):
                raise UsageError(f"{where}: {key} must be a whole number of at least 1, got {table[key]!r}")
        if table.get("engine", "auto") not in ("auto", "hf", "llama.cpp"):
            raise UsageError(f"{where}: unknown engine {table['engine']!r}", "Use auto, hf or llama.cpp.")
        options = {key: table[key] for key in ("engine", "ctx_size", "parallel", "threads") if key in table}
        if "keep_alive" in table:
            options["keep_alive"] = parse_keep_alive(table["keep_alive"], f"{where}: keep_alive")
        offer = offer_for(table["model"], table.get("name"), **options)
        aliases = table.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(alias, str) for alias in aliases):
            raise UsageError(f"{where}: aliases must be a list of names")
        offers.append(replace(offer, aliases=offer.aliases | set(aliases)))
    return offers


def check_names(offers: list[Offer]) -> None:
    """Two models under one name would make a request ambiguous."""
    seen: dict[str, str] = {}
    for offer in offers:
        if offer.name in seen:
            raise UsageError(f"two models are named {offer.name!r} ({seen[offer.name]} and {offer.model})",
                             "Give one of them another name in the --models file.")
        seen[offer.name] = offer.model
