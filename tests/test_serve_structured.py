"""Structured output in `llmcli serve`, on both engines: OpenAI's `response_format` (json_object and
json_schema) on chat and completions, the official client's `chat.completions.parse` with a pydantic
model, streamed and batched requests, and a schema the library cannot compile answered 400 by name
while the server keeps serving. Outputs are checked by `jsonschema` and pydantic, not by the library
that constrains."""

from __future__ import annotations

import json
import threading
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from test_serve import serving

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]},
    "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 3},
    "label": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
    "required": ["colour", "sizes", "label"], "additionalProperties": False}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(pattern="^[A-Za-z]{1,10}$")
    legs: int = Field(ge=0, le=4)


@pytest.fixture(params=["llama.cpp", "hf"])
def server(request):
    """A server on the tiny F32 GGUF (llama.cpp, continuous batching) or the tiny Llama directory (hf)."""
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        model = request.getfixturevalue("tiny_gguf")
    else:
        model = request.getfixturevalue("tiny_llama")
    with serving("-m", model, "--engine", request.param) as running:
        yield running


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_openai_parse_returns_a_pydantic_object(server):
    """The official client builds response_format from the pydantic model and parses the answer."""
    client = server.client()
    model = client.models.list().data[0].id
    for seed in (1, 2, 3):
        completion = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
            temperature=1.0, seed=seed, max_tokens=80)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet), choice


def test_sampled_choices_on_chat_and_completions_validate(server):
    """n seeded samples of a chat and of a completions list validate."""
    status, _, chat = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Pick a colour."}], "n": 3, "seed": 5, "temperature": 1.5,
        "max_tokens": 80, "response_format": json_schema_format(SCHEMA)})
    assert status == 200, chat
    texts = [c["message"]["content"] for c in chat["choices"]]
    status, _, plain = server.post("/v1/completions", {
        "prompt": ["This License", "the work"], "n": 2, "seed": 9, "temperature": 1.5, "max_tokens": 80,
        "response_format": json_schema_format(SCHEMA)})
    assert status == 200, plain
    texts += [c["text"] for c in plain["choices"]]
    assert len(texts) == 7 and all(c["finish_reason"] == "stop" for c in chat["choices"] + plain["choices"])
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1


def test_the_embedded_model_answers_json_object_and_parse():
    """A real model on llama.cpp: json_object gives a complete JSON object (a random tiny model's keys
    never end, so this needs one), and parse() a Pet."""
    pytest.importorskip("llama_cpp")
    with serving("--engine", "llama.cpp") as server:
        client = server.client()
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Return a JSON object with the keys name and colour for a cat."}],
            temperature=0,
            max_tokens=120, response_format={"type": "json_object"})
        assert answer.choices[0].finish_reason == "stop", answer
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
        parsed = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Describe a pet dog called Rex."}], temperature=0,
            max_tokens=80, response_format=Pet).choices[0].message.parsed
        assert isinstance(parsed, Pet) and parsed.kind == "dog", parsed


def test_streamed_and_concurrent_requests_validate(server):
    """Four clients at once, streaming: each one's joined deltas validate (on llama.cpp they decode
    together, each sequence with its own matcher)."""
    client = server.client()
    model = client.models.list().data[0].id
    texts: dict[int, str] = {}

    def user(number: int) -> None:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Colour {number}?"}], stream=True, seed=number,
            temperature=1.2, max_tokens=80, response_format=json_schema_format(SCHEMA))
        texts[number] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=user, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(texts) == [0, 1, 2, 3]
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_cut_answer_says_length(server):
    status, _, body = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
        "response_format": json_schema_format(SCHEMA)})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body


@pytest.mark.parametrize("response_format, fragment", [
    (json_schema_format({"type": "array", "uniqueItems": True}), 'Unimplemented keys: ["uniqueItems"]'),
    (json_schema_format({"type": "wat"}), "Invalid type: wat"),
    ({"type": "json_schema"}, "json_schema needs json_schema"),
    ({"type": "xml"}, "response_format"),
])
def test_a_schema_that_cannot_be_compiled_is_a_400_by_name(tiny_gguf, response_format, fragment):
    """Never silently ignored; the server keeps serving."""
    with serving("-m", tiny_gguf) as server:
        status, _, body = server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "response_format": response_format})
        assert status == 400 and fragment in body["error"]["message"], body
        assert body["error"]["param"] == "response_format", body
        status, _, body = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert status == 200, body


PLACE = {"type": "object", "properties": {"location": {"type": "object", "properties": {
    "lat": {"type": "number"}, "lon": {"type": "number"}}, "required": ["lat", "lon"]}},
    "required": ["location"], "additionalProperties": False}  # the nested object says nothing of other keys


def test_strict_closes_every_object_of_the_schema():
    """OpenAI's strict mode: no object has keys beyond its properties. The embedded model added
    address, description, zoom... to the nested object when strict was ignored; with strict: true on
    chat and on Responses it writes lat and lon alone. Without strict the schema is held as given (the
    request for tools and an answer in the schema likewise)."""
    pytest.importorskip("llama_cpp")
    from llmcli.serve.schemas import ChatRequest

    with serving() as server:
        client = server.client()
        for prompt in ("Give the location of Paris as JSON.", "Show a map of Paris."):
            answer = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=100,
                response_format=json_schema_format(PLACE)).choices[0]
            assert answer.finish_reason == "stop" and set(json.loads(answer.message.content)["location"]) == \
                {"lat", "lon"}, answer.message.content
        response = client.responses.create(
            model="smollm2", input="Give the location of Paris as JSON.", temperature=0, max_output_tokens=100,
            text={"format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}})
        assert set(json.loads(response.output_text)["location"]) == {"lat", "lon"}, response.output_text
    request = {"messages": [{"role": "user", "content": "hi"}], "response_format": json_schema_format(PLACE),
               "tools": [{"type": "function", "function": {"name": "f"}}]}
    closed = ChatRequest.model_validate(request).tool_use().answer_schema
    assert closed["properties"]["location"]["additionalProperties"] is False
    request["response_format"]["json_schema"]["strict"] = False
    assert ChatRequest.model_validate(request).tool_use().answer_schema == PLACE
