"""Anthropic's Messages API on `llmcli serve` (/v1/messages, /v1/messages/count_tokens) through the
official `anthropic` SDK and raw HTTP, on both engines: the tiny Llama (hf) and the tiny GGUF
(llama.cpp), each with an API key; the embedded model for replies that end on their own. Answers are
compared with /v1/chat/completions for the same messages (the path underneath), tool inputs are
checked by `jsonschema`. Servers bind 127.0.0.1 on a free port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from test_serve import serving

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

KEY = "sk-test-messages"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
TOOLS = [{"name": "get_weather", "description": "The weather in a city now.", "input_schema": WEATHER},
         {"name": "get_time", "description": "The time in a zone.",
          "input_schema": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# the SDK (2.x) has no sampling parameters; Anthropic's API and this server still take them
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module", params=["hf", "llama.cpp"])
def server(request):
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        model = request.getfixturevalue("tiny_gguf_2k")
    else:
        model = request.getfixturevalue("tiny_llama_2k")
    with serving("-m", model, "--engine", request.param, "--api-key", KEY) as running:
        yield running


def client(server, **auth):
    return anthropic.Anthropic(base_url=server.url, max_retries=0, timeout=120, **(auth or {"api_key": KEY}))


def model_of(server) -> str:
    return server.client(KEY).models.list().data[0].id


def sse_events(server, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """A streamed request's events as the server wrote them: (the `event:` line's name, the data)."""
    body = {**{key: value for key, value in body.items() if key != "extra_body"}, **body.get("extra_body", {}),
            "stream": True}
    request = urllib.request.Request(server.url + "/v1/messages", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "x-api-key": KEY, **(headers or {})})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        blocks = response.read().decode().strip().split("\n\n")
    events = []
    for block in blocks:
        [name, data] = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        events.append((name[7:], json.loads(data[6:])))
    return events


def raw_post(server, path: str, body: dict, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_message_equals_the_chat_completion_and_counts_its_tokens(server):
    """Greedy: the message's text is chat completions' for the same messages, its usage the same
    tokens (input plus cache reads), count_tokens the same input (system and tools counted), a cut
    reply is max_tokens; a stop sequence found in that text ends the reply before it, named."""
    model, messages = model_of(server), client(server).messages
    system = "You answer in French."
    asked = dict(model=model, max_tokens=16, extra_body=GREEDY, messages=QUESTION)
    reply = messages.create(system=system, **asked)
    chat = server.client(KEY).chat.completions.create(
        model=model, max_tokens=16, temperature=0, messages=[{"role": "system", "content": system}, *QUESTION])
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.model == model and [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length" and reply.stop_reason == "max_tokens"
    assert reply.stop_sequence is None and reply.usage.output_tokens == chat.usage.completion_tokens == 16
    used = reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    assert used == chat.usage.prompt_tokens
    counted = messages.count_tokens(model=model, system=system, messages=QUESTION).input_tokens
    assert counted == used
    # system as text blocks is the same prompt; a longer system, a longer one (without a system, SmolLM2's
    # template writes its own)
    blocks = [{"type": "text", "text": system}]
    assert messages.count_tokens(model=model, system=blocks, messages=QUESTION).input_tokens == counted
    assert messages.count_tokens(model=model, system=system + " Be brief, and polite.",
                                 messages=QUESTION).input_tokens > counted
    # tools are described in the prompt: counted as the reply that offers them uses them
    offered = messages.create(tools=TOOLS, tool_choice={"type": "any"}, **asked)
    assert messages.count_tokens(model=model, messages=QUESTION, tools=TOOLS, tool_choice={"type": "any"}
                                 ).input_tokens == offered.usage.input_tokens + offered.usage.cache_read_input_tokens

    text = reply.content[0].text
    middle = text[len(text) // 2:len(text) // 2 + 3]
    assert middle.strip() and text.find(middle) > 0, text
    stopped = messages.create(system=system, stop_sequences=["never-written-here", middle], **asked)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == middle
    assert stopped.content[0].text == text[:text.find(middle)]


def test_a_streamed_message_is_anthropics_event_sequence(server):
    """Streamed: message_start (with the input tokens), content_block_start, ping, text deltas,
    content_block_stop, message_delta (stop_reason, usage), message_stop, each named on its `event:`
    line; the SDK's stream helper gives the same text and final message as the plain request."""
    model = model_of(server)
    asked = dict(model=model, max_tokens=12, extra_body=GREEDY, messages=QUESTION)
    plain = client(server).messages.create(**asked)
    events = sse_events(server, asked)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    deltas = len(names) - 6
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    counted = client(server).messages.count_tokens(model=model, messages=QUESTION).input_tokens
    assert start["usage"]["input_tokens"] == counted
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta") == \
        plain.content[0].text
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": plain.stop_reason, "stop_sequence": None}
    assert final["usage"]["output_tokens"] == plain.usage.output_tokens
    assert final["usage"]["input_tokens"] + final["usage"]["cache_read_input_tokens"] == counted

    with client(server).messages.stream(**asked) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == message.content[0].text == plain.content[0].text
    assert (message.stop_reason, message.usage.output_tokens) == (plain.stop_reason, plain.usage.output_tokens)


