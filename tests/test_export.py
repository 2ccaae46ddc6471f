"""`llmcli export`: a Hugging Face directory (or a LoRA adapter, merged) to GGUF. The exported file on
the llama.cpp engine decodes and scores as the source does on the hf engine; llama.cpp tokenizes as
the Hugging Face tokenizer does; the chat template and EOS survive; the embedded model's round trip
gives the perplexity of llama.cpp's own F16 conversion; quantized exports load and stay close; bad
input is one line and writes nothing."""

from __future__ import annotations

import json
import os

import pytest

from conftest import GPL3, run_cli

pytest.importorskip("llama_cpp")

# per-token log-probabilities of an F32 export against its source: 20x what was measured on the tiny
# models (max 5.3e-5, mean 1.1e-5), far inside test_llamacpp.py's engine-agreement bounds (0.05, 0.002)
MAX_LOGPROB_GAP, MEAN_LOGPROB_GAP = 1e-3, 2e-4
TEXT_WITH_EVERYTHING = (GPL3.read_text()[:6000] + " 12345 3.14159 1,000,000 <|endoftext|> héllo wörld 日本語 "
                        "emoji 🦙 tabs\tand  double  spaces\n\n\n and 'quotes' I've they'll")


def export(source, output, *args) -> None:
    result = run_cli("export", source, "-o", output, *args)
    assert result.exit_code == 0, result.stderr
    assert output.is_file()


def engines(source, exported):
    from llmcli.engines import choose_engine

    return choose_engine(str(source), "hf"), choose_engine(str(exported), "llama.cpp")


def greedy(model, engine: str, prompts: list[str], tokens: int) -> list[list[int]]:
    result = run_cli("generate", *prompts, "-m", model, "--engine", engine, "--no-chat", "-n", str(tokens), "--json")
    assert result.exit_code == 0, result.stderr
    return [record["token_ids"] for record in result.json_lines()]


def logprob_gaps(hf, llama, ids: list[int]):
    import numpy as np

    from llmcli.engines import Window

    window = Window(ids, len(ids) - 1)
    return np.abs(np.array(hf.token_logprobs(window, 0)[0]) - np.array(llama.token_logprobs(window, 0)[0]))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_an_f32_export_decodes_scores_and_tokenizes_as_its_source(fixture, request, tmp_path):
    source = request.getfixturevalue(fixture)
    exported = tmp_path / "model.gguf"
    export(source, exported, "--type", "f32")
    prompts = ["This License", "the work", "You may convey verbatim copies"]
    assert greedy(exported, "llama.cpp", prompts, 24) == greedy(source, "hf", prompts, 24)
    hf, llama = engines(source, exported)
    ids = hf.encode(TEXT_WITH_EVERYTHING)
    assert llama.encode(TEXT_WITH_EVERYTHING) == ids  # digits, specials, bytes, runs of spaces
    assert (llama.adds_bos, llama.eos_id) == (hf.adds_bos, hf.eos_id)
    gaps = logprob_gaps(hf, llama, ids[:200])
    assert gaps.max() < MAX_LOGPROB_GAP and gaps.mean() < MEAN_LOGPROB_GAP, (gaps.max(), gaps.mean())
    if hf.chat_template:  # the template survives: a conversation is the same ids on both
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        assert llama.chat_template == hf.chat_template
        assert llama.encode_chat(messages) == hf.encode_chat(messages)


def test_an_export_is_read_back_whatever_its_name_and_is_not_requantized_unasked(tiny_llama, tmp_path):
    """GGUF files are known by their magic bytes: `-o model.bin` loads as it was written. Quantizing an
    already-quantized file again needs --allow-requantize, as llama-quantize's does."""
    named = tmp_path / "model.bin"
    export(tiny_llama, named, "--type", "f32")
    prompts = ["This License", "the work"]
    assert greedy(named, "llama.cpp", prompts, 12) == greedy(tiny_llama, "hf", prompts, 12)
    quantized = tmp_path / "model-q8_0.weights"
    export(tiny_llama, quantized, "--type", "q8_0")
    again = tmp_path / "again.gguf"
    refused = run_cli("export", quantized, "-o", again, "--type", "q4_0")
    assert refused.exit_code == 2 and "is already quantized (Q8_0)" in refused.stderr, refused.stderr
    assert "--allow-requantize" in refused.stderr and not again.exists()
    export(quantized, again, "--type", "f16")  # no second rounding: allowed
    export(quantized, tmp_path / "q4.gguf", "--type", "q4_0", "--allow-requantize")


