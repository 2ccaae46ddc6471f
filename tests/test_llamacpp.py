"""The llama.cpp engine: its reference is llama.cpp itself (a bare llama-cpp-python loop on the same
file and ids), its chat formatting is transformers', it never imports torch, and on F32 weights it
agrees with the Hugging Face engine."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from conftest import GPL3, bare_llama, bare_llama_greedy, run_cli

pytest.importorskip("llama_cpp")

ENGINE = ("--engine", "llama.cpp")


def generate_json(*args: str) -> list[dict]:
    result = run_cli("generate", *args, *ENGINE, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


def engine_for(path, weights: str = "as-is"):
    from llmcli import models
    from llmcli.engines.llamacpp import LlamaCppEngine

    source = models.resolve_model(str(path)) if path is not None else models.resolve_model(None)
    return LlamaCppEngine.load(source, weights, threads=2, gpu=False, on_notice=lambda message: None)


def test_greedy_ids_equal_a_bare_llama_cpp_loop_on_a_tiny_gguf(tiny_gguf):
    [record] = generate_json("This License", "-m", tiny_gguf, "--no-chat", "-n", "24")
    prompt_ids = engine_for(tiny_gguf).encode("This License")
    assert record["engine"] == "llama.cpp" and record["weights"] == "F32"
    assert record["prompt_tokens"] == len(prompt_ids)
    assert record["token_ids"] == bare_llama_greedy(tiny_gguf, prompt_ids, 24)
    assert len(set(record["token_ids"])) > 3  # a real continuation, not one repeated token


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True], ids=["default-F16", "fast-as-is"])
def test_greedy_ids_equal_a_bare_llama_cpp_loop_on_the_embedded_model(fast):
    """The default runs the F16 conversion, --fast the Q4_1 file: each equals llama.cpp on that file."""
    from llmcli import models
    from llmcli.engines.llamacpp import converted_path

    prompt = "Write a haiku about the sea."
    [record] = generate_json(prompt, "-n", "40", *(["--fast"] if fast else []))
    path = models.embedded_gguf_path() if fast else converted_path(models.embedded_gguf_path(), "F16")
    engine = engine_for(None, "as-is" if fast else "default")
    assert engine.path == path
    assert record["weights"] == ("Q4_1" if fast else "F16")
    prompt_ids = engine.encode_chat([{"role": "user", "content": prompt}])
    assert record["prompt_tokens"] == len(prompt_ids)
    assert record["token_ids"] == bare_llama_greedy(path, prompt_ids, 40)


@pytest.mark.slow
def test_default_weights_answer_like_hugging_face():
    """F16 is the default because it answers as HF float32 does (see docs/engines.md: Q4_1 and Q8_0 do not)."""
    [answer] = generate_json("What is the capital of France?", "-n", "24")
    assert answer["text"] == "The capital of France is Paris." and answer["finish_reason"] == "eos"


@pytest.mark.slow
def test_chat_formatting_equals_apply_chat_template():
    """jinja2 renders the GGUF's template as transformers does: same ids with a system message, several
    turns and the generation prompt, and with the template's own default system message."""
    from transformers import AutoTokenizer

    from llmcli.models import convert_gguf, embedded_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf_path()))
    engine = engine_for(None)
    conversations = [
        [{"role": "user", "content": "What is GPL-3?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Où est <Paris>? 😀"}],
    ]
    for messages in conversations:
        expected = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]
        assert engine.encode_chat(messages) == expected
    assert engine.encode(GPL3.read_text()) == tokenizer(GPL3.read_text())["input_ids"]


