"""`/v1/chat/completions`: chat messages through the model's chat template, with OpenAI's chat
`logprobs` and tool calls (prompted, constrained and read back by `llmcli.tools`)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from fastapi import FastAPI, Request

from llmcli import reasoning, tools
from llmcli.data import Prompt
from llmcli.engines import Engine, Window
from llmcli.serve.common import (PlainChat, Start, adapter_logprobs, batch_job, check_constraint, check_max_tokens,
                                 choices, decode_together, finish_reason, first_token_at, on_worker, reasoning_emitter,
                                 respond, sampling_options, token_pieces, token_text, usage, with_reasoning)
from llmcli.serve.metrics import Metrics
from llmcli.serve.router import Router, Served
from llmcli.serve.schemas import ChatRequest
from llmcli.tasks.generate import GenerateOptions, Generation, encode_prompt


def add_route(app: FastAPI, router: Router, metrics: Metrics) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        async with router.use(body.model, body.keep_alive) as model:
            adapter = router.adapter_of(body.model)
            start = router.hold(model, await chat_start(model, body, adapter))
            return await respond(request, start, body, "chat.completion", model.settings, metrics, adapter)


CHAT_DEFAULT_TOKENS = 512  # a chat request without max_tokens: this, or what the context leaves


async def chat_start(model: Served, body: ChatRequest, adapter: str | None = None,
                     shape_of: Callable[[tools.ToolUse | None, str], Any] | None = None) -> Start:
    """The checked request, ready to run on its model: on the scheduler (llama.cpp) or the engine thread (hf).
    `adapter`: the LoRA adapter the request names (router.adapter_of); `shape_of` makes the reply's shape
    (default `reply_shape`; another API's face may wrap it)."""
    engine, settings, worker, scheduler = model.engine, model.settings, model.worker, model.scheduler
    if adapter and body.logprobs:
        raise adapter_logprobs()
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens = check_max_tokens(asked, CHAT_DEFAULT_TOKENS, settings)
    options = replace(sampling_options(body, max_tokens, chat=True), default_length=asked is None)
    use, form = body.tool_use(), tools.call_format(engine.chat_template)
    if use is not None and use.active:
        options = replace(options, constraint=tools.constraint(use, form))
        await check_constraint(engine, options, param="tools")
    else:
        await check_constraint(engine, options)
    options = reasoning_options(engine, body, settings, options)
    prompt, shape = replace(chat_prompt(body, use, form), adapter=adapter), (shape_of or reply_shape)(use, form)

    def work(emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
        return run_chat(engine, body, prompt, shape, options, emit, cancelled)

    if scheduler is not None and not body.logprobs:
        return decode_together(scheduler, engine, [prompt], body, options, shape)
    # a default length is capped by the batch's longest prompt: only explicit lengths batch
    batchable = None if body.logprobs or asked is None else batch_job(engine, prompt, body, options, shape)
    return on_worker(worker, work, batchable)


def reasoning_options(engine: Engine, body: ChatRequest, settings: Settings,
                      options: GenerateOptions) -> GenerateOptions:
    """The server's thinking settings with the request's: reasoning_effort "none" (or the template switch
    given in chat_template_kwargs) turns thinking off, another effort on."""
    mode = settings.reasoning
    given = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        mode = "off" if body.reasoning_effort == "none" else "on"
        given.setdefault("reasoning_effort", body.reasoning_effort)  # gpt-oss's templates read it
    if isinstance(given.get(reasoning.SWITCH), bool):
        mode = "on" if given[reasoning.SWITCH] else "off"
    thinking = reasoning.thinking_for(engine, settings.reasoning_format, settings.reasoning_budget, mode)
    return replace(options, reasoning=thinking,
                   template_kwargs=reasoning.template_kwargs(engine.chat_template, mode, given))


def chat_prompt(body: ChatRequest, use: tools.ToolUse | None, form: str) -> Prompt:
    messages, template_tools = tools.prompt_messages([m.plain() for m in body.messages], use, form)
    return Prompt(messages=messages, tools=template_tools)


def reply_shape(use: tools.ToolUse | None, form: str) -> Any:
    return ToolChat(form) if use is not None and use.active else PlainChat()


class ToolChat:
    """A reply read for tool calls (`tools.ReplyReader`): streamed as content and tool-call deltas,
    finished as a message with `tool_calls` and content null, finish_reason "tool_calls" (or "length"
    where max_tokens cut the reply: a call it cut is not among the calls)."""

    # a stream's first delta: content null, as OpenAI starts a reply that calls tools (and as the
    # finished message has it)
    opening = {"role": "assistant", "content": None}

    def __init__(self, form: str) -> None:
        self.form = form
        self.readers: dict[int, tools.ReplyReader] = {}  # a streamed choice's, so its ids stay

    def emitter(self, emit: Callable[[dict], None], place: int) -> Callable[[str], None]:
        reader = self.readers.setdefault(place, tools.ReplyReader(self.form))

        def on_piece(piece: str) -> None:
            for delta in reader.feed(piece):
                emit({"index": place, "delta": delta, "logprobs": None, "finish_reason": None})

        return on_piece

    def message(self, result: Generation, place: int,
                emit: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], str]:
        reader = self.readers.pop(place, None) or tools.ReplyReader(self.form)
        reader.text = result.text  # the finished text: a stop string is not part of it
        for delta in reader.feed("", finished=True):  # what the stream held back (a marker's start)
            if emit:
                emit({"index": place, "delta": delta, "logprobs": None, "finish_reason": None})
        reply = reader.reply()
        if not reply.calls:
            return (with_reasoning({"role": "assistant", "content": reply.content or ""}, result),
                    finish_reason(result.finish_reason))
        message = with_reasoning({"role": "assistant", "content": reply.content,
                                  "tool_calls": [call.openai() for call in reply.calls]}, result)
        return message, "length" if result.finish_reason == "length" else "tool_calls"


def run_chat(engine: Engine, body: ChatRequest, prompt: Prompt, shape: Any, options: GenerateOptions,
             emit: Callable[[dict], None] | None, cancelled: Callable[[], bool]) -> dict[str, Any]:
    began = time.perf_counter()
    prompt_ids = encode_prompt(engine, prompt, options)
    emitters: dict[int, Callable[[str], None]] = {}

    def on_text(index: int, piece: str) -> None:
        if index not in emitters:
            emitters[index] = shape.emitter(emit, index)
        emitters[index](piece)

    def on_reasoning(index: int, piece: str) -> None:
        reasoning_emitter(emit, index)(piece)

    if emit:
        for index in range(body.n):
            emit({"index": index, "delta": dict(shape.opening), "logprobs": None, "finish_reason": None})
    # with logprobs a stream sends each token's with its delta, as OpenAI does: the text is streamed
    # once the choice is generated and scored
    live = emit is not None and not body.logprobs
    generated = choices(engine, prompt, options, body.n, body.seed, on_text if live else None, cancelled,
                        on_reasoning if live else None)
    out = []
    for index, result in enumerate(generated):
        message, reason = shape.message(result, index, emit if live else None)
        choice = {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
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
