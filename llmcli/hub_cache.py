"""What `llmcli pull` leaves in the Hugging Face hub cache, read offline: `REPO:QUANT` names, which GGUF file a
quantization names (llama.cpp's `-hf repo:quant` rule), the pulled models `cache list` shows, and removing them.

The cache is huggingface_hub's own layout (models--org--name/blobs, refs, snapshots of symlinks), so
transformers, llama.cpp's `-hf` and `hf cache` find the same files. Nothing here goes online.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmcli.errors import ModelNotFound, UsageError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)  # model-00001-of-00003.gguf
TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)  # model.Q4_K_M.gguf, model-q8_0.gguf
NOT_A_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")  # llama.cpp's sidecar files
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")  # what llama.cpp's -hf and ollama pick when no quantization is named


@dataclass(frozen=True)
class ModelSpec:
    repo: str
    quant: str | None  # None: a transformers repository (or llama.cpp's default quantization)

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_spec(text: str) -> ModelSpec:
    """`org/name` or `org/name:Q4_K_M`, as llama.cpp's `-hf` and ollama's `hf.co/...` take them."""
    repo, colon, quant = text.partition(":")
    if not REPO_ID.fullmatch(repo) or ".." in repo or (colon and not re.fullmatch(r"[\w.-]+", quant)):
        raise UsageError(f"{text!r} is not a hub repository (org/name) or org/name:QUANT",
                         "For example: llmcli pull HuggingFaceTB/SmolLM2-135M-Instruct, or "
                         "llmcli pull bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    return ModelSpec(repo, quant.upper() or None)  # upper-cased, as `cache list` shows quantizations


def looks_like_spec(text: str) -> bool:
    """`org/name:QUANT`, which no path or plain hub id looks like (a path was tried first)."""
    repo, colon, quant = text.partition(":")
    return bool(colon) and REPO_ID.fullmatch(repo) is not None and re.fullmatch(r"[\w.-]+", quant) is not None


# ---------------------------------------------------------------- GGUF names, as llama.cpp reads them


def split_info(path: str) -> tuple[str, str, int, int]:
    """(prefix, TAG, index, count) of a GGUF file name, as llama.cpp's get_gguf_split_info: the tag is the
    last [-.]WORD before `.gguf` (and before a -0000i-of-0000n split suffix), upper-cased."""
    prefix = path[: -len(".gguf")] if path.lower().endswith(".gguf") else path
    index = count = 1
    if match := SPLIT.match(prefix):
        prefix, index, count = match.group(1), int(match.group(2)), int(match.group(3))
    tag = TAG.search(prefix)
    return prefix, tag.group(1).upper() if tag else "", index, count


def is_model_gguf(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(word in name for word in NOT_A_MODEL)


def pick_gguf(files: list[str], quant: str | None) -> list[str]:
    """The files of the GGUF model that `quant` names among a repository's `files` (in the hub's order): the
    first model file whose path contains QUANT followed by `.` or `-`, case-insensitively, with all its
    split parts; without a quant, Q4_K_M, then Q8_0, then the first model file. As llama.cpp's
    common/download.cpp find_best_model and get_split_files do. Empty when nothing matches."""
    models = [(path, split_info(path)) for path in files if is_model_gguf(path)]
    for tag in [quant] if quant else [*DEFAULT_TAGS, None]:
        pattern = re.compile(re.escape(tag) + r"[.-]", re.IGNORECASE) if tag else None
        for path, (prefix, _, index, count) in models:
            if index == 1 and (pattern is None or pattern.search(path)):
                return [f for f, (p, _, _, c) in models if p == prefix and c == count] if count > 1 else [path]
    return []


def quantizations(files: list[str]) -> list[str]:
    """The quantizations a repository's GGUF files offer (Q4_K_M, Q8_0, ...), for an error message."""
    return sorted({split_info(f)[1] for f in files if is_model_gguf(f) and split_info(f)[1]})


# ---------------------------------------------------------------- the cache, offline


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder (HF_HUB_CACHE, or HF_HOME/hub), read when called."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path:
    return hub_cache_dir() / ("models--" + repo.replace("/", "--"))


