"""`/v1/responses`: OpenAI's Responses API as another face of chat completions. Its input items
become chat messages, the chat path runs them (tools, constraints, the scheduler, the prefix cache),
and the chat reply becomes the response's output items; streamed, the chat deltas become the
Responses event sequence. Only the store of earlier responses, for `previous_response_id`, is its own:
kept in memory, the least recently used dropped first past RESPONSES_KEPT."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from llmcli import strict_json
from llmcli.serve.chat import chat_start
from llmcli.serve.common import Tally, job_result, next_event, run_to_end, start_streaming
from llmcli.serve.errors import ApiError, error_body, validation_error
from llmcli.serve.metrics import Metrics
from llmcli.serve.router import Router
from llmcli.serve.schemas import ChatRequest
from llmcli.serve.settings import Settings

RESPONSES_KEPT = 1000  # stored responses; each holds its whole conversation as chat messages


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextOptions(BaseModel):
    format: Optional[TextFormat] = None


class ResponsesRequest(BaseModel):
    """The fields this server reads; others (metadata, user, truncation...) are ignored."""

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]] = Field(min_length=1)
    instructions: Optional[str] = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    text: Optional[TextOptions] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None  # beyond OpenAI, as chat completions takes it
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    reasoning: Optional[dict[str, Any]] = None  # {"effort": ...}: chat completions' reasoning_effort
    chat_template_kwargs: Optional[dict[str, Any]] = None  # as on chat completions (vLLM takes it here too)


class Store:
    """Earlier responses by id: the response object and its conversation (chat messages, without the
    instructions, which OpenAI does not carry to the next response)."""

    def __init__(self, size: int = RESPONSES_KEPT) -> None:
        self.size, self.kept = size, OrderedDict()
        self.lock = threading.Lock()

    def put(self, ident: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        with self.lock:
            self.kept[ident] = (response, conversation)
            self.kept.move_to_end(ident)
            while len(self.kept) > self.size:
                self.kept.popitem(last=False)

    def get(self, ident: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with self.lock:
            if ident not in self.kept:
                raise ApiError(404, f"no stored response with id {ident!r} (this server keeps the last "
                               f"{self.size}, in memory)", param="previous_response_id",
                               code="previous_response_not_found")
            self.kept.move_to_end(ident)
            return self.kept[ident]


def add_route(app: FastAPI, router: Router, metrics: Metrics) -> None:
    store = Store()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        earlier = store.get(body.previous_response_id)[1] if body.previous_response_id else []
        conversation = earlier + input_messages(body.input)
        chat = chat_request(body, conversation)
        async with router.use(body.model) as model:
            start = router.hold(model, await chat_start(model, chat, router.adapter_of(body.model)))
            reply = Reply(body, model.settings, store, conversation)
            tally = Tally(metrics, time.perf_counter(), model.settings.prefix_cache)
            if not body.stream:
                return reply.finish(await run_to_end(request, start, tally))
            cancelled = threading.Event()
            events, future = start_streaming(request, start, cancelled)
        return StreamingResponse(reply.events(request, events, future, cancelled, tally),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/responses/{ident}")
    async def stored_response(ident: str) -> Any:
        try:
            return store.get(ident)[0]
        except ApiError as error:
            raise ApiError(404, error.message, code="not_found") from None


# ------------------------------------------------------------------ request -> chat

def text_of(content: Any) -> str:
    """A message's content: a string, or its text parts joined (input_text, output_text, text)."""
    if isinstance(content, str) or content is None:
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, "input: a message's content is a string or a list of parts", param="input")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"input content parts of type {kind!r} are not supported; this model reads text "
                           "parts (input_text) only", param="input")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def input_messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: messages as they are, a run of function_call items as one
    assistant message with tool_calls, each function_call_output as a tool message."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages: list[dict[str, Any]] = []
    for number, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError(400, f"input[{number}]: a message's role is user, system, developer or assistant, "
                               f"not {role!r}", param="input")
            messages.append({"role": role, "content": text_of(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and (last.get("tool_calls") or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else text_of(output)})
        elif kind == "reasoning":
            continue  # a reasoning model's summary: nothing this model reads
        else:
            raise ApiError(400, f"input[{number}]: items of type {kind!r} are not supported (message, "
                           "function_call and function_call_output are)", param="input")
    return messages


def chat_request(body: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatRequest:
    """The chat completion that answers this response; its checks name the Responses fields."""
    tools = []
    for number, tool in enumerate(body.tools):
        if tool.get("type") != "function":
            raise ApiError(400, f"tools[{number}]: tools of type {tool.get('type')!r} are not supported "
                           "(function tools are)", param="tools")
        tools.append({"type": "function", "function": {key: tool[key] for key in
                                                       ("name", "description", "parameters", "strict") if key in tool}})
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fields: dict[str, Any] = {
        "model": body.model, "messages": ([{"role": "system", "content": body.instructions}] if body.instructions
                                          else []) + conversation,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stream": body.stream,
        "max_tokens": body.max_output_tokens, "parallel_tool_calls": body.parallel_tool_calls,
    }
    if tools:
        fields.update(tools=tools, tool_choice=choice)
    if body.reasoning and body.reasoning.get("effort") is not None:
        fields["reasoning_effort"] = body.reasoning["effort"]
    if body.chat_template_kwargs:
        fields["chat_template_kwargs"] = body.chat_template_kwargs
    chosen = body.text.format if body.text else None
    if chosen is not None and chosen.type == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": chosen.name or "response", "schema": chosen.schema_ or {"type": "object"}, "strict": chosen.strict}}
    elif chosen is not None and chosen.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:
        error = validation_error(exc.errors()[0])
        renamed = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
        raise ApiError(400, error.message, param=renamed.get(error.param, error.param)) from None


# ------------------------------------------------------------------ chat -> response

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Reply:
    """One response being answered: its ids, the object the client gets, the stored conversation,
    and (streamed) the event sequence made from the chat deltas."""

    def __init__(self, body: ResponsesRequest, settings: Settings, store: Store,
                 conversation: list[dict[str, Any]]) -> None:
        self.body, self.settings, self.store, self.conversation = body, settings, store, conversation
        self.ident, self.created = new_id("resp"), int(time.time())
        self.message_id, self.call_ids = new_id("msg"), []  # item ids, the same streamed and finished
        self.reasoning_id = new_id("rs")
        self.sequence = 0

    def envelope(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 incomplete: bool = False) -> dict[str, Any]:
        body = self.body
        format_ = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        return {"id": self.ident, "object": "response", "created_at": self.created, "status": status,
                "model": self.settings.model_name, "output": output, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.instructions, "metadata": {}, "parallel_tool_calls": body.parallel_tool_calls,
                "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
                "previous_response_id": body.previous_response_id, "store": body.store,
                "tool_choice": body.tool_choice or "auto", "tools": body.tools, "text": {"format": format_},
                "truncation": "disabled", "usage": usage}

    def output(self, message: dict[str, Any], incomplete: bool) -> list[dict[str, Any]]:
        """The output items; in a response cut by max_output_tokens only the text that was cut is
        incomplete: its calls are whole (the chat reply holds no call that was cut)."""
        calls = message.get("tool_calls") or []
        items = [self.reasoning_item(message["reasoning_content"])] if message.get("reasoning_content") else []
        if message.get("content"):
            items.append(self.message_item(message["content"], "incomplete" if incomplete and not calls
                                           else "completed"))
        for number, call in enumerate(calls):
            while len(self.call_ids) <= number:
                self.call_ids.append(new_id("fc"))
            items.append({"type": "function_call", "id": self.call_ids[number], "call_id": call["id"],
                          "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                          "status": "completed"})
        return items

    def reasoning_item(self, text: str | None, status: str = "completed") -> dict[str, Any]:
        """A thinking model's thinking, as vLLM's Responses API returns it: a `reasoning` item whose content
        is the text (no summary: nothing here summarizes)."""
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def message_item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": content}

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The finished response (stored when asked) from the chat result."""
        [choice] = result["choices"]
        incomplete = choice["finish_reason"] == "length"
        usage = result["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        response = self.envelope("incomplete" if incomplete else "completed", self.output(choice["message"], incomplete),
                                 {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                  "total_tokens": usage["total_tokens"],
                                  "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                                  "output_tokens_details": {"reasoning_tokens": 0}}, incomplete)
        if self.body.store:
            self.store.put(self.ident, response, self.conversation + [choice["message"]])
        return response

    # ------------------------------------------------------------ streaming

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return f"event: {kind}\ndata: {strict_json.dumps({'type': kind, 'sequence_number': self.sequence - 1, **fields})}\n\n"

    async def events(self, request: Request, queue: asyncio.Queue, future: asyncio.Future,
                     cancelled: threading.Event, tally: Tally) -> AsyncIterator[str]:
        stream = EventStream(self)
        try:
            yield self.event("response.created", response=self.envelope("in_progress", [], None))
            yield self.event("response.in_progress", response=self.envelope("in_progress", [], None))
            while (delta := await next_event(queue, future)) is not None:
                for event in stream.delta(delta["delta"]):
                    yield event
            while not queue.empty():
                for event in stream.delta(queue.get_nowait()["delta"]):
                    yield event
            try:
                result = job_result(future)
            except ApiError as error:
                tally.failed(error)
                yield self.event("error", **error_body(error.message, error.kind, error.param, error.code)["error"])
                return
            tally.finished(result)
            request.state.tokens = result["usage"]["total_tokens"]
            response = self.finish(result)
            for event in stream.close(response["output"]):
                yield event
            # OpenAI's last event is named by the status: response.incomplete for a response cut
            # by max_output_tokens, so that a client does not take it for a finished one (the
            # SDK's stream helper then has no final response, as against OpenAI)
            yield self.event(f"response.{response['status']}", response=response)
        finally:
            cancelled.set()
            tally.failed()


class EventStream:
    """Chat deltas (content, tool-call headers, argument fragments) as Responses events: each output
    item opened when its first delta comes, closed when the next opens or the response ends."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.items: list[dict[str, Any]] = []  # the items opened so far, as streamed
        self.calls = 0

    def delta(self, delta: dict[str, Any]) -> list[str]:
        events, reply = [], self.reply
        if delta.get("reasoning_content"):
            if not self.items or self.items[-1]["type"] != "reasoning":
                events += self.open(reply.reasoning_item(None, "in_progress"))
                events.append(reply.event("response.content_part.added", output_index=len(self.items) - 1,
                                          content_index=0, item_id=reply.reasoning_id,
                                          part={"type": "reasoning_text", "text": ""}))
                self.items[-1]["text"] = ""
            self.items[-1]["text"] += delta["reasoning_content"]
            events.append(reply.event("response.reasoning_text.delta", output_index=len(self.items) - 1,
                                      content_index=0, item_id=reply.reasoning_id, delta=delta["reasoning_content"]))
        if delta.get("content"):
            if not self.items or self.items[-1]["type"] != "message":
                events += self.open(reply.message_item(None, "in_progress"))
                events.append(reply.event("response.content_part.added", output_index=len(self.items) - 1,
                                          content_index=0, item_id=reply.message_id,
                                          part={"type": "output_text", "text": "", "annotations": []}))
                self.items[-1]["text"] = ""
            self.items[-1]["text"] += delta["content"]
            events.append(reply.event("response.output_text.delta", output_index=len(self.items) - 1,
                                      content_index=0, item_id=reply.message_id, delta=delta["content"], logprobs=[]))
        for call in delta.get("tool_calls") or []:
            if "id" in call:  # a call's header: a new function_call item
                while len(reply.call_ids) <= self.calls:
                    reply.call_ids.append(new_id("fc"))
                events += self.open({"type": "function_call", "id": reply.call_ids[self.calls], "call_id": call["id"],
                                     "name": call["function"]["name"], "arguments": "", "status": "in_progress"})
                self.calls += 1
            fragment = call.get("function", {}).get("arguments", "")
            if fragment and self.items and self.items[-1]["type"] == "function_call":
                self.items[-1]["arguments"] += fragment
                events.append(reply.event("response.function_call_arguments.delta", output_index=len(self.items) - 1,
                                          item_id=self.items[-1]["id"], delta=fragment))
        return events

    def open(self, item: dict[str, Any]) -> list[str]:
        events = self.close_last()
        self.items.append(item)
        shown = {key: value for key, value in item.items() if key != "text"}
        return events + [self.reply.event("response.output_item.added", output_index=len(self.items) - 1,
                                          item=shown)]

    def close_last(self, finished: dict[str, Any] | None = None) -> list[str]:
        """The done events of the last opened item: `finished` (its form in the finished response),
        else the item as streamed."""
        if not self.items:
            return []
        index, reply, item = len(self.items) - 1, self.reply, self.items[-1]
        if item["type"] == "reasoning":
            done = finished or reply.reasoning_item(item.get("text", ""))
            text = done["content"][0]["text"] if done["content"] else ""
            return [reply.event("response.reasoning_text.done", output_index=index, content_index=0,
                                item_id=reply.reasoning_id, text=text),
                    reply.event("response.content_part.done", output_index=index, content_index=0,
                                item_id=reply.reasoning_id, part={"type": "reasoning_text", "text": text}),
                    reply.event("response.output_item.done", output_index=index, item=done)]
        if item["type"] == "message":
            done = finished or reply.message_item(item.get("text", ""), "completed")
            text = done["content"][0]["text"] if done["content"] else ""
            return [reply.event("response.output_text.done", output_index=index, content_index=0,
                                item_id=reply.message_id, text=text, logprobs=[]),
                    reply.event("response.content_part.done", output_index=index, content_index=0,
                                item_id=reply.message_id, part={"type": "output_text", "text": text, "annotations": []}),
                    reply.event("response.output_item.done", output_index=index, item=done)]
        done = finished or {**item, "status": "completed"}
        return [reply.event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                            name=done["name"], arguments=done["arguments"]),
                reply.event("response.output_item.done", output_index=index, item=done)]

    def close(self, output: list[dict[str, Any]]) -> list[str]:
        """The last item's done events, with its form in the finished response's output; items the
        stream never opened (a reply that streamed nothing) are opened and closed here."""
        events = []
        for number, item in enumerate(output):
            if number >= len(self.items):
                events += self.open(dict(item))
        return events + self.close_last(output[len(self.items) - 1] if output and self.items else None)
