"""Bad input, every command: exit 2, one `Error:` line naming the problem (and a hint), no traceback,
and no file created or changed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import gpl_text, run_cli


def assert_clean_error(result, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: "), result.stderr
    assert len(lines) <= 2, result.stderr  # the error, and at most one hint line
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_gpt2, tiny_bert) -> Path:
    """Input files of every kind of badness, and broken models, in one directory."""
    root = tmp_path_factory.mktemp("bad-inputs")
    files = {
        "gpl.txt": gpl_text()[:20000],
        "short.txt": gpl_text()[:300],
        "empty.txt": "\n \n",
        "notes.txt": "hello",
        "long-line.txt": "short prompt\n" + "word " * 300 + "\n",
        "prompt5.jsonl": '{"prompt": 5}\n',
        "broken.jsonl": '{"prompt": "ok"}\n{"prompt": "no end\n',
        "nofield.jsonl": '{"prompt": "ok"}\n\n{"title": "x"}\n',
        "list.jsonl": '{"prompt": "ok"}\n["a list"]\n',
        "badmsg.jsonl": '{"messages": [{"role": "user"}]}\n',
        "train-broken.jsonl": '{"text": "ok"}\n{"text": "broken\n',
        "train-mixed.jsonl": '{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n',
        "train-missing.jsonl": '{"prompt": "p", "completion": "c"}\n{"prompt": "only"}\n',
        "train-type.jsonl": '{"text": 5}\n',
        "train-empty.jsonl": "\n",
        "table.csv": "title,body\nx,y\n",
        "fake.gguf": "this is not gguf at all" * 10,
        "bad.jinja": "{% for m in messages %}{{ m['content'] }}",  # the for loop never ends
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "data.bin").write_bytes(b"abc\x00def")
    (root / "utf16.txt").write_bytes("a prompt\nanother\n".encode("utf-16"))
    (root / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)  # a header, then nonsense
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (root / "not-a-model").mkdir()
    (root / "not-a-dataset").mkdir()
    (root / "not-a-dataset" / "readme.txt").write_text("x")
    truncated = root / "truncated-model"
    shutil.copytree(tiny_gpt2, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pickled = root / "pickle-model"  # transformers 5 saves only safetensors: write the pickle by hand
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model.config.save_pretrained(pickled)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (root / "full-output").mkdir()
    (root / "full-output" / "precious.txt").write_text("keep me")
    return root


# (command line with {ws} = workspace, {gpt2}, {bert}; what the error must say)
MATRIX = [
    # generate
    ("generate hi -m {ws}/missing-model", "does not exist"),
    ("generate hi -m {ws}/not-a-model", "without config.json"),
    ("generate hi -m {ws}/notes.txt", "notes.txt is a file but not a GGUF model (no GGUF header)"),
    ("generate hi -m {ws}/fake.gguf", "not a GGUF model"),
    ("generate hi -m {ws}/cut.gguf", "is not a readable GGUF model"),
    ("generate hi -m {ws}/cut.gguf --engine hf", "is not a readable GGUF model"),
    ("generate hi -m {gpt2} --engine vllm", "unknown --engine 'vllm'"),
    ("generate hi -m {gpt2} --engine llama.cpp", "runs .gguf files"),
    ("generate hi -m {gpt2} --threads 0", "--threads must be at least 1, got 0"),
    pytest.param("generate hi --engine llama.cpp --dtype bfloat16", "--dtype bfloat16 is for the hf engine",
                 marks=pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                          reason="the llama.cpp engine is not installed")),
    ("chat -m {gpt2} --engine llama.cpp", "runs .gguf files"),
    ("generate hi -m {ws}/truncated-model -n 2", "could not load model"),
    ("generate hi -m {ws}/pickle-model -n 2", "only pickle weights"),
    ("generate hi -m nobody/no-such-model-xyz", "Download it with: llmcli pull nobody/no-such-model-xyz"),
    ("generate hi -m {gpt2} --system Be", "--system needs the chat template, but this model's tokenizer has none"),
    ("generate hi -m {gpt2} --no-chat --system Be", "--system needs the chat template, but --no-chat is given"),
    ("generate hi -m {gpt2} --top-k 5 --top-p 0.9", "--top-k, --top-p shape sampling, but --temperature is 0"),
    ("chat -m {gpt2} --chat-template {ws}/missing.jinja", "cannot read --chat-template"),
    ("generate hi -m {gpt2} --chat-template {ws}/bad.jinja", "bad.jinja line 1: Unexpected end of template"),
    ("generate hi -m {gpt2} --chat-template {ws}/empty.txt", "empty.txt is empty"),
    ("generate hi -m {gpt2} -c 1000", "--ctx-size 1000 is more than this model's trained context of 256"),
    ("chat -m {gpt2} -c 8", "--ctx-size must be at least 16 tokens, got 8"),
    ("generate hi -m {bert} -n 2", "(bert) is a masked LM, not a causal (text generation) LM"),
    ("generate hi -m {gpt2} -n 0", "--max-new-tokens must be at least 1, got 0"),
    ("generate hi -m {gpt2} -n -5", "--max-new-tokens must be at least 1, got -5"),
    ("generate hi -m {gpt2} -n abc", "Invalid value for '--max-new-tokens'"),  # the rest is typer's own wording
    ("generate hi -m {gpt2} -n 300", "leaves no room in the model's context of 256"),
    ("generate hi -m {gpt2} -t -0.5", "--temperature must be 0 (greedy) or positive, got -0.5"),
    ("generate hi -m {gpt2} -t 1 --seed -1", "--seed must be in 0..4294967295, got -1"),
    ("generate hi -m {gpt2} -n 2 --top-p 0", "--top-p must be in (0, 1], got 0.0"),
    ("generate hi -m {gpt2} --top-p 1.5", "--top-p must be in (0, 1], got 1.5"),
    ("generate hi -m {gpt2} --batch-size 0", "--batch-size must be at least 1"),
    ("generate hi -m {gpt2} --num-return-sequences 2", "needs sampling"),
    ("generate hi -m {gpt2} --truncate right", "unknown --truncate 'right'"),
    ("generate hi -m {gpt2} --fast --dtype float32", "--fast on the CPU sets the dtype"),
    ("generate hi -m {gpt2} --dtype float8", "unknown dtype 'float8'"),
    pytest.param("generate hi -m {gpt2} --device cuda", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ("generate a b -m {gpt2} --stream", "--stream works with one prompt"),
    ("generate hi -m {gpt2} --no-such-option", "No such option"),
    ("generate", "no prompt given"),
    ("generate ' '", "empty prompt"),
    ("generate -f {ws}/missing.txt", "missing.txt does not exist"),
    ("generate -f {ws}/empty.txt", "empty.txt is empty (only whitespace)"),
    ("generate -f {ws}/utf16.txt", "utf16.txt is UTF-16 text, not UTF-8"),
    ("generate -f {ws}/data.bin", "binary file"),
    ("generate -f {ws}/latin1.txt", "not valid UTF-8"),
    ("generate -f {ws}/broken.jsonl", "broken.jsonl line 2: invalid JSON (Unterminated string starting at column 12)"),
    ("generate -f {ws}/list.jsonl", "list.jsonl line 2: expected a JSON object"),
    ("generate -f {ws}/nofield.jsonl", "nofield.jsonl line 3: expected a non-empty string 'prompt'"),
    ("generate -f {ws}/prompt5.jsonl", "prompt5.jsonl line 1: expected a non-empty string 'prompt'"),
    ("generate -f {ws}/badmsg.jsonl", "line 1: each message needs string 'role' and 'content'"),
    ("generate -f {ws}/badmsg.jsonl hi", "not both"),
    ("generate -f {ws}/long-line.txt -m {gpt2} -n 8 --no-chat --batch-size 2", "exceeds the model's context"),
    # fill-mask
    ("fill-mask 'no blank here' -m {bert}", "no mask in 'no blank here'"),
    ("fill-mask 'the [MASK]' -m {bert} --top-k 0", "--top-k must be at least 1, got 0"),
    ("fill-mask 'the [MASK]' -m {bert} --targets zzzqqqxxx", "target 'zzzqqqxxx' is not a single token"),
    ("fill-mask 'the [MASK]' -m {bert} --targets ☃", "target '☃' is not in this model's vocabulary (it becomes [UNK])"),
    ("fill-mask 'the [MASK]' -m {bert} --mode seq2seq", "unknown --mode 'seq2seq'"),
    ("fill-mask 'the [MASK]' -m {bert} --max-mask-tokens 0", "--max-mask-tokens must be at least 1"),
    ("fill-mask 'the [MASK]' -m {gpt2} --all-positions", "--all-positions needs a masked LM"),
    ("fill-mask 'the [MASK]' -m {bert} --mode causal", "is a masked LM, not a causal"),
    ("fill-mask 'the [MASK]' -m {bert} --mode causal", "Drop --mode causal"),
    ("fill-mask 'the [MASK]' -m {gpt2} --mode mlm", "Drop --mode mlm"),
    ("fill-mask -f {ws}/empty.txt -m {bert}", "empty.txt is empty (only whitespace)"),
    ("fill-mask -f {ws}/gpl.txt -m {bert}", "no mask in"),
    ("fill-mask '{long} [MASK]' -m {bert}", "longer than the model's 128"),
    # eval
    ("eval --data {ws}/gpl.txt -m {gpt2} --stride 80 --max-length 64", "--stride (80) must not exceed --max-length (64)"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --stride 0", "--stride must be at least 1, got 0"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --max-length 1000", "--max-length 1000 is above the model's context of 256"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --metric pseudo-perplexity", "needs a masked LM"),
    ("eval --data {ws}/gpl.txt -m {bert} --metric perplexity", "needs a causal LM"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --metric bleu", "unknown --metric 'bleu'"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --llama-cpp --lm-eval", "two different protocols"),
    ("eval --data {ws}/gpl.txt -m {gpt2} --llama-cpp --ctx 4096", "--ctx 4096 is above the model's context"),
    ("eval --data {ws}/short.txt -m {gpt2} --llama-cpp --ctx 128", "needs at least 2 × ctx"),
    ("eval --data {ws}/empty.txt -m {gpt2}", "is empty"),
    ("eval --data {ws}/utf16.txt -m {gpt2}", "Convert it: iconv -f UTF-16 -t UTF-8"),
    ("eval --data {ws}/missing.txt -m {gpt2}", "does not exist"),
    ("eval -m {gpt2}", "nothing to evaluate"),
    # finetune (the output directory must not appear)
    ("finetune --data {ws}/train-broken.jsonl -m {gpt2} -o {ws}/out", "train-broken.jsonl line 2: invalid JSON"),
    ("finetune --data {ws}/train-mixed.jsonl -m {gpt2} -o {ws}/out", "line 2: a prompt-completion record in a text file"),
    ("finetune --data {ws}/train-missing.jsonl -m {gpt2} -o {ws}/out", "line 2: no 'text', 'prompt'/'completion'"),
    ("finetune --data {ws}/train-type.jsonl -m {gpt2} -o {ws}/out", "line 1: 'text' must be a string"),
    ("finetune --data {ws}/train-empty.jsonl -m {gpt2} -o {ws}/out", "train-empty.jsonl is empty"),
    ("finetune --data {ws}/table.csv -m {gpt2} -o {ws}/out", "has no column 'text'"),
    ("finetune --data {ws}/not-a-dataset -m {gpt2} -o {ws}/out", "not a dataset saved with save_to_disk"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --objective seq2seq", "unknown --objective 'seq2seq'"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --objective mlm", "(gpt2) is not a masked LM"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --from-scratch --arch gpt2 --config-overrides n_layers",
     "bad --config-overrides item"),
    ("finetune --data {ws}/gpl.txt -o {ws}/out --from-scratch --arch gpt2 --config-overrides no_such_thing=3 "
     "--tokenizer-vocab-size 400", "GPT2Config has no setting 'no_such_thing'"),
    ("finetune --data {ws}/gpl.txt -o {ws}/out --from-scratch --arch gpt2 --config-overrides n_layer=two "
     "--tokenizer-vocab-size 300", "--config-overrides: n_layer='two' is not valid for GPT2Config: it needs int"),
    ("finetune --data {ws}/gpl.txt -o {ws}/out --from-scratch --arch gpt2 --config-overrides n_head=5 "
     "--tokenizer-vocab-size 300", "embed_dim` must be divisible by num_heads"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --from-scratch --config-overrides n_layer=two",
     "n_layer='two' is not valid for GPT2Config"),
    ("export smollm2 -o {ws}/requantized.gguf --type q4_0",
     "SmolLM2-135M-Instruct (embedded) is already quantized (Q4_1, Q8_0); quantizing it to Q4_0 rounds its weights"),
    ("finetune --data {ws}/gpl.txt -o {ws}/out --from-scratch --arch t5x", "unknown --arch 't5x'"),
    ("finetune --data {ws}/gpl.txt -o {ws}/out --from-scratch --arch gpt2", "--from-scratch needs a tokenizer"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --lr 0", "--lr must be positive"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --merge-lora", "--merge-lora needs --lora"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --lora --from-scratch --arch gpt2", "not from scratch"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --val-split 1.5", "--val-split must be in [0, 1)"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --max-length 1000", "above the model's context of 256"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --bf16 --fp16", "--bf16 and --fp16 both given"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --resume", "no complete checkpoint"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/out --resume --overwrite", "contradict"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/full-output", "is not empty"),
    ("finetune --data {ws}/gpl.txt -m {gpt2} -o {ws}/notes.txt", "is a file, not a directory"),
    ("finetune --data {ws}/gpl.txt -m {ws}/pickle-model -o {ws}/out", "only pickle weights"),
    # chat and the command line itself
    ("chat -m {gpt2} -n 0", "--max-new-tokens must be at least 1"),
    ("chat -m {gpt2} --top-p 3", "--top-p must be in (0, 1]"),
    ("translate hello", "No such command 'translate'"),
    # processes and big models
    ("generate hi -m {gpt2} --num-processes 0", "--num-processes must be at least 1, got 0"),
    ("eval -d {ws}/notes.txt -m {gpt2} --nnodes 2", "--nnodes above 1 needs --master-port"),
    ("fill-mask 'a [MASK]' -m {bert} --nnodes 2 --node-rank 5 --master-port 29400", "--node-rank must be in 0..1"),
    ("generate hi -m {gpt2} --master-port 0", "--master-port must be in 1..65535, got 0"),
    ("finetune -d {ws}/notes.txt -m {gpt2} --fsdp", "--fsdp shards over GPUs, and this run is on the CPU"),
    ("generate hi -m {gpt2} --max-memory cpu=1GiB", "--max-memory works with --device-map"),
    ("eval -d {ws}/notes.txt -m {gpt2} --offload-dir {ws}/off", "--offload-dir works with --device-map"),
    ("generate hi -m {gpt2} --device-map auto --max-memory cpu:1GiB", "--max-memory 'cpu:1GiB' is not DEVICE=SIZE"),
    ("generate hi -m {gpt2} --device-map auto --max-memory cpu=lots", "is not DEVICE=SIZE"),
    ("generate hi -m {gpt2} --device-map everywhere", "unknown --device-map 'everywhere'"),
    ("generate hi -m {gpt2} --device-map auto --num-processes 2", "--device-map spreads one model over the devices"),
    ("fill-mask 'a [MASK]' -m {bert} --device-map auto --device cuda", "--device cuda asks for one device"),
    ("generate hi -m {gpt2} --device-map auto --max-memory 0=1GiB", "--device cpu and a GPU in --max-memory"),
    # serve
    ("serve -m {gpt2} --port 70000", "--port must be in 1..65535, got 70000"),
    ("serve -m {gpt2} --queue-size 0", "--queue-size must be at least 1, got 0"),
    ("serve -m {gpt2} --max-tokens-limit 0", "--max-tokens-limit must be at least 1, got 0"),
    ("serve -m {gpt2} --api-key ''", "--api-key is empty"),
    ("serve -m {ws}/missing-model", "does not exist"),
    # one model per command: a second -m is refused before anything loads, not silently preferred
    ("generate hi -m smollm2 -m {gpt2}", "-m/--model was given 2 times, and generate runs one model"),
    ("chat -m smollm2 --model={gpt2}", "-m/--model was given 2 times, and chat runs one model"),
    # serve offers every -m (loaded on demand), but some options name one model
    ("serve -m smollm2 -m {gpt2} --served-model-name x", "--served-model-name is for a server of one model"),
    ("fill-mask 'a [MASK]' -m {bert} -m{bert}", "-m/--model was given 2 times, and fill-mask runs one model"),
    ("finetune -d {ws}/gpl.txt -m smollm2 -m {gpt2}", "-m/--model was given 2 times, and finetune runs one model"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def case_id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case[0])[:60]


@pytest.mark.parametrize("command, fragment", MATRIX, ids=[case_id(c) for c in MATRIX])
def test_error_matrix(command, fragment, workspace, tiny_gpt2, tiny_bert, tmp_path, monkeypatch):
    import os
    import shlex

    values = {"ws": workspace, "gpt2": tiny_gpt2, "bert": tiny_bert, "long": "word " * 200}
    args = [a.format(**values) for a in shlex.split(command)]
    monkeypatch.chdir(tmp_path)  # relative defaults (finetune's output) land here
    cache = Path(os.environ["LLMCLI_CACHE"])
    (cache / "llama-host.json").parent.mkdir(parents=True, exist_ok=True)
    # the host probe's record is written by whichever test first loads llama.cpp: make it exist already
    run_cli("info") if not (cache / "llama-host.json").exists() else None
    before = snapshot(workspace), snapshot(cache)
    assert_clean_error(run_cli(*args), fragment)
    assert (snapshot(workspace), snapshot(cache)) == before  # nothing created or changed
    assert list(tmp_path.iterdir()) == []


def test_pickle_weights_load_when_allowed(workspace, tiny_gpt2):
    """The pickled weights are the tiny GPT-2's: the same greedy tokens as its safetensors."""
    outputs = []
    for model, extra in ((workspace / "pickle-model", ["--allow-pickle"]), (tiny_gpt2, [])):
        result = run_cli("generate", "This License", "-m", model, *extra, "-n", "6", "--no-chat", "--json")
        assert result.exit_code == 0, result.stderr
        outputs.append(result.json_lines()[0]["token_ids"])
    assert outputs[0] == outputs[1]


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "generate", "hi", "-m", tmp_path / "nope")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_version_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "llmcli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("llmcli ")


