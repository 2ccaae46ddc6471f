"""What one `llmcli serve` runs with: its settings, and what they imply (the fingerprint, the KV cells)."""

from __future__ import annotations

from dataclasses import dataclass

from llmcli.engines import Engine


@dataclass
class Settings:
    model_name: str  # the id /v1/models lists
    model_aliases: frozenset[str] = frozenset()  # other names a request may use (the -m value, its file name)
    api_key: str | None = None
    max_tokens_limit: int | None = None  # the most one request may ask for
    queue_size: int = 64  # requests waiting for the engine before 503
    max_batch: int = 8  # hf engine: waiting greedy/unseeded requests generated together (1: never)
    parallel: int = 8  # llama.cpp: sequences decoded together (llama-server's -np)
    ctx_size: int | None = None  # llama.cpp: KV cells the live sequences share (None: the model's context)
    prefix_cache: bool = True  # llama.cpp: a prompt's cached prefix is not decoded again
    speculative: str = "off"  # llama.cpp: each sequence's speculative decoding (auto, on, off)
    draft_max: int = 12  # llama.cpp: tokens drafted per step at most
    max_body_bytes: int = 1 << 20
    json_logs: bool = False
    fingerprint: str = ""  # system_fingerprint: what produced the answers (create_app fills it in)
    embedding_model: str | None = None  # /v1/embeddings' model (None: the embedded all-MiniLM-L6-v2)
    embedding_unavailable: str | None = None  # why /v1/embeddings is off (the default model is not installed)
    rerank_model: str | None = None  # /v1/rerank's cross-encoder (None: /v1/rerank says how to start one)
    reasoning_format: str = "auto"  # thinking models: how replies are split (llmcli.reasoning.FORMATS)
    reasoning: str = "auto"  # thinking on, off, or as the template has it, unless a request says
    reasoning_budget: int | None = None  # thinking tokens at most before the end marker is forced


def system_fingerprint(engine: Engine) -> str:
    """The engine, its weights and its build, as OpenAI's system_fingerprint: a seeded request repeats
    only while this stays the same."""
    from importlib.metadata import PackageNotFoundError, version

    from llmcli import __version__

    packages = ("llama_cpp_python",) if engine.name == "llama.cpp" else ("torch", "transformers")
    builds = []
    for package in packages:
        try:
            builds.append(f"{package}-{version(package)}")
        except PackageNotFoundError:
            pass
    return "_".join([f"llmcli-{__version__}", engine.name, engine.weights or "default", *builds])


DEFAULT_CELLS_LIMIT = 16384  # a 128k-context model would otherwise take its whole KV cache up front


def kv_cells(engine: Engine, settings: Settings) -> int:
    """The KV cells the live sequences share: --ctx-size, or the model's context up to 16384."""
    return settings.ctx_size or min(engine.context_length or 4096, DEFAULT_CELLS_LIMIT)