def snapshot_files(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def snapshots(repo: str) -> list[Path]:
    """The repository's pulled snapshots, the one refs/main names first, then the newest."""
    folder = repo_folder(repo)
    found = sorted((p for p in (folder / "snapshots").glob("*") if p.is_dir()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    main = folder / "refs" / "main"
    commit = main.read_text().strip() if main.is_file() else None
    return sorted(found, key=lambda p: p.name != commit)


def has_transformers_model(repo: str) -> bool:
    """The snapshot refs/main names holds a config.json (a transformers model was pulled)."""
    main = repo_folder(repo) / "refs" / "main"
    return main.is_file() and (repo_folder(repo) / "snapshots" / main.read_text().strip() / "config.json").is_file()


def cached_gguf(spec: ModelSpec) -> Path | None:
    """The first file of the pulled GGUF model that `spec` names (llama.cpp opens the other split parts
    beside it), or None. Offline."""
    for snapshot in snapshots(spec.repo):
        chosen = pick_gguf(snapshot_files(snapshot), spec.quant)
        if chosen and all((snapshot / name).is_file() for name in chosen):
            return snapshot / chosen[0]
    return None


def pulled_ggufs(repo: str) -> list[str]:
    """`REPO:QUANT` for every GGUF model of a repository in the cache."""
    return sorted({f"{repo}:{split_info(name)[1]}" for snapshot in snapshots(repo) for name in snapshot_files(snapshot)
                   if is_model_gguf(name) and split_info(name)[1]})


def not_pulled(spec: ModelSpec) -> ModelNotFound:
    others = pulled_ggufs(spec.repo)
    also = f" (pulled: {', '.join(others)})" if others else ""
    return ModelNotFound(f"{spec} is not in the Hugging Face cache{also}", f"Download it with: llmcli pull {spec}")


@dataclass
class PulledModel:
    name: str  # org/name for a transformers repository, org/name:QUANT for a GGUF file
    kind: str  # "hub model" | "hub GGUF" | "partial download" (an interrupted first pull)
    size_bytes: int
    files: list[Path]  # the snapshot entries (symlinks to blobs) that make it up


def pulled_models() -> list[PulledModel]:
    """The models in the hub cache: each repository's GGUF models by quantization, the rest of a
    repository (a transformers model) under its id."""
    found = []
    for folder in sorted(hub_cache_dir().glob("models--*")):
        repo = folder.name.removeprefix("models--").replace("--", "/")
        ggufs: dict[str, list[Path]] = {}
        rest: list[Path] = []
        for snapshot in snapshots(repo):
            for name in snapshot_files(snapshot):
                tag = split_info(name)[1] if is_model_gguf(name) else ""
                (ggufs.setdefault(f"{repo}:{tag}", []) if tag else rest).append(snapshot / name)
        for name, files in sorted(ggufs.items()):
            found.append(PulledModel(name, "hub GGUF", blobs_size(files), files))
        partial = sorted((folder / "blobs").glob("*.incomplete"))
        if rest or not ggufs:
            kind = "partial download" if partial and not rest else "hub model"  # a pull to run again (or cache rm)
            found.append(PulledModel(repo, kind, blobs_size(rest or partial), rest))
    return found


def blobs_size(files: list[Path]) -> int:
    """Each blob once, however many snapshots link to it."""
    blobs = {f.resolve() for f in files}
    return sum(b.stat().st_size for b in blobs if b.is_file())


def remove_pulled(name: str) -> str | None:
    """Remove a pulled model: `org/name` the whole repository, `org/name:QUANT` that GGUF model's files (and
    their blobs when nothing else links to them). None when the cache has no such model."""
    spec = parse_spec(name)
    folder = repo_folder(spec.repo)
    if not folder.is_dir():
        return None
    if spec.quant is None:
        shutil.rmtree(folder)
        shutil.rmtree(hub_cache_dir() / ".locks" / folder.name, ignore_errors=True)
        return spec.repo
    removed = [m for m in pulled_models() if m.kind == "hub GGUF" and m.name.lower() == str(spec).lower()]
    if not removed:
        return None
    links = removed[0].files
    blobs = {link.resolve() for link in links}
    for link in links:
        link.unlink()
    still_linked = {p.resolve() for p in (folder / "snapshots").rglob("*") if p.is_symlink()}
    for blob in blobs - still_linked:
        if blob.parent == folder / "blobs":
            blob.unlink(missing_ok=True)
    return removed[0].name
