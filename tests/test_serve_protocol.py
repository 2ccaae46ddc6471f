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
                  "/v1/responses/{ident}", "/health", "/metrics"}
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