def test_a_lora_adapter_is_merged_into_its_base(tiny_llama, tmp_path):
    """A LoRA finetune's output directory: the export runs base + adapter, as the hf engine does."""
    data = tmp_path / "train.txt"
    data.write_text(GPL3.read_text()[:20000])
    adapter = tmp_path / "adapter"
    trained = run_cli("finetune", "--data", data, "-m", tiny_llama, "--lora", "--lora-r", "4", "--max-steps", "8",
                      "--max-length", "64", "--batch-size", "8", "--lr", "3e-3", "-o", adapter)
    assert trained.exit_code == 0, trained.stderr
    exported = tmp_path / "merged.gguf"
    result = run_cli("export", adapter, "-o", exported, "--type", "f32")
    assert result.exit_code == 0 and "LoRA adapter merged" in result.stderr, result.stderr
    prompts = ["This License", "the work"]
    assert greedy(exported, "llama.cpp", prompts, 16) == greedy(adapter, "hf", prompts, 16)
    assert greedy(exported, "llama.cpp", prompts, 16) != greedy(tiny_llama, "hf", prompts, 16)  # it learned
    hf, llama = engines(adapter, exported)
    gaps = logprob_gaps(hf, llama, hf.encode(GPL3.read_text()[:1500])[:200])
    assert gaps.max() < MAX_LOGPROB_GAP and gaps.mean() < MEAN_LOGPROB_GAP, (gaps.max(), gaps.mean())


def perplexity(model, text) -> float:
    result = run_cli("eval", "--data", text, "-m", model, "--engine", "llama.cpp", "--max-length", "512", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()[0]["value"]


@pytest.mark.slow
def test_the_embedded_model_round_trip_and_quantized_exports(tmp_path):
    """The hf engine's safetensors of the embedded model, exported to F16, score a license text exactly
    as llama.cpp's own F16 conversion of the original GGUF (equal to 1e-9, measured equal); Q8_0 and
    Q4_K_M exports load, generate, and stay within 2% and 25% of an F32 export's perplexity (measured on the whole
    Apache license, 2214 tokens, against F32: +0.3% and +10.2%)."""
    from llmcli import models
    from llmcli.engines.llamacpp import converted_path

    assert run_cli("generate", "hi", "-n", "1", "--engine", "hf").exit_code == 0  # makes the safetensors entry
    assert run_cli("generate", "hi", "-n", "1", "--engine", "llama.cpp").exit_code == 0  # and llama.cpp's F16
    directory = models.gguf_cache_dir(models.embedded_gguf_path())
    reference = converted_path(models.embedded_gguf_path(), "F16")
    text = tmp_path / "apache.txt"
    text.write_text(open("/usr/share/common-licenses/Apache-2.0").read()[:5000])
    exported = tmp_path / "smollm2-f16.gguf"
    export(directory, exported, "--type", "f16")
    assert perplexity(exported, text) == pytest.approx(perplexity(reference, text), rel=1e-9)
    full = tmp_path / "smollm2-f32.gguf"
    export(directory, full, "--type", "f32")
    base = perplexity(full, text)
    full.unlink()
    for type_name, bound in (("q8_0", 0.02), ("q4_k_m", 0.25)):
        quantized = tmp_path / f"smollm2-{type_name}.gguf"
        export(directory, quantized, "--type", type_name)
        [record] = run_cli("generate", "What is the capital of France?", "-m", quantized, "-n", "12", "--fast",
                           "--json").json_lines()  # --fast: the file's own weights, not an F16 conversion
        assert record["weights"] == type_name.upper() and record["generated_tokens"] > 0
        assert abs(perplexity(quantized, text) / base - 1) < bound
        assert quantized.stat().st_size < exported.stat().st_size


def test_exports_are_ordinary_files_and_bf16_is_close(tiny_llama, tmp_path):
    """BF16 rounds the weights (scores close, not equal); the file gets the umask's mode, not mkstemp's
    private one; nothing temporary is left; the notice gives its size in a unit that shows it (not "0 MB")."""
    import gguf

    from llmcli.render import human_size

    exported = tmp_path / "model-bf16.gguf"
    result = run_cli("export", tiny_llama, "-o", exported, "--type", "bf16")
    assert result.exit_code == 0, result.stderr
    size, tensors = exported.stat().st_size, len(gguf.GGUFReader(exported).tensors)
    assert size < 2**20 and f"BF16, {tensors} tensors, {human_size(size)}, in" in result.stderr, result.stderr
    assert human_size(size) == f"{size / 1024:.0f} kB"  # a tiny model is tens of kB (it said "0 MB")
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-bf16.gguf"]
    hf, llama = engines(tiny_llama, exported)
    assert llama.weights == "BF16"
    gaps = logprob_gaps(hf, llama, hf.encode(GPL3.read_text()[:1500])[:200])
    assert 0 < gaps.mean() < 0.05


@pytest.mark.parametrize("case", ["not a model", "masked LM", "exists", "unknown type", "wordpiece"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_llama, tiny_bert, tmp_path):
    output = tmp_path / "out" / "model.gguf"
    output.parent.mkdir()
    source, args, fragment = tiny_llama, [], None
    if case == "not a model":
        source, fragment = tmp_path, "without config.json"
    elif case == "masked LM":
        source, fragment = tiny_bert, "export writes Llama-family and GPT-2 causal LMs; this model is BertForMaskedLM"
    elif case == "exists":
        output.write_text("precious")
        fragment = "exists"
    elif case == "unknown type":
        args, fragment = ["--type", "q3"], "unknown --type 'q3'"
    else:
        from transformers import LlamaConfig

        from conftest import save_tiny, train_wordpiece_tokenizer

        tokenizer = train_wordpiece_tokenizer()
        source = save_tiny(tmp_path / "wordpiece", LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64), tokenizer)
        fragment = "export writes byte-level BPE tokenizers"
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    result = run_cli("export", source, "-o", output, *args)
    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in output.parent.iterdir()} == before


