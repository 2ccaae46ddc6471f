"""`llmcli serve`: the OpenAI HTTP API over one loaded engine, on FastAPI.

No model logic here. On llama.cpp requests are decoded together by the scheduler (scheduler.py:
continuous batching over the engine's sequence step, which `llmcli generate` drives too); on the hf
engine text comes from `tasks.generate.generate` (what `llmcli generate` runs), behind a queue that
batches waiting requests (worker.py). Either way the per-sequence text logic is generate.py's, so the
server and the command cannot drift apart. Log-probabilities come from the engine's `token_logprobs`,
the computation `llmcli eval` sums. Every error is OpenAI's JSON shape, `{"error": {"message", "type",
"param", "code"}}`, with its HTTP status; no traceback ever reaches a client. `/metrics`: metrics.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcli import strict_json
from llmcli.constraints import ANY_JSON_OBJECT, Constraint
from llmcli.data import Prompt
from llmcli.engines import Engine, Window
from llmcli.errors import ContextOverflow, LlmcliError
from llmcli.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from llmcli.serve.schemas import ChatRequest, CompletionRequest
from llmcli.serve.scheduler import Choice, Scheduler
from llmcli.serve.worker import Batchable, Busy, Cancelled, EngineWorker
from llmcli.tasks.generate import (SEEDS, Generation, GenerateOptions, encode_prompt, generate, outside_vocabulary,
                                   prepare)

CHAT_DEFAULT_TOKENS = 512  # a chat request without max_tokens: this, or what the context leaves


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
    max_body_bytes: int = 1 << 20
    json_logs: bool = False
    fingerprint: str = ""  # system_fingerprint: what produced the answers (create_app fills it in)


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    settings = replace(settings, fingerprint=settings.fingerprint or system_fingerprint(engine))
    scheduler = None
    if engine.name == "llama.cpp":
        worker = scheduler = Scheduler(engine, settings.parallel, settings.queue_size, kv_cells(engine, settings),
                                       settings.prefix_cache)
    else:
        worker = EngineWorker(settings.queue_size, settings.max_batch)
    metrics = Metrics(worker.running_requests, worker.waiting_requests,
                      (lambda: scheduler.sequences.decoded) if scheduler else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    # the schema and its page, as FastAPI publishes them: client generators and schemathesis read it
    from llmcli import __version__

    app = FastAPI(title="llmcli", version=__version__, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Gate, settings=settings)  # size limit, API key and access log, before any parsing

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()[0]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(route_error(app, request, error))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    started = int(time.time())
    model_card = {"id": settings.model_name, "object": "model", "created": started, "owned_by": "llmcli"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict[str, Any]:
        if not known_model(name, settings):
            raise ApiError(404, f"no model {name!r} here; this server runs {settings.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")
        return model_card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model, settings)
        max_tokens = check_max_tokens(body.max_tokens, 16, settings)
        options = sampling_options(body, max_tokens, chat=False)
        await check_constraint(engine, options)

        def work(emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
            return run_completions(engine, body, options, max_tokens, emit, cancelled)

        prompts = completion_prompts(engine, body)
        if scheduler is not None and body.logprobs is None and max_tokens > 0:
            start = decode_together(scheduler, engine, prompts, body, options)
        else:
            alone = len(body.prompt) > 1 or body.echo or body.logprobs is not None or max_tokens == 0
            batchable = None if alone else batch_job(engine, prompts[0], body, options)
            start = on_worker(worker, work, batchable)
        return await respond(request, start, body, "text_completion", settings, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body.model, settings)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = check_max_tokens(asked, CHAT_DEFAULT_TOKENS, settings)
        options = replace(sampling_options(body, max_tokens, chat=True), default_length=asked is None)
        await check_constraint(engine, options)

        def work(emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
            return run_chat(engine, body, options, emit, cancelled)

        if scheduler is not None and not body.logprobs:
            start = decode_together(scheduler, engine, [chat_prompt(body)], body, options)
        else:
            # a default length is capped by the batch's longest prompt: only explicit lengths batch
            batchable = None if body.logprobs or asked is None else batch_job(engine, chat_prompt(body), body, options)
            start = on_worker(worker, work, batchable)
        return await respond(request, start, body, "chat.completion", settings, metrics)

    return app


# ---------------------------------------------------------------- checks and options


UNION_BRANCHES = ("str", "int", "float", "bool", "list", "dict")  # pydantic names the union member it tried


def validation_error(first: dict[str, Any]) -> ApiError:
    """pydantic's first complaint as OpenAI's 400: the message names the field's path (`messages.0.content`,
    without pydantic's union-branch parts such as `str`) and has no "Value error, " prefix; `param` is
    the top-level field."""
    kind, context = first.get("type"), first.get("ctx") or {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = [part for part in where if part not in UNION_BRANCHES and "[" not in part]
    if kind == "json_invalid" or (not where and kind not in ("value_error", "unsupported_field")):
        return ApiError(400, "the request body is not a JSON object (send one, with Content-Type: application/json)")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if not where:  # a check of the whole body: its context names the field
        return ApiError(400, message, param=context.get("field"))
    return ApiError(400, f"{'.'.join(where)}: {message}", param=where[0])


def route_error(app: FastAPI, request: Request, error: StarletteHTTPException) -> ApiError:
    """A path this server does not serve names what it does serve; a method it does not take on a
    path it serves says which it takes (and the Allow header, as HTTP asks)."""
    routes = {route.path: route.methods for route in app.routes if getattr(route, "include_in_schema", False)}
    if error.status_code == 404:
        served = ", ".join(sorted(f"{' '.join(sorted(methods))} {path}" for path, methods in routes.items()))
        return ApiError(404, f"this server has no {request.method} {request.url.path}; it serves {served}",
                        "not_found_error", code="unknown_url")
    allow = (error.headers or {}).get("Allow")  # starlette names the route's methods on a 405
    if error.status_code == 405 and allow:
        return ApiError(405, f"{request.url.path} takes {allow}, not {request.method}", headers={"Allow": allow})
    return ApiError(error.status_code, str(error.detail), headers=error.headers)


def known_model(name: str, settings: Settings) -> bool:
    return name == settings.model_name or name in settings.model_aliases


def check_model(name: str | None, settings: Settings) -> None:
    """OpenAI answers a model it does not have with 404 model_not_found."""
    if name is not None and not known_model(name, settings):
        raise ApiError(404, f"unknown model {name!r}; this server runs {settings.model_name!r}", param="model",
                       code="model_not_found")


def check_max_tokens(asked: int | None, default: int, settings: Settings) -> int:
    limit = settings.max_tokens_limit
    if asked is not None and limit is not None and asked > limit:
        raise ApiError(400, f"max_tokens {asked} is above this server's limit of {limit}", param="max_tokens")
    if asked is None:
        return min(default, limit) if limit else default
    return asked


def sampling_options(body: Any, max_tokens: int, chat: bool) -> GenerateOptions:
    sampled = body.temperature > 0
    return GenerateOptions(
        max_new_tokens=max(1, max_tokens), temperature=body.temperature,
        top_k=(body.top_k or 0) if sampled else None,  # OpenAI's API has no top-k: none applies unless asked
        top_p=body.top_p if sampled and body.top_p < 1 else None,
        min_p=body.min_p if sampled and body.min_p else None, repetition_penalty=body.repetition_penalty,
        stop=list(body.stop or []), chat=chat, truncate="error", constraint=response_constraint(body),
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
    )


def response_constraint(body: Any) -> Constraint | None:
    """`response_format` as a constraint: json_object is any JSON object, json_schema its schema."""
    chosen = body.response_format
    if chosen is None or chosen.type == "text":
        return None
    if chosen.type == "json_object":
        return Constraint("schema", ANY_JSON_OBJECT)
    return Constraint("schema", json.dumps(chosen.json_schema.schema_))


async def check_constraint(engine: Engine, options: GenerateOptions) -> None:
    """A schema the library cannot compile is a 400 naming what it rejects, before any work is queued
    (compiled off the event loop: the first one also builds the vocabulary's tokenizer, ~0.5 s); so is
    a logit_bias token outside the vocabulary."""
    outside = outside_vocabulary(options.logit_bias, engine)
    if outside is not None:
        raise ApiError(400, f"logit_bias names token {outside}, outside this model's vocabulary of "
                       f"{engine.constraints.n_vocab} tokens", param="logit_bias")
    if options.constraint is None:
        return
    try:
        await asyncio.to_thread(engine.constraints.compile, options.constraint)
    except LlmcliError as exc:
        raise ApiError(400, exc.message.replace("the schema", "response_format's schema"),
                       param="response_format") from exc


# ---------------------------------------------------------------- running on the engine thread


def choices(engine: Engine, prompt: Prompt, options: GenerateOptions, n: int, seed: int | None,
            on_text: Callable[[int, str], None] | None, cancelled: Callable[[], bool]) -> list[Generation]:
    """n generations of one prompt; choice i samples with seed + i, so a seeded request repeats."""
    results = []
    for index in range(n):
        # OpenAI takes any integer as a seed: folded into the engines' range
        chosen = replace(options, seed=None if seed is None else (seed + index) % SEEDS)
        stream = (lambda text, index=index: on_text(index, text)) if on_text else None
        [result] = generate(engine, [prompt], chosen, on_text=stream, cancelled=cancelled)
        results.append(result)
        if cancelled():
            break
    return results


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # OpenAI says "stop" for EOS and stop strings


def token_text(engine: Engine, token: int) -> str:
    return engine.decode([token])


def run_completions(engine: Engine, body: CompletionRequest, options: GenerateOptions, max_tokens: int,
                    emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
    out, prompt_tokens, completion_tokens, began, first = [], 0, 0, time.perf_counter(), None
    for number, prompt in enumerate(completion_prompts(engine, body)):
        text = prompt.text
        prompt_ids = encode_prompt(engine, prompt, options)
        prompt_tokens += len(prompt_ids)
        if max_tokens == 0:  # nothing to generate: the prompt's own scores (echo) are the answer
            generated = [Generation(text, 0, "", [], "length", len(prompt_ids), 0, 0.0)] * body.n
        else:
            def on_text(index: int, piece: str, number: int = number) -> None:
                emit({"index": number * body.n + index, "text": piece, "logprobs": None, "finish_reason": None})

            live = emit is not None and body.logprobs is None  # see per_token below
            if live and body.echo:
                for index in range(body.n):
                    on_text(index, text)
            generated = choices(engine, prompt, options, body.n, body.seed, on_text if live else None, cancelled)
            first = first or first_token_at(began, generated)
        for index, result in enumerate(generated):
            completion_tokens += result.generated_tokens
            choice = {"index": number * body.n + index, "text": (text if body.echo else "") + result.text,
                      "logprobs": None, "finish_reason": finish_reason(result.finish_reason)}
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(engine, prompt_ids, result.token_ids, body.logprobs,
                                                         body.echo)
                if emit and max_tokens > 0:
                    stream_completion_logprobs(emit, choice, engine, (prompt_ids + result.token_ids))
            out.append(choice)
    # a stream sends each token's log-probabilities with its text, as OpenAI does, once the choice is
    # scored (echoed prompt tokens first); with max_tokens 0 they come in the last chunk
    per_token = emit is not None and body.logprobs is not None and max_tokens > 0
    return {"choices": out, "usage": usage(prompt_tokens, completion_tokens), "first_token_at": first,
            "logprobs_streamed": per_token}


def stream_completion_logprobs(emit: Callable[[dict], None], choice: dict[str, Any], engine: Engine,
                               ids: list[int]) -> None:
    """One chunk per token of the choice's `logprobs` (the last of `ids`: an echoed prompt's, then the
    generated ones): its text and its entry of each legacy list. Where the tokens' decoded pieces do
    not add up to the choice's text (a tokenizer that does not decode a prompt back to itself), one
    chunk carries the whole text and the whole object."""
    logprobs = choice["logprobs"]
    count = len(logprobs["tokens"])
    pieces = token_pieces(engine, ids[len(ids) - count:], choice["text"]) if count else []
    if "".join(pieces) != choice["text"]:
        emit({"index": choice["index"], "text": choice["text"], "logprobs": logprobs, "finish_reason": None})
        return
    for position, piece in enumerate(pieces):
        entry = {key: None if logprobs[key] is None else [logprobs[key][position]]
                 for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        emit({"index": choice["index"], "text": piece, "logprobs": entry, "finish_reason": None})


def completion_prompts(engine: Engine, body: CompletionRequest) -> list[Prompt]:
    """The request's prompts: texts, or token ids (checked against the vocabulary; their text is what
    echo shows)."""
    prompts = []
    for prompt in body.prompt:
        if isinstance(prompt, str):
            prompts.append(Prompt(text=prompt))
            continue
        outside = outside_vocabulary(prompt, engine)
        if outside is not None:
            raise ApiError(400, f"prompt token {outside} is outside this model's vocabulary of "
                           f"{engine.constraints.n_vocab} tokens", param="prompt")
        prompts.append(Prompt(text=engine.decode(prompt), ids=list(prompt)))
    return prompts


def first_token_at(began: float, generated: list[Generation]) -> float | None:
    """When the first of these generations, run one after another from `began` (perf_counter), had its
    first token."""
    times = [g.time_to_first_token for g in generated if g.time_to_first_token is not None]
    return began + times[0] if times else None


def chat_prompt(body: ChatRequest) -> Prompt:
    return Prompt(messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                            for m in body.messages])


def batch_job(engine: Engine, prompt: Prompt, body: Any, options: GenerateOptions) -> Batchable | None:
    """A request that may share `model.generate` with others waiting: one choice, no seed (a seed
    fixes one request's own random stream), not streamed. Requests with equal options batch together;
    each gets its own text and usage, or its own error (an exception in its place)."""
    if body.n != 1 or body.seed is not None or body.stream:
        return None
    chat = isinstance(body, ChatRequest)

    def answer(result: Generation, batch: int) -> dict[str, Any]:
        reason = finish_reason(result.finish_reason)
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason})
        return {"choices": [choice], "usage": usage(result.prompt_tokens, result.generated_tokens),
                "batch": batch}  # for the access log, not the client

    def answer_at(result: Generation, batch: int, began: float) -> dict[str, Any]:
        return {**answer(result, batch), "first_token_at": first_token_at(began, [result])}

    def run_batch(prompts: list[Prompt], cancelled: Callable[[], bool]) -> list[Any]:
        began = time.perf_counter()
        try:
            batched = replace(options, batch_size=len(prompts))
            return [answer_at(result, len(prompts), began)
                    for result in generate(engine, prompts, batched, cancelled=cancelled)]
        except LlmcliError:
            pass  # one request's prompt does not fit: each alone, so only that one gets the error
        answers: list[Any] = []
        for prompt in prompts:
            try:
                began = time.perf_counter()
                [result] = generate(engine, [prompt], options, cancelled=cancelled)
                answers.append(answer_at(result, 1, began))
            except LlmcliError as exc:
                answers.append(exc)
        return answers

    return Batchable(key=("chat" if chat else "completion", repr(options)), item=prompt, run_batch=run_batch)


def run_chat(engine: Engine, body: ChatRequest, options: GenerateOptions, emit: Callable[[dict], None] | None,
             cancelled: Callable[[], bool]) -> dict[str, Any]:
    began = time.perf_counter()
    prompt = chat_prompt(body)
    prompt_ids = encode_prompt(engine, prompt, options)

    def on_text(index: int, piece: str) -> None:
        emit({"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None})

    if emit:
        for index in range(body.n):
            emit({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None})
    # with logprobs a stream sends each token's with its delta, as OpenAI does: the text is streamed
    # once the choice is generated and scored
    live = emit is not None and not body.logprobs
    generated = choices(engine, prompt, options, body.n, body.seed, on_text if live else None, cancelled)
    out = []
    for index, result in enumerate(generated):
        choice = {"index": index, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": finish_reason(result.finish_reason)}
        if body.logprobs:
            choice["logprobs"] = chat_logprobs(engine, prompt_ids, result.token_ids, body.top_logprobs or 0)
            if emit:
                for piece, entry in zip(token_pieces(engine, result.token_ids, result.text),
                                        choice["logprobs"]["content"]):
                    emit({"index": index, "delta": {"content": piece}, "logprobs": {"content": [entry]},
                          "finish_reason": None})
        out.append(choice)
    return {"choices": out, "usage": usage(len(prompt_ids), sum(r.generated_tokens for r in generated)),
            "first_token_at": first_token_at(began, generated), "logprobs_streamed": bool(emit and body.logprobs)}


def token_pieces(engine: Engine, ids: list[int], text: str) -> list[str]:
    """The text each token adds (empty while a character is incomplete), cut where the finished text
    ends (a stop string is not part of it)."""
    pieces, emitted = [], 0
    for count in range(1, len(ids) + 1):
        decoded = engine.decode(ids[:count]).rstrip("\ufffd")[:len(text)]
        pieces.append(decoded[emitted:])
        emitted = max(emitted, len(decoded))
    return pieces


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(engine: Engine, prompt_ids: list[int], generated: list[int], top: int,
                        echo: bool) -> dict[str, Any]:
    """The legacy completions `logprobs` object. With echo the prompt's tokens come first, the first
    of them without a log-probability (nothing precedes it), the rest exactly as `llmcli eval`
    scores them: lm-evaluation-harness reads a continuation's log-likelihood from these."""
    ids = prompt_ids + generated
    first = 0 if echo else len(prompt_ids)
    if engine.adds_bos and first == 0 and ids and ids[0] == engine.bos_id:
        first = 1  # the BOS the tokenizer added is not part of the text
    scored_from = max(first, 1)
    values, tops = engine.token_logprobs(Window(ids, len(ids) - scored_from), top) if len(ids) > scored_from \
        else ([], [])
    tokens = [token_text(engine, t) for t in ids[first:]]
    token_logprobs = [None] * (scored_from - first) + values
    top_logprobs = [None] * (scored_from - first) + [{token_text(engine, t): p for t, p in row} for row in tops]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs if top else None, "text_offset": offsets}


