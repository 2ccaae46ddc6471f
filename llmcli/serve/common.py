"""What every generating endpoint does between its request and its response: checks and sampling
options from the request's fields, the choices run on the engine thread (hf) or handed to the
scheduler (llama.cpp), and the answer sent whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmcli import strict_json
from llmcli.constraints import ANY_JSON_OBJECT, Constraint
from llmcli.data import Prompt
from llmcli.engines import Engine
from llmcli.errors import LlmcliError
from llmcli.serve.errors import ApiError, api_error, busy, error_body, log_internal_error
from llmcli.serve.metrics import Metrics
from llmcli.serve.scheduler import Choice, Scheduler
from llmcli.serve.settings import Settings
from llmcli.serve.worker import Batchable, Busy, Cancelled, EngineWorker
from llmcli.tasks.generate import SEEDS, Generation, GenerateOptions, generate, outside_vocabulary, prepare


def adapter_logprobs() -> ApiError:
    """Scores run the model as loaded; an adapter's would be the base's numbers under its name."""
    return ApiError(400, "logprobs are not computed for LoRA adapters yet", param="logprobs")


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
    return Constraint("schema", json.dumps(chosen.json_schema.enforced()))


async def check_constraint(engine: Engine, options: GenerateOptions, param: str = "response_format") -> None:
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
        where = "response_format's schema" if param == "response_format" else "a tool's parameters"
        raise ApiError(400, exc.message.replace("the schema", where).replace("the grammar", where),
                       param=param) from exc


def choices(engine: Engine, prompt: Prompt, options: GenerateOptions, n: int, seed: int | None,
            on_text: Callable[[int, str], None] | None, cancelled: Callable[[], bool],
            on_reasoning: Callable[[int, str], None] | None = None) -> list[Generation]:
    """n generations of one prompt; choice i samples with seed + i, so a seeded request repeats."""
    results = []
    for index in range(n):
        # OpenAI takes any integer as a seed: folded into the engines' range
        chosen = replace(options, seed=None if seed is None else (seed + index) % SEEDS)
        stream = (lambda text, index=index: on_text(index, text)) if on_text else None
        thinking = (lambda text, index=index: on_reasoning(index, text)) if on_reasoning else None
        [result] = generate(engine, [prompt], chosen, on_text=stream, cancelled=cancelled, on_reasoning=thinking)
        results.append(result)
        if cancelled():
            break
    return results


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # OpenAI says "stop" for EOS and stop strings


def token_text(engine: Engine, token: int) -> str:
    return engine.decode([token])


def first_token_at(began: float, generated: list[Generation]) -> float | None:
    """When the first of these generations, run one after another from `began` (perf_counter), had its
    first token."""
    times = [g.time_to_first_token for g in generated if g.time_to_first_token is not None]
    return began + times[0] if times else None


def reasoning_emitter(emit: Callable[[dict], None], place: int) -> Callable[[str], None]:
    """Where a streamed chat reply's thinking goes: `reasoning_content` deltas, as llama-server and vLLM
    send them."""
    return lambda piece: emit({"index": place, "delta": {"reasoning_content": piece}, "logprobs": None,
                               "finish_reason": None})


def with_reasoning(message: dict[str, Any], result: Generation) -> dict[str, Any]:
    """The message with the reply's thinking as `reasoning_content` (left out when there was none, as
    llama-server leaves it out)."""
    return {**message, "reasoning_content": result.reasoning} if result.reasoning else message


class PlainChat:
    """A chat reply as OpenAI's message: the text is the content."""

    opening = {"role": "assistant", "content": ""}  # a stream's first delta

    def emitter(self, emit: Callable[[dict], None], place: int) -> Callable[[str], None]:
        return lambda piece: emit({"index": place, "delta": {"content": piece}, "logprobs": None,
                                   "finish_reason": None})

    def message(self, result: Generation, place: int,
                emit: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], str]:
        return with_reasoning({"role": "assistant", "content": result.text}, result), finish_reason(result.finish_reason)


def batch_job(engine: Engine, prompt: Prompt, body: Any, options: GenerateOptions,
              shape: Any = None) -> Batchable | None:
    """A request that may share `model.generate` with others waiting: one choice, no seed (a seed
    fixes one request's own random stream), not streamed. Requests with equal options batch together;
    each gets its own text and usage, or its own error (an exception in its place)."""
    if body.n != 1 or body.seed is not None or body.stream:
        return None
    chat = shape is not None

    def answer(result: Generation, batch: int) -> dict[str, Any]:
        if chat:
            message, reason = shape.message(result, 0)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None,
                      "finish_reason": finish_reason(result.finish_reason)}
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

    # the batch's answers are made by its first request's shape: only requests of one shape batch together
    return Batchable(key=(type(shape).__name__ if chat else "completion", repr(options)), item=prompt,
                     run_batch=run_batch)


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


