"""LoRA adapters unmerged: `export --adapter` writes llama.cpp's LoRA GGUF, which llama.cpp itself applies to
the exported base as peft applies the adapter; the llama.cpp engine runs an adapter directory on its base
GGUF with it; the hf engine holds several adapters on one base and mixes them in one batch; `serve
--adapter NAME=DIR` offers each adapter as a model. References: peft's own generate, and llama.cpp's own
adapter loading through llama-cpp-python's `Llama(lora_path=...)`."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from conftest import bare_llama, run_cli

PROMPTS = ["This License", "the work", "You may convey verbatim copies"]


def make_adapter(base: Path | None, path: Path, seed: int, alpha: int, base_reference: str | None = None) -> Path:
    """A rank-4 LoRA on every linear layer with random (not zero) B factors: it changes greedy text at once,
    as a trained adapter does, without training. alpha != rank, so an ignored alpha shows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llmcli import models

    loaded = models.load_model(None if base is None else str(base), device="cpu", dtype="float32")
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.5)  # moves greedy text without drowning the base
    model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    settings = json.loads((path / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = base_reference or str(base)
    (path / "adapter_config.json").write_text(json.dumps(settings))
    return path


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(tiny_llama, root / "alpha16", seed=1, alpha=16),
            make_adapter(tiny_llama, root / "alpha8", seed=2, alpha=8))


@pytest.fixture(scope="module")
def gguf_base(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama exported to an F32 GGUF: a GGUF base, as the embedded model is for `finetune --lora`."""
    path = tmp_path_factory.mktemp("gguf-base") / "tiny-llama-f32.gguf"
    assert run_cli("export", tiny_llama, "-o", path, "--type", "f32").exit_code == 0
    return path


def rebased(adapter: Path, base: Path, path: Path) -> Path:
    """A copy of `adapter` naming `base` (the same weights in another form) as its base model."""
    shutil.copytree(adapter, path)
    settings = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))
    return path


@pytest.fixture(scope="module")
def gguf_adapters(llama_adapters, gguf_base, tmp_path_factory) -> tuple[Path, Path]:
    """The adapters naming the GGUF export of their base as their base model."""
    root = tmp_path_factory.mktemp("gguf-adapters")
    return tuple(rebased(adapter, gguf_base, root / adapter.name) for adapter in llama_adapters)


@pytest.fixture(scope="module")
def gguf_adapter(gguf_adapters) -> Path:
    return gguf_adapters[0]


def greedy(model, engine: str, tokens: int, *prompts: str) -> list[list[int]]:
    result = run_cli("generate", *(prompts or PROMPTS), "-m", model, "--engine", engine, "--no-chat",
                     "-n", str(tokens), "--json")
    assert result.exit_code == 0, result.stderr
    return [record["token_ids"] for record in result.json_lines()]


def llama_cpp_greedy(base: Path, lora: Path, prompt_ids: list[int], tokens: int) -> list[int]:
    """llama.cpp's own adapter path: llama-cpp-python's Llama with lora_path, at temperature 0."""
    from llama_cpp import llama_vocab_is_eog

    llm = bare_llama(base, lora_path=str(lora), n_ctx=256, n_threads=2, n_threads_batch=2, flash_attn=True)
    new: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0):
        new.append(token)
        if llama_vocab_is_eog(llm._model.vocab, token) or len(new) == tokens:
            break
    return new


def export_adapter(adapter: Path, output: Path, *args: str) -> Path:
    result = run_cli("export", "--adapter", adapter, "-o", output, *args)
    assert result.exit_code == 0, result.stderr
    return output


def test_an_exported_adapter_is_llama_cpps_lora_gguf_and_decodes_as_peft(tiny_llama, llama_adapters, tmp_path):
    """The keys and tensors convert_lora_to_gguf.py writes; on the exported base, llama.cpp's own adapter
    loading gives peft's greedy text: token for token at F32, and at F16 within its rounding's flips."""
    pytest.importorskip("llama_cpp")
    import gguf
    from transformers import AutoTokenizer

    adapter = llama_adapters[0]
    written = export_adapter(adapter, tmp_path / "adapter.gguf")  # F16 by default
    reader = gguf.GGUFReader(written)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("general.architecture")) == ("adapter", "lora", "llama")
    assert field("adapter.lora.alpha") == 16.0
    tensors = {t.name: t for t in reader.tensors}
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(tensors) == {f"blk.{b}.{k}.weight.lora_{ab}" for b in (0, 1) for k in kinds for ab in "ab"}
    # numpy order (ggml's reversed): lora_a is rank x in, lora_b is out x rank; 64 = hidden, 32 = 2 kv heads x 16
    assert list(tensors["blk.0.attn_k.weight.lora_a"].shape[::-1]) == [4, 64]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape[::-1]) == [32, 4]
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape[::-1]) == [4, 128]
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    reference = greedy(adapter, "hf", 24)
    assert reference != greedy(tiny_llama, "hf", 24)  # the adapter changes the text
    base32 = tmp_path / "base-f32.gguf"
    assert run_cli("export", tiny_llama, "-o", base32, "--type", "f32").exit_code == 0
    lora32 = export_adapter(adapter, tmp_path / "adapter-f32.gguf", "--type", "f32")
    for prompt, expected in zip(PROMPTS, reference):
        assert llama_cpp_greedy(base32, lora32, tokenizer(prompt)["input_ids"], 24) == expected, prompt
    base16 = tmp_path / "base-f16.gguf"
    assert run_cli("export", tiny_llama, "-o", base16, "--type", "f16").exit_code == 0
    agreeing = 0
    for prompt, expected in zip(PROMPTS, reference):
        got = llama_cpp_greedy(base16, written, tokenizer(prompt)["input_ids"], 24)
        agreeing += next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
    # measured on both adapters, 6 prompts x 32 tokens: 380 of 384 agree before the first F16 flip
    assert agreeing >= 0.75 * sum(len(row) for row in reference), agreeing


def test_the_llama_cpp_engine_runs_an_adapter_on_its_base_gguf_unmerged(tiny_llama, llama_adapters, gguf_base,
                                                                        gguf_adapter, tmp_path):
    """`generate -m ADAPTER_DIR --engine llama.cpp`: the base GGUF with the adapter's LoRA GGUF applied by
    llama.cpp (made once into the cache). On a GGUF base it equals peft; on a Hugging Face base (exported
    once to F16 into the cache) it equals llama.cpp's own `Llama(lora_path=...)` on those files."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from llmcli.engines import choose_engine

    reference = greedy(llama_adapters[0], "hf", 16)
    assert greedy(gguf_adapter, "llama.cpp", 16) == reference
    assert greedy(gguf_base, "llama.cpp", 16) != reference
    engine = choose_engine(str(gguf_adapter), "llama.cpp")
    assert engine.path == gguf_base and engine.adapter in engine.adapters and len(engine.adapters) == 1

    second = llama_adapters[1]
    base16 = tmp_path / "base-f16.gguf"
    assert run_cli("export", tiny_llama, "-o", base16, "--type", "f16").exit_code == 0
    lora = export_adapter(second, tmp_path / "second.gguf", "--type", "f32")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    expected = [llama_cpp_greedy(base16, lora, tokenizer(p)["input_ids"], 16) for p in PROMPTS]
    assert greedy(second, "llama.cpp", 16) == expected


def test_a_llama_cpp_engine_switches_adapters_per_prompt_and_per_sequence(gguf_base, gguf_adapter):
    """One base, its adapter added: prompts (generate's batch) and a SequenceSet's sequences (a server's
    continuous batch) each run with their own adapter, stepping groups in turn."""
    pytest.importorskip("llama_cpp")
    from llmcli.data import Prompt
    from llmcli.engines import add_adapter_dir, choose_engine
    from llmcli.engines.llama_sequences import SequenceSet
    from llmcli.tasks.generate import GenerateOptions, generate

    base, adapted = greedy(gguf_base, "llama.cpp", 12), greedy(gguf_adapter, "llama.cpp", 12)
    engine = choose_engine(str(gguf_base), "llama.cpp")
    add_adapter_dir(engine, "tuned", str(gguf_adapter), lambda message: None)
    prompts = [Prompt(text=text, adapter=name) for text in PROMPTS for name in (None, "tuned")]
    options = GenerateOptions(max_new_tokens=12, temperature=0.0, chat=False, batch_size=len(prompts))
    rows = [result.token_ids for result in generate(engine, prompts, options)]
    assert rows == [row for pair in zip(base, adapted) for row in pair]
    sequences = SequenceSet(engine, 512, len(prompts), 64)
    try:
        live = [sequences.add(engine.encode(p.text), engine.sampler(options, []), 12, adapter=p.adapter)
                for p in prompts]
        while sequences.live:
            sequences.step(engine.eos_ids)
    finally:
        sequences.close()
    assert [s.new for s in live] == [row for pair in zip(base, adapted) for row in pair]


def test_the_hf_engine_mixes_adapters_of_one_base_in_one_batch(tiny_llama, llama_adapters):
    """Base and two adapters side by side (peft's load_adapter); one left-padded batch mixing them (peft's
    adapter_names) gives each prompt the text `generate -m` gives it on its own model."""
    from llmcli.data import Prompt
    from llmcli.engines import add_adapter_dir, choose_engine
    from llmcli.tasks.generate import GenerateOptions, generate

    first, second = llama_adapters
    alone = {None: greedy(tiny_llama, "hf", 16), "first": greedy(first, "hf", 16), "second": greedy(second, "hf", 16)}
    assert alone["first"] != alone["second"] != alone[None]
    engine = choose_engine(str(tiny_llama), "hf")
    add_adapter_dir(engine, "first", str(first), lambda message: None)
    add_adapter_dir(engine, "second", str(second), lambda message: None)
    names = [None, "first", "second", "second", None, "first"]
    prompts = [Prompt(text=PROMPTS[i % 3], adapter=name) for i, name in enumerate(names)]
    options = GenerateOptions(max_new_tokens=16, temperature=0.0, chat=False, batch_size=len(prompts))
    rows = [result.token_ids for result in generate(engine, prompts, options)]
    assert rows == [alone[name][i % 3] for i, name in enumerate(names)]
    plain = GenerateOptions(max_new_tokens=16, temperature=0.0, chat=False)
    assert [r.token_ids for r in generate(engine, [Prompt(text=p) for p in PROMPTS], plain)] == alone[None]


def test_export_adapter_refuses_what_llama_cpp_cannot_hold(llama_adapters, tmp_path):
    not_adapter = run_cli("export", "--adapter", tmp_path, "-o", tmp_path / "a.gguf")
    assert not_adapter.exit_code == 2 and "not a LoRA adapter directory" in not_adapter.stderr
    both = run_cli("export", llama_adapters[0], "--adapter", llama_adapters[0], "-o", tmp_path / "a.gguf")
    assert both.exit_code == 2 and "not both" in both.stderr
    quantized = run_cli("export", "--adapter", llama_adapters[0], "-o", tmp_path / "a.gguf", "--type", "q4_0")
    assert quantized.exit_code == 2 and "not written for adapters" in quantized.stderr
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("engine", ["hf", "llama.cpp"])
def test_serve_offers_adapters_as_models_and_concurrent_requests_get_their_own_text(engine, request):
    """`serve -m BASE --adapter NAME=DIR ...`: /v1/models lists each adapter with its parent; eight
    concurrent requests over the base and two adapters (batched together: peft's mixed batch on hf, turns
    of one adapter per step on llama.cpp) each get the text `generate -m` gives on its own model."""
    from test_serve import serving

    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
        base, (first, second) = request.getfixturevalue("gguf_base"), request.getfixturevalue("gguf_adapters")
    else:
        base, (first, second) = request.getfixturevalue("tiny_llama"), request.getfixturevalue("llama_adapters")
    expected = {}
    for name, model in (("base", base), ("first", first), ("second", second)):
        result = run_cli("generate", *PROMPTS, "-m", model, "--engine", engine, "--no-chat", "-n", "12", "--json")
        expected[name] = [record["text"] for record in result.json_lines()]
    assert expected["base"] != expected["first"] != expected["second"]
    with serving("-m", base, "--engine", engine, "--adapter", f"first={first}", "--adapter", f"second={second}",
                 "--max-batch", "8") as server:
        with server.client() as client:
            cards = {card.id: card for card in client.models.list().data}
            base_id = Path(base).name
            assert cards["first"].parent == cards["second"].parent == base_id
            answers: dict[int, tuple[str, str]] = {}
            asked = [(["base", "first", "second"][i % 3], i % 3) for i in range(8)]

            def ask(i: int) -> None:
                name, p = asked[i]
                reply = client.completions.create(model=base_id if name == "base" else name, prompt=PROMPTS[p],
                                                  max_tokens=12, temperature=0)
                answers[i] = (reply.model, reply.choices[0].text)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            # an unknown model is 404, listing what is offered
            status, _, body = server.post("/v1/completions", {"model": "third", "prompt": "x", "max_tokens": 2})
    assert status == 404 and "'first'" in body["error"]["message"], body
    for i, (name, p) in enumerate(asked):
        assert answers[i] == ((base_id if name == "base" else name), expected[name][p]), (i, name)
