"""Tool calling in `llmcli serve`, on both engines and in both call formats (the generic JSON one for
templates without tools, the `<tool_call>` markers of a Hermes-style template given with
--chat-template), through the official openai client; the Responses API; openai-agents and
LangChain against the server. Arguments are checked by `jsonschema`, not by the library that
constrains. Servers bind 127.0.0.1 on a free port."""

from __future__ import annotations

import json

import pytest

from test_serve import serving

jsonschema = pytest.importorskip("jsonschema")

# A Hermes/Qwen-2.5-style template: tools in the system turn, calls as <tool_call> blocks, results as
# <tool_response> blocks in a user turn
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}, "exact": {"type": "boolean"}},
         "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                            "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def hermes_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "hermes.jinja"
    path.write_text(HERMES_TEMPLATE)
    return path


@pytest.fixture(params=["llama.cpp generic", "llama.cpp marker", "hf generic", "hf marker"])
def server(request, hermes_template):
    """The tiny F32 GGUF (llama.cpp, SmolLM2's template: generic) or the tiny Llama (hf, a template
    without tools: generic), each with a context of 2048 and each also with the Hermes template (markers)."""
    engine, form = request.param.split()
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
        model = request.getfixturevalue("tiny_gguf_2k")
    else:
        model = request.getfixturevalue("tiny_llama_2k")
    template = ["--chat-template", hermes_template] if form == "marker" else []
    with serving("-m", model, "--engine", engine, *template) as running:
        running.form = form
        yield running


def check_calls(message, allowed: set[str]) -> None:
    """Every call names an allowed tool, has an id, and arguments valid for that tool's schema."""
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)


def test_every_tool_choice_form_gives_calls_that_validate(server):
    """16 seeded samples for each tool_choice: required and a named function always call (the named one
    only), with arguments valid for the tool's schema; auto calls validly or answers in plain text;
    parallel_tool_calls false allows one call; none never calls."""
    client = server.client()
    model = client.models.list().data[0].id

    def sample(max_tokens=1000, **fields):  # room for 8 calls; a free-text answer is cut sooner
        completion = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, n=16, seed=7,
                                                    temperature=1.0, max_tokens=max_tokens, **fields)
        return completion.choices

    for choice in sample(tool_choice="required"):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message, {"get_weather", "get_time"})
    for choice in sample(tool_choice={"type": "function", "function": {"name": "get_time"}}):
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        check_calls(choice.message, {"get_time"})
    for choice in sample(tool_choice="required", parallel_tool_calls=False):
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message, {"get_weather", "get_time"})
    for choice in sample(max_tokens=48):  # auto, the default with tools
        if choice.finish_reason == "tool_calls":
            check_calls(choice.message, {"get_weather", "get_time"})
        elif not choice.message.tool_calls:
            assert isinstance(choice.message.content, str) and "<tool_call>" not in choice.message.content
            assert not choice.message.content.startswith('{"response"')  # the generic wrapper is unwrapped
    for choice in sample(max_tokens=8, tool_choice="none"):
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


def test_a_streamed_call_is_the_unstreamed_one_in_deltas_the_sdk_reassembles(server):
    """Seeded and streamed: every tool-call delta has an index, each call's id, type and name come once,
    its arguments in fragments; the SDK's stream helper reassembles the same calls as the plain request."""
    client = server.client()
    model = client.models.list().data[0].id
    # room for 8 calls of the tiny tokenizer's ~60 tokens each
    fields = dict(model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", seed=3, temperature=1.0,
                  max_tokens=1000)
    plain = client.chat.completions.create(**fields).choices[0]
    headers, fragments, reasons = {}, {}, []
    for chunk in client.chat.completions.create(stream=True, **fields):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                assert delta.index is not None
                if delta.id is not None:
                    assert delta.index not in headers and delta.type == "function"
                    headers[delta.index] = (delta.id, delta.function.name)
                else:
                    assert delta.function.name is None
                fragments[delta.index] = fragments.get(delta.index, "") + (delta.function.arguments or "")
    assert reasons[-1] == "tool_calls"
    assert [(name, fragments[index]) for index, (_, name) in sorted(headers.items())] == \
        [(call.function.name, call.function.arguments) for call in plain.message.tool_calls]
    with client.chat.completions.stream(**fields) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert [(call.function.name, call.function.arguments) for call in final.message.tool_calls] == \
        [(call.function.name, call.function.arguments) for call in plain.message.tool_calls]
    assert final.finish_reason == "tool_calls"


def test_tools_with_a_response_format_call_or_answer_in_the_schema(server):
    """tools together with a json_schema response_format (what openai-agents sends for an agent with an
    output type): each of 16 samples is a valid call or an answer valid for the schema."""
    client = server.client()
    model = client.models.list().data[0].id
    answer = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 20}},
              "required": ["summary"], "additionalProperties": False}
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, n=16, seed=11, temperature=1.0, max_tokens=400,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}})
    kinds = set()
    for choice in completion.choices:
        if choice.message.tool_calls:
            check_calls(choice.message, {"get_weather", "get_time"})
            kinds.add("call")
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), answer)
            kinds.add("answer")
    assert kinds


def test_the_conversation_comes_back_with_the_tool_result(tiny_gguf, hermes_template):
    """A two-turn loop on the embedded model: the call, then the result sent back with the assistant
    message (content null, arguments as a string or an object) and a tool message; the second turn reads
    the result (more prompt tokens) and reuses the cached first turn."""
    pytest.importorskip("llama_cpp")
    with serving() as server:
        client = server.client()
        first = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=TOOLS,
                                               tool_choice="required", temperature=0, max_tokens=64)
        call = first.choices[0].message.tool_calls[0]
        check_calls(first.choices[0].message, {"get_weather", "get_time"})
        for arguments in (call.function.arguments, json.loads(call.function.arguments)):
            history = QUESTION + [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                                     "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
            second = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS,
                                                    temperature=0, max_tokens=64)
            assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
            assert second.usage.prompt_tokens_details.cached_tokens > 0
            message = second.choices[0].message
            if message.tool_calls:
                check_calls(message, {"get_weather", "get_time"})
            else:
                assert message.content
        without_tools = client.chat.completions.create(model="smollm2", messages=history, max_tokens=8)
        assert without_tools.choices[0].message.tool_calls is None  # a tool history, no tools offered


BAD_REQUESTS = [  # (body, param, what the message says)
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, "tools",
     "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "type object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools", "tool's parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages", "content"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "one name"),
]


def test_bad_tool_requests_are_answered_by_name_and_the_server_keeps_serving(tiny_gguf):
    pytest.importorskip("llama_cpp")
    with serving("-m", tiny_gguf) as server:
        for body, param, fragment in BAD_REQUESTS:
            code, _, answer = server.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4, **body})
            assert code == 400 and answer["error"]["param"] == param, (body, answer)
            assert fragment in answer["error"]["message"], (body, answer)
            assert answer["error"]["type"] == "invalid_request_error"
        code, _, answer = server.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})
        assert code == 200
