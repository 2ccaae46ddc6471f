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
    gappy = tmp_path / "gappy.txt"
    gappy.write_text("one\n\ntwo\n")
    cases = [
        (["-f", str(gappy)], "line 2 is empty"),
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
        short = client.embeddings.create(model="minilm", input=TEXTS, dimensions=32)
        assert len(short.data[0].embedding) == 32
        assert np.abs(np.array(short.data[0].embedding) - expected[0][:32]).max() < TOLERANCE

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
