"""`llmcli serve`: the OpenAI HTTP API over the offered models, on FastAPI. Which of them are loaded, and
when they load and unload, is the router's (router.py): each request asks it for its model.

No model logic here. On llama.cpp requests are decoded together by the scheduler (scheduler.py:
continuous batching over the engine's sequence step, which `llmcli generate` drives too); on the hf
engine text comes from `tasks.generate.generate` (what `llmcli generate` runs), behind a queue that
batches waiting requests (worker.py). Either way the per-sequence text logic is generate.py's, so the
server and the command cannot drift apart. Log-probabilities come from the engine's `token_logprobs`,
the computation `llmcli eval` sums. Every error is OpenAI's JSON shape, `{"error": {"message", "type",
"param", "code"}}`, with its HTTP status; no traceback ever reaches a client. `/metrics`: metrics.py.

This module is the app itself: middleware (size, key, access log), errors, health, metrics, the model
listing and the schema's page (/docs); each endpoint family has its module (completions.py, chat.py,
responses.py, messages.py, tokenize.py; as vLLM's entrypoints lay them out), what they share is common.py.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcli import strict_json
from llmcli.engines import Engine
from llmcli.serve import chat, completions, embeddings, messages, rerank, responses, tokenize
from llmcli.serve.errors import ApiError, error_response, log_internal_error, route_error, validation_error
from llmcli.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from llmcli.serve.offers import Offer
from llmcli.serve.router import Router
from llmcli.serve.settings import Settings


def create_app(engine: Engine | None, settings: Settings, router: Router | None = None) -> FastAPI:
    """The app over the router's models; or over `engine` alone, loaded already and named
    settings.model_name (what tests and a plain `serve -m X` run)."""
    if router is None:
        router = single_model(engine, settings)
    decodes = len(router.offers) > 1 or any(served.scheduler for served in router.loaded.values())
    metrics = Metrics(router.running_requests, router.waiting_requests, router.decoded_tokens if decodes else None)
    router.metrics = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        expiry = asyncio.create_task(router.expire_idle())
        yield
        expiry.cancel()
        router.close()

    # the schema and its page, as FastAPI publishes them: client generators and schemathesis read it. The
    # page's Swagger UI script, style and icon come from fastapi-offline's copy, served here (FastAPI's
    # own page loads them from a CDN, and is blank offline)
    from fastapi_offline import FastAPIOffline

    from llmcli import __version__

    app = FastAPIOffline(title="llmcli", version=__version__, docs_url="/docs", redoc_url=None,
                         openapi_url="/openapi.json", static_url="/docs-assets", lifespan=lifespan)
    app.state.worker = router  # what runs every model: its drain() cuts their requests at shutdown
    app.add_middleware(Gate, settings=settings)  # size limit, API key and access log, before any parsing

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error, messages.speaks_anthropic(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()[0]), messages.speaks_anthropic(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(route_error(app, request, error), messages.speaks_anthropic(request.url.path))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    completions.add_route(app, router, metrics)
    chat.add_route(app, router, metrics)
    responses.add_route(app, router, metrics)
    messages.add_routes(app, router, metrics)
    embedder = embeddings.add_route(app, settings)
    reranker = rerank.add_routes(app, settings)
    tokenize.add_routes(app, router)
    add_model_routes(app, router, embedder, reranker, settings)
    return app


def single_model(engine: Engine, settings: Settings) -> Router:
    """A router offering one model, loaded already; reloaded (after /models/unload) on its engine."""
    from llmcli.engines import choose_engine

    offer = Offer(settings.model_name, engine.source.location, engine=engine.name, aliases=settings.model_aliases)
    router = Router([offer], lambda offer: choose_engine(offer.model, offer.engine), settings)
    router.preload(engine)
    return router


class ModelName(BaseModel):
    model: str


def add_model_routes(app: FastAPI, router: Router, embedder: Any, reranker: Any, settings: Settings) -> None:
    """/v1/models (every offered model: its kind, whether it is loaded, an adapter's parent, as vLLM
    lists them) and llama-server's /models/load and /models/unload."""
    started = int(time.time())

    def card(name: str, kind: str, status: str, parent: str | None = None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "llmcli", "kind": kind,
                "loaded": status == "loaded", "status": {"value": status}, "parent": parent}

    def holder_status(holder: Any) -> str:
        return "loaded" if holder.model is not None else "unloaded"

    def cards() -> list[dict[str, Any]]:
        listed = [card(offer.name, "chat", router.status(offer.name), router.parent_id(offer))
                  for offer in router.offers.values()]
        if not settings.embedding_unavailable:
            listed.append(card(embeddings.embedding_model_id(settings.embedding_model), "embedding",
                               holder_status(embedder)))
        if reranker is not None:
            listed.append(card(rerank.rerank_model_id(settings.rerank_model), "rerank", holder_status(reranker)))
        return listed

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict[str, Any]:
        listed = cards()
        found = next((listed_card for listed_card in listed if listed_card["id"] == name), None)
        if found is not None:
            return found
        offer = router.find(name)  # an alias (the -m value, the file name); else 404 listing what is offered
        return next(listed_card for listed_card in listed if listed_card["id"] == offer.name)

    @app.post("/models/load")
    async def load_model(body: ModelName) -> dict[str, bool]:
        offer = router.find(body.model)
        await router.load(router.offers[offer.parent] if offer.on_parent else offer)  # an adapter: its base
        return {"success": True}

    @app.post("/models/unload")
    async def unload_model(body: ModelName) -> dict[str, bool]:
        """Once the model's requests in flight have ended: none is cut."""
        if not await router.unload_when_idle(body.model):
            raise ApiError(400, f"model {body.model!r} is not loaded", param="model", code="model_not_loaded")
        return {"success": True}


