"""Reasoning models: a reply split into thinking and answer, on both engines.

The tiny models are untrained, so they never close a thinking block of their own accord: their chat
template (given with --chat-template) opens `<think>` in the prompt, as DeepSeek-R1's and QwQ's do, and
--reasoning-budget forces `</think>` after N thinking tokens, which is the behaviour under test. Every
split is checked against the token ids the engine returned, decoded apart; the thinking before the
budget is checked against an unbudgeted greedy run. No small real reasoning GGUF is available offline
(no model hub here), so none is tested."""

from __future__ import annotations

import json
import random
import urllib.request

import pytest

from conftest import run_cli
from test_serve import serving

# Qwen3's shape in plain text: an `enable_thinking` switch, and the thinking opened in the prompt
TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")
PROMPT = "Why is the sky blue?"
BUDGET = 6
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking") / "thinking.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module", params=["hf", "llama.cpp"])
def model(request, template):
    """(engine name, model path, a loaded engine with the thinking template: the reference decoder)."""
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        path = request.getfixturevalue("tiny_gguf")
    else:
        path = request.getfixturevalue("tiny_llama")
    from llmcli.engines import choose_engine

    engine = choose_engine(str(path), request.param)
    engine.chat_template = TEMPLATE
    return request.param, path, engine


def generate(model, template, *args: str) -> dict:
    name, path, _ = model
    result = run_cli("generate", "-m", path, "--engine", name, "--chat-template", template, "--json", "-n", "30",
                     *args, PROMPT)
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    return record


def test_the_splitter_gives_the_same_parts_whatever_the_pieces():
    from llmcli.reasoning import Thinking, split, stream_router

    texts = ["<think>\n a plan \n</think>\n\n{\"n\": 1}", "  no thinking here", "<thi", "<think> cut </thi",
             "x<think>y</think>z", "</think>", "a\n</think>\n\nb </think> c"]
    for opened in (False, True):
        thinking = Thinking("<think>", "</think>", (1,), (2,), opened=opened)
        for text in texts:
            whole = split(text, thinking)
            for _ in range(30):
                cuts = sorted(random.sample(range(len(text) + 1), min(4, len(text) + 1)))
                got = {"reasoning": "", "answer": ""}
                route = stream_router(thinking, lambda p: got.__setitem__("answer", got["answer"] + p),
                                      lambda p: got.__setitem__("reasoning", got["reasoning"] + p))
                for begin, end in zip([0, *cuts], [*cuts, len(text)]):
                    route(text[begin:end], False)
                route("", True)
                assert (got["reasoning"], got["answer"]) == (whole[0] or "", whole[1]), (text, cuts)
    opened = Thinking("<think>", "</think>", (1,), (2,), opened=True)
    assert split("a plan\n</think>\n\nthe answer", opened) == ("a plan", "the answer")
    assert split("<think>a plan</think>the answer", Thinking("<think>", "</think>", (1,), (2,))) == \
        ("a plan", "the answer")
    assert split("just an answer", Thinking("<think>", "</think>", (1,), (2,))) == (None, "just an answer")


def test_markers_come_from_the_template_or_the_format():
    from llmcli.reasoning import markers, opened_by, Thinking

    assert markers(TEMPLATE, "auto") == ("<think>", "</think>")
    assert markers("{{ messages }}", "auto") is None
    assert markers("{{ messages }}", "deepseek") == ("<think>", "</think>")
    assert markers(TEMPLATE, "none") is None
    thinking = Thinking("<think>", "</think>", (), ())
    assert opened_by("<｜Assistant｜><think>\n", thinking)
    assert not opened_by("assistant\n<think>\n\n</think>\n\n", thinking)
    assert not opened_by("<|im_start|>assistant\n", thinking)