def decode_together(scheduler: Scheduler, engine: Engine, prompts: list[Prompt], body: Any,
                    options: GenerateOptions, shape: Any = None) -> Start:
    """The request's choices (each prompt's n samples; choice i seeded seed + i, as `choices` does),
    handed to the scheduler, which decodes them with every other live request. `shape` makes a chat
    reply's message (None: a completion)."""
    chat = shape is not None
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
                    emit({"index": place, "delta": dict(shape.opening), "logprobs": None, "finish_reason": None})
                elif emit and body.echo:
                    emit({"index": place, "text": prompt.text, "logprobs": None, "finish_reason": None})
                pieces = (shape.emitter(emit, place) if chat else piece_emitter(emit, place)) if emit else None
                thinking = reasoning_emitter(emit, place) if emit and chat else None
                choices.append(Choice(prompt, ids, options, index, seed, pieces, thinking))

        def answer(results: list[Generation], cached_tokens: int) -> dict[str, Any]:
            out = []
            for place, result in enumerate(results):
                if chat:
                    message, reason = shape.message(result, place, emit)
                    out.append({"index": place, "message": message, "logprobs": None, "finish_reason": reason})
                else:
                    text = (prompts[place // body.n].text if body.echo else "") + result.text
                    out.append({"index": place, "text": text, "logprobs": None,
                                "finish_reason": finish_reason(result.finish_reason)})
            counted = usage(sum(len(ids) for ids in encoded), sum(r.generated_tokens for r in results))
            counted["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
            if any(r.drafted is not None for r in results):  # OpenAI's names for checked predictions
                accepted = sum(r.accepted or 0 for r in results)
                counted["completion_tokens_details"] = {
                    "accepted_prediction_tokens": accepted,
                    "rejected_prediction_tokens": sum(r.drafted or 0 for r in results) - accepted}
            return {"choices": out, "usage": counted}

        try:
            return scheduler.submit(choices, answer, cancelled)
        except Busy as exc:
            raise busy() from exc

    return start


def piece_emitter(emit: Callable[[dict], None], place: int) -> Callable[[str], None]:
    """Where a streamed completion's text goes: one event per piece, in OpenAI's chunk shape."""
    return lambda piece: emit({"index": place, "text": piece, "logprobs": None, "finish_reason": None})


Start = Callable[[Callable[[dict], None] | None, threading.Event], asyncio.Future]  # (emit, cancelled) -> result


async def respond(request: Request, start: Start, body: Any, kind: str, settings: Settings,
                  metrics: Metrics, adapter: str | None = None) -> Any:
    ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    model = adapter or settings.model_name  # an adapter answers as itself
    header = {"id": ident, "object": kind, "created": int(time.time()), "model": model,
              "system_fingerprint": settings.fingerprint}
    tally = Tally(metrics, time.perf_counter(), settings.prefix_cache)
    if not body.stream:
        result = await run_to_end(request, start, tally)
        request.state.batch = result.pop("batch", 1)
        result.pop("logprobs_streamed", None)
        return {**header, **result}
    cancelled = threading.Event()
    events, future = start_streaming(request, start, cancelled)
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(sse_events(request, header, kind, events, future, cancelled, tally, with_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def run_to_end(request: Request, start: Start, tally: Tally) -> dict[str, Any]:
    """The job's whole result (no stream), counted in the metrics whether it ends well or not."""
    cancelled = threading.Event()
    future = start(None, cancelled)
    try:
        result = await until_done_or_gone(request, future, cancelled)
    except ApiError as error:
        tally.failed(error)
        raise
    tally.finished(result)
    request.state.tokens = result["usage"]["total_tokens"]
    return result


def start_streaming(request: Request, start: Start, cancelled: threading.Event) -> tuple[asyncio.Queue, asyncio.Future]:
    """The job started with its events going to a queue on this event loop."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    future = start(lambda event: loop.call_soon_threadsafe(events.put_nowait, event), cancelled)
    request.state.tokens = 0
    return events, future


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


async def next_event(events: asyncio.Queue, future: asyncio.Future) -> Any:
    """The job's next streamed event, or None once the job has finished. The wait for the queue is
    cancelled however this ends: a client that hangs up cancels this await, and a get() left pending
    would be logged as "Task was destroyed but it is pending!"."""
    getter = asyncio.ensure_future(events.get())
    try:
        done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter in done else None


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
        while (event := await next_event(events, future)) is not None:
            yield chunk([event])
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
    finally:
        cancelled.set()  # finished, or the client went away mid-stream: either way the job stops
        tally.failed()  # counted once: a client gone mid-stream is an abort
