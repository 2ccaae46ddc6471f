"""`/v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API as another face of chat
completions, as responses.py is OpenAI's Responses. The request's system, messages (text, tool_use and
tool_result blocks) and tools become a chat request, the chat path runs it (tools constrained by
`llmcli.tools`, the scheduler, the prefix cache), and the chat reply becomes a Message with content
blocks; streamed, the chat deltas become Anthropic's event sequence. Errors take Anthropic's shape
(errors.py: `anthropic_body`), on these paths only."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from llmcli import reasoning, strict_json, tools
from llmcli.engines import Engine
from llmcli.errors import LlmcliError
from llmcli.serve.chat import chat_prompt, chat_start, reply_shape
from llmcli.serve.common import (Tally, job_result, next_event, run_to_end, sampling_options,
                                 start_streaming)
from llmcli.serve.errors import ApiError, anthropic_body, api_error, validation_error
from llmcli.serve.metrics import Metrics
from llmcli.serve.responses import new_id
from llmcli.serve.router import Router
from llmcli.serve.schemas import ChatRequest
from llmcli.tasks.generate import Generation, encode_prompt, find_stop

PREFIX = "/v1/messages"  # the paths whose errors are in Anthropic's shape


def speaks_anthropic(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class ThinkingConfig(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(None, ge=1)


class ToolDefinition(BaseModel):
    name: str
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    type: Optional[str] = None  # "custom" or none; Anthropic's server tools (web_search_...) are refused


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False


class InputMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class Conversation(BaseModel):
    """What `/v1/messages/count_tokens` reads (and the prompt of `/v1/messages`); other fields
    (metadata, service_tier, cache_control on blocks...) are ignored."""

    model: Optional[str] = None
    messages: list[InputMessage] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[ToolDefinition] = Field(default_factory=list)
    tool_choice: Optional[ToolChoice] = None
    # enabled or disabled: the template's thinking switch (llmcli.reasoning), as chat_template_kwargs
    # {"enable_thinking": ...} sets it on chat completions; adaptive leaves the server's setting. The
    # thinking comes back as a thinking block. budget_tokens is not mapped (the server's
    # --reasoning-budget holds)
    thinking: Optional[ThinkingConfig] = None


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] = Field(default_factory=list)
    temperature: float = Field(1.0, ge=0, le=1)  # Anthropic's range and default
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    metadata: Optional[dict[str, Any]] = None  # user_id: nothing here uses it
    stream: bool = False


def add_routes(app: FastAPI, router: Router, metrics: Metrics) -> None:
    @app.post(PREFIX)
    async def messages(body: MessagesRequest, request: Request) -> Any:
        chat = chat_request(body)
        async with router.use(chat.model) as model:
            engine, settings, adapter = model.engine, model.settings, router.adapter_of(chat.model)
            shape_of = lambda use, form: StopSequenceShape(reply_shape(use, form), engine.decode, chat.stop)  # noqa: E731
            start = router.hold(model, await chat_start(model, chat, adapter, shape_of))
            tally = Tally(metrics, time.perf_counter(), settings.prefix_cache)
            reply = Reply(adapter or settings.model_name)
            if not body.stream:
                result = await run_to_end(request, start, tally)
                request.state.batch = result.get("batch", 1)  # for the access log
                return reply.finish(result)
            # Anthropic's message_start carries the input tokens, before any is generated: counted here
            # (the job counts them again, on the engine's thread)
            counted = await asyncio.to_thread(prompt_tokens, engine, chat)
            cancelled = threading.Event()
            events, future = start_streaming(request, start, cancelled)
            return StreamingResponse(reply.events(request, counted, events, future, cancelled, tally),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post(PREFIX + "/count_tokens")
    async def count_tokens(body: Conversation) -> dict[str, int]:
        chat = chat_request(body)
        async with router.use(chat.model) as model:
            return {"input_tokens": await asyncio.to_thread(prompt_tokens, model.engine, chat)}


# ------------------------------------------------------------------ request -> chat

def block_text(blocks: Any, where: str) -> str:
    """A string, or text blocks joined by newlines (clients send a turn's parts as separate blocks:
    Claude Code its reminders, then the prompt; joined without one they would run together)."""
    if isinstance(blocks, str) or blocks is None:
        return blocks or ""
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where}: a string or a list of text blocks is expected", param=where.split(".")[0])
    texts = []
    for number, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind != "text":
            raise ApiError(400, f"{where}.{number}: blocks of type {kind!r} are not supported here; this model "
                           "reads text blocks only", param=where.split(".")[0])
        texts.append(str(block.get("text", "")))
    return "\n".join(texts)


def chat_messages(system: Any, messages: list[InputMessage]) -> list[dict[str, Any]]:
    """The conversation as chat messages: tool_use blocks as the assistant message's tool_calls,
    each tool_result block as a tool message (before the user's text that follows it), earlier thinking
    dropped (chat templates do not read it back)."""
    out = [{"role": "system", "content": block_text(system, "system")}] if system else []
    for number, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts, calls, results = [], [], []
        for part, block in enumerate(message.content):
            kind, where = block.get("type"), f"messages.{number}.content.{part}"
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use" and message.role == "assistant":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and message.role == "user":
                content = block_text(block.get("content"), where + ".content")
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                "content": f"Error: {content}" if block.get("is_error") else content})
            elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
                continue
            elif kind in ("image", "document"):
                raise ApiError(400, f"{where}: {kind} blocks are not supported; this server's model reads text "
                               "only", param="messages")
            else:
                raise ApiError(400, f"{where}: blocks of type {kind!r} are not supported in a {message.role} "
                               "message (text, tool_use in assistant messages and tool_result in user messages "
                               "are)", param="messages")
        out += results
        if calls:
            out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts or not results:
            out.append({"role": message.role, "content": "\n".join(texts)})
    return out


def chat_tools(body: Conversation) -> dict[str, Any]:
    """tools and tool_choice as chat completions takes them."""
    if not body.tools:
        return {}
    given = []
    for number, tool in enumerate(body.tools):
        if tool.type not in (None, "custom"):
            raise ApiError(400, f"tools.{number}: Anthropic's server tools ({tool.type!r}) are not supported; "
                           "give client tools (name, description, input_schema)", param="tools")
        given.append({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                       "parameters": tool.input_schema}})
    choice = body.tool_choice or ToolChoice(type="auto")
    named = {"type": "function", "function": {"name": choice.name}}
    return {"tools": given, "parallel_tool_calls": not choice.disable_parallel_tool_use,
            "tool_choice": {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]}


def chat_request(body: Conversation) -> ChatRequest:
    """The chat completion that answers this request; its checks name the Messages fields."""
    fields: dict[str, Any] = {"model": body.model, "messages": chat_messages(body.system, body.messages),
                              **chat_tools(body)}
    if body.thinking is not None and body.thinking.type != "adaptive":
        fields["chat_template_kwargs"] = {reasoning.SWITCH: body.thinking.type == "enabled"}
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p or 1.0, top_k=body.top_k, stream=body.stream)
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:
        error = validation_error(exc.errors()[0])
        if error.param == "stop":
            raise ApiError(400, error.message.replace("stop", "stop_sequences", 2), param="stop_sequences") from None
        raise error from None


def prompt_tokens(engine: Engine, chat: ChatRequest) -> int:
    """The tokens of the prompt the chat path renders for this request (its tools described too)."""
    use = chat.tool_use()
    prompt = chat_prompt(chat, use, tools.call_format(engine.chat_template))
    try:
        return len(encode_prompt(engine, prompt, sampling_options(chat, 1, chat=True)))
    except LlmcliError as exc:
        raise api_error(exc) from exc


class StopSequenceShape:
    """The chat path's reply shape, and which stop sequence ended the reply (chat completions says
    "stop" for a stop string and for EOS alike; Anthropic tells them apart)."""

    def __init__(self, shape: Any, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.shape, self.decode, self.stops = shape, decode, stops
        self.opening = shape.opening

    def emitter(self, emit: Callable[[dict], None], place: int) -> Callable[[str], None]:
        return self.shape.emitter(emit, place)

    def message(self, result: Generation, place: int,
                emit: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], str]:
        message, reason = self.shape.message(result, place, emit)
        if result.finish_reason == "stop":  # the kept tokens end with the one that completed the stop string
            text = self.decode(result.token_ids)
            at = find_stop(text, self.stops)
            ended = [stop for stop in self.stops if at is not None and text.startswith(stop, at)]
            message["stop_sequence"] = min(ended, key=len) if ended else None
        return message, reason


# ------------------------------------------------------------------ chat -> message

def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat message as content blocks: thinking, text (empty when nothing else came), tool_use."""
    blocks = []
    if message.get("reasoning_content"):  # where a reasoning model's thinking, split off by the chat path, goes
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        blocks.append({"type": "text", "text": message.get("content") or ""})
    blocks += [{"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                "input": json.loads(call["function"]["arguments"])} for call in calls]
    return blocks


def stop_reason(finish_reason: str, stop_sequence: str | None) -> str:
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "end_turn" if stop_sequence is None else "stop_sequence"


def usage_of(usage: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage: input_tokens without the cached ones, which are cache_read_input_tokens."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


class Reply:
    """One message being answered: the finished Message, or (streamed) its event sequence."""

    def __init__(self, model: str) -> None:
        self.model, self.ident = model, new_id("msg")

    def message(self, content: list[dict[str, Any]], reason: str | None, sequence: str | None,
                usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.ident, "type": "message", "role": "assistant", "content": content, "model": self.model,
                "stop_reason": reason, "stop_sequence": sequence, "usage": usage}

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        [choice] = result["choices"]
        sequence = choice["message"].pop("stop_sequence", None)
        return self.message(content_blocks(choice["message"]), stop_reason(choice["finish_reason"], sequence),
                            sequence, usage_of(result["usage"]))

    async def events(self, request: Request, counted: int, queue: asyncio.Queue, future: asyncio.Future,
                     cancelled: threading.Event, tally: Tally) -> AsyncIterator[str]:
        stream = EventStream()
        try:
            yield event("message_start", message=self.message([], None, None, {
                "input_tokens": counted, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}))
            while (delta := await next_event(queue, future)) is not None:
                for line in stream.delta(delta["delta"]):
                    yield line
            while not queue.empty():
                for line in stream.delta(queue.get_nowait()["delta"]):
                    yield line
            try:
                result = job_result(future)
            except ApiError as error:
                tally.failed(error)
                yield event("error", **{key: value for key, value in anthropic_body(error).items() if key != "type"})
                return
            tally.finished(result)
            request.state.tokens = result["usage"]["total_tokens"]
            finished = self.finish(result)
            for line in stream.close(finished["content"]):
                yield line
            yield event("message_delta", delta={"stop_reason": finished["stop_reason"],
                                                "stop_sequence": finished["stop_sequence"]}, usage=finished["usage"])
            yield event("message_stop")
        finally:
            cancelled.set()
            tally.failed()


def event(kind: str, **fields: Any) -> str:
    """One server-sent event as Anthropic sends it: its name on the `event:` line and in the data's type."""
    return f"event: {kind}\ndata: {strict_json.dumps({'type': kind, **fields})}\n\n"


class EventStream:
    """Chat deltas as content blocks: a block started when its first delta comes (a ping after the
    first, as Anthropic sends it), stopped when the next starts or the message ends. Calls come whole
    from the chat path (tools.ReplyReader), each as one tool_use block with one input_json_delta."""

    def __init__(self) -> None:
        self.kinds: list[str] = []  # the blocks started so far
        self.stopped = True

    def delta(self, delta: dict[str, Any]) -> list[str]:
        events = []
        if delta.get("reasoning_content"):  # a reasoning model's thinking (llmcli.reasoning's field)
            events += self.text("thinking", delta["reasoning_content"])
        if delta.get("content"):
            events += self.text("text", delta["content"])
        for call in delta.get("tool_calls") or []:
            function = call.get("function", {})
            if "id" in call:
                events += self.start({"type": "tool_use", "id": tool_use_id(call["id"]), "name": function["name"],
                                      "input": {}})
            if function.get("arguments"):
                events.append(event("content_block_delta", index=len(self.kinds) - 1,
                                    delta={"type": "input_json_delta", "partial_json": function["arguments"]}))
        return events

    def text(self, kind: str, text: str) -> list[str]:
        events = []
        if self.stopped or self.kinds[-1] != kind:
            events += self.start({"type": "text", "text": ""} if kind == "text"
                                 else {"type": "thinking", "thinking": "", "signature": ""})
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        return events + ([event("content_block_delta", index=len(self.kinds) - 1, delta=delta)] if text else [])

    def start(self, block: dict[str, Any]) -> list[str]:
        events = self.stop()
        self.kinds.append(block["type"])
        self.stopped = False
        events.append(event("content_block_start", index=len(self.kinds) - 1, content_block=block))
        return events + ([event("ping")] if len(self.kinds) == 1 else [])

    def stop(self) -> list[str]:
        if self.stopped:
            return []
        self.stopped = True
        return [event("content_block_stop", index=len(self.kinds) - 1)]

    def close(self, content: list[dict[str, Any]]) -> list[str]:
        """The last block stopped; blocks the stream never started (the empty text of a reply that
        streamed nothing) started and stopped here."""
        events = []
        for block in content[len(self.kinds):]:
            if block["type"] == "tool_use":
                events += self.start({**block, "input": {}}) + [event(
                    "content_block_delta", index=len(self.kinds) - 1,
                    delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})]
            else:
                events += self.text(block["type"], block.get("text", block.get("thinking", "")))
        return events + self.stop()
