"""`llmcli pull` against a local server that speaks the Hugging Face hub's download API: the model info with
file hashes, HEAD and GET on /{repo}/resolve/{revision}/{file}, LFS files redirected to a "CDN" host
(127.0.0.2 instead of 127.0.0.1, as the hub sends them to another host) that honours Range requests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import default_sigint, run_cli, write_tiny_gguf

COMMIT = "a" * 40
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories in memory, and what the client asked for."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.auth: list[tuple[str, str, str | None]] = []  # ("hub" or "cdn", path, Authorization header)
        self.drop_after: dict[str, int] = {}  # file name -> bytes sent before the connection is cut, once
        self.broken: set[str] = set()  # files whose every GET is cut before any byte
        self.break_after_drop: set[str] = set()  # files that are broken once a GET of them was cut
        self.slow: set[str] = set()  # files sent 64 KiB at a time, 50 ms apart
        self.corrupt: set[str] = set()  # files served with a byte changed (the listing keeps the true hash)
        # the hub, and its "CDN" on another address (Linux routes all of 127.0.0.0/8 to the loopback)
        self.servers = [ThreadingHTTPServer((host, 0), self.handler()) for host in ("127.0.0.1", "127.0.0.2")]
        self.url = f"http://127.0.0.1:{self.servers[0].server_port}"
        self.cdn = f"http://127.0.0.2:{self.servers[1].server_port}/cdn"
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def file(self, sha256: str) -> tuple[str, bytes]:
        return next((name, data) for files in self.repos.values() for name, data in files.items()
                    if hashlib.sha256(data).hexdigest() == sha256)

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file's bytes."""
        sha = next(hashlib.sha256(data).hexdigest() for files in self.repos.values()
                   for n, data in files.items() if n == name)
        return [rng for method, path, rng in self.requests if method == "GET" and path == f"/cdn/{sha}"]

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, status, headers, data=b"", body=True):
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def not_found(self, code, body):
                self.send(404, {"X-Error-Code": code, "Content-Type": "application/json"},
                          json.dumps({"error": code}).encode(), body)

            def answer(self, body):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                where = "cdn" if self.server is hub.servers[1] else "hub"
                hub.auth.append((where, path, self.headers.get("Authorization")))
                if path.startswith("/api/models/"):
                    return self.model_info(path.removeprefix("/api/models/"), body)
                if path.startswith("/cdn/"):
                    return self.cdn_file(path.removeprefix("/cdn/"), body)
                org, name, kind, revision, filename = (path.lstrip("/").split("/", 4) + [""] * 5)[:5]
                files = hub.repos.get(f"{org}/{name}")
                if kind != "resolve" or files is None:
                    return self.not_found("RepoNotFound", body)
                if filename not in files:
                    return self.not_found("EntryNotFound", body)
                data = files[filename]
                headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
                if filename.endswith(LFS_SUFFIXES):  # LFS: the hash in X-Linked-Etag, the bytes on the CDN
                    sha = hashlib.sha256(data).hexdigest()
                    headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                    "ETag": '"pointer"', "Location": f"{hub.cdn}/{sha}"})
                    return self.send(302, headers, b"", body)
                return self.send(200, {**headers, "ETag": f'"{git_blob_id(data)}"'}, data, body)

            def model_info(self, rest, body):
                repo, _, revision = rest.partition("/revision/")
                if repo not in hub.repos:
                    return self.not_found("RepoNotFound", body)
                if revision not in ("main", COMMIT):
                    return self.not_found("RevisionNotFound", body)
                siblings = [{"rfilename": name, "size": len(data), "blobId": git_blob_id(data),
                             **({"lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                         "pointerSize": 134}} if name.endswith(LFS_SUFFIXES) else {})}
                            for name, data in hub.repos[repo].items()]
                info = {"id": repo, "sha": COMMIT, "private": False, "siblings": siblings}
                self.send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

            def cdn_file(self, sha, body):
                name, data = hub.file(sha)
                if name in hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                asked = self.headers.get("Range")
                start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
                if body and name in hub.broken:
                    self.close_connection = True
                    return self.connection.shutdown(2)
                status, headers = (200, {})
                if start:
                    status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                part = data[start:]
                if body and name in hub.slow:
                    return self.trickle(status, headers, part)
                if not body or name not in hub.drop_after:
                    return self.send(status, {**headers, "Accept-Ranges": "bytes"}, part, body)
                cut = hub.drop_after.pop(name)  # the whole length announced, then the connection cut
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(part))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(part[:cut])
                self.wfile.flush()
                if name in hub.break_after_drop:
                    hub.broken.add(name)
                self.close_connection = True
                self.connection.shutdown(2)

            def trickle(self, status, headers, part):
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(part))}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    for at in range(0, len(part), 1 << 16):
                        self.wfile.write(part[at:at + (1 << 16)])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client went away
                    self.close_connection = True

        return Handler

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def second_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-b") / "other.gguf", 256, seed=1)


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_llama, tiny_gguf, second_gguf):
    """A fake hub with a transformers repository (the tiny Llama, with a pickle and an ONNX copy that pull
    must skip) and a repository of GGUFs; huggingface_hub pointed at it and at a fresh cache."""
    from huggingface_hub import constants

    fake = FakeHub()
    llama = {p.name: p.read_bytes() for p in sorted(tiny_llama.iterdir()) if p.is_file()}
    fake.repos["org/tiny-llama"] = {**llama, "pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx",
                                    "README.md": b"# tiny"}
    fake.repos["org/tiny-GGUF"] = {"README.md": b"# ggufs", "tiny.Q4_K_M.gguf": second_gguf.read_bytes(),
                                   "tiny-q8_0.gguf": tiny_gguf.read_bytes(),
                                   "mmproj-tiny-Q8_0.gguf": b"GGUF not a model"}
    point_hub_at(monkeypatch, fake.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("llmcli.tasks.pull.RETRY_DELAY", 0.01)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.close()


def point_hub_at(monkeypatch, url: str) -> None:
    """HF_ENDPOINT, as huggingface_hub read it at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


def snapshot(tmp_path: Path, repo: str) -> Path:
    return tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT


def test_pull_a_transformers_model_then_generate_offline(hub, tmp_path, tiny_llama, monkeypatch):
    """The model's files arrive in the hub cache's layout (safetensors, not the pickle; no ONNX), and
    `generate -m org/name` reads them with the hub stopped, giving the local directory's text."""
    pulled = run_cli("pull", "org/tiny-llama")
    assert pulled.exit_code == 0, pulled.stderr
    files = sorted(p.name for p in snapshot(tmp_path, "org/tiny-llama").iterdir())
    assert files == sorted(p.name for p in tiny_llama.iterdir() if p.is_file())
    assert all(p.is_symlink() for p in snapshot(tmp_path, "org/tiny-llama").iterdir())
    assert (tmp_path / "hub" / "models--org--tiny-llama" / "refs" / "main").read_text() == COMMIT
    assert "Pulled org/tiny-llama (" in pulled.stderr
    again = run_cli("pull", "org/tiny-llama")  # nothing to fetch: no GET of a file's bytes
    assert again.exit_code == 0 and "already in the cache" in again.stderr
    hub.close()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    args = ("generate", "The license", "-n", "8", "--no-chat")
    from_cache, from_dir = run_cli(*args, "-m", "org/tiny-llama"), run_cli(*args, "-m", str(tiny_llama))
    assert from_cache.exit_code == 0, from_cache.stderr
    assert from_cache.stdout == from_dir.stdout and from_cache.stdout.strip()


def test_pull_a_quantization_then_generate(hub, tmp_path, tiny_gguf):
    """REPO:QUANT picks that GGUF file, case-insensitively, and not the mmproj beside it; `-m REPO:QUANT`
    finds it in the cache and answers as the file does."""
    pulled = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert pulled.exit_code == 0, pulled.stderr
    folder = snapshot(tmp_path, "org/tiny-GGUF")
    assert [p.name for p in folder.iterdir()] == ["tiny-q8_0.gguf"]
    assert (folder / "tiny-q8_0.gguf").read_bytes() == tiny_gguf.read_bytes()
    lower = run_cli("pull", "org/tiny-GGUF:q4_k_m")  # beside it: -m must still tell them apart
    assert lower.exit_code == 0 and "Pulled org/tiny-GGUF:Q4_K_M (1 file" in lower.stderr, lower.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-q8_0.gguf", "tiny.Q4_K_M.gguf"]
    args = ("generate", "The license", "-n", "8", "--no-chat")
    from_cache, from_file = run_cli(*args, "-m", "org/tiny-GGUF:q8_0"), run_cli(*args, "-m", str(tiny_gguf))
    assert from_cache.exit_code == 0, from_cache.stderr
    assert from_cache.stdout == from_file.stdout and from_cache.stdout.strip()


def test_a_dropped_connection_is_resumed_by_the_next_pull(hub, tmp_path, tiny_gguf):
    """The connection is cut after 1 MiB and every retry fails: the pull stops with one error and keeps the
    partial file under its .incomplete name; the next pull asks for the rest with a Range request."""
    hub.drop_after["tiny-q8_0.gguf"] = 1 << 20
    hub.break_after_drop.add("tiny-q8_0.gguf")
    failed = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert failed.exit_code == 2 and "Error:" in failed.stderr and "continues where it stopped" in failed.stderr
    blobs = tmp_path / "hub" / "models--org--tiny-GGUF" / "blobs"
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert (blobs / f"{sha}.incomplete").stat().st_size == 1 << 20
    assert not (blobs / sha).exists() and not snapshot(tmp_path, "org/tiny-GGUF").exists()
    listed = [(e["name"], e["kind"], e["size_bytes"]) for e in run_cli("cache", "list", "--json").json_lines()]
    assert ("org/tiny-GGUF", "partial download", 1 << 20) in listed
    hub.broken.clear()
    resumed = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert resumed.exit_code == 0, resumed.stderr
    assert hub.gets("tiny-q8_0.gguf")[-1] == f"bytes={1 << 20}-"
    assert "continuing 1.0 MB of an earlier pull" in resumed.stderr
    pulled = snapshot(tmp_path, "org/tiny-GGUF") / "tiny-q8_0.gguf"
    assert hashlib.sha256(pulled.read_bytes()).hexdigest() == sha
    assert not (blobs / f"{sha}.incomplete").exists()


def test_a_connection_cut_once_is_resumed_within_the_pull(hub, tmp_path, tiny_gguf):
    hub.drop_after["tiny-q8_0.gguf"] = 300_000
    pulled = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert pulled.exit_code == 0, pulled.stderr
    assert hub.gets("tiny-q8_0.gguf") == [None, "bytes=300000-"]
    assert (snapshot(tmp_path, "org/tiny-GGUF") / "tiny-q8_0.gguf").read_bytes() == tiny_gguf.read_bytes()


def test_a_wrong_hash_is_an_error_and_leaves_no_file(hub, tmp_path):
    hub.corrupt.add("tiny-q8_0.gguf")
    failed = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert failed.exit_code == 2
    assert "tiny-q8_0.gguf arrived with sha256" in failed.stderr and "the file was deleted" in failed.stderr
    folder = tmp_path / "hub" / "models--org--tiny-GGUF"
    assert not [p for p in folder.rglob("*") if p.is_file() and "blobs" in p.parts]
    assert run_cli("generate", "hi", "-m", "org/tiny-GGUF:Q8_0").stderr.count("llmcli pull org/tiny-GGUF:Q8_0") == 1


def test_pull_errors(hub, monkeypatch):
    """A missing repository, an unknown quantization (listing those there are), GGUF-less :QUANT, a bad
    revision, pickle-only weights, an unreachable hub: one Error line each, exit 2."""
    hub.repos["org/pickles"] = {"config.json": b"{}", "pytorch_model.bin": b"x", "training_args.bin": b"y"}
    cases = [
        (["org/nothing"], "no repository org/nothing on"),
        (["org/tiny-GGUF:Q5_K_M"], "org/tiny-GGUF has no GGUF file of quantization Q5_K_M"),
        (["org/tiny-llama:Q4_0"], "org/tiny-llama has no GGUF files, so :Q4_0 names nothing"),
        (["org/tiny-llama", "--revision", "v9"], "org/tiny-llama has no revision 'v9'"),
        (["org/pickles"], "org/pickles has only pickle weights (pytorch_model.bin)"),
        (["not a repo"], "'not a repo' is not a hub repository"),
    ]
    for args, message in cases:
        result = run_cli("pull", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr
    assert "It has: Q4_K_M, Q8_0." in run_cli("pull", "org/tiny-GGUF:Q5_K_M").stderr
    assert run_cli("pull", "org/pickles", "--allow-pickle").exit_code == 0
    point_hub_at(monkeypatch, "http://127.0.0.1:9")  # nothing listens there
    unreachable = run_cli("pull", "org/tiny-llama")
    assert unreachable.exit_code == 2 and "cannot reach the hub at http://127.0.0.1:9" in unreachable.stderr
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in run_cli("pull", "org/tiny-llama").stderr


def test_a_full_disk_is_an_error_before_downloading(hub, monkeypatch, tiny_gguf):
    from llmcli.render import human_size

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    full = run_cli("pull", "org/tiny-GGUF:Q8_0")
    assert full.exit_code == 2, full.stderr
    assert f"the download needs {human_size(tiny_gguf.stat().st_size)} but" in full.stderr
    assert "has 1000 B free" in full.stderr
    assert not hub.gets("tiny-q8_0.gguf")


def test_hf_token_goes_to_the_hub_and_not_to_the_cdn(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert run_cli("pull", "org/tiny-llama").exit_code == 0
    to_hub = [auth for host, path, auth in hub.auth if host == "hub"]
    to_cdn = [auth for host, path, auth in hub.auth if host == "cdn"]
    assert to_hub and set(to_hub) == {"Bearer hf_secret"}
    assert to_cdn and set(to_cdn) == {None}


def test_models_not_pulled_name_the_pull(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for model in ("org/tiny-GGUF:Q8_0", "org/tiny-llama"):
        result = run_cli("generate", "hi", "-m", model)
        assert result.exit_code == 2 and f"llmcli pull {model}" in result.stderr, result.stderr


def test_cache_list_and_rm_pulled_models(hub, tmp_path):
    assert run_cli("pull", "org/tiny-llama").exit_code == 0
    assert run_cli("pull", "org/tiny-GGUF:Q8_0").exit_code == 0
    default = run_cli("pull", "org/tiny-GGUF")  # no quantization: llama.cpp's default, Q4_K_M
    assert default.exit_code == 0 and "pulling Q4_K_M, as llama.cpp's -hf would" in default.stderr, default.stderr
    listed = {e["name"]: e for e in run_cli("cache", "list", "--json").json_lines()}
    assert {n: e["kind"] for n, e in listed.items() if "/" in n} == {
        "org/tiny-GGUF:Q4_K_M": "hub GGUF", "org/tiny-GGUF:Q8_0": "hub GGUF", "org/tiny-llama": "hub model"}
    q8 = snapshot(tmp_path, "org/tiny-GGUF") / "tiny-q8_0.gguf"
    assert listed["org/tiny-GGUF:Q8_0"]["size_bytes"] == q8.stat().st_size
    assert run_cli("cache", "rm", "org/tiny-GGUF:q8_0").exit_code == 0  # one quantization, its blob with it
    assert not q8.exists() and (snapshot(tmp_path, "org/tiny-GGUF") / "tiny.Q4_K_M.gguf").is_file()
    assert len(list((tmp_path / "hub" / "models--org--tiny-GGUF" / "blobs").iterdir())) == 1
    from llmcli.models import resolve_model

    assert resolve_model("org/tiny-GGUF").name == "org/tiny-GGUF:Q4_K_M"  # -m REPO of GGUFs: its Q4_K_M
    assert run_cli("cache", "rm", "org/tiny-llama").exit_code == 0
    assert not (tmp_path / "hub" / "models--org--tiny-llama").exists()
    names = [e["name"] for e in run_cli("cache", "list", "--json").json_lines()]
    assert "org/tiny-GGUF:Q4_K_M" in names and "org/tiny-llama" not in names
    missing = run_cli("cache", "rm", "org/tiny-llama")
    assert missing.exit_code == 2 and "no pulled model named 'org/tiny-llama'" in missing.stderr


def test_pick_gguf_follows_llama_cpp():
    """llama.cpp's rule (common/download.cpp find_best_model): QUANT then . or -, any case, the first
    split part with all its parts, sidecar files (mmproj, imatrix) never; no QUANT: Q4_K_M, then Q8_0."""
    from llmcli.hub_cache import pick_gguf, quantizations

    files = ["README.md", "mmproj-model-Q4_K_M.gguf", "model-IQ4_XS.gguf", "model-Q4_K_S.gguf",
             "Q8_0/model-Q8_0-00002-of-00002.gguf", "Q8_0/model-Q8_0-00001-of-00002.gguf", "model.q4_k_m.gguf"]
    assert pick_gguf(files, "q4_k_m") == ["model.q4_k_m.gguf"]
    assert pick_gguf(files, "Q4_K") == []  # Q4_K_M and Q4_K_S are other quantizations
    assert pick_gguf(files, "IQ4_XS") == ["model-IQ4_XS.gguf"]
    assert pick_gguf(files, "Q8_0") == ["Q8_0/model-Q8_0-00002-of-00002.gguf", "Q8_0/model-Q8_0-00001-of-00002.gguf"]
    assert pick_gguf(files, None) == ["model.q4_k_m.gguf"]
    assert pick_gguf(["a-F16.gguf", "a-Q8_0.gguf"], None) == ["a-Q8_0.gguf"]
    assert pick_gguf(["a-F16.gguf", "a-BF16.gguf"], None) == ["a-F16.gguf"]
    assert quantizations(files) == ["IQ4_XS", "Q4_K_M", "Q4_K_S", "Q8_0"]


def test_ctrl_c_keeps_the_partial_file_for_the_next_pull(hub, tmp_path, tiny_gguf):
    """In a fresh process that finds the hub through HF_ENDPOINT and the cache through HF_HOME, as a user's
    shell sets them: Ctrl-C mid-file exits 130 keeping the partial file; the next pull continues it."""
    hub.slow.add("tiny-q8_0.gguf")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "llmcli", "pull", "org/tiny-GGUF:Q8_0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    blobs = tmp_path / "home" / "hub" / "models--org--tiny-GGUF" / "blobs"
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    deadline = time.monotonic() + 60
    while not ((blobs / f"{sha}.incomplete").is_file() and (blobs / f"{sha}.incomplete").stat().st_size > 1 << 19):
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "The partial download is kept: the same pull continues it." in stderr and "Traceback" not in stderr
    kept = (blobs / f"{sha}.incomplete").stat().st_size
    assert 0 < kept < tiny_gguf.stat().st_size and not (blobs / sha).exists()
    hub.slow.clear()
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert hub.gets("tiny-q8_0.gguf")[-1] == f"bytes={kept}-"
    pulled = tmp_path / "home" / "hub" / "models--org--tiny-GGUF" / "snapshots" / COMMIT / "tiny-q8_0.gguf"
    assert pulled.read_bytes() == tiny_gguf.read_bytes()


def test_a_split_gguf_arrives_whole(hub, tmp_path):
    """A quantization split in parts (model-Q8_0-00001-of-00002.gguf, ...) is pulled whole; -m names it by its
    first part, beside which llama.cpp finds the others, and serve lists it as org/name:QUANT."""
    from types import SimpleNamespace

    from llmcli.models import resolve_model
    from llmcli.serve import model_id

    hub.repos["org/split-GGUF"] = {"Q8_0/m-Q8_0-00001-of-00002.gguf": b"GGUF part one",
                                   "Q8_0/m-Q8_0-00002-of-00002.gguf": b"GGUF part two", "m-Q4_0.gguf": b"GGUF q4"}
    assert run_cli("pull", "org/split-GGUF:Q8_0").exit_code == 0
    folder = snapshot(tmp_path, "org/split-GGUF") / "Q8_0"
    assert sorted(p.name for p in folder.iterdir()) == ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    assert (folder / "m-Q8_0-00002-of-00002.gguf").read_bytes() == b"GGUF part two"
    source = resolve_model("org/split-GGUF:q8_0")
    assert (source.kind, Path(source.location)) == ("gguf", folder / "m-Q8_0-00001-of-00002.gguf")
    assert model_id(SimpleNamespace(source=source), None) == "org/split-GGUF:Q8_0"
