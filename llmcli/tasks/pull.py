"""`llmcli pull`: download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN) into its cache, the one
thing llmcli does online.

Files land in huggingface_hub's cache layout (blobs named by their hash, snapshots of symlinks, refs), linked
there by `hf_hub_download` itself, so that transformers, llama.cpp's `-hf` and `hf cache` see them. The bytes
are fetched here rather than by `hf_hub_download` because huggingface_hub 2.5 downloads each file into a
process-unique temporary file that it deletes on failure: an interrupted pull would start over. Here a
partial file stays as `blobs/<etag>.incomplete` (the name `scan_cache_dir` reports as an interrupted
download), and the next pull continues it with a Range request. huggingface_hub checks only a file's size;
here every file is hashed as it arrives and compared with the hub's listing (sha256 for LFS files, the git
blob id for the others) before it is moved into place.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from llmcli import hub_cache
from llmcli.errors import DownloadError, UsageError
from llmcli.hub_cache import ModelSpec

CHUNK = 1 << 20
RETRIES = 3  # attempts in a row that bring no new byte before a pull gives up (the partial file is kept)
RETRY_DELAY = 1.0  # seconds before the first retry, doubled after each
# A transformers model's files: config, tokenizer, chat template, generation config, safetensors weights; at
# the top level, or in a sentence-transformers module folder (1_Pooling/). Not ONNX, TF, Flax, GGUF copies.
MODEL_FILES = re.compile(r"(\d+_\w+/|additional_chat_templates/)?[^/]+\.(json|safetensors|txt|model|jinja|tiktoken|py)")
PICKLE_FILES = re.compile(r"[^/]+\.(bin|pt|pth)|[^/]+\.bin\.index\.json")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")  # trainer state, not model


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # an LFS file's hash, from the hub's listing
    blob_id: str | None  # the git blob id (sha1 of "blob SIZE\0" + content) of a file kept in git


@dataclass
class PullResult:
    name: str  # what -m takes: org/name, or org/name:QUANT
    commit: str
    path: Path  # the snapshot folder, or the GGUF file (its first part when split)
    files: list[str]
    downloaded_bytes: int = 0
    resumed_from: dict[str, int] = field(default_factory=dict)  # file -> bytes already there from an earlier pull
    cached: list[str] = field(default_factory=list)  # files already in the cache


def pull(text: str, revision: str = "main", allow_pickle: bool = False,
         on_start: Callable[[int], None] = lambda total: None, on_advance: Callable[[int], None] = lambda n: None,
         on_notice: Callable[[str], None] = lambda message: None) -> PullResult:
    """Download the model `text` names (org/name or org/name:QUANT) at `revision`; returns what is now cached."""
    spec = hub_cache.parse_spec(text)
    check_online()
    listing, commit = list_repository(spec.repo, revision)
    spec, chosen = choose_files(spec, listing, allow_pickle)
    if spec.quant and not text.partition(":")[2]:
        on_notice(f"{spec.repo} is a repository of GGUF files: pulling {spec.quant}, as llama.cpp's -hf would "
                  f"(name another with {spec.repo}:QUANT; it has {', '.join(hub_cache.quantizations(list(listing)))}).")
    folder = hub_cache.repo_folder(spec.repo)
    blobs = folder / "blobs"
    result = PullResult(str(spec), commit, folder / "snapshots" / commit, [f.name for f in chosen])
    plan = [(f, resolve_metadata(spec.repo, f.name, commit)) for f in chosen]
    missing = [(f, meta) for f, meta in plan if not (blobs / meta.etag).is_file()]
    result.cached = [f.name for f, meta in plan if (blobs / meta.etag).is_file()]
    partial = {f.name: partial_size(blobs / f"{meta.etag}.incomplete", f.size) for f, meta in missing}
    needed = sum(f.size for f, _ in missing) - sum(partial.values())
    check_disk_space(blobs, needed)
    on_start(sum(f.size for f, _ in missing))
    on_advance(sum(partial.values()))
    for remote, meta in missing:
        result.resumed_from.update({remote.name: partial[remote.name]} if partial[remote.name] else {})
        result.downloaded_bytes += fetch_blob(remote, meta, blobs, on_advance)
    for remote, _ in plan:
        link_into_snapshot(spec.repo, remote.name, commit, blobs)
    if revision != commit:  # what -m REPO finds offline: written last, once every file is in place
        ref = folder / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    if spec.quant:
        result.path = result.path / chosen[0].name
    return result


def check_online() -> None:
    """pull is the one command that goes online, but a user's HF_HUB_OFFLINE=1 still wins."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set, so pull may not download", "Run it with HF_HUB_OFFLINE=0.")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def network_error(exc: Exception) -> DownloadError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DownloadError(f"cannot reach the hub at {endpoint()} ({reason})",
                         "Check the network connection, or HF_ENDPOINT if you use a mirror.")


