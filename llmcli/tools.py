"""Tool calling below the server: the tools and the tool history rendered into a prompt, the
constraint that makes every call parse, and a reply (finished or partial) read back into calls.
No HTTP here: the server translates OpenAI's shapes to these and back.

Two formats, chosen by the chat template:
- "marker": a template that renders `tools` and writes calls as `<tool_call>{json}</tool_call>`
  (Hermes, Qwen 2.5 and their fine-tunes) gets the tools and the history through the template, and
  the model's own markers; "auto" constrains from the first marker on (a lazy prefix in the grammar),
  so free text before it is the model's own.
- "generic" (every other template, the embedded SmolLM2's among them): the tools are described in a
  system message and the whole reply is constrained to JSON, `{"tool_calls": [{"name", "arguments"}]}`
  or `{"response": ...}`, as llama.cpp's common/chat "generic" format does; earlier calls and tool
  results are rendered as the same JSON, so the model reads its own history in the shape it wrote it.

Calls are compact JSON with `name` first (x-guidance: no free whitespace), which is what lets a
partial reply be read while it streams.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmcli.constraints import Constraint, bounded_strings, closed_objects

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# calls in one reply at most: a bound on any loop of calls, as JSON strings and numbers are bounded by
# default (a reply also ends at its first repeated call: `RepeatedCall`)
MAX_CALLS = 8
COMPACT = {"whitespace_flexible": False}  # llguidance's JSON options: `,` and `:` with no spaces


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """OpenAI's function-tool shape, as chat templates read `tools`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of the tools: `choice` is "auto", "required", "none" or a tool's name."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True
    answer_schema: dict[str, Any] | None = None  # response_format's schema: an answer must match it

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def callable_tools(self) -> tuple[Tool, ...]:
        if self.choice in ("auto", "required", "none"):
            return self.tools
        return tuple(tool for tool in self.tools if tool.name == self.choice)

    @property
    def must_call(self) -> bool:
        return self.choice != "auto"


def call_format(chat_template: str | None) -> str:
    """ "marker" when the template writes `<tool_call>` itself from `tools`, else "generic"."""
    source = chat_template or ""
    return "marker" if OPEN in source and "tools" in source else "generic"


# ------------------------------------------------------------------ the prompt

def prompt_messages(messages: list[dict[str, Any]], use: ToolUse | None,
                    form: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the chat template and the `tools` it is given (None: the template gets none).
    `messages` are OpenAI's: assistant messages may carry `tool_calls` (arguments a JSON string or an
    object) and `content` None; `role: tool` messages carry `tool_call_id`."""
    if form == "marker":
        rendered = [marker_message(message) for message in messages]
        return rendered, [tool.spec() for tool in use.tools] if use and use.active else None
    names = {call["id"]: call["name"] for message in messages for call in message.get("tool_calls") or []}
    rendered = [generic_message(message, names) for message in messages]
    if use and use.active:
        rendered = with_system(rendered, generic_instructions(use))
    return rendered, None


def arguments_object(arguments: Any) -> Any:
    """Arguments as an object: templates write them with `tojson`, and a JSON string would be quoted."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments  # not JSON: passed on as the client wrote it
    return arguments


