"""Tool calling in `llmcli serve`, on both engines and in both call formats (the generic JSON one for
templates without tools, the `<tool_call>` markers of a Hermes-style template given with
--chat-template), through the official openai client; the Responses API; openai-agents and
LangChain against the server. Arguments are checked by `jsonschema`, not by the library that
constrains. Servers bind 127.0.0.1 on a free port."""

from __future__ import annotations

import json
from contextlib import contextmanager

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
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "country": {"type": "string", "maxLength": 20}},
        "required": ["name", "country"], "additionalProperties": False}
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
    with tool_server(request, hermes_template) as running:
        yield running


@contextmanager
def tool_server(request, hermes_template):
    engine, form = request.param.split()
    if engine == "embedded":
        pytest.importorskip("llama_cpp")
        with serving() as running:
            running.form = form
            yield running
        return
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


@pytest.fixture(params=["llama.cpp generic", "llama.cpp marker", "hf generic", "hf marker", "embedded generic"])
def any_server(request, hermes_template):
    """The four tiny servers, and the embedded model on llama.cpp."""
    with tool_server(request, hermes_template) as running:
        yield running


def test_every_tool_choice_form_gives_calls_that_validate(any_server):
    """16 seeded samples for each tool_choice: required and a named function always call (the named one
    only), with arguments valid for the tool's schema; auto calls validly or answers in plain text;
    parallel_tool_calls false allows one call; none never calls."""
    client = any_server.client()
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


def sse_data(server, path: str, body: dict) -> list[dict]:
    """A streamed request's events as the server wrote them (each `data:` line parsed; [DONE] left out)."""
    import urllib.request

    request = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        lines = response.read().decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def streamed_calls(chunks: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) of each call in a chat stream, its deltas joined by index."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], ["", ""])
                call[0] += delta["function"].get("name") or ""
                call[1] += delta["function"].get("arguments") or ""
    return [tuple(calls[index]) for index in sorted(calls)]


OSLO = "What is the weather in Oslo, and what time is it in UTC?"
# free strings: with these the embedded model writes two calls, then repeats them (with TOOLS, one)
OPEN_TOOLS = [{"type": "function", "function": {
    "name": name, "description": description,
    "parameters": {"type": "object", "properties": {field: {"type": "string"}}, "required": [field]}}}
    for name, description, field in (("get_weather", "The weather in a city now.", "city"),
                                      ("get_time", "The time in a time zone.", "zone"))]