def test_the_budget_forces_the_end_marker_after_n_thinking_tokens(model, template):
    _, _, engine = model
    free = generate(model, template)
    budgeted = generate(model, template, "--reasoning-budget", str(BUDGET))
    end = engine.encode("</think>", add_special=False)
    ids = budgeted["token_ids"]
    assert ids[:BUDGET] == free["token_ids"][:BUDGET]  # the thinking before the budget is the model's own
    assert free["token_ids"][BUDGET:BUDGET + len(end)] != end  # it would not have closed the block itself
    assert ids[BUDGET:BUDGET + len(end)] == end
    # the split is the thinking tokens and the tokens after the marker, each decoded apart
    assert budgeted["reasoning"] == engine.decode(ids[:BUDGET]).strip()
    assert budgeted["text"] == engine.decode(ids[BUDGET + len(end):]).lstrip()
    assert budgeted["text"]
    # without a budget the untrained model thinks to the end: all of it is thinking
    # (a character cut by the token limit is dropped, as from any text)
    assert free["text"] == "" and free["reasoning"] == engine.decode(free["token_ids"]).rstrip("\ufffd").strip()


def test_the_streamed_split_joins_to_the_whole(model):
    from llmcli.data import Prompt
    from llmcli.reasoning import thinking_for
    from llmcli.tasks.generate import GenerateOptions, generate as run_generate

    _, _, engine = model
    options = GenerateOptions(max_new_tokens=30, reasoning=thinking_for(engine, budget=BUDGET))
    answer, thought = [], []
    [result] = run_generate(engine, [Prompt(text=PROMPT)], options, on_text=answer.append, on_reasoning=thought.append)
    assert result.reasoning and result.text
    assert "".join(thought) == result.reasoning and "".join(answer) == result.text
    assert len(thought) > 1 and len(answer) > 1  # streamed piece by piece, not at the end


def test_reasoning_off_goes_through_enable_thinking(model, template):
    _, _, engine = model
    off = generate(model, template, "--reasoning", "off")
    messages = [{"role": "user", "content": PROMPT}]
    closed = engine.encode_chat(messages, None, {"enable_thinking": False})
    assert engine.decode(closed).endswith("<think>\n\n</think>\n\n")
    assert off["prompt_tokens"] == len(closed)
    assert "reasoning" not in off and off["text"] == engine.decode(off["token_ids"])  # all of it is the answer


def test_a_schema_constrains_the_answer_and_not_the_thinking(model, template):
    _, _, engine = model
    free = generate(model, template, "-n", "60")
    record = generate(model, template, "-n", "60", "--reasoning-budget", str(BUDGET), "--schema", json.dumps(SCHEMA))
    ids = record["token_ids"]
    assert ids[:BUDGET] == free["token_ids"][:BUDGET]  # free text where the schema would allow only JSON
    assert record["reasoning"] == engine.decode(ids[:BUDGET]).strip()
    answer = json.loads(record["text"])
    assert set(answer) == {"n"} and isinstance(answer["n"], int)
    assert record["finish_reason"] == "eos" and not record["incomplete"]


def chat(server, **body) -> dict:
    request = urllib.request.Request(server.url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": PROMPT}],
                                                      "max_tokens": 30, "temperature": 0, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        if not body.get("stream"):
            return json.loads(response.read())
        deltas = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                  if line.startswith("data: {")]
    return {"deltas": [choice["delta"] for chunk in deltas for choice in chunk["choices"]]}