MODEL_PATHS = ("/models/load", "/models/unload")


class Gate:
    """ASGI middleware in front of every route: a body over the limit is a 413 (by its Content-Length
    or as it streams in), /v1 needs the API key when one is set (compared in constant time), and each
    request leaves one access line on stderr."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.perf_counter(), [0]
        scope.setdefault("state", {})
        anthropic = messages.speaks_anthropic(scope["path"])

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refuse(scope)
            if refusal is not None:
                await error_response(refusal, anthropic)(scope, receive, send_and_note)
                return
            received = [0]

            async def limited_receive() -> dict:
                message = await receive()
                received[0] += len(message.get("body", b""))
                if received[0] > self.settings.max_body_bytes:
                    raise BodyTooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_and_note)
            except BodyTooLarge:
                if not status[0]:
                    await error_response(too_large(self.settings), anthropic)(scope, receive, send_and_note)
            except Exception as exc:  # answered here, so the server's log gets one line, not a traceback
                log_internal_error(exc)
                if not status[0]:
                    error = ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
                    await error_response(error, anthropic)(scope, receive, send_and_note)
        finally:
            self.log(scope, status[0], began)

    def refuse(self, scope: dict) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # every body here is JSON: one sent as text/plain or without a type (curl -d) is read as JSON
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return too_large(self.settings)
        if self.settings.api_key and (scope["path"].startswith("/v1") or scope["path"] in tokenize.PATHS
                                     or scope["path"] in rerank.PATHS or scope["path"] in MODEL_PATHS):
            key = self.settings.api_key.encode()
            bearer = hmac.compare_digest(headers.get("authorization", "").encode(), b"Bearer " + key)
            # Anthropic's clients send the key as x-api-key (ANTHROPIC_AUTH_TOKEN as a Bearer token)
            anthropic = hmac.compare_digest(headers.get("x-api-key", "").encode(), key)
            if not (bearer or anthropic):
                return ApiError(401, "a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY)",
                                "authentication_error", code="invalid_api_key")
        return None

    def log(self, scope: dict, status: int, began: float) -> None:
        tokens, batch = scope["state"].get("tokens"), scope["state"].get("batch", 1)
        milliseconds = (time.perf_counter() - began) * 1000
        if self.settings.json_logs:
            line = strict_json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                      "tokens": tokens, "ms": round(milliseconds, 1), "batch": batch})
        else:
            line = (f"{scope['method']} {scope['path']} {status} "
                    f"{'-' if tokens is None else tokens} tokens {milliseconds:.0f} ms"
                    + (f" (batch of {batch})" if batch > 1 else ""))
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class BodyTooLarge(Exception):
    pass


def too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="body_too_large")
