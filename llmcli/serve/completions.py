"""`/v1/completions`: the legacy text completions, with echo and the legacy `logprobs` object
(what lm-evaluation-harness's local-completions backend reads)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from fastapi import FastAPI, Request

from llmcli.data import Prompt
from llmcli.engines import Engine, Window
from llmcli.serve.common import (Start, adapter_logprobs, batch_job, check_constraint, check_max_tokens, choices,
                                 decode_together, finish_reason, first_token_at, on_worker, respond, sampling_options,
                                 token_pieces, token_text, usage)
from llmcli.serve.errors import ApiError
from llmcli.serve.metrics import Metrics
from llmcli.serve.router import Router, Served
from llmcli.serve.schemas import CompletionRequest
from llmcli.tasks.generate import Generation, GenerateOptions, encode_prompt, outside_vocabulary


def add_route(app: FastAPI, router: Router, metrics: Metrics) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        async with router.use(body.model, body.keep_alive) as model:
            adapter = router.adapter_of(body.model)
            start = router.hold(model, await completion_start(model, body, adapter))
            return await respond(request, start, body, "text_completion", model.settings, metrics, adapter)


async def completion_start(model: Served, body: CompletionRequest, adapter: str | None = None) -> Start:
    """The checked request, ready to run on its model: on the scheduler (llama.cpp) or the engine thread (hf)."""
    engine, settings, worker, scheduler = model.engine, model.settings, model.worker, model.scheduler
    if adapter and body.logprobs is not None:
        raise adapter_logprobs()
    max_tokens = check_max_tokens(body.max_tokens, 16, settings)
    options = sampling_options(body, max_tokens, chat=False)
    await check_constraint(engine, options)
    prompts = [replace(prompt, adapter=adapter) for prompt in completion_prompts(engine, body)]

    def work(emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
        return run_completions(engine, body, prompts, options, max_tokens, emit, cancelled)

    if scheduler is not None and body.logprobs is None and max_tokens > 0:
        return decode_together(scheduler, engine, prompts, body, options)
    alone = len(body.prompt) > 1 or body.echo or body.logprobs is not None or max_tokens == 0
    batchable = None if alone else batch_job(engine, prompts[0], body, options)
    return on_worker(worker, work, batchable)


def run_completions(engine: Engine, body: CompletionRequest, prompts: list[Prompt], options: GenerateOptions,
                    max_tokens: int, emit: Callable[[dict], None] | None,
                    cancelled: Callable[[], bool]) -> dict[str, Any]:
    out, prompt_tokens, completion_tokens, began, first = [], 0, 0, time.perf_counter(), None
    for number, prompt in enumerate(prompts):
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