def chat_logprobs(engine: Engine, prompt_ids: list[int], generated: list[int], top: int) -> dict[str, Any]:
    if not generated:
        return {"content": []}
    values, tops = engine.token_logprobs(Window(prompt_ids + generated, len(generated)), top)

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(engine, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(o, q) for o, q in row]}
                        for t, p, row in zip(generated, values, tops)]}


# ---------------------------------------------------------------- decoding together (llama.cpp)


DEFAULT_CELLS_LIMIT = 16384  # a 128k-context model would otherwise take its whole KV cache up front


def kv_cells(engine: Engine, settings: Settings) -> int:
    """The KV cells the live sequences share: --ctx-size, or the model's context up to 16384."""
    return settings.ctx_size or min(engine.context_length or 4096, DEFAULT_CELLS_LIMIT)


def decode_together(scheduler: Scheduler, engine: Engine, prompts: list[Prompt], body: Any,
                    options: GenerateOptions) -> Start:
    """The request's choices (each prompt's n samples; choice i seeded seed + i, as `choices` does),
    handed to the scheduler, which decodes them with every other live request."""
    chat = isinstance(body, ChatRequest)
    try:
        encoded, options = prepare(engine, prompts, options)
    except LlmcliError as exc:
        raise api_error(exc) from exc
    need = max(len(ids) for ids in encoded) + options.max_new_tokens
    if need > scheduler.cells:
        raise ApiError(400, f"the prompt and max_tokens need {need} tokens of cache, above this server's "
                       f"--ctx-size of {scheduler.cells}", param="max_tokens", code="context_length_exceeded")

    def start(emit: Callable[[dict], None] | None, cancelled: threading.Event) -> asyncio.Future:
        choices = []
        for number, (prompt, ids) in enumerate(zip(prompts, encoded)):
            for index in range(body.n):
                seed = None if body.seed is None else (body.seed + index) % SEEDS
                place = number * body.n + index
                if emit and chat:
                    emit({"index": place, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None})
                elif emit and body.echo:
                    emit({"index": place, "text": prompt.text, "logprobs": None, "finish_reason": None})
                choices.append(Choice(prompt, ids, options, index, seed, piece_emitter(emit, place, chat)))

        def answer(results: list[Generation], cached_tokens: int) -> dict[str, Any]:
            out = []
            for place, result in enumerate(results):
                reason = finish_reason(result.finish_reason)
                if chat:
                    out.append({"index": place, "message": {"role": "assistant", "content": result.text},
                                "logprobs": None, "finish_reason": reason})
                else:
                    text = (prompts[place // body.n].text if body.echo else "") + result.text
                    out.append({"index": place, "text": text, "logprobs": None, "finish_reason": reason})
            counted = usage(sum(len(ids) for ids in encoded), sum(r.generated_tokens for r in results))
            return {"choices": out, "usage": {**counted, "prompt_tokens_details": {"cached_tokens": cached_tokens}}}

        try:
            return scheduler.submit(choices, answer, cancelled)
        except Busy as exc:
            raise busy() from exc

    return start


def piece_emitter(emit: Callable[[dict], None] | None, place: int, chat: bool) -> Callable[[str], None] | None:
    """Where a streamed choice's text goes: one event per piece, in OpenAI's chunk shape."""
    if emit is None:
        return None
    if chat:
        return lambda piece: emit({"index": place, "delta": {"content": piece}, "logprobs": None,
                                   "finish_reason": None})
    return lambda piece: emit({"index": place, "text": piece, "logprobs": None, "finish_reason": None})


# ---------------------------------------------------------------- answering


Start = Callable[[Callable[[dict], None] | None, threading.Event], asyncio.Future]  # (emit, cancelled) -> result


CLI_TO_API = {"--max-new-tokens": "max_tokens", "--logit-bias": "logit_bias"}  # what an error names, as a client sends it


def api_error(exc: LlmcliError) -> ApiError:
    """A user error from the task as a 400; one that does not fit the context says so in OpenAI's code."""
    overflow = isinstance(exc, ContextOverflow)
    return ApiError(400, api_message(exc), code="context_length_exceeded" if overflow else None)


def api_message(exc: LlmcliError) -> str:
    """The error for an API client: request fields instead of command-line options, and no hint about
    options it cannot pass."""
    message = exc.message
    for option, name in CLI_TO_API.items():
        message = message.replace(option, name)
    return message


async def respond(request: Request, start: Start, body: Any, kind: str, settings: Settings,
                  metrics: Metrics) -> Any:
    ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    header = {"id": ident, "object": kind, "created": int(time.time()), "model": settings.model_name,
              "system_fingerprint": settings.fingerprint}
    cancelled = threading.Event()
    tally = Tally(metrics, time.perf_counter(), settings.prefix_cache)
    if not body.stream:
        future = start(None, cancelled)
        try:
            result = await until_done_or_gone(request, future, cancelled)
        except ApiError as error:
            tally.failed(error)
            raise
        tally.finished(result)
        request.state.tokens = result["usage"]["total_tokens"]
        request.state.batch = result.pop("batch", 1)
        result.pop("logprobs_streamed", None)
        return {**header, **result}
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
    future = start(emit, cancelled)
    request.state.tokens = 0
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(sse_events(request, header, kind, events, future, cancelled, tally, with_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@dataclass
class Tally:
    """Puts one request's outcome into the metrics, once."""

    metrics: Metrics
    arrived: float
    prefix_cache: bool
    counted: bool = False

    def finished(self, result: dict[str, Any]) -> None:
        self.counted = True
        reasons = [choice["finish_reason"] for choice in result["choices"]]
        self.metrics.finished(result["usage"], reasons, self.arrived, result.pop("first_token_at", None),
                              time.perf_counter(), self.prefix_cache and "prompt_tokens_details" in result["usage"])

    def failed(self, error: "ApiError | None" = None) -> None:
        """An error answered, or (None) a client gone mid-stream."""
        if not self.counted and (error is None or error.status == 499):
            self.metrics.aborted()
        self.counted = True


def busy() -> ApiError:
    return ApiError(503, "the server is busy: too many requests are waiting", "server_busy",
                    headers={"Retry-After": "1"})


def on_worker(worker: EngineWorker | Scheduler, work: Callable[..., dict[str, Any]],
              batchable: Batchable | None) -> Start:
    """A request run as one job on the engine thread; a full queue is a 503 now, before any answer."""
    def start(emit: Callable[[dict], None] | None, cancelled: threading.Event) -> asyncio.Future:
        try:
            return worker.enqueue(lambda is_cancelled: work(emit, is_cancelled), cancelled,
                                  None if emit else batchable)
        except Busy as exc:
            raise busy() from exc

    return start


async def until_done_or_gone(request: Request, future: asyncio.Future, cancelled: threading.Event) -> Any:
    """The job's result; a client that hangs up cancels its job (skipped, or stopped at its next token)."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.2)
        if done:
            return job_result(future)
        if await request.is_disconnected():
            cancelled.set()
            raise ApiError(499, "the client closed the connection", "client_closed")


def job_result(future: asyncio.Future) -> Any:
    try:
        return future.result()
    except Cancelled as exc:
        raise ApiError(499, "the client closed the connection", "client_closed") from exc
    except LlmcliError as exc:  # a prompt too long for the context, a template the model lacks
        raise api_error(exc) from exc
    except Exception as exc:  # a bug: the client gets a 500 without a traceback, the log gets its line
        log_internal_error(exc)
        raise ApiError(500, f"internal error: {type(exc).__name__}", "server_error") from exc


async def sse_events(request: Request, header: dict[str, Any], kind: str, events: asyncio.Queue,
                     future: asyncio.Future, cancelled: threading.Event, tally: Tally,
                     with_usage: bool) -> AsyncIterator[str]:
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {strict_json.dumps({**header, 'object': chunk_kind, 'choices': choices, **extra})}\n\n"

    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield chunk([getter.result()])
                continue
            getter.cancel()
            while not events.empty():  # what the job emitted before it finished
                yield chunk([events.get_nowait()])
            try:
                result = job_result(future)
            except ApiError as error:
                tally.failed(error)
                yield f"data: {json.dumps(error_body(error.message, error.kind, error.param, error.code))}\n\n"
                return
            tally.finished(result)
            streamed = result.pop("logprobs_streamed", False)  # each token's came with its text already
            for choice in result["choices"]:
                last = {"index": choice["index"], "finish_reason": choice["finish_reason"],
                        "logprobs": None if streamed else choice["logprobs"]}
                last.update({"delta": {}} if kind == "chat.completion" else {"text": ""})
                yield chunk([last])
            if with_usage:  # OpenAI sends the usage chunk only when stream_options.include_usage asks for it
                yield chunk([], usage=result["usage"])
            request.state.tokens = result["usage"]["total_tokens"]
            request.state.batch = result.pop("batch", 1)
            yield "data: [DONE]\n\n"
            return
    finally:
        cancelled.set()  # finished, or the client went away mid-stream: either way the job stops
        tally.failed()  # counted once: a client gone mid-stream is an abort


# ---------------------------------------------------------------- the gate: size, key, access log


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

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refuse(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_and_note)
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
                    await error_response(too_large(self.settings))(scope, receive, send_and_note)
            except Exception as exc:  # answered here, so the server's log gets one line, not a traceback
                log_internal_error(exc)
                if not status[0]:
                    error = ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
                    await error_response(error)(scope, receive, send_and_note)
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
        if self.settings.api_key and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            expected = f"Bearer {self.settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
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


def log_internal_error(exc: BaseException) -> None:
    import os

    if os.environ.get("LLMCLI_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    sys.stderr.write(f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)\n")


class BodyTooLarge(Exception):
    pass


def too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"the request body is over {settings.max_body_bytes} bytes", code="body_too_large")
