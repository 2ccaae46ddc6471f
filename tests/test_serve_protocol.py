"""`llmcli serve`'s protocol as clients read it: sampling fields honoured on both engines (or refused by
name, never silently ignored), the published OpenAPI schema, OpenAI's error codes, token-id prompts,
system_fingerprint. Servers bind 127.0.0.1 on a free port; every loop is bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import run_cli
from test_serve import serving


def get(server, path: str) -> tuple[int, dict, dict | str]:
    """(status, headers in lower case, the JSON body, or the text of another kind of body)."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, error.headers, error.read()
    headers = {k.lower(): v for k, v in headers.items()}
    return status, headers, json.loads(body) if "json" in headers.get("content-type", "") else body.decode()


def cli_tokens(model: str, prompt: str, *args: str) -> list[int]:
    result = run_cli("generate", prompt, "-m", model, "--no-chat", "-n", "12", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return result.json_lines()[0]["token_ids"]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gguf"])
def test_sampling_fields_change_tokens_as_generate_options_do(model, request):
    """logit_bias, presence_penalty and frequency_penalty on /v1/completions give the tokens `generate`
    gives with --logit-bias, --presence-penalty and --frequency-penalty (those are checked against
    OpenAI's definition in test_sampling.py); `logprobs: false` gives none; token-id prompts are the
    text's tokens."""
    path = str(request.getfixturevalue(model))
    plain = cli_tokens(path, "This License")
    adjusted_args = ["--logit-bias", f"{plain[0]}=-100", "--presence-penalty", "1.5", "--frequency-penalty", "0.5"]
    adjusted = cli_tokens(path, "This License", *adjusted_args)
    assert adjusted != plain
    with serving("-m", path) as server:
        client = server.client()
        base = dict(model=client.models.list().data[0].id, prompt="This License", max_tokens=12, temperature=0,
                    logprobs=True)
        answer = client.completions.create(**base, logit_bias={str(plain[0]): -100}, presence_penalty=1.5,
                                           frequency_penalty=0.5)
        assert answer.choices[0].logprobs.tokens == [run_cli_decode(path, t) for t in adjusted]
        status, _, raw = server.post("/v1/completions", {**base, "logprobs": False})
        assert status == 200 and raw["choices"][0]["logprobs"] is None
        assert raw["system_fingerprint"].startswith("llmcli-") and answer.system_fingerprint == raw["system_fingerprint"]
        from llmcli.engines import choose_engine

        ids = choose_engine(path, "auto").encode("This License")
        by_ids = client.completions.create(**{**base, "prompt": ids, "logprobs": None})
        assert by_ids.choices[0].text == client.completions.create(**{**base, "logprobs": None}).choices[0].text
        status, _, raw = server.post("/v1/completions", {**base, "logit_bias": {"99999999": 1}})
        assert status == 400 and raw["error"]["param"] == "logit_bias", raw
        chat = client.chat.completions.create(model=base["model"], messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, logit_bias={str(plain[0]): -100})
        assert chat.system_fingerprint == answer.system_fingerprint
    assert "Traceback" not in server.stderr


def run_cli_decode(model: str, token: int) -> str:
    from llmcli.engines import choose_engine

    return choose_engine(model, "auto").decode([token])


def test_the_schema_errors_and_unsupported_fields(tiny_gpt2):
    """/openapi.json lists every route the server answers; an unknown path names what is served, a
    wrong method gets 405 with Allow, an unknown model 404 model_not_found, a context overflow
    context_length_exceeded; fields that would change the answer and are not done are refused by
    name; error messages carry neither pydantic's "Value error, " nor its union-branch locations."""
    with serving("-m", tiny_gpt2) as server:
        status, _, schema = get(server, "/openapi.json")
        assert status == 200 and schema["openapi"].startswith("3.")
        served = {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/models/{name}",
                  "/v1/responses/{ident}", "/v1/messages", "/v1/messages/count_tokens", "/health", "/metrics",
                  "/tokenize", "/detokenize", "/tokenizer_info"}
        assert served <= set(schema["paths"]), schema["paths"].keys()
        for path in schema["paths"]:  # every published route answers (no 404)
            concrete = path.replace("{name}", "x")
            method = "post" if "post" in schema["paths"][path] else "get"
            if method == "get":
                assert get(server, concrete)[0] != 404 or "{" in path, path  # an unknown id's 404 aside
        status, _, answer = server.post("/v1/nowhere", {})
        assert status == 404 and "POST /v1/chat/completions" in answer["error"]["message"], answer
        status, headers, answer = get(server, "/v1/completions")
        assert status == 405 and headers.get("allow") == "POST" and "takes POST, not GET" in answer["error"]["message"]
        status, _, answer = server.post("/v1/completions", {"prompt": "hi", "model": "gpt-4"})
        assert status == 404 and answer["error"]["code"] == "model_not_found"
        status, _, answer = server.post("/v1/completions", {"prompt": " ".join(["word"] * 400), "max_tokens": 5})
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        for field, value in (("suffix", "end"), ("best_of", 3), ("modalities", ["text", "audio"]),
                             ("prediction", {"type": "content", "content": "x"})):
            status, _, answer = server.post("/v1/completions" if field in ("suffix", "best_of") else
                                            "/v1/chat/completions",
                                            {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                                             field: value})
            assert status == 400 and answer["error"]["param"] == field, (field, answer)
            assert f"{field} is not supported" in answer["error"]["message"], answer
        status, _, answer = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]})
        message = answer["error"]["message"]
        assert status == 400 and message.startswith("messages.0.content: ") and ".str" not in message, answer
        status, _, answer = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url"}]}]})
        assert status == 400 and not answer["error"]["message"].count("Value error"), answer
        # accepted and honoured, or accepted as metadata: still a 200
        status, _, answer = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "user": "me",
                                                            "best_of": 1, "suffix": None})
        assert status == 200, answer
    assert "Traceback" not in server.stderr