def list_repository(repo: str, revision: str) -> tuple[dict[str, RemoteFile], str]:
    """The repository's files at `revision`, with their sizes and hashes (the hub's model info with
    blobs=True), and the commit it names."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError as exc:
        raise DownloadError(f"{repo} is gated: its terms must be accepted on the hub first",
                            "Accept them on the model's page, then set HF_TOKEN to a token of that account.") from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"no repository {repo} on {endpoint()} (or it is private)",
                            "Check the name (org/name); for a private model set HF_TOKEN.") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo} has no revision {revision!r}",
                            "Check --revision (a branch, tag or commit).") from exc
    except HfHubHTTPError as exc:
        raise DownloadError(f"the hub at {endpoint()} answered {exc.response.status_code} for {repo}",
                            "Try again later.") from exc
    except httpx2.TransportError as exc:
        raise network_error(exc) from exc
    files = {s.rfilename: RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size or 0,
                                     s.lfs.sha256 if s.lfs else None, s.blob_id) for s in info.siblings or []}
    return files, info.sha


def choose_files(spec: ModelSpec, listing: dict[str, RemoteFile],
                 allow_pickle: bool) -> tuple[ModelSpec, list[RemoteFile]]:
    """The files a model needs: the GGUF model `spec.quant` names, or a transformers model's files with
    safetensors weights (pickles only with allow_pickle, and only when there are no safetensors)."""
    names = list(listing)
    ggufs = [name for name in names if hub_cache.is_model_gguf(name)]
    if spec.quant is None and "config.json" not in listing and ggufs:  # a GGUF repository: llama.cpp's default
        spec = ModelSpec(spec.repo, hub_cache.split_info(hub_cache.pick_gguf(names, None)[0])[1])
    if spec.quant is not None:
        if not ggufs:
            raise DownloadError(f"{spec.repo} has no GGUF files, so :{spec.quant} names nothing",
                                f"Pull its transformers model with: llmcli pull {spec.repo}")
        chosen = hub_cache.pick_gguf(names, spec.quant)
        if not chosen:
            raise DownloadError(f"{spec.repo} has no GGUF file of quantization {spec.quant}",
                                f"It has: {', '.join(hub_cache.quantizations(names))}.")
        return spec, [listing[name] for name in chosen]
    if "config.json" not in listing:
        raise DownloadError(f"{spec.repo} has no config.json and no .gguf file, so it is not a model llmcli runs",
                            "Check the repository name.")
    chosen = [name for name in names if MODEL_FILES.fullmatch(name) and not name.endswith(".bin.index.json")]
    if not any(name.endswith(".safetensors") for name in chosen):
        pickles = [name for name in names if PICKLE_FILES.fullmatch(name) and name not in NOT_WEIGHTS]
        if pickles and not allow_pickle:
            raise DownloadError(f"{spec.repo} has only pickle weights ({pickles[0]}), which can run code when loaded",
                                f"Pass --allow-pickle if you trust its authors: llmcli pull {spec.repo} --allow-pickle")
        chosen += pickles
    return spec, [listing[name] for name in chosen]


def resolve_metadata(repo: str, filename: str, commit: str) -> Any:
    """The HEAD of the file's resolve URL: the etag huggingface_hub names its blob by, and where to GET it."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo, filename, revision=commit, endpoint=endpoint())
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint())
    except HfHubHTTPError as exc:
        raise DownloadError(f"the hub at {endpoint()} answered {exc.response.status_code} for {repo}/{filename}",
                            "Try again later.") from exc
    except httpx2.TransportError as exc:
        raise network_error(exc) from exc
    if not meta.etag:
        raise DownloadError(f"{endpoint()} gave no ETag for {repo}/{filename}, so it is not a hub endpoint",
                            "Check HF_ENDPOINT.")
    return meta


def partial_size(part: Path, size: int) -> int:
    """Bytes an earlier pull left of a file (0 if none, or more than the file: then it is started again)."""
    have = part.stat().st_size if part.is_file() else 0
    return have if have <= size else 0


def check_disk_space(folder: Path, needed: int) -> None:
    probe = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    if needed > free:
        from llmcli.render import human_size

        raise DownloadError(f"the download needs {human_size(needed)} but {probe} has {human_size(free)} free",
                            "Free some space, or set HF_HOME (or HF_HUB_CACHE) to a larger disk.")