def test_the_embedded_model_s_calls_are_whole_and_each_once_when_cut_or_repeating():
    """Greedy on the embedded model with room for several calls, the model writes its two calls again
    and again (up to the grammar's 8 before): the reply ends at the first repeat, with the two calls and
    finish_reason tool_calls. Cut by max_tokens inside a call, chat (plain and streamed) and Responses
    (plain and streamed) carry only the whole calls before it, say length (Responses: incomplete, its
    calls completed, the stream ending with response.incomplete) and stream nothing of the cut call.
    A streamed reply with tools starts with content null, as the finished message has it."""
    pytest.importorskip("llama_cpp")
    fields = dict(model="smollm2", messages=[{"role": "user", "content": OSLO}], tools=OPEN_TOOLS,
                  tool_choice="required", temperature=0)
    flat_tools = [{"type": "function", **tool["function"]} for tool in OPEN_TOOLS]
    asked = dict(model="smollm2", input=OSLO, tools=flat_tools, tool_choice="required", temperature=0)
    with serving() as server:
        client = server.client()
        whole = client.chat.completions.create(max_tokens=400, **fields)
        choice = whole.choices[0]
        calls = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]
        assert choice.finish_reason == "tool_calls" and len(set(calls)) == len(calls) == 2, calls
        chunks = sse_data(server, "/v1/chat/completions", {**fields, "max_tokens": 400})
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert streamed_calls(chunks) == calls and choice.message.content is None
        # inside the repeat, which was to be dropped; inside the second call
        for max_tokens in (whole.usage.completion_tokens - 3, whole.usage.completion_tokens // 2):
            cut = client.chat.completions.create(max_tokens=max_tokens, **fields).choices[0]
            kept = [(call.function.name, call.function.arguments) for call in cut.message.tool_calls or []]
            assert cut.finish_reason == "length" and kept == calls[:len(kept)], (max_tokens, kept)
            assert len(kept) == (2 if max_tokens > whole.usage.completion_tokens // 2 else 1)
            chunks = sse_data(server, "/v1/chat/completions", {**fields, "max_tokens": max_tokens})
            assert streamed_calls(chunks) == kept and chunks[-1]["choices"][0]["finish_reason"] == "length"
        # Responses, cut inside the second call (the last max_tokens above)
        response = client.responses.create(max_output_tokens=max_tokens, **asked)
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert [(item.name, item.arguments, item.status) for item in response.output] == \
            [(name, arguments, "completed") for name, arguments in kept]
        events = sse_data(server, "/v1/responses", {**asked, "max_output_tokens": max_tokens})
        assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"
        assert [(event["item"]["name"], event["item"]["arguments"]) for event in events
                if event["type"] == "response.output_item.done"] == kept
        # the SDK's stream helper has a final response only after response.completed, as against OpenAI
        with client.responses.stream(max_output_tokens=max_tokens, **asked) as stream:
            with pytest.raises(RuntimeError, match="response.completed"):
                stream.get_final_response()


# ------------------------------------------------------------------ below the server

def streamed(form: str, text: str) -> tuple[str, dict[int, list[str]], "object"]:
    """`text` fed to a ReplyReader one character at a time: the content and each call's (name,
    arguments) as the deltas give them, and the finished reply."""
    from llmcli.tools import ReplyReader

    reader = ReplyReader(form)
    deltas = [delta for char in text for delta in reader.feed(char)] + reader.feed("", finished=True)
    content = "".join(delta.get("content", "") for delta in deltas)
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] not in calls
                calls[call["index"]] = [call["function"]["name"], ""]
            calls[call["index"]][1] += call["function"]["arguments"]
    return content, calls, reader.reply()


@pytest.mark.parametrize("form, text, content, calls", [
    ("generic", '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},'
                '{"name":"get_time","arguments":{"zone":"UTC"}}]}', None,
     [("get_weather", '{"city":"Paris"}'), ("get_time", '{"zone":"UTC"}')]),
    ("generic", '{"response":"Say \\"hi\\" \\u00e9\\\\n"}', 'Say "hi" é\\n', []),
    ("generic", '{"response":{"summary":"ok","n":[1,2]}}', '{"summary":"ok","n":[1,2]}', []),
    ("marker", 'Let me look.\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>\n'
               '<tool_call>{"name":"get_time","arguments":{"zone":"CET"}}</tool_call>', "Let me look.\n",
     [("get_weather", '{"city":"Oslo"}'), ("get_time", '{"zone":"CET"}')]),
    ("marker", "a < b and <tool but no call", "a < b and <tool but no call", []),
    # cut by max_tokens inside the second call: only the whole first one, streamed or not
    ("generic", '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo"}},{"name":"get_weather",'
                '"arguments":{"city":"Os', None, [("get_weather", '{"city":"Oslo"}')]),
    ("generic", '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Oslo"', None, []),
    ("marker", '<tool_call>{"name":"get_time","arguments":{"zone":"UTC"}}</tool_call>\n<tool_call>{"name":"get_ti',
     None, [("get_time", '{"zone":"UTC"}')]),
    # a repeat (the same arguments in another key order too) is not a second call
    ("generic", '{"tool_calls":[{"name":"get_time","arguments":{"zone":"UTC","exact":true}},{"name":"get_weather",'
                '"arguments":{"city":"Oslo"}},{"name":"get_time","arguments":{"exact":true,"zone":"UTC"}}', None,
     [("get_time", '{"zone":"UTC","exact":true}'), ("get_weather", '{"city":"Oslo"}')]),
])
def test_a_reply_read_as_it_streams_adds_up_to_the_finished_reply(form, text, content, calls):
    """Deltas for each character (a marker's start held back, escapes decoded whole) add up to the
    finished reply's content and calls; a call comes once it is whole, in one delta with its id, and
    a call that was cut or repeats an earlier one is neither streamed nor in the reply."""
    streamed_content, streamed_calls, reply = streamed(form, text)
    assert reply.content == content
    assert [(call.name, call.arguments) for call in reply.calls] == calls
    assert streamed_content == (content or "")
    assert [tuple(streamed_calls[index]) for index in sorted(streamed_calls)] == calls
    assert all(call.id.startswith("call_") for call in reply.calls)


def test_a_repeated_call_ends_the_reply_where_distinct_calls_go_on():
    """On the embedded model's vocabulary, with room for several calls: after two distinct calls the
    grammar still lets a third begin; once a call repeats an earlier one, EOS is the one token allowed
    (on llama.cpp the matcher hands it back at once), in both formats."""
    pytest.importorskip("llama_cpp")
    from llmcli.engines import choose_engine
    from llmcli.tools import Tool, ToolUse, constraint

    engine = choose_engine(None, "llama.cpp", fast=True)
    tools = (Tool("get_weather", "", WEATHER), Tool("get_time", "", CLOCK))
    oslo, utc = '{"name":"get_weather","arguments":{"city":"Oslo"}}', '{"name":"get_time","arguments":{"zone":"UTC"}}'
    texts = {"generic": ('{"tool_calls":[' + oslo + "," + utc, "," + oslo),
             "marker": (f"<tool_call>{oslo}</tool_call>\n<tool_call>{utc}</tool_call>", f"\n<tool_call>{oslo}")}
    for form, (distinct, repeat) in texts.items():
        matcher = engine.constraints.matcher(constraint(ToolUse(tools, "required"), form))
        ends = [matcher.accept(token, engine.eos_ids, engine.eos_id, 100)
                for token in engine.encode(distinct, add_special=False)]
        assert ends[-1] is None and matcher.allowed().sum() > 1  # another call may begin
        ends = [matcher.accept(token, engine.eos_ids, engine.eos_id, 100)
                for token in engine.encode(repeat, add_special=False)]
        assert ends[-1] == engine.eos_id and ends[:-1] == [None] * (len(ends) - 1), form
        assert matcher.allowed().nonzero()[0].tolist() == [engine.eos_id]


def test_the_prompt_renders_tools_and_history_for_each_format():
    """Marker: the tools go to the template and earlier arguments become objects (templates `tojson`
    them); generic: the tools are described in the system message, earlier calls are the JSON the
    model writes and a tool's result is a user turn naming its tool."""
    from llmcli.tools import Tool, ToolUse, prompt_messages

    use = ToolUse((Tool("get_weather", "The weather.", WEATHER),))
    history = [{"role": "system", "content": "Be brief."}, *QUESTION,
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    messages, tools = prompt_messages(history, use, "marker")
    assert tools == [{"type": "function", "function": {"name": "get_weather", "description": "The weather.",
                                                       "parameters": WEATHER}}]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    messages, tools = prompt_messages(history, use, "generic")
    assert tools is None and messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2] == {"role": "assistant",
                           "content": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'}
    assert messages[3] == {"role": "user", "content": '{"tool_response":{"tool":"get_weather","content":"18 C"}}'}
    plain, _ = prompt_messages(history, ToolUse(use.tools, "none"), "generic")
    assert plain[0] == {"role": "system", "content": "Be brief."}  # "none": no tools described


def test_the_grammar_allows_exactly_the_calls_each_choice_allows():
    """On the embedded model's vocabulary: which replies each tool_choice, parallel_tool_calls and
    format lets through (one call, two calls, a plain answer)."""
    pytest.importorskip("llama_cpp")
    from llguidance import LLMatcher

    from llmcli.constraints import compile_grammar
    from llmcli.engines import choose_engine
    from llmcli.tools import Tool, ToolUse, constraint

    engine = choose_engine(None, "llama.cpp", fast=True)
    vocabulary = engine.guidance_tokenizer()

    def allows(rule, text: str) -> bool:
        matcher = LLMatcher(vocabulary, compile_grammar(rule, vocabulary), log_level=0)
        return all(matcher.consume_token(token) for token in engine.encode(text, add_special=False)) \
            and matcher.is_accepting()

    tools = (Tool("get_weather", "", WEATHER), Tool("get_time", "", CLOCK))
    one = {"generic": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}',
           "marker": 'Checking.\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'}
    bare = {"generic": one["generic"], "marker": one["marker"].removeprefix("Checking.\n")}
    two = {"generic": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},'
                      '{"name":"get_time","arguments":{"zone":"UTC"}}]}',
           "marker": '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>\n'
                     '<tool_call>{"name":"get_time","arguments":{"zone":"UTC"}}</tool_call>'}
    answer = {"generic": '{"response":"It is sunny."}', "marker": "It is sunny."}
    wrong = {"generic": '{"tool_calls":[{"name":"get_weather","arguments":{"city":3}}]}',
             "marker": '<tool_call>{"name":"get_weather","arguments":{"town":"Paris"}}</tool_call>'}
    # a key the schema does not list: refused, as OpenAI's strict mode does
    extra = {"generic": '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris","country":"FR"}}]}',
             "marker": '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","country":"FR"}}</tool_call>'}
    for form in ("generic", "marker"):
        auto = constraint(ToolUse(tools), form)
        assert [allows(auto, text[form]) for text in (one, two, answer, wrong, extra)] == [True, True, True, False,
                                                                                          False]
        required = constraint(ToolUse(tools, "required"), form)
        assert [allows(required, text[form]) for text in (bare, two, answer)] == [True, True, False]
        single = constraint(ToolUse(tools, "required", parallel=False), form)
        assert [allows(single, text[form]) for text in (bare, two)] == [True, False]
        named = constraint(ToolUse(tools, "get_time"), form)
        assert not allows(named, bare[form])  # a call to another tool
        assert constraint(ToolUse(tools, "none"), form) is None