def test_tools_round_trip_with_tool_choice(server):
    """tool_choice tool and any: stop_reason tool_use, a tool_use block whose input is valid for the
    tool's schema (plain and streamed alike); the tool_result sent back is read: a longer result is a
    longer prompt, and the reply is a message."""
    model, messages = model_of(server), client(server).messages
    asked = dict(model=model, max_tokens=120, extra_body=GREEDY, messages=QUESTION, tools=TOOLS)
    named = messages.create(tool_choice={"type": "tool", "name": "get_weather"}, **asked)
    assert named.stop_reason == "tool_use" and named.stop_sequence is None
    [call] = [block for block in named.content if block.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER)
    with messages.stream(tool_choice={"type": "tool", "name": "get_weather"}, **asked) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(call.name, call.input)]
    events = sse_events(server, {**asked, "tool_choice": {"type": "tool", "name": "get_weather"}})
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert starts[-1]["type"] == "tool_use" and starts[-1]["input"] == {}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    anyone = messages.create(tool_choice={"type": "any", "disable_parallel_tool_use": True}, **asked)
    assert anyone.stop_reason == "tool_use"
    assert len([block for block in anyone.content if block.type == "tool_use"]) == 1

    def answered(result: str) -> list[dict]:
        return [*QUESTION, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                              "input": call.input}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}]

    short = messages.count_tokens(model=model, messages=answered("18 C"), tools=TOOLS).input_tokens
    long = messages.count_tokens(model=model, messages=answered("18 C, sunny, a light wind from the west"),
                                 tools=TOOLS).input_tokens
    assert long > short > messages.count_tokens(model=model, messages=QUESTION, tools=TOOLS).input_tokens
    then = messages.create(model=model, max_tokens=8, extra_body=GREEDY, messages=answered("18 C"), tools=TOOLS,
                           tool_choice={"type": "none"})
    assert then.content[0].type == "text" and then.usage.input_tokens + then.usage.cache_read_input_tokens == \
        messages.count_tokens(model=model, messages=answered("18 C"), tools=TOOLS,
                              tool_choice={"type": "none"}).input_tokens


def test_errors_are_in_anthropics_shape(server):
    """Missing max_tokens 400, an image block 400, an unknown model 404, a bad or missing key 401: the
    SDK's exception classes, and the body `{"type": "error", "error": {"type", "message"}}`; the key is
    taken as x-api-key or as a Bearer token (ANTHROPIC_AUTH_TOKEN), with anthropic-version."""
    model = model_of(server)
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    status, body = raw_post(server, "/v1/messages", {"model": model, "messages": QUESTION}, headers)
    assert status == 400 and body == {"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "max_tokens: Field required"}}
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBORw0KGgo="}}]}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(server).messages.create(model=model, max_tokens=4, messages=image)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as caught:
        client(server).messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=QUESTION)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    assert "claude-sonnet-4-5" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(server, api_key="wrong").messages.create(model=model, max_tokens=4, messages=QUESTION)
    assert caught.value.body["error"]["type"] == "authentication_error"
    status, body = raw_post(server, "/v1/messages/count_tokens", {"messages": QUESTION}, {})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    # OpenAI's paths keep OpenAI's shape
    status, body = raw_post(server, "/v1/chat/completions", {"messages": QUESTION}, {})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    bearer = client(server, auth_token=KEY).messages.create(model=model, max_tokens=2, messages=QUESTION)
    assert bearer.usage.output_tokens == 2