def test_bare_command_prints_help():
    result = subprocess.run([sys.executable, "-m", "llmcli"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


def test_help_imports_neither_torch_nor_transformers():
    for args in (["--help"], ["generate", "--help"], ["chat", "--help"], ["fill-mask", "--help"],
                 ["eval", "--help"], ["finetune", "--help"], ["serve", "--help"], ["embed", "--help"],
                 ["similar", "--help"], ["rerank", "--help"], ["pull", "--help"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmcli", *args],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
        assert "typer" in imported  # the import log was really captured
        assert not imported & {"torch", "transformers", "accelerate", "datasets"}, args


def test_prompt_too_long_truncated_left_on_request(tiny_gpt2, tiny_tokenizer):
    """--truncate left keeps the prompt's end: the continuation is HF's greedy one from those tokens."""
    from transformers import AutoModelForCausalLM

    long_prompt = " ".join(gpl_text().split()[:400])
    result = run_cli("generate", long_prompt, "-m", tiny_gpt2, "--no-chat", "-n", "6", "--truncate", "left", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert record["prompt_tokens"] == 256 - 6  # the prompt's end, filling the context
    ids = tiny_tokenizer(long_prompt, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)

    def continuation(kept):
        return model.generate(kept, attention_mask=torch.ones_like(kept), do_sample=False, max_new_tokens=6,
                              pad_token_id=tiny_tokenizer.eos_token_id)[0, kept.shape[1]:].tolist()

    assert record["token_ids"] == continuation(ids[:, -250:])
    assert record["token_ids"] != continuation(ids[:, :250])


CUSTOM_CODE = """
import os

from transformers import GPT2Config, GPT2LMHeadModel

open(os.environ["CUSTOM_CODE_MARKER"], "w").close()  # proof that this file was executed


class TinyCustomConfig(GPT2Config):
    model_type = "tiny-custom"


class TinyCustomModel(GPT2LMHeadModel):
    config_class = TinyCustomConfig

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits[..., 7] += 1000.0  # the custom code's fingerprint: token 7 always wins
        return output
"""


def test_remote_code_runs_only_with_trust_remote_code(tiny_gpt2, tmp_path):
    """A model whose config points at its own Python code: refused (exit 2, the code never executed)
    unless --trust-remote-code, with which the code runs."""
    import json
    import os

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_gpt2, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tiny-custom", auto_map={"AutoConfig": "custom.TinyCustomConfig",
                                                       "AutoModelForCausalLM": "custom.TinyCustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(CUSTOM_CODE)
    marker = tmp_path / "custom-code-ran"
    env = {**os.environ, "CUSTOM_CODE_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-m", "llmcli", "generate", "hi", "-m", str(model), "-n", "3", "--json"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("Error: "), refused.stderr
    assert "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()
    trusted = subprocess.run([*command, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=120)
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["token_ids"] == [7, 7, 7] and marker.exists()


def stderr_on_a_terminal(args: list[str], **env: str) -> bytes:
    """Run llmcli with its stderr on a pseudo-terminal (where rich colours) and return what it wrote."""
    import os
    import pty

    leader, follower = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    subprocess.run([sys.executable, "-m", "llmcli", *args], stdout=subprocess.DEVNULL, stderr=follower,
                   env={**environment, "TERM": "xterm-256color", **env}, timeout=60)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other side is closed and drained
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return output


def test_no_color_is_respected_on_a_terminal(tmp_path):
    import re

    args = ["generate", "hi", "-m", str(tmp_path / "missing")]
    colour = re.compile(rb"\x1b\[[0-9;]*3[0-9]m")  # an SGR sequence with a foreground colour
    coloured = stderr_on_a_terminal(args)
    plain = stderr_on_a_terminal(args, NO_COLOR="1")
    assert b"Error: " in coloured and b"Error: " in plain
    assert colour.search(coloured) and not colour.search(plain)


def test_a_closed_pipe_is_not_an_error(tiny_gpt2):
    """`llmcli generate - | head -1` with many prompts: exit 0, nothing on stderr but the headers.
    (click turns a BrokenPipeError into a silent exit 1, so llmcli must not let one reach it.)"""
    prompts = "".join(f"prompt number {n}\n" for n in range(30))
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "-", "-m", str(tiny_gpt2), "-n", "20",
                                "--no-chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write(prompts.encode())
    process.stdin.close()
    assert process.stdout.readline()  # the first generation arrived; then the reader goes away
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Error" not in stderr and "Traceback" not in stderr and "Exception" not in stderr


def test_info_and_cache_commands(tmp_path, monkeypatch):
    """`info --json` names the cache and engines; `cache list` shows each entry; `cache rm` removes one
    by name, refuses without a name (removing nothing), and `--all` empties the cache."""
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path))
    folder = tmp_path / "gguf"
    entry = folder / "model-abc-v2"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 2048)
    (entry / "llmcli-cache.json").write_text(json.dumps({"source": "/models/model.gguf", "files": {}}))
    (folder / "model-abc-v2.F16.gguf").write_bytes(b"y" * 1024)
    (folder / "model-abc-v2.F16.json").write_text(json.dumps({"source": "/models/model.gguf"}))  # its marker
    (folder / ".model-abc-v2.lock").write_text("")
    details = run_cli("info", "--json").json_lines()[0]
    assert details["cache"]["path"] == str(tmp_path) and details["engines"]["hf"] is True
    assert [e["name"] for e in details["cache"]["entries"]] == ["model-abc-v2", "model-abc-v2.F16.gguf"]
    listed = run_cli("cache", "list", "--json").json_lines()
    assert [(e["kind"], e["source"]) for e in listed] == [("safetensors", "/models/model.gguf"),
                                                          ("F16 GGUF", "/models/model.gguf")]
    refused = run_cli("cache", "rm")
    assert refused.exit_code == 2 and "name one cache entry, or pass --all" in refused.stderr
    assert entry.is_dir()
    assert run_cli("cache", "rm", "model-abc-v2.F16").exit_code == 0
    assert [e["name"] for e in run_cli("cache", "list", "--json").json_lines()] == ["model-abc-v2"]
    assert not (folder / "model-abc-v2.F16.json").exists()  # the marker went with its file
    assert run_cli("cache", "rm", "--all").exit_code == 0 and not entry.exists()


def test_cache_list_shows_the_hub_cache_models(tmp_path, monkeypatch):
    """`cache list` also lists the Hugging Face hub cache's models (what `-m org/name` finds offline), and
    `cache rm` of one removes its repository folder (what `llmcli pull` put there)."""
    import huggingface_hub.constants

    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "llmcli"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--org--tiny"  # the hub cache's layout: blobs, refs, snapshots of symlinks
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"z" * 4096)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "abc")
    (hub / "datasets--org--data" / "snapshots").mkdir(parents=True)  # not a model: not listed
    listed = run_cli("cache", "list", "--json").json_lines()
    assert [(e["name"], e["kind"], e["source"]) for e in listed] == [("org/tiny", "hub model", str(hub))]
    assert "org/tiny  hub model" in run_cli("cache", "list").stdout
    assert run_cli("cache", "rm", "org/tiny").exit_code == 0
    assert not repo.exists() and (hub / "datasets--org--data").exists()


def test_shell_completion():
    script = subprocess.run([sys.executable, "-m", "llmcli", "--show-completion", "bash"], capture_output=True,
                            text=True)
    assert script.returncode == 0 and "complete" in script.stdout, script.stderr
    env = {**os.environ, "COMP_WORDS": "llmcli generate --eng", "COMP_CWORD": "2", "_LLMCLI_COMPLETE": "complete_bash"}
    completed = subprocess.run([sys.executable, "-m", "llmcli"], capture_output=True, text=True, env=env)
    assert completed.stdout.split() == ["--engine"], completed.stderr


@pytest.mark.parametrize("engine", ["hf", "llama.cpp"])
def test_an_unwritable_cache_is_a_one_line_error(engine, tmp_path, monkeypatch):
    """Both engines' one-time GGUF conversions go through the same cache lock: a cache path that is a
    file is an exit-2 error naming LLMCLI_CACHE, and nothing is written."""
    if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the llama.cpp engine is not installed")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setenv("LLMCLI_CACHE", str(blocker))
    result = run_cli("generate", "hi", "-n", "2", "--engine", engine)
    assert result.exit_code == 2, result.stderr
    assert "Error: cannot write the model cache" in result.stderr and "Set LLMCLI_CACHE" in result.stderr
    assert "Traceback" not in result.stderr and blocker.read_text() == "x"


def test_help_names_arguments_without_python_types():
    """typer labels positional arguments with their Python type ("TEXT <list[str]>"); ours are named."""
    for args in (["generate"], ["chat"], ["fill-mask"], ["eval"], ["finetune"], ["cache", "rm"], ["pull"]):
        result = run_cli(*args, "--help")
        assert result.exit_code == 0, result.stderr
        assert "<list[" not in result.stdout and "name <str>" not in result.stdout, args


@pytest.mark.parametrize("text, fragment", [
    ("[generate]\nmax-new-tokens = 'many'\n", "[generate] max-new-tokens = 'many': 'many' is not a valid int"),
    ("[generate]\ntemprature = 0.5\n", "[generate] temprature is not an option of llmcli generate"),
    ("[generat]\nmodel = 'x'\n", "[generat] is not an llmcli command"),
    ("[generate]\nstream = 'yes'\n", "[generate] stream must be true or false"),
    ("[generate]\nmodel = ['a', 'b']\n", "[generate] model takes one value, not a list"),
    ("generate = 3\n", "generate must be a table ([generate]) of option values"),
    ("[generate\n", "is not valid TOML"),
])
def test_an_invalid_config_file_is_one_error_naming_the_file_and_key(text, fragment, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("LLMCLI_CONFIG", str(config))
    assert_clean_error(run_cli("generate", "hi"), f"Error: the config file {config}", fragment)


def test_the_config_file_is_found_in_the_xdg_config_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMCLI_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "llmcli").mkdir()
    (tmp_path / "llmcli" / "config.toml").write_text("[generate]\nmax-new-tokens = 'many'\n")
    assert_clean_error(run_cli("generate", "hi"), f"{tmp_path / 'llmcli' / 'config.toml'}: [generate] max-new-tokens")
