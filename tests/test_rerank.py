"""`llmcli rerank` and `/v1/rerank` against sentence-transformers' own `CrossEncoder.predict` on tiny
cross-encoders built here, offline: a BERT sequence-classification model saved by CrossEncoder with its
default activation (Sigmoid) and with Identity, the same model as a plain transformers directory (no
sentence-transformers files: Sigmoid), one with the pre-4.0 activation key in its config.json, and one
with a default prompt (put before each query). Scores within 1e-5 (max abs), best first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, train_wordpiece_tokenizer

st = pytest.importorskip("sentence_transformers")

TOLERANCE = 1e-5
MAX_LENGTH = 48  # the long document below is cut to it (as CrossEncoder cuts it), the others fit
QUERY = "Who may copy this license?"
DOCUMENTS = [
    "Everyone is permitted to copy and distribute verbatim copies of this license document.",
    "Cats sleep most of the day.",
    "The GNU General Public License is a free, copyleft license for software and other kinds of works, and it "
    "guarantees your freedom to share and change all versions of a program, so that it remains free software.",
    "Hi",
    "This License applies to any program or other work which contains a notice placed by the copyright holder.",
]
ACTIVATIONS = {"sigmoid": "Sigmoid", "identity": "Identity", "plain": "Sigmoid", "legacy": "Identity",
               "prompted": "Sigmoid"}


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory) -> dict[str, str]:
    """The four directories of ACTIVATIONS, one model's weights in each."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, BertConfig

    root = tmp_path_factory.mktemp("cross-encoders")
    tokenizer = train_wordpiece_tokenizer()
    tokenizer.model_max_length = MAX_LENGTH  # the limit of the plain directories too
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # the default init's head (std 0.02) puts every logit near 0: spread them out
        model.classifier.weight.normal_(0, 1.0)
    plain = root / "plain"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    CrossEncoder(str(plain), max_length=MAX_LENGTH, device="cpu").save(str(root / "sigmoid"))
    CrossEncoder(str(plain), max_length=MAX_LENGTH, device="cpu",
                 activation_fn=torch.nn.Identity()).save(str(root / "identity"))
    CrossEncoder(str(plain), max_length=MAX_LENGTH, device="cpu", prompts={"query": "Query: "},
                 default_prompt_name="query").save(str(root / "prompted"))
    legacy = root / "legacy"
    model.save_pretrained(legacy)
    tokenizer.save_pretrained(legacy)
    config_file = legacy / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}))
    return {name: str(root / name) for name in ACTIVATIONS}


def predict(path: str) -> np.ndarray:
    """CrossEncoder.predict's scores, checking it picked the activation its directory is named after."""
    from pathlib import Path

    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(path, device="cpu")
    assert type(reference.activation_fn).__name__ == ACTIVATIONS[Path(path).name]
    return reference.predict([(QUERY, document) for document in DOCUMENTS], batch_size=2)


