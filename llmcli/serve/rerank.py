"""`/v1/rerank` (and `/rerank`, `/v2/rerank`, where vLLM serves it too): the cross-encoder of
`--rerank-model`, loaded at the first request, through the same `rerank` task as the command, so each
score equals `llmcli rerank`'s (and sentence-transformers' CrossEncoder.predict's).

The shape is the one llama-server, vLLM and Jina share. Request: `query`, `documents` (strings, or
{"text": ...} objects as Jina and vLLM take them), `top_n` (default: all), `return_documents` (default
true, as Jina's; vLLM always returns them). Answer: `results` best first, each `{index,
relevance_score, document: {text}}` (`document` left out when return_documents is false, as
llama-server leaves it out), `usage: {prompt_tokens, total_tokens}` (vLLM's and llama-server's), `model`,
`object: "list"` (llama-server's) and `id` (vLLM's). One difference: `top_n` 0 is a 400 here, where
vLLM reads it as "all" (leave top_n out for all)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI
from pydantic import BaseModel, Field, field_validator

from llmcli.serve.embeddings import EmbeddingModel
from llmcli.serve.errors import ApiError
from llmcli.serve.settings import Settings

PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")


class RerankDocument(BaseModel):
    text: str


class RerankRequest(BaseModel):
    query: str
    documents: list[Union[str, RerankDocument]] = Field(min_length=1)
    model: Optional[str] = None
    top_n: Optional[int] = Field(None, ge=1)
    return_documents: bool = True

    @field_validator("query")
    @classmethod
    def some_query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class RerankModel(EmbeddingModel):
    """The cross-encoder, loaded once on first use (as the embedding model is)."""

    def load(self) -> Any:
        from llmcli.cross_encoders import load_cross_encoder

        return load_cross_encoder(self.location)


def rerank_model_id(location: str) -> str:
    return Path(location).name or location


def check_rerank_model(location: str | None) -> None:
    """At startup, without torch: a --rerank-model that is missing or not a one-label cross-encoder
    stops `serve` before it listens."""
    from llmcli.cross_encoders import read_cross_encoder_recipe

    if location is not None:
        read_cross_encoder_recipe(location)


def add_routes(app: FastAPI, settings: Settings) -> RerankModel | None:
    """The routes; the model's holder (None without --rerank-model) is returned for /v1/models."""
    holder = RerankModel(settings.rerank_model) if settings.rerank_model else None
    name = rerank_model_id(settings.rerank_model) if settings.rerank_model else None

    async def rerank(body: RerankRequest) -> Any:
        if holder is None:
            raise ApiError(404, "this server has no rerank model; start it with `llmcli serve --rerank-model DIR` "
                           "(a cross-encoder directory)", "not_found_error", code="model_not_found")
        if body.model is not None and body.model not in (name, settings.rerank_model):
            raise ApiError(404, f"unknown rerank model {body.model!r}; this server reranks with {name!r}",
                           "not_found_error", param="model", code="model_not_found")
        texts = [document if isinstance(document, str) else document.text for document in body.documents]
        ranking = await asyncio.to_thread(run, holder, body.query, texts, body.top_n)
        results = []
        for number in ranking.order:
            result: dict[str, Any] = {"index": number, "relevance_score": float(ranking.scores[number])}
            if body.return_documents:
                result["document"] = {"text": texts[number]}
            results.append(result)
        return {"id": f"rerank-{uuid.uuid4().hex}", "object": "list", "model": name, "results": results,
                "usage": {"prompt_tokens": ranking.tokens, "total_tokens": ranking.tokens}}

    for path in PATHS:
        app.post(path, include_in_schema=path == "/v1/rerank")(rerank)
    return holder


def run(holder: RerankModel, query: str, documents: list[str], top_n: int | None) -> Any:
    from llmcli.tasks.rerank import RerankOptions, rerank_documents

    return holder.use(lambda model: rerank_documents(model, query, documents, RerankOptions(top_k=top_n)),
                      "rerank", "rerank_model_unavailable")