def f32_copy(tmp_path):
    """The embedded model dequantized to F32 by llama.cpp: the same weights HF's float32 runs."""
    from llmcli.engines.llamacpp import import_llama_cpp
    from llmcli.models import embedded_gguf_path

    lib = import_llama_cpp()
    target = tmp_path / "smollm2-f32.gguf"
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = lib.LLAMA_FTYPE_ALL_F32, True
    assert lib.llama_model_quantize(str(embedded_gguf_path()).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return target


@pytest.mark.slow
def test_engines_agree_on_f32_weights_and_llama_perplexity_figure(tmp_path):
    """Top-1 token at >= 99% of positions and per-token log-probabilities within 0.05 (measured: 99.93%,
    max 0.020, mean 0.0009 over 4096 GPL-3 tokens); and llama-perplexity's own figure for this file."""
    import numpy as np
    import torch

    from llmcli.engines import Window
    from llmcli.models import load_model

    path = f32_copy(tmp_path)
    engine = engine_for(path)
    hf = load_model(None, device="cpu", dtype="float32")
    ids = hf.tokenizer(GPL3.read_text())["input_ids"][:1025]
    assert engine.encode(GPL3.read_text())[:1025] == ids
    llama_nll = np.array(engine.token_nlls([Window(ids[:513], 512), Window(ids[512:], 512)], 1))
    with torch.inference_mode():
        logits = [hf.model(torch.tensor([w[:-1]])).logits[0].double() for w in (ids[:513], ids[512:])]
    hf_logprobs = torch.cat([x.log_softmax(-1) for x in logits])
    targets = torch.tensor(ids[1:513] + ids[513:])
    hf_nll = -hf_logprobs[torch.arange(len(targets)), targets].numpy()
    assert np.abs(llama_nll - hf_nll).max() < 0.05
    assert np.abs(llama_nll - hf_nll).mean() < 0.002
    engine.use_context(512)
    engine.feed(ids[:512], 0, outputs=512)
    llama_top1 = [int(np.argmax(np.ctypeslib.as_array(engine.lib.llama_get_logits_ith(engine.context, i),
                                                      shape=(engine.n_vocab,)))) for i in range(512)]
    agreement = np.mean(np.array(llama_top1) == logits[0].argmax(-1).numpy())
    assert agreement >= 0.99

    # tests/data/README.md: llama-perplexity -c 512, built from the same llama.cpp, on this F32 file
    assert llama_perplexity(path) == llama_perplexity_figure("F32")


# llama-perplexity -c 512 on GPL-3, built from the llama.cpp that llama-cpp-python vendors with the same
# SIMD level as the engine's build (tests/data/README.md): the summation order of the kernels differs
# between AVX2 (make install's x86-64-v3 build) and AVX-512 (a native build on an AVX-512 host).
LLAMA_PERPLEXITY = {"AVX512": {"F32": ("18.2994", "0.85945"), "Q4_1": ("18.3914", "0.86455")},
                    "AVX2": {"F32": ("18.2992", "0.85944"), "Q4_1": ("18.3459", "0.86234")}}


def llama_perplexity_figure(weights: str) -> tuple[str, str]:
    from llmcli.engines.llamacpp import import_llama_cpp

    features = import_llama_cpp().llama_print_system_info().decode()
    level = "AVX512" if "AVX512 = 1" in features else "AVX2" if "AVX2 = 1" in features else None
    if level is None:
        pytest.skip(f"no llama-perplexity figure recorded for this build ({features.strip()})")
    return LLAMA_PERPLEXITY[level][weights]


def llama_perplexity(path) -> tuple[str, str]:
    """`eval --llama-cpp --ctx 512` on GPL-3, rounded as llama-perplexity prints its final estimate."""
    result = run_cli("eval", "--data", GPL3, "-m", path, *ENGINE, "--llama-cpp", "--ctx", "512", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert record["engine"] == "llama.cpp" and record["protocol"] == "llama.cpp(ctx=512)"
    return f"{record['value']:.4f}", f"{record['stderr']:.5f}"


@pytest.mark.slow
def test_llama_perplexity_figure_on_the_quantized_file():
    """The embedded Q4_1 file as it is (what eval scores): what llama-perplexity -c 512 printed
    (tests/data/README.md)."""
    from llmcli.models import embedded_gguf_path

    assert llama_perplexity(embedded_gguf_path()) == llama_perplexity_figure("Q4_1")


def test_eval_nll_equals_a_bare_llama_cpp_forward(tiny_gguf, tmp_path):
    """Sliding-window perplexity on llama.cpp: every scored token's NLL from `Llama(logits_all=True)`."""
    import numpy as np

    text = GPL3.read_text()[:3000]
    data = tmp_path / "text.txt"
    data.write_text(text)
    result = run_cli("eval", "--data", data, "-m", tiny_gguf, *ENGINE, "--max-length", "64", "--stride", "32",
                     "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    from llmcli.tasks.evaluate import sliding_windows

    llm = bare_llama(tiny_gguf, n_ctx=64, logits_all=True, n_threads=2, flash_attn=True)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    total = 0.0
    for window in sliding_windows(ids, 64, 32):
        llm.reset()
        llm.eval(window.ids[:-1])
        logits = np.array(llm.scores[: len(window.ids) - 1], dtype=np.float64)
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        rows = np.arange(len(window.ids) - 1)[-window.scored:]
        total -= logprobs[rows, np.array(window.ids[1:])[-window.scored:]].sum()
    assert record["nll"] == pytest.approx(total, rel=1e-9)
    assert record["tokens"] == len(ids) - 1


@pytest.mark.slow
def test_eval_window_longer_than_a_decode_batch(tmp_path):
    """A window of more than 512 tokens is decoded in two batches, and llama.cpp keeps only the last
    batch's logits: each batch's scored tokens are read before the next (a 1024-token window failed
    with 'NULL pointer access' before). Reference: `Llama(logits_all=True)` on the embedded file."""
    import numpy as np

    from llmcli.models import embedded_gguf_path

    text = GPL3.read_text()[:3000]
    data = tmp_path / "text.txt"
    data.write_text(text)
    result = run_cli("eval", "--data", data, *ENGINE, "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    llm = bare_llama(embedded_gguf_path(), n_ctx=1024, logits_all=True, n_threads=2, flash_attn=True)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert 512 < len(ids) <= 1024 and record["tokens"] == len(ids) - 1  # one window, two decode batches
    llm.eval(ids[:-1])
    logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    assert record["nll"] == pytest.approx(-logprobs[np.arange(len(ids) - 1), ids[1:]].sum(), rel=1e-9)


def test_sampling_controls_take_effect_and_seeds_repeat(tiny_gguf):
    base = ("This License", "-m", tiny_gguf, "--no-chat", "-n", "16", "-t", "1.5")
    first = generate_json(*base, "--seed", "1")
    assert generate_json(*base, "--seed", "1")[0]["token_ids"] == first[0]["token_ids"]
    other = generate_json(*base, "--seed", "2")
    assert other[0]["token_ids"] != first[0]["token_ids"]
    top1 = generate_json(*base, "--seed", "1", "--top-k", "1")
    greedy = generate_json("This License", "-m", tiny_gguf, "--no-chat", "-n", "16")
    assert top1[0]["token_ids"] == greedy[0]["token_ids"] != first[0]["token_ids"]
    penalized = generate_json("This License", "-m", tiny_gguf, "--no-chat", "-n", "16", "--repetition-penalty", "5")
    assert penalized[0]["token_ids"] != greedy[0]["token_ids"]
    assert len(set(penalized[0]["token_ids"])) == 16  # a strong penalty never repeats a token here
    # top-p and min-p: a nucleus of 1% and a floor of 99% of the top probability keep the top token alone
    for option, value in (("--top-p", "0.01"), ("--min-p", "0.99")):
        kept = generate_json(*base, "--seed", "1", option, value)
        assert kept[0]["token_ids"] == greedy[0]["token_ids"], option
    samples = generate_json(*base, "--seed", "3", "--num-return-sequences", "3")
    assert [s["index"] for s in samples] == [0, 1, 2] and len({tuple(s["token_ids"]) for s in samples}) == 3


def test_stop_strings_eos_and_context_on_llama_cpp(tiny_gguf):
    [free] = generate_json("This License", "-m", tiny_gguf, "--no-chat", "-n", "24")
    stop = free["text"][len(free["text"]) // 2:][:4]
    [stopped] = generate_json("This License", "-m", tiny_gguf, "--no-chat", "-n", "24", "--stop", stop)
    assert stopped["finish_reason"] == "stop" and free["text"].startswith(stopped["text"] + stop)
    assert len(stopped["token_ids"]) < len(free["token_ids"])
    long_prompt = "This License " * 200
    result = run_cli("generate", long_prompt, "-m", tiny_gguf, *ENGINE, "--no-chat", "-n", "8")
    assert result.exit_code == 2 and "exceeds the model's context of 256 tokens" in result.stderr
    [cut] = generate_json(long_prompt, "-m", tiny_gguf, "--no-chat", "-n", "8", "--truncate", "left")
    assert cut["prompt_tokens"] == 256 - 8


def test_no_torch_or_transformers_on_the_llama_cpp_path(tiny_gguf):
    script = (
        "import sys\n"
        "from llmcli.cli import main\n"
        "for argv in ([\"generate\", \"--help\"], [\"generate\", \"--engine\", \"llama.cpp\", \"--help\"],\n"
        f"             [\"generate\", \"Hello\", \"-m\", {str(tiny_gguf)!r}, \"--engine\", \"llama.cpp\", \"-n\", \"4\"],\n"
        f"             [\"fill-mask\", \"This [MASK].\", \"-m\", {str(tiny_gguf)!r}, \"--top-k\", \"1\"]):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets', 'pydantic') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_engine_loads_only_llama_cpp_bindings_and_the_package_stays_whole():
    """The engine imports llama-cpp-python's ctypes bindings alone (its high-level Llama class and chat
    formats cost 0.37 s of a cold generate); `import llama_cpp` afterwards still gives every name."""
    script = (
        "import sys\n"
        "from llmcli.engines.llamacpp import import_llama_cpp\n"
        "lib = import_llama_cpp()\n"
        "print('llama_cpp.llama' in sys.modules, callable(lib.llama_backend_init))\n"
        "import llama_cpp\n"
        "print(llama_cpp.Llama.__name__, llama_cpp.__version__ == __import__('importlib.metadata').metadata.version('llama-cpp-python'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "Llama", "True"]


@pytest.mark.parametrize("args, fragment", [
    (["--engine", "vllm"], "unknown --engine 'vllm'"),
    (["--engine", "llama.cpp", "--threads", "0"], "--threads must be at least 1"),
    (["--engine", "llama.cpp", "--draft-model", "x"], "--draft-model runs on the hf engine only"),
    (["--engine", "llama.cpp", "--dtype", "bfloat16"], "--dtype bfloat16 is for the hf engine"),
])
def test_bad_engine_options_are_one_line_errors(tiny_gguf, args, fragment):
    result = run_cli("generate", "hi", "-m", tiny_gguf, *args)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and fragment in lines[0] and len(lines) <= 2, result.stderr


def test_llama_cpp_on_a_non_gguf_model_or_when_missing(tiny_llama, tiny_gguf, monkeypatch):
    result = run_cli("generate", "hi", "-m", tiny_llama, *ENGINE)
    assert result.exit_code == 2 and "runs .gguf files" in result.stderr
    from llmcli import engines

    monkeypatch.setattr(engines, "llama_cpp_installed", lambda: False)
    result = run_cli("generate", "hi", "-m", tiny_gguf, *ENGINE)
    assert result.exit_code == 2 and "not installed" in result.stderr and "pip install 'llmcli[llama]'" in result.stderr


def test_decoding_stops_when_asked_and_threads_are_set(tiny_gguf):
    """A stop string is found by the shared streamer; the engine must then stop decoding, not run on
    to --max-new-tokens. And --threads reaches llama.cpp's context (default: the physical cores)."""
    from llmcli.engines import choose_engine, physical_cores
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_gguf), "llama.cpp", threads=1)
    seen: list[int] = []
    [row] = engine.generate([engine.encode("This License")], GenerateOptions(max_new_tokens=24),
                            on_tokens=seen.extend, should_stop=lambda: len(seen) >= 3)
    assert len(row) == 3 and row == seen
    assert engine.lib.llama_n_threads(engine.context) == 1
    default = choose_engine(str(tiny_gguf), "llama.cpp")
    default.generate([default.encode("Hi")], GenerateOptions(max_new_tokens=2), lambda ids: None, lambda: False)
    assert default.lib.llama_n_threads(default.context) == physical_cores()


def test_chat_reuses_the_cached_conversation_and_answers_as_afresh(tiny_gguf, monkeypatch):
    """A chat's next turn decodes only what the context does not already hold (as llama-cli and ollama
    do), and answers what a fresh generation of the same conversation answers."""
    from llmcli.data import Prompt
    from llmcli.engines import choose_engine
    from llmcli.tasks.chat import ChatSession
    from llmcli.tasks.generate import GenerateOptions, generate

    engine = choose_engine(str(tiny_gguf), "llama.cpp")
    fed: list[int] = []
    feed = engine.feed
    monkeypatch.setattr(engine, "feed", lambda tokens, start, outputs=1: fed.append(len(tokens)) or
                        feed(tokens, start, outputs))
    session = ChatSession(engine, GenerateOptions(max_new_tokens=8, chat=True))
    session.handle("Hello there", on_text=lambda text: None)
    fed.clear()
    session.handle("Tell me more", on_text=lambda text: None)
    fresh = choose_engine(str(tiny_gguf), "llama.cpp")
    messages = session.history[:-1]
    [again] = generate(fresh, [Prompt(messages=messages)], GenerateOptions(max_new_tokens=8))
    prompt_length = len(fresh.encode_chat(messages))
    assert fed[0] < prompt_length / 2  # the first turn and its reply were not decoded again
    assert session.history[-1]["content"] == again.text


def test_auto_engine_is_llama_cpp_for_gguf_and_hf_otherwise(tiny_gguf, tiny_llama, tmp_path):
    def engine_of(*args: str) -> str:
        result = run_cli(*args, "--json")
        assert result.exit_code == 0, result.stderr
        return result.json_lines()[0]["engine"]

    assert engine_of("generate", "Hi", "-m", tiny_gguf, "-n", "2") == "llama.cpp"
    assert engine_of("generate", "Hi", "-m", tiny_llama, "-n", "2") == "hf"
    data = tmp_path / "text.txt"
    data.write_text(GPL3.read_text()[:2000])
    assert engine_of("eval", "--data", data, "-m", tiny_gguf, "--max-length", "64") == "llama.cpp"
    # prompt lookup runs on both engines: a GGUF model stays on llama.cpp
    assert engine_of("generate", "Hi", "-m", tiny_gguf, "-n", "2", "--prompt-lookup", "2") == "llama.cpp"