def fetch_blob(remote: RemoteFile, meta: Any, blobs: Path, on_advance: Callable[[int], None]) -> int:
    """Download one file to blobs/<etag>, continuing blobs/<etag>.incomplete, hashed as it arrives; returns the
    bytes fetched. The partial file is kept on a network or disk error (the next pull continues it) and
    deleted when the finished file's hash is not the hub's."""
    from huggingface_hub.utils import WeakFileLock

    blobs.mkdir(parents=True, exist_ok=True)
    blob, part = blobs / meta.etag, blobs / f"{meta.etag}.incomplete"
    lock = hub_cache.hub_cache_dir() / ".locks" / blobs.parent.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the lock hf_hub_download takes: one download of a blob at a time
        if blob.is_file():  # another process finished it while this one waited
            return 0
        try:
            fetched = download_resuming(meta.location, part, remote, on_advance)
        except OSError as exc:
            raise DownloadError(f"cannot write {part} ({exc.strerror or exc})",
                                "Free some space or fix the folder's permissions, then pull again: the "
                                "download continues where it stopped.") from exc
        part.replace(blob)
    return fetched


def new_hasher(remote: RemoteFile) -> Any:
    if remote.sha256:
        return hashlib.sha256()
    hasher = hashlib.sha1()  # git's blob id: the content after a "blob SIZE\0" header
    hasher.update(f"blob {remote.size}\0".encode())
    return hasher


def download_resuming(url: str, part: Path, remote: RemoteFile, on_advance: Callable[[int], None]) -> int:
    """GET `url` into `part` from the bytes it already holds (a Range request), retrying a dropped connection
    while it brings new bytes; then compare the whole file's hash with the hub's listing."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    have = partial_size(part, remote.size)
    hasher = new_hasher(remote)
    with part.open("r+b" if part.exists() else "w+b") as out:
        out.truncate(have)
        while chunk := out.read(CHUNK):  # the bytes of an earlier pull count in the hash too
            hasher.update(chunk)
        fetched, idle_tries = 0, 0
        while have < remote.size:
            error = None
            try:
                range_honoured = stream_into(url, out, have, remote, hasher, on_advance)
            except httpx2.TransportError as exc:  # a cut connection: the bytes written so far stay
                range_honoured, error = True, exc
            except HfHubHTTPError as exc:
                raise DownloadError(f"the hub at {endpoint()} answered {exc.response.status_code} for {remote.name}",
                                    "Try again later: the next pull continues where this one stopped.") from exc
            if not range_honoured:  # the server sent the whole file from its start: so does the hash
                out.seek(0)
                out.truncate(0)
                on_advance(-have)
                hasher, have = new_hasher(remote), 0
                continue
            got = out.tell() - have
            have, fetched = have + got, fetched + got
            idle_tries = 0 if got else idle_tries + 1
            if have < remote.size and idle_tries >= RETRIES:
                from llmcli.render import human_size

                why = f" ({error})" if error else ""
                raise DownloadError(f"the connection to {endpoint()} failed {RETRIES} times while downloading "
                                    f"{remote.name}, at {human_size(have)} of {human_size(remote.size)}{why}",
                                    "Run the same pull again: it continues where it stopped.")
            if have < remote.size and idle_tries:
                time.sleep(RETRY_DELAY * 2 ** (idle_tries - 1))
    expected = remote.sha256 or remote.blob_id
    if hasher.hexdigest() != expected:
        part.unlink()
        kind = "sha256" if remote.sha256 else "git blob id"
        raise DownloadError(f"{remote.name} arrived with {kind} {hasher.hexdigest()}, but the hub lists {expected}; "
                            "the file was deleted", "Pull again; if it happens again, the mirror or a proxy alters it.")
    return fetched


def stream_into(url: str, out: Any, have: int, remote: RemoteFile, hasher: Any,
                on_advance: Callable[[int], None]) -> bool:
    """One GET from byte `have`, written to `out` and hashed (never past the listed size: a longer file fails
    its hash anyway); False, with nothing written, if the server sent the whole file for a Range request."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # the bytes as the hash was taken of them
    if urlparse(url).netloc != urlparse(endpoint()).netloc:  # a CDN's signed URL: the token stays with the hub
        headers.pop("authorization", None)
        headers.pop("Authorization", None)
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        if have and response.status_code != 206:
            return False
        for chunk in response.iter_bytes():  # as they arrive: iter_bytes(n) would lose a cut connection's last < n
            chunk = chunk[: remote.size - out.tell()]
            out.write(chunk)
            hasher.update(chunk)
            on_advance(len(chunk))
    return True


def link_into_snapshot(repo: str, filename: str, commit: str, blobs: Path) -> None:
    """hf_hub_download links the blob (already in place) into snapshots/<commit>/, as it would have
    after downloading it itself."""
    import httpx2
    from huggingface_hub import hf_hub_download

    try:
        pointer = hf_hub_download(repo, filename, revision=commit, endpoint=endpoint(),
                                  cache_dir=hub_cache.hub_cache_dir())
    except httpx2.TransportError as exc:
        raise network_error(exc) from exc
    if Path(pointer).resolve().parent != blobs.resolve():
        raise DownloadError(f"{repo}/{filename} was not linked to its verified download",
                            "Pull again; if it happens again, report it.")