def test_the_exported_file_carries_the_metadata_llama_cpp_reads(tiny_llama, tmp_path):
    """Spot checks on what the loader reads, against the source's config and tokenizer."""
    import gguf

    exported = tmp_path / "model.gguf"
    export(tiny_llama, exported, "--type", "f16")
    fields = {key: field.contents() for key, field in gguf.GGUFReader(exported).fields.items()
              if not key.startswith("tokenizer.ggml.token") and key != "tokenizer.ggml.merges"}
    config = json.loads((tiny_llama / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["general.file_type"] == 1  # mostly F16


def test_finetune_export_gguf_writes_what_export_writes(tiny_llama, tmp_path):
    """`finetune --export-gguf FILE` is `export OUTPUT -o FILE --type f16` after training; an existing
    FILE is refused before any training."""
    data = tmp_path / "train.txt"
    data.write_text(GPL3.read_text()[:5000])
    args = ["finetune", "--data", data, "-m", tiny_llama, "--max-steps", "2", "--max-length", "64", "--lr", "3e-3"]
    taken = tmp_path / "taken.gguf"
    taken.write_text("precious")
    refused = run_cli(*args, "-o", tmp_path / "never", "--export-gguf", taken)
    assert refused.exit_code == 2 and "taken.gguf exists" in refused.stderr, refused.stderr
    assert "Choose another --export-gguf file" in refused.stderr, refused.stderr
    assert not (tmp_path / "never").exists() and taken.read_text() == "precious"
    shortcut = tmp_path / "shortcut.gguf"
    trained = run_cli(*args, "-o", tmp_path / "model", "--export-gguf", shortcut)
    assert trained.exit_code == 0, trained.stderr
    by_hand = tmp_path / "by-hand.gguf"
    export(tmp_path / "model", by_hand, "--type", "f16")
    assert shortcut.read_bytes() == by_hand.read_bytes()