def test_schemathesis_finds_no_server_error_in_the_published_schema(tiny_gpt2, tmp_path):
    """schemathesis, reading /openapi.json, sends a bounded run of generated requests (its examples and
    coverage and fuzzing phases, up to 100 cases an operation, deterministic): no 5xx, and the server still answers after."""
    import subprocess
    import sys
    from pathlib import Path

    st = Path(sys.executable).parent / "st"
    with serving("-m", tiny_gpt2, "--max-tokens-limit", "8") as server:
        run = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                              "--max-examples", "100", "--phases", "examples,coverage,fuzzing", "--workers", "1",
                              "--generation-deterministic", "--request-timeout", "60"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its .schemathesis/
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert get(server, "/health") == (200, get(server, "/health")[1], {"status": "ok"})
    cases = [line for line in server.stderr.splitlines() if line.startswith(("POST ", "GET "))]
    assert len(cases) > 300 and not any(" 500 " in line for line in cases), len(cases)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gguf"])
def test_streamed_logprobs_come_with_each_tokens_delta(model, request):
    """stream + logprobs: every chunk carries its own tokens' log-probabilities, as OpenAI sends them,
    and together they are the non-streamed answer's (with echo, the prompt's tokens first); the text is
    the same too."""
    path = request.getfixturevalue(model)
    with serving("-m", path) as server:
        client = server.client()
        name = client.models.list().data[0].id
        chat = dict(model=name, messages=[{"role": "user", "content": "This License"}], max_tokens=8, temperature=0,
                    logprobs=True, top_logprobs=2)
        whole = client.chat.completions.create(**chat)
        chunks = [c for c in client.chat.completions.create(**chat, stream=True) if c.choices]
        with_entries = [c for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.content]
        assert all(len(c.choices[0].logprobs.content) == 1 for c in with_entries)
        assert [c.choices[0].logprobs.content[0].logprob for c in with_entries] == \
            [entry.logprob for entry in whole.choices[0].logprobs.content]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        legacy = dict(model=name, prompt="This License", max_tokens=8, temperature=0, logprobs=1)
        whole = client.completions.create(**legacy)
        chunks = [c for c in client.completions.create(**legacy, stream=True) if c.choices and c.choices[0].logprobs]
        assert [c.choices[0].logprobs.token_logprobs[0] for c in chunks] == whole.choices[0].logprobs.token_logprobs
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        echoed = dict(legacy, echo=True)  # the prompt's tokens first, each with its own chunk too
        whole = client.completions.create(**echoed)
        streamed = [c for c in client.completions.create(**echoed, stream=True) if c.choices]
        chunks = [c for c in streamed if c.choices[0].logprobs]
        assert len(chunks) == len(whole.choices[0].logprobs.tokens) > 8
        assert [c.choices[0].logprobs.tokens[0] for c in chunks] == whole.choices[0].logprobs.tokens
        assert [c.choices[0].logprobs.token_logprobs[0] for c in chunks] == whole.choices[0].logprobs.token_logprobs
        assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert "Traceback" not in server.stderr


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is This License?"}]
CHAT_WITH_TOOLS = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "look_up", "arguments": '{"term": "License"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "the GNU General Public License"}]


