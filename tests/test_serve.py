"""`llmcli serve` through the official `openai` client and raw HTTP. Every server here binds 127.0.0.1
on a free port, and every loop is bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import pytest

from conftest import GPL3, run_cli


def free_port() -> int:
    from llmcli.distributed import free_port

    return free_port()


class Server:
    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url = process, url

    def client(self, api_key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


@contextmanager
def serving(*args) -> Iterator[Server]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", "--port", str(port), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # read both pipes all along: a server whose access log fills an unread pipe (64 KiB, a few hundred
    # requests) blocks in its write and stops answering
    output = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda pipe, lines: lines.extend(pipe), args=(getattr(process, name), lines),
                                daemon=True) for name, lines in output.items()]
    for reader in readers:
        reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if process.poll() is not None:
            for reader in readers:
                reader.join(timeout=10)
            raise AssertionError(("".join(output["stdout"]), "".join(output["stderr"])))
        assert time.time() < deadline, "the server did not start"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    server = Server(process, url)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        server.returncode = process.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
        server.stderr = "".join(output["stderr"])


def open_long_stream(server: Server, prompt: str = "Once upon a time"):
    """A raw HTTP connection streaming a 3000-token greedy completion (about a minute on the embedded
    model), for a client that hangs up or a server stopped mid-stream; (connection, response)."""
    import http.client

    port = int(server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 3000, "stream": True,
                                                              "temperature": 0}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def generate_text(*args) -> str:
    result = run_cli("generate", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()[0]["text"]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gguf"])
def test_openai_client_completions_and_chat_equal_llmcli_generate(model, request):
    path = request.getfixturevalue(model)
    with serving("-m", path) as server:
        client = server.client()
        listed, embedder = client.models.list().data  # the chat model first, then the embedding model
        assert embedder.id == "minilm"
        completion = client.completions.create(model=listed.id, prompt="This License", max_tokens=12, temperature=0)
        assert completion.choices[0].text == generate_text("This License", "-m", path, "--no-chat", "-n", "12")
        assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens > 0
        messages = [{"role": "user", "content": "the program"}]
        chat = client.chat.completions.create(model=listed.id, messages=messages, max_tokens=10, temperature=0)
        assert chat.choices[0].message.content == generate_text("the program", "-m", path, "-n", "10")
        # streaming gives the same text in pieces, and ends with a finish reason
        pieces = list(client.chat.completions.create(model=listed.id, messages=messages, max_tokens=10,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content
        assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] in ("length", "stop")
        streamed = client.completions.create(model=listed.id, prompt="This License", max_tokens=12, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
        # n samples, repeatable with a seed; a stop string cuts the text
        sampled = dict(model=listed.id, prompt="This License", max_tokens=12, temperature=1.0, n=3, seed=7)
        first, again = (client.completions.create(**sampled) for _ in range(2))
        texts = [c.text for c in first.choices]
        assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
        full = completion.choices[0].text
        word = full[len(full) // 2:len(full) // 2 + 3]
        assert len(word) == 3
        stopped = client.completions.create(model=listed.id, prompt="This License", max_tokens=12, temperature=0,
                                             stop=[word])
        assert stopped.choices[0].text == completion.choices[0].text[:completion.choices[0].text.index(word)]
        assert stopped.choices[0].finish_reason == "stop"
    assert server.returncode == 0 and "Stopped." in server.stderr  # SIGTERM: a clean stop
    assert "POST /v1/completions 200" in server.stderr  # one access line per request


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_gguf"])
def test_echoed_prompt_logprobs_are_the_numbers_eval_sums(model, request, tmp_path):
    """What lm-evaluation-harness's local-completions backend asks for a loglikelihood: echo, logprobs,
    max_tokens 0. Summed, the prompt's log-probabilities are minus `llmcli eval`'s NLL of the same text."""
    path = request.getfixturevalue(model)
    text = " ".join(GPL3.read_text().split()[:60])
    data = tmp_path / "text.txt"
    data.write_text(text)
    result = run_cli("eval", "-d", data, "-m", path, "--max-length", "256", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    with serving("-m", path) as server:
        status, _, body = server.post("/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True,
                                                           "logprobs": 2, "temperature": 0})
    assert status == 200, body
    logprobs = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == text and "".join(logprobs["tokens"]) == text
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == record["tokens"] + 1
    assert -sum(logprobs["token_logprobs"][1:]) == pytest.approx(record["nll"], rel=1e-9)
    for chosen, token, top in zip(logprobs["token_logprobs"][1:], logprobs["tokens"][1:], logprobs["top_logprobs"][1:]):
        # the two likeliest (one key when both are parts of a character, shown as U+FFFD)
        assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-9


def test_bad_requests_get_their_status_and_an_error_body(tiny_gpt2):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    with serving("-m", tiny_gpt2, "--api-key", "sesame", "--max-tokens-limit", "50", "--max-body", "4096") as server:
        key = {"Authorization": "Bearer sesame"}
        cases = [
            (b"{not json", key, 400, "not a JSON object"),
            ({"prompt": "hi", "max_tokens": "many"}, key, 400, "max_tokens"),
            ({"prompt": "hi", "max_tokens": -3}, key, 400, "max_tokens"),
            ({"prompt": "hi", "max_tokens": 10_000}, key, 400, "above this server's limit of 50"),
            ({"prompt": "hi", "temperature": 9}, key, 400, "temperature"),
            ({"prompt": [], "max_tokens": 1}, key, 400, "prompt"),
            ({"prompt": "hi", "model": "gpt-4"}, key, 404, "unknown model 'gpt-4'"),
            ({"prompt": " ".join(["word"] * 400), "max_tokens": 5}, key, 400, "context"),
            ({"prompt": "hi"}, {}, 401, "API key"),
            ({"prompt": "hi"}, {"Authorization": "Bearer sesame2"}, 401, "API key"),
            (big, key, 413, "over 4096 bytes"),
        ]
        for body, headers, status, fragment in cases:
            got, _, answer = server.post("/v1/completions", body, headers)
            assert got == status and fragment in answer["error"]["message"], (body if isinstance(body, bytes)
                                                                              else str(body)[:80], got, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
        got, _, answer = server.post("/v1/chat/completions", {"messages": []}, key)
        assert got == 400 and answer["error"]["param"] == "messages"
        got, _, answer = server.post("/v1/nowhere", {}, key)
        assert got == 404
        # the tokenizer's routes, at the root as vLLM serves them, need the key too
        assert server.post("/tokenize", {"prompt": "hi"})[0] == 401
        assert server.post("/tokenize", {"prompt": "hi"}, key)[0] == 200
        # after all that the server still answers, and /health needs no key
        got, _, answer = server.post("/v1/completions", {"prompt": "This License", "max_tokens": 3}, key)
        assert got == 200 and answer["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.stderr


def test_a_full_queue_answers_503_with_retry_after(tiny_gpt2):
    with serving("-m", tiny_gpt2, "--queue-size", "1") as server:
        answers = []

        def ask() -> None:
            answers.append(server.post("/v1/completions", {"prompt": "This License", "max_tokens": 200,
                                                            "temperature": 0}))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    statuses = sorted(status for status, _, _ in answers)
    assert len(answers) == 6 and 503 in statuses and 200 in statuses, statuses
    assert set(statuses) == {200, 503}
    for status, headers, body in answers:
        if status == 503:
            assert headers.get("retry-after") == "1" and body["error"]["type"] == "server_busy"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["llama.cpp", "hf"])
def test_a_client_gone_mid_stream_frees_the_engine(engine):
    """A stream of 3000 tokens (about a minute on the embedded model here) whose client hangs up after
    the first pieces: the generation stops, so the next request is answered at once, and the server's
    log says nothing of the abandoned job (asyncio once logged "Future exception was never retrieved"
    with a traceback, and "Task was destroyed but it is pending!")."""
    with serving("--engine", engine) as server:
        for _ in range(2):  # the second time after the first one's leftovers have been collected
            connection, response = open_long_stream(server)
            assert response.read(6) == b"data: "  # the first piece has come
            connection.sock.close()  # the client goes away mid-stream
            connection.close()
            began = time.time()
            status, _, body = server.post("/v1/completions", {"prompt": "The capital of France is",
                                                               "max_tokens": 4, "temperature": 0})
            waited = time.time() - began
            assert status == 200 and body["usage"]["completion_tokens"] == 4
            assert waited < 15, f"the abandoned generation held the engine for {waited:.0f} s"
    assert server.returncode == 0 and "Stopped." in server.stderr
    for noise in ("Traceback", "never retrieved", "Task was destroyed", "Cancelled"):
        assert noise not in server.stderr, server.stderr


def test_many_concurrent_streaming_clients_each_get_their_own_text(tiny_gpt2):
    """A bounded load: 8 clients, 40 streamed requests, prompts of their own; each checks its text
    against the greedy answer for its prompt (no request lost or mixed up)."""
    prompts = [" ".join(GPL3.read_text().split()[i * 5:i * 5 + 4]) for i in range(8)]
    with serving("-m", tiny_gpt2) as server:
        client = server.client()
        model = client.models.list().data[0].id
        expected = {p: client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
                    for p in prompts}
        failures: list[str] = []

        def user(prompt: str) -> None:
            for _ in range(5):
                stream = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                   stream=True)
                text = "".join(c.choices[0].text for c in stream if c.choices)
                if text != expected[prompt]:
                    failures.append(f"{prompt!r}: {text!r} != {expected[prompt]!r}")

        threads = [threading.Thread(target=user, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert server.stderr.count("POST /v1/completions 200") == 8 + 40


def test_waiting_requests_are_batched_and_each_gets_its_own_answer(tiny_gpt2):
    """hf engine, --max-batch 4: eight concurrent greedy requests while the engine is busy run in
    batches; every answer is the one the same request gets alone, with its own usage."""
    prompts = [" ".join(GPL3.read_text().split()[i * 9:i * 9 + 2 + i % 4]) for i in range(8)]
    with serving("-m", tiny_gpt2, "--max-batch", "4", "--json-logs") as server:
        alone = {}
        for prompt in prompts:
            _, _, body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
            alone[prompt] = (body["choices"][0]["text"], body["usage"])
        answers = {}

        def ask(prompt: str) -> None:
            answers[prompt] = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})

        blocker = threading.Thread(target=ask, args=(prompts[0],))  # keeps the engine busy while the rest queue
        blocker.start()
        time.sleep(0.05)
        too_long = " ".join(["word"] * 400)  # queued with the others: its error is its own
        threads = [threading.Thread(target=ask, args=(p,)) for p in [*prompts[1:4], too_long, *prompts[4:]]]
        for thread in threads:
            thread.start()
        for thread in [blocker, *threads]:
            thread.join(timeout=120)
    status, _, body = answers[too_long]
    assert status == 400 and "context" in body["error"]["message"]
    for prompt in prompts:
        status, _, body = answers[prompt]
        assert status == 200 and (body["choices"][0]["text"], body["usage"]) == alone[prompt], prompt
        assert "batch" not in body
    logged = [json.loads(line) for line in server.stderr.splitlines() if line.startswith("{")]
    assert max(record["batch"] for record in logged) > 1


def test_waiting_requests_with_other_options_are_not_batched_with_them(tiny_gpt2):
    """hf engine: requests queued together whose options differ (length, stop string, a JSON constraint,
    logit_bias, penalties) each get the answer the same request gets alone; two with equal options
    still share a batch."""
    prompt = "This License"
    with serving("-m", tiny_gpt2, "--max-batch", "8", "--json-logs") as server:
        _, _, plain = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        text = plain["choices"][0]["text"]
        first = server.post("/tokenize", {"prompt": text, "add_special_tokens": False})[2]["tokens"][0]
        variants = [{"max_tokens": 16}, {"max_tokens": 5}, {"max_tokens": 16, "stop": [text[6:9]]},
                    {"max_tokens": 16, "response_format": {"type": "json_object"}},
                    {"max_tokens": 16, "logit_bias": {str(first): -100}},
                    {"max_tokens": 16, "presence_penalty": 2, "frequency_penalty": 1},
                    {"max_tokens": 16, "repetition_penalty": 3.0}]
        requests = [{"prompt": prompt, "temperature": 0, **options} for options in variants]
        requests.append({**requests[1], "prompt": "Everyone is permitted"})  # equal options: one batch
        alone = []
        for body in requests:
            status, _, answer = server.post("/v1/completions", body)
            assert status == 200, answer
            alone.append((answer["choices"][0]["text"], answer["usage"]))
        # each option changes the answer: joined to the first one's batch, a request would get another
        assert all(answer != alone[0] for answer in alone[1:len(variants)]), alone
        answers: dict[int, tuple] = {}

        def ask(index: int, body: dict) -> None:
            answers[index] = server.post("/v1/completions", body)

        # keeps the engine busy while the rest queue
        blocker = threading.Thread(target=ask, args=(-1, {"prompt": prompt, "max_tokens": 200, "temperature": 0}))
        blocker.start()
        time.sleep(0.05)
        threads = [threading.Thread(target=ask, args=(index, body)) for index, body in enumerate(requests)]
        for thread in threads:
            thread.start()
        for thread in [blocker, *threads]:
            thread.join(timeout=120)
    for index, (text, usage) in enumerate(alone):
        status, _, answer = answers[index]
        assert status == 200 and (answer["choices"][0]["text"], answer["usage"]) == (text, usage), requests[index]
    logged = [json.loads(line) for line in server.stderr.splitlines() if line.startswith("{")]
    assert max(record["batch"] for record in logged) == 2  # the two with equal options, and no others


def test_listening_beyond_this_machine_without_a_key_warns():
    """Checked as a function: tests never bind anything but 127.0.0.1."""
    from llmcli.serve import exposure_warning

    assert "without --api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "secret") is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None


def test_what_real_clients_send_and_expect(tiny_gguf):
    """Content as a list of text parts, model names and retrieval, `functions` refused, a default max_tokens
    capped by --max-tokens-limit, the usage chunk only when asked, JSON sent without its content type,
    and errors that name request fields, not command-line options."""
    import urllib.request

    with serving("-m", tiny_gguf, "--max-tokens-limit", "5", "--served-model-name", "tiny") as server:
        client = server.client()
        card, _ = client.models.list().data
        assert card.id == "tiny" and card.created > 1_700_000_000
        assert client.models.retrieve("tiny").id == "tiny"
        assert client.models.retrieve("tiny-llama-f32.gguf").id == "tiny"  # the file's own name works too
        status, _, answer = server.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                                                               "content": "hi"}]})
        assert status == 404 and answer["error"]["code"] == "model_not_found"  # as OpenAI answers
        with pytest.raises(Exception, match="404"):
            client.models.retrieve("nope")

        plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "This License"}],
                                               max_tokens=5, temperature=0)
        parts = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "This "}, {"type": "text", "text": "License"}]}])
        assert parts.choices[0].message.content == plain.choices[0].message.content
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
        status, _, answer = server.post("/v1/chat/completions", {"messages": [image]})
        assert status == 400 and "'image_url' are not supported" in answer["error"]["message"]
        legacy = {"name": "f", "parameters": {}}  # OpenAI's deprecated `functions`, which no 200 would honour
        status, _, answer = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                                 "functions": [legacy]})
        assert status == 400 and answer["error"]["param"] == "functions" and "send tools" in answer["error"]["message"]

        status, _, answer = server.post("/v1/completions", {"prompt": "This License", "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] == 5  # the default 16, capped to the limit

        chunks = list(client.completions.create(model="tiny", prompt="This License", max_tokens=3, stream=True))
        assert all(chunk.usage is None for chunk in chunks)
        chunks = list(client.completions.create(model="tiny", prompt="This License", max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices

        request = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": "This License", "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 2

        status, _, answer = server.post("/v1/completions", {"prompt": " ".join(["word"] * 300), "max_tokens": 5})
        assert status == 400 and "max_tokens 5" in answer["error"]["message"]
        assert "--" not in answer["error"]["message"]
    assert "Traceback" not in server.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["llama.cpp", "hf"])
def test_sigterm_ends_open_streams_properly(engine):
    """SIGTERM while a long stream is in flight: the stream ends within the grace period with a finish
    reason and [DONE], the server exits 0, and no traceback is printed."""
    with serving("--engine", engine) as server:
        connection, response = open_long_stream(server)
        assert response.read(6) == b"data: "
        server.process.send_signal(signal.SIGTERM)
        rest = response.read().decode()  # to the end of the stream
        connection.close()
    events = [json.loads(line[6:]) for line in ("data: " + rest).split("\n\n") if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events)
    assert server.returncode == 0 and "Traceback" not in server.stderr and "Exception" not in server.stderr
