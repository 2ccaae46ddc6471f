"""`llmcli serve` offering several models: each loads at its first request and answers as a server
running it alone; --max-loaded unloads the least recently used idle model; --keep-alive unloads idle
ones; a stream is never cut by an unload; unknown and broken models are errors that name them while the
others serve; /models/load and /models/unload. Servers bind 127.0.0.1 on a free port; waits are bounded."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from test_serve import generate_text, serving

pytest.importorskip("llama_cpp")
from test_serve_llama import metrics  # noqa: E402


def models(server) -> dict[str, dict]:
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as response:
        return {card["id"]: card for card in json.loads(response.read())["data"]}


def loaded(server) -> set[str]:
    return {name for name, card in models(server).items() if card["loaded"] and card["kind"] == "chat"}


def complete(server, model: str, prompt: str = "This License", **fields) -> str:
    status, _, answer = server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12,
                                                        "temperature": 0, **fields})
    assert status == 200, answer
    return answer["choices"][0]["text"]


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def models_file(tmp_path, entries: list[dict]):
    """A --models TOML file from dicts (strings quoted, lists as TOML arrays)."""
    lines = []
    for entry in entries:
        lines.append("[[model]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path = tmp_path / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hf_models_alternating_under_max_loaded_one_answer_as_alone(tiny_llama, tiny_gpt2):
    """Two hf models, one loaded at a time: A, B, A each equal `llmcli generate` on that model alone
    (greedy), each switch unloads the other, and /metrics counts the loads and unloads per model."""
    alone = {path.name: generate_text("This License", "-m", path, "--no-chat", "-n", "12")
             for path in (tiny_llama, tiny_gpt2)}
    assert alone[tiny_llama.name] != alone[tiny_gpt2.name]  # the check below could not tell them apart otherwise
    with serving("-m", tiny_llama, "-m", tiny_gpt2, "--max-loaded", "1") as server:
        cards = models(server)
        assert [cards[p.name]["loaded"] for p in (tiny_llama, tiny_gpt2)] == [False, False]
        assert cards["minilm"]["kind"] == "embedding" and cards[tiny_llama.name]["kind"] == "chat"
        for path in (tiny_llama, tiny_gpt2, tiny_llama):
            assert complete(server, path.name) == alone[path.name]
            assert loaded(server) == {path.name}
        counted = metrics(server)
        assert counted[f"llmcli:model_loads_total{{model={tiny_llama.name}}}"] == 2
        assert counted[f"llmcli:model_loads_total{{model={tiny_gpt2.name}}}"] == 1
        assert counted[f"llmcli:model_unloads_total{{model={tiny_llama.name}}}"] == 1
        assert counted[f"llmcli:model_load_seconds_count{{model={tiny_gpt2.name}}}"] == 1


def test_least_recently_used_idle_model_makes_room(tiny_gguf, tiny_gguf_2k, tmp_path):
    """Three llama.cpp models under --max-loaded 2 (a models file, with aliases and options): after A, B,
    A a request for C unloads B, the least recently used; then B unloads A; each answers as alone."""
    table = models_file(tmp_path, [{"name": "a", "model": str(tiny_gguf), "aliases": ["first"]},
                                   {"name": "b", "model": str(tiny_gguf_2k), "parallel": 2},
                                   {"name": "c", "model": str(tiny_gguf), "ctx_size": 512}])
    alone = generate_text("This License", "-m", tiny_gguf, "--no-chat", "-n", "12")
    with serving("--models", table, "--max-loaded", "2") as server:
        assert complete(server, "first") == alone  # an alias names its model
        assert complete(server, "b") == alone  # the same weights, a longer context
        assert complete(server, "a") == alone
        assert loaded(server) == {"a", "b"}
        assert complete(server, "c") == alone
        assert loaded(server) == {"a", "c"}
        assert complete(server, "b") == alone
        assert loaded(server) == {"b", "c"}


def test_keep_alive_unloads_idle_models(tiny_gguf, tiny_gguf_2k):
    """--keep-alive 2s: an idle model unloads about two seconds after its last request; a request's own
    keep_alive (ollama's) of -1 keeps its model loaded."""
    kept, idle = tiny_gguf_2k.name, tiny_gguf.name
    with serving("-m", tiny_gguf, "-m", tiny_gguf_2k, "--keep-alive", "2s") as server:
        complete(server, kept, keep_alive=-1)
        complete(server, idle)
        assert loaded(server) == {kept, idle}  # not at once
        wait_for(lambda: loaded(server) == {kept}, 15)
        time.sleep(2.5)
        assert loaded(server) == {kept}


def test_a_long_stream_survives_a_burst_that_loads_and_unloads_another_model(tiny_gguf_2k, tiny_gguf):
    """--keep-alive 0: every model unloads as soon as it is idle. A long stream on A keeps A loaded while
    requests for B load and unload B three times; it runs to its last token, and its text starts with
    the same request's text alone (compared over 200 tokens: past ~800 tokens this random model's
    greedy text turns on near-ties that a second run on one server already flips)."""
    long = {"model": tiny_gguf_2k.name, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}
    with serving("-m", tiny_gguf_2k, "-m", tiny_gguf, "--keep-alive", "0") as server:
        client = server.client()
        chunks = iter(client.completions.create(stream=True, stream_options={"include_usage": True}, **long))
        received = [next(chunks)]
        reader = threading.Thread(target=lambda: received.extend(chunks))
        reader.start()
        checks = []  # (A listed as loaded, A's stream still running on the server): read in that order
        for _ in range(3):
            complete(server, tiny_gguf.name)
            wait_for(lambda: tiny_gguf.name not in loaded(server), 10)
            checks.append((tiny_gguf_2k.name in loaded(server), metrics(server)["llmcli:num_requests_running"] > 0))
        reader.join(timeout=120)
        assert not reader.is_alive()
        assert checks[0][1], f"the stream ended before the burst ({checks}): make it longer"
        assert all(listed for listed, running in checks if running), checks  # never unloaded under its stream
        assert metrics(server)[f"llmcli:model_loads_total{{model={tiny_gguf.name}}}"] == 3
        assert received[-1].usage.completion_tokens == 1000
        text = "".join(chunk.choices[0].text for chunk in received if chunk.choices)
        assert text.startswith(client.completions.create(**{**long, "max_tokens": 200}).choices[0].text)


def test_unknown_and_broken_models_and_load_unload_routes(tiny_gguf, tmp_path):
    """A model not offered is 404 model_not_found listing the offered ones; one that fails to load is a
    500 naming it while the other keeps serving; /models/load and /models/unload as llama-server's."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # a GGUF header, and nothing llama.cpp can load
    with serving("-m", tiny_gguf, "-m", broken) as server:
        status, _, answer = server.post("/v1/completions", {"model": "nope", "prompt": "hi"})
        assert status == 404 and answer["error"]["code"] == "model_not_found"
        assert tiny_gguf.name in answer["error"]["message"] and "broken.gguf" in answer["error"]["message"]
        status, _, answer = server.post("/v1/completions", {"model": "broken.gguf", "prompt": "hi"})
        assert status == 500 and "'broken.gguf' failed to load" in answer["error"]["message"], answer
        complete(server, tiny_gguf.name)  # the other one serves
        status, _, answer = server.post("/models/load", {"model": "broken"})
        assert status == 500 and answer["error"]["code"] == "model_load_failed"
        assert server.post("/models/unload", {"model": tiny_gguf.name})[2] == {"success": True}
        assert loaded(server) == set()
        status, _, answer = server.post("/models/unload", {"model": tiny_gguf.name})
        assert status == 400 and "not loaded" in answer["error"]["message"]
        assert server.post("/models/load", {"model": tiny_gguf.name})[2] == {"success": True}
        assert models(server)[tiny_gguf.name]["status"] == {"value": "loaded"}
        assert server.post("/models/load", {"model": "nope"})[0] == 404


def test_models_dir_offers_models_and_adapters_with_their_parent(tiny_llama, tiny_gguf, tmp_path):
    """--models-dir: a .gguf file, a model directory and a LoRA adapter directory on it are offered by
    name; /v1/models gives the adapter's parent (vLLM's field); the adapter answers as `llmcli generate
    -m ADAPTER_DIR`."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "models"
    folder.mkdir()
    base = shutil.copytree(tiny_llama, folder / "base")
    (folder / tiny_gguf.name).symlink_to(tiny_gguf)
    (folder / "notes.txt").write_text("not a model")
    # init_lora_weights=False: random A and B, so the adapter changes the text (the default B is zero)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(folder / "tuned")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "tuned")
    expected = generate_text("This License", "-m", folder / "tuned", "--no-chat", "-n", "12")
    assert expected != generate_text("This License", "-m", base, "--no-chat", "-n", "12")
    with serving("--models-dir", folder) as server:
        cards = models(server)
        assert {name for name, card in cards.items() if card["kind"] == "chat"} == {"base", "tuned", tiny_gguf.name}
        assert cards["tuned"]["parent"] == "base" and cards["base"]["parent"] is None
        assert complete(server, "tuned") == expected
        assert complete(server, "tiny-llama-f32") == generate_text("This License", "-m", tiny_gguf, "--no-chat",
                                                                   "-n", "12")  # a file's stem names it too


def test_bad_model_offers_are_one_line_errors(tiny_gguf, tmp_path):
    """Mistakes in what to offer stop `serve` before it listens: exit 2, one Error line naming the input."""
    from conftest import run_cli
    from test_serve import free_port

    duplicate = models_file(tmp_path, [{"name": "a", "model": str(tiny_gguf)}, {"name": "a", "model": str(tiny_gguf)}])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(f'[[model]]\nmodel = "{tiny_gguf}"\ncontext = 4096\n')
    for args, message in ((("-m", tiny_gguf, "-m", tiny_gguf, "--keep-alive", "5x"), "--keep-alive '5x' is not a"),
                          (("--models", duplicate), "two models are named 'a'"),
                          (("--models", unknown), "model 1: unknown key 'context'"),
                          (("-m", tiny_gguf, "--models-dir", tmp_path / "nowhere"), "is not a directory"),
                          (("--models", duplicate, "--max-loaded", "0"), "--max-loaded must be at least 1"),
                          (("--models-dir", tiny_gguf.parent, "--served-model-name", "x"), "for a server of one model")):
        result = run_cli("serve", "--port", free_port(), *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], (args, result.stderr)