# ------------------------------------------------------------------ the Responses API and agent clients

def test_responses_plain_streamed_with_a_tool_and_a_previous_response(tiny_gguf):
    """responses.create on the embedded model: plain; streamed (the whole event sequence, numbered
    from 0, ending at response.incomplete when cut, the SDK's helper ending at response.completed); a function tool; the call's result sent with
    previous_response_id (the stored turn is read again, from the prefix cache); an unknown id is a 404."""
    pytest.importorskip("llama_cpp")
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city now.",
              "parameters": WEATHER}]
    with serving() as server:
        client = server.client()
        plain = client.responses.create(model="smollm2", input="Say hello.", max_output_tokens=12, temperature=0)
        assert plain.object == "response" and plain.output[0].type == "message" and plain.output_text
        # 12 tokens cut this reply: the response and its cut message are incomplete
        assert plain.status == plain.output[0].status == "incomplete" and plain.usage.output_tokens == 12
        chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=12, temperature=0)
        assert plain.output_text == chat.choices[0].message.content  # the same path underneath

        events = list(client.responses.create(model="smollm2", input="Say hello.", max_output_tokens=12,
                                              temperature=0, stream=True))
        kinds = [event.type for event in events]
        assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                             "response.content_part.added"]
        assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                              "response.output_item.done", "response.incomplete"]  # OpenAI's last event when cut
        assert events[-1].response.status == events[-2].item.status == "incomplete"
        assert [event.sequence_number for event in events] == list(range(len(events)))
        deltas = [event for event in events if event.type == "response.output_text.delta"]
        assert "".join(event.delta for event in deltas) == plain.output_text
        assert all(event.output_index == 0 and event.content_index == 0 for event in deltas)
        with client.responses.stream(model="smollm2", input="Say hello.", max_output_tokens=100,
                                     temperature=0) as stream:  # room to finish: response.completed
            final = stream.get_final_response()
        assert final.status == "completed" and final.output_text.startswith(plain.output_text)

        called = client.responses.create(model="smollm2", input="What is the weather in Paris?", tools=tools,
                                         tool_choice="required", temperature=0)
        [call] = [item for item in called.output if item.type == "function_call"]
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
        with client.responses.stream(model="smollm2", input="What is the weather in Paris?", tools=tools,
                                     tool_choice="required", temperature=0) as stream:
            streamed_call = stream.get_final_response().output[0]
        assert (streamed_call.name, streamed_call.arguments) == (call.name, call.arguments)

        then = client.responses.create(model="smollm2", previous_response_id=called.id, tools=tools, temperature=0,
                                       input=[{"type": "function_call_output", "call_id": call.call_id,
                                               "output": "18 C and sunny"}], max_output_tokens=40)
        assert then.previous_response_id == called.id
        assert then.usage.input_tokens > called.usage.input_tokens + 10
        assert then.usage.input_tokens_details.cached_tokens > 0
        assert client.responses.retrieve(then.id).id == then.id

        shaped = client.responses.create(model="smollm2", input="Describe Paris.", temperature=0, max_output_tokens=80,
                                         text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
        jsonschema.validate(json.loads(shaped.output_text), CITY)

        status, _, answer = server.post("/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"})
        assert status == 404 and answer["error"]["code"] == "previous_response_not_found"
        assert answer["error"]["param"] == "previous_response_id"
        status, _, answer = server.post("/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]})
        assert status == 400 and answer["error"]["param"] == "tools"
        status, _, answer = server.post("/v1/responses", {"input": [{"type": "function_call_output",
                                                                     "output": "x"}]})
        assert status == 400 and "tool_call_id" in answer["error"]["message"]


@pytest.mark.parametrize("api", ["responses", "chat completions"])
def test_openai_agents_runs_an_agent_with_a_function_tool_to_its_final_output(api):
    """The openai-agents SDK against `llmcli serve` (the embedded model), through its Responses model
    and its chat-completions model: the agent calls the tool with valid arguments and ends with the
    tool's result as its final output (stop_on_first_tool: this model calls tools again rather than
    answering from a result)."""
    pytest.importorskip("llama_cpp")
    agents = pytest.importorskip("agents")
    import asyncio

    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    cities = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        cities.append(city)
        return f"18 C and sunny in {city}"

    with serving() as server:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        model = (agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel)(
            "smollm2", client)
        agent = agents.Agent(name="weather", instructions="Use the weather tool.", tools=[get_weather], model=model,
                             # one call a turn, as llama-server's default has it
                             model_settings=agents.ModelSettings(temperature=0, max_tokens=64, tool_choice="required",
                                                                 parallel_tool_calls=False),
                             tool_use_behavior="stop_on_first_tool")
        result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    assert cities and isinstance(cities[0], str)
    assert result.final_output == f"18 C and sunny in {cities[0]}"


def test_langchain_binds_tools_and_returns_structured_output():
    """langchain-openai against `llmcli serve` (the embedded model): `bind_tools(...).invoke` gives a
    tool call LangChain parses, and `with_structured_output(Model, method="function_calling")` an
    instance of the model."""
    pytest.importorskip("llama_cpp")
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""

        city: str = Field(max_length=20)
        degrees: int = Field(ge=-50, le=50)

    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "18 C"

    with serving() as server:
        llm = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="smollm2",
                                          temperature=0, max_tokens=64, max_retries=0)
        message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
        [call] = message.tool_calls
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
        weather = llm.with_structured_output(Weather, method="function_calling").invoke(
            "It is 18 degrees in Paris. Give the weather.")
        assert isinstance(weather, Weather)