def marker_message(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [{"id": call["id"], "type": "function",
              "function": {"name": call["name"], "arguments": arguments_object(call["arguments"])}}
             for call in message["tool_calls"]]
    return {**message, "content": message.get("content") or "", "tool_calls": calls}


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def generic_message(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """An assistant's calls as the JSON the model writes, a tool's result as a user turn holding it
    (as minja's polyfills do for templates without a `tool` role)."""
    if message.get("tool_calls"):
        calls = [{"name": call["name"], "arguments": arguments_object(call["arguments"])}
                 for call in message["tool_calls"]]
        return {"role": "assistant", "content": compact({"tool_calls": calls})}
    if message["role"] == "tool":
        result = {"tool": names.get(message.get("tool_call_id"), ""), "content": message.get("content") or ""}
        return {"role": "user", "content": compact({"tool_response": result})}
    return {"role": message["role"], "content": message.get("content") or ""}


def with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` after the system message's own, or as a system message of its own."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def generic_instructions(use: ToolUse) -> str:
    tools = [{"name": tool.name, "description": tool.description, "parameters": tool.parameters}
             for tool in use.callable_tools()]
    lines = ["You can call these tools:", json.dumps(tools, ensure_ascii=False), "",
             'To call tools, reply with JSON: {"tool_calls":[{"name":"<tool name>","arguments":{<its arguments>}}]}']
    if not use.must_call:
        answer = "<your answer as JSON>" if use.answer_schema is not None else '"<your answer>"'
        lines.append(f'To answer the user directly, reply with JSON: {{"response":{answer}}}')
        lines.append("A tool's result comes back as a tool_response; once it holds what the user asked for, "
                     "answer with a response instead of calling the tool again.")
    return "\n".join(lines)


# ------------------------------------------------------------------ the constraint

def call_schema(tool: Tool) -> dict[str, Any]:
    arguments = bounded_strings(closed_objects(tool.parameters))
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def constraint(use: ToolUse, form: str) -> Constraint | None:
    """Every reply the grammar allows is calls to the given tools with arguments valid for their
    schemas, or (unless a call is required) an answer; `parallel` False allows one call."""
    if not use.active:
        return None
    call = one_of([call_schema(tool) for tool in use.callable_tools()])
    single = not use.parallel or use.choice not in ("auto", "required")
    ends = None if single else RepeatedCall(form)
    if form == "generic":
        calls = {"type": "array", "items": call, "minItems": 1, "maxItems": 1 if single else MAX_CALLS}
        options = [{"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                    "additionalProperties": False}]
        if not use.must_call:
            answer = use.answer_schema if use.answer_schema is not None else {"type": "string"}
            options.append({"type": "object", "properties": {"response": answer}, "required": ["response"],
                            "additionalProperties": False})
        return Constraint("schema", json.dumps(one_of(options)), ends)
    body = f'"\\n"? %json {json.dumps({"x-guidance": COMPACT, **call})} "\\n"? "{CLOSE}"'
    more = "" if single else f' ("\\n"? call){{0,{MAX_CALLS - 1}}}'
    rules = [f"call: \"{OPEN}\" body", f"body: {body}"]
    if use.must_call:
        rules.insert(0, f"start: call{more}")
    elif use.answer_schema is not None:  # an answer in the schema, or calls
        rules.insert(0, f"start: answer | call{more}")
        rules.append(f"answer: %json {json.dumps({'x-guidance': COMPACT, **bounded_strings(use.answer_schema)})}")
    else:  # free text without the marker, or text up to the first marker (lazy: it ends there) and calls
        rules.insert(0, f"start: TEXT | prefix body{more}")
        rules += [f"prefix[lazy]: /(.|\\n)*{OPEN}/", f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{OPEN}(.|\\n)*/"]
    return Constraint("grammar", "\n".join(rules), ends)


@dataclass(frozen=True)
class RepeatedCall:
    """Ends a reply at its first call identical to an earlier one (same name and arguments): the
    embedded model, given room for several calls, writes one call again and again until MAX_CALLS or
    max_tokens cuts it. The repeat is dropped from the reply (`whole_calls`), so it ends with the calls
    before it and finish_reason "tool_calls"; distinct calls (a real parallel request) go on."""

    form: str

    def __call__(self, text: str) -> bool:
        done = [call for call in Scanner(self.form).read(text, finished=False).calls if call.done]
        return len(whole_calls(done)) < len(done)


# ------------------------------------------------------------------ reading a reply

@dataclass
class Call:
    id: str
    name: str
    arguments: str  # the JSON text as the model wrote it (partial while streaming)
    done: bool = False

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Reply:
    content: str | None
    calls: list[Call] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class Scanner:
    """Reads a reply's text as far as it goes: content so far, and each call's name once complete and
    its arguments' text so far. Partial text reads as a prefix of what the whole text reads as."""

    def __init__(self, form: str) -> None:
        self.form = form
        self.decoder = json.JSONDecoder()

    def read(self, text: str, finished: bool) -> Reply:
        if self.form == "generic":
            return self.read_generic(text, finished)
        return self.read_marker(text, finished)

    def value(self, text: str, at: int) -> tuple[Any, int] | None:
        try:
            return self.decoder.raw_decode(text, at)
        except ValueError:
            return None

    def skip(self, text: str, at: int, literal: str) -> int | None:
        """The index after `literal` at `at` (after whitespace), or None when the text is not there yet."""
        while at < len(text) and text[at] in " \n\r\t":
            at += 1
        return at + len(literal) if text.startswith(literal, at) else None

    def call(self, text: str, at: int) -> tuple[str | None, str, int | None]:
        """A call object at `at`: its name (None until complete), its arguments' text so far, and the
        index after the object (None until complete)."""
        key = self.skip(text, at, '{')
        key = key is not None and self.skip(text, key, '"name"')
        key = key and self.skip(text, key, ":")
        name = self.value(text, key) if key else None
        if name is None or not isinstance(name[0], str):
            return None, "", None
        at = self.skip(text, name[1], ",")
        at = at and self.skip(text, at, '"arguments"')
        at = at and self.skip(text, at, ":")
        if not at:
            return name[0], "", None
        while at < len(text) and text[at] in " \n\r\t":
            at += 1
        arguments = self.value(text, at)
        if arguments is None:
            return name[0], text[at:], None
        end = self.skip(text, arguments[1], "}")
        return name[0], text[at:arguments[1]], end

    def calls(self, text: str, at: int, separator: str, opener: str = "", closer: str = "") -> list[Call]:
        calls: list[Call] = []
        while True:
            start = self.skip(text, at, opener) if opener else at
            if start is None:
                return calls
            name, arguments, end = self.call(text, start)
            if name is None:
                return calls
            calls.append(Call("", name, arguments, end is not None))
            if end is None:
                return calls
            at = self.skip(text, end, closer) if closer else end
            if at is None:
                return calls
            if separator:
                after = self.skip(text, at, separator)
                if after is None:
                    return calls
                at = after

    def read_generic(self, text: str, finished: bool) -> Reply:
        at = self.skip(text, 0, "{")
        key = self.value(text, at) if at is not None else None
        if key is None:
            return Reply(None if finished else "")
        at = self.skip(text, key[1], ":")
        if at is None:
            return Reply("")
        if key[0] == "tool_calls":
            start = self.skip(text, at, "[")
            return Reply(None, self.calls(text, start, ",") if start is not None else [])
        while at < len(text) and text[at] in " \n\r\t":
            at += 1
        whole = self.value(text, at)
        if whole is not None:
            answer = whole[0]
            return Reply(answer if isinstance(answer, str) else text[at:whole[1]])
        if text[at:at + 1] == '"':
            return Reply(partial_string(text[at + 1:]))
        return Reply(text[at:])  # an answer in response_format's schema, as far as it goes

    def read_marker(self, text: str, finished: bool) -> Reply:
        first = text.find(OPEN)
        if first < 0:
            held = 0 if finished else held_back(text, OPEN)  # what may be the start of a marker
            return Reply(text[:len(text) - held])
        calls = self.calls(text, first, "", opener=OPEN, closer=CLOSE)
        return Reply(text[:first] if text[:first].strip() else None, calls)


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def partial_string(body: str) -> str:
    """The value of a JSON string's body that has not been closed yet, up to its last whole escape."""
    for cut in range(len(body), max(len(body) - 7, -1), -1):  # an escape is at most \uXXXX plus one
        try:
            return json.loads(f'"{body[:cut]}"')
        except ValueError:
            continue
    return ""


def whole_calls(calls: list[Call]) -> list[Call]:
    """The calls a reply carries: complete (a reply cut by max_tokens or a stop string may end inside
    one), with arguments that are a JSON object (the grammar makes them valid for the tool's schema),
    and each (name, arguments) once, as a repeat is no second request."""
    whole, seen = [], []
    for call in calls:
        if not call.done:
            continue
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            continue
        if isinstance(arguments, dict) and (call.name, arguments) not in seen:
            seen.append((call.name, arguments))
            whole.append(call)
    return whole


class ReplyReader:
    """One choice's reply read as it streams: `feed` returns the chat-completion deltas for the text
    added (content as it comes; each call once it is whole, in one delta with its id, name and
    arguments); `reply` is the finished reply, its calls those the stream sent, with the same ids.

    A call is held until it is whole so that a stream never sends arguments that a cut then leaves
    unparsable (clients parse what they were sent: LangChain reads a cut call as `args: {}`), nor a
    repeat that the finished reply drops; OpenAI's clients reassemble a call sent in one delta."""

    def __init__(self, form: str) -> None:
        self.scanner = Scanner(form)
        self.text = ""
        self.ids: list[str] = []
        self.content_sent = 0
        self.calls_sent = 0

    def feed(self, piece: str, finished: bool = False) -> list[dict[str, Any]]:
        self.text += piece
        reply = self.read(finished)
        deltas = []
        content = reply.content or ""
        if len(content) > self.content_sent:
            deltas.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for index, call in enumerate(reply.calls[self.calls_sent:], start=self.calls_sent):
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": call.arguments}}]})
        self.calls_sent = len(reply.calls)
        return deltas

    def read(self, finished: bool) -> Reply:
        reply = self.scanner.read(self.text, finished)
        while len(self.ids) < len(reply.calls):
            self.ids.append(new_call_id())
        for call, ident in zip(reply.calls, self.ids):
            call.id = ident
        reply.calls = whole_calls(reply.calls)
        return reply

    def reply(self) -> Reply:
        return self.read(finished=True)


def read_reply(text: str, form: str) -> Reply:
    """A finished reply's content and calls."""
    reader = ReplyReader(form)
    reader.text = text
    return reader.reply()