@pytest.mark.parametrize("model", ["bos_llama", pytest.param(None, marks=pytest.mark.slow)])  # None: the embedded GGUF
def test_tokenize_gives_the_ids_generation_uses(model, request):
    """/tokenize: a prompt's ids are the engine's encode (with and without special tokens) and what
    /v1/completions counts; messages' are the chat template's as /v1/chat/completions generates from
    them (tool calls too), with or without the generation prompt; /detokenize gives the text back with
    special tokens' text; /tokenizer_info names the special tokens and the template. Bad requests: 400
    naming the field, and the server goes on."""
    from llmcli.engines import choose_engine

    path = None if model is None else str(request.getfixturevalue(model))
    engine = choose_engine(path, "auto")
    assert engine.name == ("hf" if model else "llama.cpp")
    eos = engine.token_text(engine.eos_id)
    texts = ["This License", f"{eos}Everyone is permitted{eos} to copy", "  spaced\n\nlines"]
    with serving(*(["-m", path] if path else [])) as server:
        for text in texts:
            for add in (None, True, False):
                status, _, answer = server.post("/tokenize", {"prompt": text} | ({} if add is None else
                                                                                  {"add_special_tokens": add}))
                expected = engine.encode(text, add_special=add is not False)
                assert status == 200 and answer["tokens"] == expected and answer["count"] == len(expected), answer
                assert answer["token_strs"] is None
            if model:
                assert engine.encode(text) != engine.encode(text, add_special=False)  # the BOS: the check above bites
            _, _, named = server.post("/tokenize", {"prompt": text, "return_token_strs": True})
            assert named["token_strs"] == [engine.token_text(token) for token in named["tokens"]]
            _, _, done = server.post("/v1/completions", {"prompt": text, "max_tokens": 1})
            assert done["usage"]["prompt_tokens"] == len(engine.encode(text))
            _, _, back = server.post("/detokenize", {"tokens": engine.encode(text)})
            assert back == {"prompt": (engine.token_text(engine.bos_id) if engine.adds_bos else "") + text}
        _, _, chat = server.post("/tokenize", {"messages": CHAT})
        assert chat["tokens"] == engine.encode_chat(CHAT) and chat["max_model_len"] >= 256
        _, _, open_turn = server.post("/tokenize", {"messages": CHAT, "add_generation_prompt": False})
        assert chat["tokens"][:open_turn["count"]] == open_turn["tokens"] and open_turn["count"] < chat["count"]
        for messages in (CHAT, CHAT_WITH_TOOLS):
            _, _, counted = server.post("/tokenize", {"messages": messages})
            _, _, reply = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1})
            assert reply["usage"]["prompt_tokens"] == counted["count"], (counted, reply)
        status, _, info = get(server, "/tokenizer_info")
        assert status == 200 and info["eos_token"] == eos and info["chat_template"] == engine.chat_template
        assert info["bos_token"] == engine.token_text(engine.bos_id) and info["add_bos_token"] == engine.adds_bos
        for route, body, code, param in [
            ("/tokenize", {}, 400, "prompt"),
            ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
            ("/tokenize", {"prompt": 5}, 400, "prompt"),
            ("/tokenize", {"messages": []}, 400, "messages"),
            ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
            ("/tokenize", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
            ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
            ("/detokenize", {"tokens": [engine.constraints.n_vocab]}, 400, "tokens"),
            ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
            ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ]:
            status, _, answer = server.post(route, body)
            assert status == code and answer["error"]["param"] == param, (route, body, answer)
        assert server.post("/detokenize", {"tokens": []})[2] == {"prompt": ""}
    assert "Traceback" not in server.stderr


def test_lm_evals_local_completions_runs_on_the_remote_tokenizer(tiny_gpt2, tmp_path):
    """lm-evaluation-harness's local-completions with tokenizer_backend=remote and no tokenizer of its own:
    its loglikelihood requests (3 questions of 3 answers) tokenized by this server's /tokenize, scored
    by /v1/completions, give the log-likelihoods `llmcli eval --tasks` gives for the same task; a chat
    needs the template this model lacks: a 400."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from conftest import GPL3

    words = GPL3.read_text().split()
    questions = [{"context": " ".join(words[i:i + 8]), "choices": [words[i + 8], words[i + 30], words[i + 50]],
                  "label": 0} for i in (100, 400, 700)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "mc.yaml").write_text(
        f"task: remote_mc\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\noutput_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    with serving("-m", tiny_gpt2) as server:
        name = server.client().models.list().data[0].id
        from lm_eval.utils import check_remote_tokenizer_support

        assert check_remote_tokenizer_support(f"{server.url}/v1/completions")
        theirs = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"model={name},base_url={server.url}/v1/completions,"
            "tokenizer_backend=remote,max_retries=1,max_length=256", tasks=["remote_mc"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path)))
        status, _, answer = server.post("/tokenize", {"messages": CHAT})
        assert status == 400 and "no chat template" in answer["error"]["message"], answer
    assert server.stderr.count("POST /tokenize 200") >= 9 and "GET /tokenizer_info 200" in server.stderr
    assert server.stderr.count("POST /v1/completions 200") == 9
    result = run_cli("eval", "--tasks", str(tmp_path / "mc.yaml"), "-m", str(tiny_gpt2), "--json", "--log-samples",
                     "--output-path", str(tmp_path / "ours"))
    assert result.exit_code == 0, result.stderr
    [samples] = (tmp_path / "ours").rglob("samples_*.jsonl")
    ours = {s["doc_id"]: s["resps"] for s in map(json.loads, samples.read_text().splitlines())}
    remote = {s["doc_id"]: s["resps"] for s in theirs["samples"]["remote_mc"]}
    assert sorted(ours) == sorted(remote) == [0, 1, 2]
    for doc in ours:
        for [[mine, mine_greedy]], [[them, them_greedy]] in zip(ours[doc], remote[doc], strict=True):
            assert float(mine) == pytest.approx(float(them), rel=1e-5, abs=1e-5)
            assert str(mine_greedy) == str(them_greedy)


def test_docs_page_loads_only_what_this_server_serves(tiny_gpt2):
    """/docs works offline: its script, style, icon and schema are this server's own URLs (no CDN), and
    each answers 200."""
    import re

    with serving("-m", tiny_gpt2) as server:
        status, headers, page = get(server, "/docs")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "//" not in page, page  # no absolute or protocol-relative URL: nothing from elsewhere
        urls = [a or b for a, b in re.findall(r'(?:src|href)="([^"]+)"|url: \'([^\']+)\'', page)]
        assert {url.rsplit(".", 1)[-1] for url in urls} == {"js", "css", "png", "json"}, urls
        for url in urls:
            request = urllib.request.urlopen(server.url + url, timeout=60)
            assert request.status == 200 and len(request.read()) > 100, url
    assert "Traceback" not in server.stderr