def test_the_embedded_model_ends_its_turn_and_answers_a_tool_result():
    """On the embedded model: a short greedy reply ends on its own (end_turn), equal to chat
    completions' and streamed alike; a forced call's result sent back as tool_result gets a text answer."""
    pytest.importorskip("llama_cpp")
    with serving() as server:
        messages = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120).messages
        hello = [{"role": "user", "content": "Say hello."}]
        reply = messages.create(model="smollm2", max_tokens=100, extra_body=GREEDY, messages=hello)
        chat = server.client().chat.completions.create(model="smollm2", max_tokens=100, temperature=0, messages=hello)
        assert chat.choices[0].finish_reason == "stop" and reply.stop_reason == "end_turn"
        assert reply.content[0].text == chat.choices[0].message.content and reply.stop_sequence is None
        with messages.stream(model="smollm2", max_tokens=100, extra_body=GREEDY, messages=hello) as stream:
            final = stream.get_final_message()
        assert (final.content[0].text, final.stop_reason) == (reply.content[0].text, "end_turn")

        called = messages.create(model="smollm2", max_tokens=100, extra_body=GREEDY, messages=QUESTION, tools=TOOLS[:1],
                                 tool_choice={"type": "tool", "name": "get_weather"})
        [call] = called.content
        assert called.stop_reason == "tool_use" and call.type == "tool_use"
        jsonschema.validate(call.input, WEATHER)
        result = "18 C and sunny"
        then = messages.create(model="smollm2", max_tokens=60, extra_body=GREEDY, tools=TOOLS[:1], messages=[
            *QUESTION, {"role": "assistant", "content": called.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}])
        # the same conversation in OpenAI's shape: the same prompt, the same reply
        chat = server.client().chat.completions.create(
            model="smollm2", max_tokens=60, temperature=0, tools=[{"type": "function", "function": {
                "name": "get_weather", "description": TOOLS[0]["description"], "parameters": WEATHER}}],
            messages=[*QUESTION, {"role": "assistant", "content": None, "tool_calls": [{
                "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
                {"role": "tool", "tool_call_id": call.id, "content": result}])
        assert then.usage.input_tokens + then.usage.cache_read_input_tokens == chat.usage.prompt_tokens
        assert then.usage.input_tokens + then.usage.cache_read_input_tokens > \
            called.usage.input_tokens + called.usage.cache_read_input_tokens
        [choice] = chat.choices
        assert then.stop_reason == {"tool_calls": "tool_use", "stop": "end_turn", "length": "max_tokens"}[
            choice.finish_reason]
        assert "".join(block.text for block in then.content if block.type == "text") == (choice.message.content or "")
        assert [(block.name, block.input) for block in then.content if block.type == "tool_use"] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]


def test_streamed_deltas_become_blocks_in_order():
    """Below the server: thinking (the reasoning splitter's reasoning_content), text and a whole call
    become three blocks, each started, filled and stopped in turn, a ping after the first start; a
    reply that streamed nothing still gets its empty text block."""
    from llmcli.serve.messages import EventStream, content_blocks

    def parsed(lines: list[str]) -> list[tuple[str, dict]]:
        return [(line.split("\n")[0][7:], json.loads(line.split("\n")[1][6:])) for line in lines]

    stream = EventStream()
    lines = []
    for delta in ({"role": "assistant", "content": None}, {"reasoning_content": "Paris, so "},
                  {"reasoning_content": "the weather."}, {"content": "Checking."},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}):
        lines += stream.delta(delta)
    lines += stream.close([{"type": "thinking"}, {"type": "text"}, {"type": "tool_use"}])
    events = parsed(lines)
    assert [(name, data.get("index")) for name, data in events] == [
        ("content_block_start", 0), ("ping", None), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    assert events[0][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[3][1]["delta"] == {"type": "thinking_delta", "thinking": "the weather."}
    assert events[8][1]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    assert events[9][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":"Paris"}'}
    empty = EventStream()
    assert [name for name, _ in parsed(empty.close([{"type": "text", "text": ""}]))] == [
        "content_block_start", "ping", "content_block_stop"]
    assert content_blocks({"role": "assistant", "content": "Sunny.", "reasoning_content": "Paris."}) == [
        {"type": "thinking", "thinking": "Paris.", "signature": ""}, {"type": "text", "text": "Sunny."}]
