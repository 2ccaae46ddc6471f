"""`/v1/chat/completions`: chat messages through the model's chat template, with OpenAI's chat
`logprobs`."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from fastapi import FastAPI, Request

from llmcli.data import Prompt
from llmcli.engines import Engine, Window
from llmcli.serve.common import (batch_job, check_constraint, check_max_tokens, check_model, choices,
                                 decode_together, finish_reason, first_token_at, on_worker, respond, sampling_options,
                                 token_pieces, token_text, usage)
from llmcli.serve.metrics import Metrics
from llmcli.serve.schemas import ChatRequest
from llmcli.serve.settings import Settings
from llmcli.tasks.generate import GenerateOptions, encode_prompt


def add_route(app: FastAPI, engine: Engine, settings: Settings, worker: Any, scheduler: Any, metrics: Metrics) -> None:
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


CHAT_DEFAULT_TOKENS = 512  # a chat request without max_tokens: this, or what the context leaves


def chat_prompt(body: ChatRequest) -> Prompt:
    return Prompt(messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                            for m in body.messages])


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


def chat_logprobs(engine: Engine, prompt_ids: list[int], generated: list[int], top: int) -> dict[str, Any]:
    if not generated:
        return {"content": []}
    values, tops = engine.token_logprobs(Window(prompt_ids + generated, len(generated)), top)

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(engine, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(o, q) for o, q in row]}
                        for t, p, row in zip(generated, values, tops)]}