@pytest.mark.parametrize("which", list(ACTIVATIONS))
def test_rerank_scores_equal_cross_encoder_predict_best_first(cross_encoders, which):
    """Every activation sentence-transformers reads (saved by CrossEncoder, its default, the legacy key), a
    default prompt;
    batches of 2 over pairs of mixed lengths (padding), one pair cut to the model's limit."""
    expected = predict(cross_encoders[which])
    result = run_cli("rerank", QUERY, *DOCUMENTS, "-m", cross_encoders[which], "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert [record["rank"] for record in records] == [1, 2, 3, 4, 5]
    assert sorted(record["index"] for record in records) == list(range(len(DOCUMENTS)))
    scores = np.array([record["score"] for record in records])
    assert np.abs(scores - expected[[record["index"] for record in records]]).max() < TOLERANCE
    assert list(scores) == sorted(scores, reverse=True)
    assert [record["text"] for record in records] == [DOCUMENTS[record["index"]] for record in records]
    assert "1 of 5 (query, document) pairs were cut to the model's limit of 48 tokens" in result.stderr
    if ACTIVATIONS[which] == "Sigmoid":
        assert ((0 < scores) & (scores < 1)).all()
    else:  # raw logits: some outside (0, 1) with this head
        assert ((scores < 0) | (scores > 1)).any()


def test_documents_from_a_file_stdin_or_arguments_and_the_text_output(cross_encoders, tmp_path):
    model = cross_encoders["sigmoid"]
    expected = predict(model)
    lines = tmp_path / "documents.txt"
    lines.write_text(DOCUMENTS[0] + "\n\n" + "\n".join(DOCUMENTS[1:]) + "\n")
    from_file = run_cli("rerank", QUERY, "-f", lines, "-m", model, "--top-k", "2")
    assert from_file.exit_code == 0, from_file.stderr
    best = np.argsort(-expected, kind="stable")[:2]
    width = len(str(len(DOCUMENTS) - 1))
    shown = from_file.stdout.splitlines()
    assert len(shown) == 2
    for line, number in zip(shown, best):
        score, index, text = line.split(None, 2)
        assert int(index) == number and text == DOCUMENTS[number] and abs(float(score) - expected[number]) < 1e-4
        assert line.startswith(f"{expected[number]:.4f}  {number:>{width}}  ")
    assert "Ranked 5 texts from" in from_file.stderr and "1 blank line skipped" in from_file.stderr
    records = tmp_path / "documents.jsonl"
    records.write_text("".join(json.dumps({"text": document}) + "\n" for document in DOCUMENTS))
    for args, stdin in ((["-f", records], None), (["-"], "\n".join(DOCUMENTS)), ([], "\n".join(DOCUMENTS))):
        result = run_cli("rerank", QUERY, *args, "-m", model, "--json", input=stdin)
        assert result.exit_code == 0, (args, result.stderr)
        got = {record["index"]: record["score"] for record in result.json_lines()}
        assert np.abs(np.array([got[n] for n in range(len(DOCUMENTS))]) - expected).max() < TOLERANCE, args


def test_bad_rerank_input_is_one_error(cross_encoders, tiny_bert, tiny_gguf, tmp_path):
    """Exit 2 with one Error: line naming the problem, no traceback."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    two_labels = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(two_labels)
    model = cross_encoders["sigmoid"]
    for args, message in (
        (["  ", "a", "-m", model], "empty query"),
        (["q", "-m", model], "no document given"),
        (["q", "a", "-m", model, "--top-k", "0"], "--top-k must be at least 1"),
        (["q", "a", "-m", model, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["q", "a", "", "-m", model], "empty document"),
        (["q", "a"], "rerank needs a cross-encoder model"),
        (["q", "a", "-m", tmp_path / "nope"], "does not exist"),
        (["q", "a", "-m", tiny_gguf], "is a GGUF file"),
        (["q", "a", "-m", tiny_bert], "is not a sequence-classification model (BertForMaskedLM)"),
        (["q", "a", "-m", two_labels], "has 2 labels"),
    ):
        result = run_cli("rerank", *args)
        assert result.exit_code == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_serve_rerank_equals_predict_in_the_servers_shapes(cross_encoders, tiny_llama):
    """/v1/rerank, /rerank and /v2/rerank: vLLM's and llama-server's fields, best first, top_n,
    return_documents, {"text"} documents; the model listed; bad requests a 400 naming the field while
    the server keeps serving; a model not served a 404."""
    from test_serve import serving

    identity, sigmoid = cross_encoders["identity"], cross_encoders["sigmoid"]
    expected = predict(identity)
    order = list(np.argsort(-expected, kind="stable"))
    with serving("-m", tiny_llama, "--rerank-model", identity) as server:
        client = server.client()
        assert "identity" in [card.id for card in client.models.list().data]
        status, _, answer = server.post("/v1/rerank", {"model": "identity", "query": QUERY, "documents": DOCUMENTS})
        assert status == 200, answer
        assert set(answer) == {"id", "object", "model", "results", "usage"} and answer["model"] == "identity"
        assert [result["index"] for result in answer["results"]] == order
        scores = np.array([result["relevance_score"] for result in answer["results"]])
        assert np.abs(scores - expected[order]).max() < TOLERANCE
        assert [result["document"]["text"] for result in answer["results"]] == [DOCUMENTS[n] for n in order]
        assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > len(DOCUMENTS)
        for path in ("/rerank", "/v2/rerank"):
            status, _, short = server.post(path, {"query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                                                  "top_n": 2, "return_documents": False})
            assert status == 200, short
            assert short["results"] == [{"index": int(n), "relevance_score": r["relevance_score"]}
                                        for n, r in zip(order[:2], answer["results"][:2])]
        for body, param in (({"query": "", "documents": ["a"]}, "query"), ({"query": 5, "documents": ["a"]}, "query"),
                            ({"query": "q"}, "documents"), ({"query": "q", "documents": []}, "documents"),
                            ({"query": "q", "documents": "a"}, "documents"),
                            ({"query": "q", "documents": [7]}, "documents"),
                            ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
                            ({"query": "q", "documents": ["a"], "top_n": -1}, "top_n")):
            status, _, error = server.post("/v1/rerank", body)
            assert status == 400 and error["error"]["param"] == param, (body, error)
            assert error["error"]["type"] == "invalid_request_error"
        status, _, error = server.post("/v1/rerank", {"model": "other", "query": "q", "documents": ["a"]})
        assert status == 404 and error["error"]["code"] == "model_not_found" and "identity" in error["error"]["message"]
        status, _, again = server.post("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS[:1]})
        assert status == 200 and abs(again["results"][0]["relevance_score"] - expected[0]) < TOLERANCE
    refused = run_cli("serve", "-m", tiny_llama, "--rerank-model", sigmoid + "-missing", "--port", "1")
    assert refused.exit_code == 2 and "does not exist" in refused.stderr, refused.stderr


def test_a_server_without_a_rerank_model_says_how_to_start_one(tiny_llama):
    from fastapi.testclient import TestClient

    from llmcli.engines import choose_engine
    from llmcli.serve.app import create_app
    from llmcli.serve.settings import Settings

    app = create_app(choose_engine(str(tiny_llama), "hf"), Settings(model_name="tiny", api_key="secret"))
    with TestClient(app) as client:
        for path in ("/v1/rerank", "/rerank"):
            assert client.post(path, json={"query": "q", "documents": ["a"]}).status_code == 401  # the key, first
            answer = client.post(path, json={"query": "q", "documents": ["a"]},
                                 headers={"Authorization": "Bearer secret"})
            assert answer.status_code == 404, answer.json()
            assert "--rerank-model" in answer.json()["error"]["message"]
            assert answer.json()["error"]["code"] == "model_not_found"