def test_the_server_returns_reasoning_content_whole_and_streamed(model, template):
    name, path, engine = model
    with serving("-m", path, "--engine", name, "--chat-template", template, "--reasoning-budget", BUDGET) as server:
        whole = chat(server)["choices"][0]["message"]
        assert whole["reasoning_content"] and whole["content"]
        streamed = chat(server, stream=True)["deltas"]
        assert "".join(d.get("reasoning_content", "") for d in streamed) == whole["reasoning_content"]
        assert "".join(d.get("content") or "" for d in streamed) == whole["content"]
        assert sum("reasoning_content" in d for d in streamed) > 1  # its own deltas, as they come
        for off in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
            message = chat(server, **off)["choices"][0]["message"]
            assert "reasoning_content" not in message and message["content"]
        output = respond(server)["output"]
        assert [item["type"] for item in output] == ["reasoning", "message"]
        assert output[0]["content"] == [{"type": "reasoning_text", "text": whole["reasoning_content"]}]
        assert output[1]["content"][0]["text"] == whole["content"]
        events = respond(server, stream=True)
        deltas = [event["delta"] for event in events if event["type"] == "response.reasoning_text.delta"]
        assert len(deltas) > 1 and "".join(deltas) == whole["reasoning_content"]
        assert events[-1]["response"]["output"] == [{**item, "id": events[-1]["response"]["output"][n]["id"]}
                                                    for n, item in enumerate(output)]
        # Anthropic's Messages: a thinking block, and thinking disabled through the template's switch
        blocks = message_blocks(server)
        assert blocks == [{"type": "thinking", "thinking": whole["reasoning_content"], "signature": ""},
                          {"type": "text", "text": whole["content"]}]
        assert [b["type"] for b in message_blocks(server, thinking={"type": "disabled"})] == ["text"]


def message_blocks(server, **body) -> list[dict]:
    request = urllib.request.Request(server.url + "/v1/messages", method="POST", data=json.dumps(
        {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 30, "temperature": 0, **body}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["content"]


def respond(server, **body):
    """A /v1/responses answer: the response, or (streamed) its events."""
    request = urllib.request.Request(server.url + "/v1/responses", method="POST", data=json.dumps(
        {"input": PROMPT, "max_output_tokens": 30, "temperature": 0, **body}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        if not body.get("stream"):
            return json.loads(response.read())
        return [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: ")]


def test_off_without_a_switch_closes_the_thinking_at_once_and_none_splits_nothing(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    no_switch = tmp_path / "no-switch.jinja"
    no_switch.write_text(TEMPLATE.replace("enable_thinking is defined and not enable_thinking", "false"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    end = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    result = run_cli("generate", "-m", tiny_llama, "--chat-template", no_switch, "--json", "-n", "20",
                     "--reasoning", "off", PROMPT)
    assert result.exit_code == 0 and "no enable_thinking switch" in result.stderr
    [record] = result.json_lines()
    assert record["token_ids"][:len(end)] == end and record["reasoning"] == "" and record["text"]
    [plain] = run_cli("generate", "-m", tiny_llama, "--chat-template", no_switch, "--json", "-n", "20",
                      "--reasoning-format", "none", PROMPT).json_lines()
    assert "reasoning" not in plain  # the whole reply is the answer
    assert plain["text"] == tokenizer.decode(plain["token_ids"], skip_special_tokens=True).rstrip("\ufffd")


def test_chat_shows_the_thinking_unless_hidden(tiny_llama, template):
    shown = run_cli("chat", "-m", tiny_llama, "--chat-template", template, "-n", "20", "--reasoning-budget", "4",
                    input="hello\n")
    hidden = run_cli("chat", "-m", tiny_llama, "--chat-template", template, "-n", "20", "--reasoning-budget", "4",
                     "--hide-reasoning", input="hello\n")
    assert shown.exit_code == 0 and hidden.exit_code == 0, shown.stderr + hidden.stderr
    answer = hidden.stdout.strip()
    assert answer and shown.stdout.strip().endswith(answer) and len(shown.stdout.strip()) > len(answer)
    assert "</think>" not in shown.stdout


@pytest.mark.parametrize("args, fragment", [(("--reasoning-format", "qwen"), "--reasoning-format 'qwen'"),
                                            (("--reasoning", "maybe"), "--reasoning 'maybe'"),
                                            (("--reasoning-budget", "-1"), "--reasoning-budget must be 0 or more")])
def test_bad_reasoning_options_are_one_error_line(args, fragment):
    result = run_cli("generate", "-m", "/nonexistent-model", *args, "hi")
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr
