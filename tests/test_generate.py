"""`llmcli generate`: faithfulness to Hugging Face generate, sampling, stops, EOS, inputs, JSON, chat."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import GPL3, hf_greedy, run_cli

PROMPTS = ["This License", "the GNU General Public License is", "You may convey"]
JSON_KEYS = {"prompt", "index", "text", "token_ids", "finish_reason", "prompt_tokens", "generated_tokens", "seconds",
             "engine", "weights", "prompt_number"}


def greedy(model_dir, *prompts, n=12, extra=()):
    result = run_cli("generate", *prompts, "-m", model_dir, "-t", "0", "--no-chat", "-n", n, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_fixtures_greedy_output_depends_on_the_whole_prompt(model, request, tiny_tokenizer):
    """The faithfulness tests mean something only if the fixtures' greedy output depends on every prompt
    token: two prompts ending in the same token continue differently, and not by repeating that token."""
    model_dir = request.getfixturevalue(model)
    prompts = ["the GNU General Public License is", "free software is"]
    assert len({tiny_tokenizer(p)["input_ids"][-1] for p in prompts}) == 1
    first, second = (hf_greedy(model_dir, [p], 8)[0] for p in prompts)
    assert first != second
    last = tiny_tokenizer(prompts[0])["input_ids"][-1]
    assert first.count(last) < 4


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_greedy_equals_hf_generate(model, request):
    model_dir = request.getfixturevalue(model)
    [record] = greedy(model_dir, PROMPTS[1], n=20)
    assert record["token_ids"] == hf_greedy(model_dir, [PROMPTS[1]], 20)[0]
    assert set(record) == JSON_KEYS
    assert record["generated_tokens"] == len(record["token_ids"])


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_batched_equals_hf_left_padded_batch(model, request):
    model_dir = request.getfixturevalue(model)
    records = greedy(model_dir, *PROMPTS, n=10, extra=("--batch-size", "3"))
    assert [r["prompt"] for r in records] == PROMPTS  # input order kept
    assert [r["token_ids"] for r in records] == hf_greedy(model_dir, PROMPTS, 10)


def test_prompt_tokenized_as_plain_tokenizer_call(tiny_gpt2, tiny_tokenizer):
    [record] = greedy(tiny_gpt2, PROMPTS[0], n=3)
    assert record["prompt_tokens"] == len(tiny_tokenizer(PROMPTS[0])["input_ids"])


def test_seeded_sampling_is_reproducible(tiny_gpt2):
    args = ("generate", "This License", "-m", tiny_gpt2, "-t", "1.0", "-n", "16", "--json",
            "--num-return-sequences", "3")
    first = run_cli(*args, "--seed", "7").json_lines()
    again = run_cli(*args, "--seed", "7").json_lines()
    other = run_cli(*args, "--seed", "8").json_lines()
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]
    assert [r["index"] for r in first] == [0, 1, 2]
    assert len({tuple(r["token_ids"]) for r in first}) > 1  # three samples, not one repeated


@pytest.mark.parametrize("option, value", [("top_k", 5), ("top_p", 0.3), ("min_p", 0.9),
                                           ("repetition_penalty", 1.5)])
def test_sampling_options_equal_hf_and_change_the_samples(tiny_llama, option, value):
    """With a seed, each sampling control gives `model.generate`'s own sample with that control, and a
    different one than without it (so the option reached the sampler). The tiny model's next-token
    distribution is nearly flat, hence min-p 0.9 to make min-p cut anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inputs = tokenizer(PROMPTS[1], return_tensors="pt")

    def reference(**kwargs):
        set_seed(3)
        output = model.generate(**inputs, do_sample=True, temperature=1.0, max_new_tokens=16, **kwargs)
        return output[0, inputs["input_ids"].shape[1]:].tolist()

    flag = "--" + option.replace("_", "-")
    [record] = greedy(tiny_llama, PROMPTS[1], n=16, extra=("-t", "1.0", "--seed", "3", flag, str(value)))
    assert record["token_ids"] == reference(**{option: value})
    assert record["token_ids"] != reference()


def test_stop_string_cuts_text_and_reports_stop(tiny_gpt2):
    [full] = greedy(tiny_gpt2, PROMPTS[1], n=24)
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0, f"pick a visible stop string past the start of {text!r}"
    [cut] = greedy(tiny_gpt2, PROMPTS[1], n=24, extra=("--stop", stop))
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)] and cut["text"]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]
    assert len(cut["token_ids"]) < len(full["token_ids"])


def test_eos_ends_generation(tiny_gpt2, tmp_path):
    """Make a greedily generated token (the first new one from the third on) the model's EOS: generation
    must end there, with the tokens before it kept."""
    [full] = greedy(tiny_gpt2, PROMPTS[1], n=12)
    ids = full["token_ids"]
    eos = next(t for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])
    model_dir = tmp_path / "eos-model"
    shutil.copytree(tiny_gpt2, model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = eos
    config_path.write_text(json.dumps(config))
    [record] = greedy(model_dir, PROMPTS[1], n=12)
    first_eos = full["token_ids"].index(eos)
    assert first_eos >= 2
    assert record["finish_reason"] == "eos"
    assert record["token_ids"] == full["token_ids"][: first_eos + 1]
    assert full["finish_reason"] == "length" and full["generated_tokens"] == 12


def test_prompts_from_stdin_and_file(tiny_gpt2, tmp_path):
    expected = [r["token_ids"] for r in greedy(tiny_gpt2, *PROMPTS, n=6)]
    assert len({tuple(ids) for ids in expected}) == len(PROMPTS)  # each prompt read whole, in order
    stdin = run_cli("generate", "-", "-m", tiny_gpt2, "--no-chat", "-n", "6", "--json", input="\n".join(PROMPTS) + "\n")
    assert [r["token_ids"] for r in stdin.json_lines()] == expected
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    from_file = run_cli("generate", "-f", jsonl, "-m", tiny_gpt2, "--no-chat", "-n", "6", "--json", "--batch-size", "2")
    assert [r["token_ids"] for r in from_file.json_lines()] == expected


def test_chat_template_applied_by_default(tiny_llama, tiny_tokenizer):
    [plain] = greedy(tiny_llama, "Hello there", n=2)
    chat = run_cli("generate", "Hello there", "-m", tiny_llama, "-n", "2", "--json", "--system", "Be brief.")
    [record] = chat.json_lines()
    templated = "<|system|>Be brief.\n<|user|>Hello there\n<|assistant|>"
    assert record["prompt_tokens"] == len(tiny_tokenizer(templated)["input_ids"])
    assert plain["prompt_tokens"] == len(tiny_tokenizer("Hello there")["input_ids"])


def test_messages_jsonl_uses_chat_template(tiny_llama, tiny_tokenizer, tmp_path):
    data = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    [record] = run_cli("generate", "-f", data, "-m", tiny_llama, "-n", "2", "--json").json_lines()
    templated = "<|user|>Hi\n<|assistant|>Hello\n<|user|>Bye\n<|assistant|>"
    assert record["prompt"] == "Bye"
    assert record["prompt_tokens"] == len(tiny_tokenizer(templated)["input_ids"])


def test_plain_output_streams_text(tiny_gpt2):
    [record] = greedy(tiny_gpt2, PROMPTS[0], n=10)
    result = run_cli("generate", PROMPTS[0], "-m", tiny_gpt2, "-n", "10", "--stats")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == record["text"] + "\n"
    assert "tokens/s" in result.stderr and "time to first token" in result.stderr
    assert not [line for line in result.stderr.splitlines() if line != line.rstrip()]  # no padding after values


def test_streamer_never_splits_multibyte_characters(tiny_tokenizer):
    """Feed a multi-byte text token by token (byte-level BPE splits characters) and check every piece."""
    from llmcli.tasks.generate import TokenStreamer

    text = "naïve café — 東京 😀 done"
    ids = tiny_tokenizer(text)["input_ids"]
    assert len(ids) > len(text) // 2  # many of these characters span several byte tokens
    pieces: list[str] = []
    streamer = TokenStreamer(tiny_tokenizer.decode, pieces.append, stops=["STOP"], eos=set())
    for token in ids:
        streamer.add([token])
    streamer.end()
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_streamer_holds_back_a_partial_stop_string(tiny_tokenizer):
    from llmcli.tasks.generate import TokenStreamer

    pieces: list[str] = []
    streamer = TokenStreamer(tiny_tokenizer.decode, pieces.append, stops=["END"], eos=set())
    for token in tiny_tokenizer("abc EN")["input_ids"]:
        streamer.add([token])
    assert "".join(pieces) == "abc "  # "EN" may begin the stop string: not shown yet
    assert not streamer.done
    for token in tiny_tokenizer("D more")["input_ids"]:
        streamer.add([token])
    streamer.end()
    assert "".join(pieces) == "abc "
    assert streamer.done  # what tells a token-by-token engine to stop


def test_chat_repl_keeps_history(tiny_llama):
    result = run_cli("chat", "-m", tiny_llama, "-n", "3", input="Hello\n/system Be brief.\nAgain\n/reset\n/exit\nnever\n")
    assert result.exit_code == 0, result.stderr
    # /system and /reset say the same thing: /reset clears the conversation and keeps the system message
    assert "System message set; the conversation goes on (/reset clears the conversation and keeps the system " \
           "message)." in result.stderr
    assert "Conversation cleared; the system message stays (/system alone removes it)." in result.stderr
    assert len(result.stdout.splitlines()) == 2  # two replies; nothing after /exit


def test_chat_system_command_keeps_the_conversation(tiny_llama):
    """/system sets the system message and the conversation goes on (ollama's /set system): the next
    reply is generate's for the system message, the earlier turns and the new message."""
    from llmcli.engines import choose_engine
    from llmcli.data import Prompt
    from llmcli.tasks.chat import ChatSession
    from llmcli.tasks.generate import GenerateOptions, generate

    engine = choose_engine(str(tiny_llama), "hf")
    options = GenerateOptions(max_new_tokens=6, chat=True)
    session = ChatSession(engine, options)
    pieces: list[str] = []
    session.handle("Hello", pieces.append)
    first = session.history[-1]["content"]
    assert "conversation goes on" in session.handle("/system Be brief.", pieces.append)
    session.handle("Again", pieces.append)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "Again"}]
    [expected] = generate(engine, [Prompt(messages=messages)], options)
    assert session.history[-1]["content"] == expected.text and len(session.history) == 4


def test_chat_second_turn_sees_the_first(tiny_llama, tmp_path):
    """Each reply is what `generate` gives for the whole conversation so far (reply included)."""
    def reply(*messages):
        path = tmp_path / "conversation.jsonl"
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(messages)]
        path.write_text(json.dumps({"messages": turns}) + "\n")
        [record] = run_cli("generate", "-f", path, "-m", tiny_llama, "-n", "6", "--json").json_lines()
        return record["text"]

    first = reply("Hello")
    second = reply("Hello", first, "Again")
    assert second != reply("Again")  # the history changes the answer, so the check below can fail
    result = run_cli("chat", "-m", tiny_llama, "-n", "6", input="Hello\nAgain\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == first + "\n" + second + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_gguf, tmp_path):
    """Context 256: long messages push the oldest turns out (said once each time, the system message
    kept) and the chat goes on; a message that cannot fit alone is an error line, and the next is answered."""
    words = GPL3.read_text().split()
    long = [" ".join(words[i * 60:(i + 1) * 60]) for i in range(5)]
    too_long = " ".join(words[:400])
    saved = tmp_path / "talk.json"
    script = "\n".join([long[0], long[1], too_long, long[2], long[3], f"/save {saved}"]) + "\n"
    result = run_cli("chat", "-m", tiny_gguf, "-n", "20", "--system", "Be brief.", input=script)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4  # every message but the one too long was answered
    assert "messages were dropped (the system message is kept)" in result.stderr
    assert result.stderr.count("Error:") == 1 and "context" in result.stderr
    # /save writes the whole conversation, the turns the model no longer sees included, and says so
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [long[0], long[1], long[2], long[3]]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4
    assert "Saved 8 messages" in result.stderr and "of them no longer in the model's context)" in result.stderr


def test_a_stopped_reply_stays_in_the_conversation_with_its_message(tiny_gguf):
    """Ctrl-C after the first pieces of a reply: the user's message and the reply so far are kept, so
    the next turn sees them (llama-cli's behaviour)."""
    from llmcli.engines import choose_engine
    from llmcli.tasks.chat import ChatSession
    from llmcli.tasks.generate import GenerateOptions

    session = ChatSession(choose_engine(str(tiny_gguf), "llama.cpp"), GenerateOptions(max_new_tokens=30, chat=True))
    pieces: list[str] = []

    def impatient(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.handle("This License", on_text=impatient)
    assert session.history == [{"role": "user", "content": "This License"},
                               {"role": "assistant", "content": "".join(pieces)}]
    assert session.handle("the work", on_text=lambda piece: None) == ""
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_chat_help_multi_line_messages_and_a_cut_reply(tiny_gguf):
    script = '/help\n/?\n"""\nThis License\napplies to the work\n"""\n/nonsense\n'
    result = run_cli("chat", "-m", tiny_gguf, "-n", "5", input=script)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("/quit, /bye") == 2 and "/help lists the commands" in result.stderr
    assert len(result.stdout.splitlines()) == 1  # the three lines were one message
    assert "(reply cut at 5 tokens" in result.stderr


@pytest.mark.slow
def test_embedded_model_greedy_equals_hf_and_answers():
    """The embedded SmolLM2: our cached conversion generates what transformers' own GGUF load does."""
    from transformers import AutoModelForCausalLM

    from llmcli import models

    prompt = "The three primary colors are"
    [record] = greedy("smollm2", prompt, n=24, extra=("--engine", "hf"))
    path = models.embedded_gguf_path()
    loaded = models.load_model(None)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    inputs = loaded.tokenizer(prompt, return_tensors="pt")
    output = reference.generate(**inputs, do_sample=False, max_new_tokens=24)
    assert record["token_ids"] == output[0, inputs["input_ids"].shape[1]:].tolist()[: len(record["token_ids"])]
    assert record["generated_tokens"] == 24 or record["finish_reason"] == "eos"

    answer = run_cli("generate", "What is the capital of France?", "-n", "40", "--json", "--engine", "hf")
    [chat] = answer.json_lines()
    assert "Paris" in chat["text"] and chat["finish_reason"] == "eos"
    assert "Using the embedded model" in answer.stderr


def forward_inputs(model) -> list[dict]:
    """Record the keyword arguments of every forward call of `model`."""
    calls: list[dict] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


@pytest.mark.parametrize("assist", ["prompt_lookup", "draft"])
def test_assisted_decoding_keeps_greedy_output_and_verifies_proposals(tiny_llama, assist):
    """Same tokens as plain greedy; and the main model really was handed proposed tokens to verify
    (a decode step with several new positions), which plain greedy never does."""
    from llmcli.data import Prompt
    from llmcli.engines.hf import HFEngine
    from llmcli.models import load_model
    from llmcli.tasks.generate import GenerateOptions, generate

    repetitive = "the program the program the program the program"
    loaded = load_model(str(tiny_llama), device="cpu")
    draft = load_model(str(tiny_llama), device="cpu") if assist == "draft" else None
    options = GenerateOptions(max_new_tokens=16, chat=False, prompt_lookup=3 if assist == "prompt_lookup" else None)
    calls = forward_inputs(loaded.model)
    draft_calls = forward_inputs(draft.model) if draft else []
    [assisted] = generate(HFEngine(loaded, draft=draft), [Prompt(text=repetitive)], options)
    decode_widths = [c["input_ids"].shape[1] for c in calls[1:]]
    assert assisted.token_ids == hf_greedy(tiny_llama, [repetitive], 16)[0]
    assert max(decode_widths) > 1, decode_widths
    assert draft_calls or assist == "prompt_lookup"


def test_fast_mode_equals_hf_in_bfloat16(tiny_gpt2, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli import models

    loaded = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    [record] = greedy(tiny_gpt2, PROMPTS[1], n=12, extra=("--fast",))
    # the tiny model's greedy tokens happen to be the same in float32: check the weights it ran with
    assert loaded[0].model.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.bfloat16)
    inputs = AutoTokenizer.from_pretrained(tiny_gpt2)(PROMPTS[1], return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    assert record["token_ids"] == output[0, inputs["input_ids"].shape[1]:].tolist()
    assert "--fast on the CPU sets the dtype" in run_cli("generate", "x", "-m", tiny_gpt2, "--fast", "--dtype", "float32").stderr


def test_static_cache_gives_the_same_greedy_tokens(tiny_llama):
    """--fast on CUDA decodes with a static KV cache (compiled there); the cache alone must not change tokens."""
    from llmcli.data import Prompt
    from llmcli.engines.hf import HFEngine
    from llmcli.models import load_model
    from llmcli.tasks.generate import GenerateOptions, generate

    from transformers import StaticCache

    loaded = load_model(str(tiny_llama), device="cpu")
    options = GenerateOptions(max_new_tokens=20, chat=False)
    calls = forward_inputs(loaded.model)
    [result] = generate(HFEngine(loaded, static_cache=True), [Prompt(text=PROMPTS[1])], options)
    assert result.token_ids == hf_greedy(tiny_llama, [PROMPTS[1]], 20)[0]
    # the forward's keyword is `cache` since transformers 5.2x, `past_key_values` before
    assert calls and all(isinstance(c.get("cache", c.get("past_key_values")), StaticCache) for c in calls)


def test_llmcli_device_sets_the_default_device(tiny_gpt2, monkeypatch):
    monkeypatch.setenv("LLMCLI_DEVICE", "tpu")
    result = run_cli("generate", "hi", "-m", tiny_gpt2, "-n", "2")
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.stderr
    assert run_cli("generate", "hi", "-m", tiny_gpt2, "-n", "2", "--device", "cpu").exit_code == 0


def test_a_character_cut_by_the_token_limit_is_dropped_not_replaced(tiny_tokenizer):
    """Byte-level tokens can end mid-character at --max-new-tokens: no U+FFFD in the text, streamed or not."""
    from llmcli.tasks.generate import TokenStreamer, finish

    text = "月亮🌙"
    ids = tiny_tokenizer(text)["input_ids"]
    cut = ids[:-1]  # the moon emoji's last byte is missing
    assert tiny_tokenizer.decode(cut).endswith("\ufffd")
    assert finish(tiny_tokenizer.decode, cut, eos=set(), stops=[]) == ("月亮", cut, "length")
    pieces: list[str] = []
    streamer = TokenStreamer(tiny_tokenizer.decode, pieces.append, stops=[], eos=set())
    for token in cut:
        streamer.add([token])
    streamer.end()
    assert "".join(pieces) == "月亮"


def test_default_max_new_tokens_is_capped_to_what_the_context_leaves(tiny_gpt2):
    """256 new tokens by default do not fit the tiny GPT-2's 256 positions after a prompt: capped, with a
    notice; an explicit -n 300 stays an error (tests/test_errors.py)."""
    result = run_cli("generate", PROMPTS[0], "-m", tiny_gpt2, "--no-chat", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    room = 256 - record["prompt_tokens"]
    assert f"--max-new-tokens defaults to 256; using {room}" in result.stderr
    assert record["generated_tokens"] <= room


def test_piped_stdin_is_read_without_a_dash_and_records_are_numbered(tiny_gpt2):
    """`printf 'a\\na\\n' | llmcli generate --json`: the pipe is read as `-` reads it, and the repeated
    prompt's records say which line they answer."""
    result = run_cli("generate", "-m", tiny_gpt2, "-n", "3", "--no-chat", "--json", input="This License\nThis License\nthe work\n")
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert [(r["prompt"], r["prompt_number"]) for r in records] == [("This License", 0), ("This License", 1),
                                                                     ("the work", 2)]


def test_chat_stop_ends_each_reply_before_the_string(tiny_llama):
    """`chat --stop TEXT` cuts every reply before TEXT, as `generate --stop` does."""
    plain = run_cli("chat", "-m", tiny_llama, "-n", "12", input="Hello\n/exit\n")
    assert plain.exit_code == 0, plain.stderr
    reply = plain.stdout.splitlines()[0]
    cut_at = len(reply) // 2
    stop = reply[cut_at:cut_at + 3]
    assert len(stop) == 3 and stop.strip(), reply
    stopped = run_cli("chat", "-m", tiny_llama, "-n", "12", "--stop", stop, input="Hello\n/exit\n")
    assert stopped.exit_code == 0, stopped.stderr
    assert stopped.stdout.splitlines()[0] == reply[:reply.index(stop)].rstrip("\n"), stopped.stdout


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_gguf"])
def test_chat_template_file_replaces_the_models_own(model, request, tmp_path):
    """`--chat-template FILE` formats the chat with that file on both engines: the reply is greedy
    generate's for the text the template renders (neither fixture adds a BOS of its own)."""
    model_dir = request.getfixturevalue(model)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    chatted = run_cli("generate", "This License", "-m", model_dir, "--chat", "--chat-template", template,
                      "--system", "Be brief.", "-n", "8", "--json")
    assert chatted.exit_code == 0, chatted.stderr
    [expected] = greedy(model_dir, "[system] Be brief.\n[user] This License\n[assistant]", n=8)
    assert chatted.json_lines()[0]["text"] == expected["text"]
    [default] = greedy(model_dir, "This License", n=8)
    assert expected["text"] != default["text"]  # the template changed what the model saw


def test_ctx_size_bounds_the_context_a_run_uses(tiny_gguf):
    """`-c N` is the context the run has: the prompt and the reply must fit in it, and the default
    length is what it leaves."""
    words = " ".join(GPL3.read_text().split()[:60])
    fits = run_cli("generate", words, "-m", tiny_gguf, "--no-chat", "-n", "4", "--json")
    assert fits.exit_code == 0, fits.stderr
    prompt_tokens = fits.json_lines()[0]["prompt_tokens"]
    refused = run_cli("generate", words, "-m", tiny_gguf, "--no-chat", "-n", "4", "-c", str(prompt_tokens + 2))
    assert refused.exit_code == 2 and f"context of {prompt_tokens + 2}" in refused.stderr, refused.stderr
    capped = run_cli("generate", words, "-m", tiny_gguf, "--no-chat", "-c", str(prompt_tokens + 5), "--json")
    assert capped.exit_code == 0, capped.stderr
    assert capped.json_lines()[0]["generated_tokens"] <= 5


def test_chat_without_a_template_uses_plain_lines_and_stops_at_the_next_turn(tiny_gpt2):
    """A model without a chat template chats in plain User:/Assistant: lines (said once on stderr): the
    reply is greedy generate's for that text, and replies stop where the model would write "\nUser:"."""
    from llmcli.engines import choose_engine
    from llmcli.engines.chat_template import FALLBACK_CHAT_TEMPLATE, render
    from llmcli.tasks.chat import plain_chat
    from llmcli.tasks.generate import GenerateOptions

    result = run_cli("chat", "-m", tiny_gpt2, "-n", "24", input="This License\n/exit\n")
    assert result.exit_code == 0, result.stderr
    assert "no chat template" in result.stderr and "Error" not in result.stderr
    text = render(FALLBACK_CHAT_TEMPLATE, [{"role": "user", "content": "This License"}])
    assert text == "User: This License\nAssistant:"
    [record] = greedy(tiny_gpt2, text, n=24)
    assert result.stdout == record["text"].split("\nUser:")[0] + "\n"
    engine = choose_engine(str(tiny_gpt2), "hf")
    assert engine.chat_template is None
    options = plain_chat(engine, GenerateOptions(stop=["END"], chat=True))
    assert options.stop == ["END", "\nUser:"] and engine.chat_template == FALLBACK_CHAT_TEMPLATE


def test_chat_save_and_load_a_conversation(tiny_llama, tmp_path):
    """/save writes the conversation (system message included) as a `generate --file` line and never
    over an existing file; /load goes on from it: the next reply is the one the saved chat would give."""
    saved = tmp_path / "talk.jsonl"
    first = run_cli("chat", "-m", tiny_llama, "-n", "6", "--system", "Be brief.",
                    input=f"Hello\n/save {saved}\n/save {saved}\nAgain\n")
    assert first.exit_code == 0, first.stderr
    assert "Saved 2 messages" in first.stderr and f"Error: {saved} exists" in first.stderr
    record = json.loads(saved.read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][2]["content"] == first.stdout.splitlines()[0]
    resumed = run_cli("chat", "-m", tiny_llama, "-n", "6", input=f"/load {saved}\nAgain\n")
    assert resumed.exit_code == 0, resumed.stderr
    assert "Loaded 2 messages" in resumed.stderr
    assert resumed.stdout.splitlines()[-1] == first.stdout.splitlines()[1]  # the same second reply
    broken = tmp_path / "broken.json"
    broken.write_text('{"messages": [{"role": "user"}]}')
    kept = run_cli("chat", "-m", tiny_llama, "-n", "6", input=f"Hello\n/load {broken}\n/save {tmp_path / 'b.json'}\n")
    assert "each message needs a role" in kept.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())["messages"]) == 2  # the failed load changed nothing


def test_defaults_from_the_config_file_and_llmcli_model_under_the_command_line(tiny_llama, tiny_gguf, tmp_path,
                                                                               monkeypatch):
    """The command line wins over LLMCLI_MODEL, which wins over the config file's [generate] table, which
    wins over the built-in defaults; `info` shows the file and what it sets. (conftest points LLMCLI_CONFIG
    at a file that does not exist, so no test reads the user's.)"""
    config = tmp_path / "config.toml"
    config.write_text(f'[generate]\nmodel = "{tiny_llama}"\nmax-new-tokens = 3\nchat = false\n[cache.list]\njson = true\n')
    monkeypatch.setenv("LLMCLI_CONFIG", str(config))

    def record(*args: str) -> dict:
        result = run_cli("generate", "This License", "--json", *args)
        assert result.exit_code == 0, result.stderr
        assert "Using the embedded model" not in result.stderr
        return result.json_lines()[0]

    from_file = record()
    assert (from_file["engine"], from_file["generated_tokens"]) == ("hf", 3)
    assert from_file["token_ids"] == hf_greedy(tiny_llama, ["This License"], 3)[0]  # chat = false: the plain prompt
    assert record("-n", "5")["generated_tokens"] == 5  # the command line over the file
    monkeypatch.setenv("LLMCLI_MODEL", str(tiny_gguf))
    assert record()["engine"] == "llama.cpp"  # the environment over the file
    assert record("-m", str(tiny_llama))["engine"] == "hf"  # the command line over the environment
    details = run_cli("info", "--json").json_lines()[0]["config"]
    assert details == {"path": str(config), "found": True, "LLMCLI_MODEL": str(tiny_gguf),
                       "defaults": {"generate": {"model": str(tiny_llama), "max-new-tokens": 3, "chat": False},
                                    "cache": {"list": {"json": True}}}}
    shown = run_cli("info").stdout
    assert f"[generate] model = \"{tiny_llama}\", max-new-tokens = 3, chat = false" in shown
    assert "[cache.list] json = true" in shown
