"""`llmcli fill-mask`: equal to the fill-mask pipeline on masked LMs; causal rescoring on the embedded model."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_errors import assert_clean_error

SINGLE = ["the program is [MASK] software.", "you may [MASK] copies of the program."]
MULTI = "the [MASK] general public license is a [MASK] license."
PREDICTION_KEYS = {"token", "token_str", "score", "sequence"}


def pipeline_predictions(model_dir, text: str, **kwargs):
    """The Hugging Face reference, always as a list of per-mask lists."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(model_dir), device="cpu")
    output = fill(text.replace("[MASK]", fill.tokenizer.mask_token), **kwargs)
    return output if isinstance(output[0], list) else [output]


def assert_same_predictions(ours, reference):
    assert len(ours) == len(reference)
    for our_row, ref_row in zip(ours, reference):
        assert [p["token"] for p in our_row] == [p["token"] for p in ref_row]
        assert [p["token_str"] for p in our_row] == [p["token_str"] for p in ref_row]
        assert [p["sequence"] for p in our_row] == [p["sequence"] for p in ref_row]
        for ours_p, ref_p in zip(our_row, ref_row):
            # relative: scores of a tiny model are ~1e-3, where an absolute 1e-5 would be 1%
            assert ours_p["score"] == pytest.approx(ref_p["score"], rel=1e-5)


def fill(*args, input=None):
    result = run_cli("fill-mask", *args, "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_roberta"])
def test_single_and_multi_mask_equal_pipeline(model, request):
    model_dir = request.getfixturevalue(model)
    records = fill(*SINGLE, MULTI, "-m", model_dir, "--top-k", "4", "--batch-size", "2")
    assert [r["text"] for r in records] == [*SINGLE, MULTI]
    for record in records:
        assert set(record) == {"text", "predictions"}
        assert all(set(p) == PREDICTION_KEYS for row in record["predictions"] for p in row)
        assert_same_predictions(record["predictions"], pipeline_predictions(model_dir, record["text"], top_k=4))
    assert len(records[-1]["predictions"]) == 2  # one ranked list per mask


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_roberta"])
def test_targets_equal_pipeline(model, request):
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(model)
    vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    # three whole-word vocabulary entries, spelled as the vocabulary spells them (Ġ marks a space in BPE)
    targets = sorted(t for t in vocab if t.lstrip("Ġ").isalpha() and len(t.lstrip("Ġ")) > 4)[:3]
    [record] = fill(SINGLE[0], "-m", model_dir, *sum((["--targets", t] for t in targets), []))
    reference = pipeline_predictions(model_dir, SINGLE[0], targets=targets, top_k=5)
    assert len(record["predictions"][0]) == 3
    assert_same_predictions(record["predictions"], reference)


def test_model_mask_token_accepted_and_file_and_stdin_input(tiny_roberta, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("the program is <mask> software.\n\nyou may [MASK] copies of the program.\n")
    from_file = fill("-f", path, "-m", tiny_roberta)
    from_stdin = fill("-", "-m", tiny_roberta, input=path.read_text())
    from_args = fill(*SINGLE, "-m", tiny_roberta)
    assert [r["predictions"] for r in from_file] == [r["predictions"] for r in from_stdin]
    assert [r["predictions"] for r in from_file] == [r["predictions"] for r in from_args]


def test_batching_keeps_order_and_values(tiny_bert, tmp_path):
    lines = [line.strip() for line in open("/usr/share/common-licenses/GPL-3") if len(line.split()) > 6][:12]
    texts = [" ".join(w if i != 3 else "[MASK]" for i, w in enumerate(line.split())) for line in lines]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    batched = fill("-f", path, "-m", tiny_bert, "--batch-size", "5")
    one_by_one = fill("-f", path, "-m", tiny_bert, "--batch-size", "1")
    assert [r["text"] for r in batched] == texts
    for a, b in zip(batched, one_by_one):
        assert [p["token"] for p in a["predictions"][0]] == [p["token"] for p in b["predictions"][0]]


def test_all_positions_is_argmax_everywhere(tiny_bert):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    [record] = fill(SINGLE[0], "-m", tiny_bert, "--all-positions")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    inputs = tokenizer(SINGLE[0], return_tensors="pt")
    with torch.no_grad():
        argmax = model(**inputs).logits[0].argmax(-1)[1:-1]  # drop [CLS] and [SEP] positions
    assert record["all_positions"] == tokenizer.decode(argmax.tolist())


def test_table_output(tiny_bert):
    result = run_cli("fill-mask", SINGLE[0], "-m", tiny_bert, "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    [top] = fill(SINGLE[0], "-m", tiny_bert, "--top-k", "3")[0]["predictions"]
    for prediction in top:
        assert prediction["token_str"] in result.stdout and f"{prediction['score']:.4f}" in result.stdout


def test_no_mask_names_the_model_mask_token(tiny_roberta):
    assert_clean_error(run_cli("fill-mask", "nothing", "-m", tiny_roberta), "[MASK]", "<mask>")


def test_model_neither_masked_nor_causal(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path)
    assert_clean_error(run_cli("fill-mask", "a [MASK]", "-m", tmp_path), "neither a masked LM nor a causal LM")


def test_causal_rescoring_is_a_softmax_over_sentence_likelihoods(tiny_gpt2):
    """The reported probabilities are a softmax over whole-sentence log-likelihoods, each sentence
    conditioned on <|endoftext|> (the tokenizer's document separator), computed here with a plain
    forward pass and log_softmax."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()

    def log_likelihood(sentence: str) -> float:
        ids = [tokenizer.convert_tokens_to_ids("<|endoftext|>")] + tokenizer(sentence)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1))

    targets = ["free", "proprietary", "the"]
    [record] = fill("the program is [MASK] software.", "-m", tiny_gpt2, *sum((["--targets", t] for t in targets), []))
    sentences = [f"the program is {t} software." for t in targets]
    scores = [log_likelihood(s) for s in sentences]
    expected = {t: math.exp(s) / sum(math.exp(x) for x in scores) for t, s in zip(targets, scores)}
    got = {p["token_str"]: p["score"] for p in record["predictions"][0]}
    assert got == pytest.approx(expected, rel=1e-4)
    assert [p["sequence"] for p in record["predictions"][0]] == sorted(sentences, key=lambda s: -scores[sentences.index(s)])
    # a word of several pieces reports all its ids (`token` stays the first, as the pipeline's)
    for prediction in record["predictions"][0]:
        ids = tokenizer(" " + prediction["token_str"], add_special_tokens=False)["input_ids"]
        assert prediction["token_ids"] == ids and prediction["token"] == ids[0]
    assert any(len(p["token_ids"]) > 1 for p in record["predictions"][0])


@pytest.mark.slow
def test_embedded_model_answers_cloze_sentences():
    cloze = {
        "The capital of France is [MASK].": "Paris",
        "Birds can [MASK] because they have wings.": "fly",
        "The opposite of hot is [MASK].": "cold",
        "Water freezes at zero degrees [MASK].": "Celsius",
        "I [MASK] a book yesterday.": "read",
        # " Pythagoras" is two tokens of this tokenizer: the blank stands for a split word
        "The theorem about right triangles is named after the Greek mathematician [MASK].": "Pythagoras",
    }
    result = run_cli("fill-mask", *cloze, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    answers = {r["text"]: r["predictions"][0][0]["token_str"] for r in result.json_lines()}
    assert answers == cloze
    assert "Using the embedded model" in result.stderr


@pytest.mark.slow
def test_embedded_model_fills_several_blanks_left_to_right():
    [record] = fill("The sky is [MASK] and the grass is [MASK].", "--top-k", "2")
    first, second = record["predictions"]
    assert first[0]["token_str"] == "blue" and second[0]["token_str"] == "green"
    assert first[0]["sequence"] == "The sky is blue and the grass is [MASK]."
    assert second[0]["sequence"] == "The sky is blue and the grass is green."


@pytest.mark.slow
def test_embedded_model_proposes_words_for_a_blank_at_the_start():
    """With nothing to the left, candidates come from a question about the whole sentence: the left
    context alone ranks " January" below the top 800 at the start of a text (benchmarks/cloze.py)."""
    [record] = fill("[MASK] is the first month of the year.", "--top-k", "3")
    assert record["predictions"][0][0]["token_str"] == "January"
    assert all(p["token_str"][:1].isalnum() for p in record["predictions"][0])


def test_causal_blanks_are_not_filled_with_punctuation(tiny_gpt2):
    [record] = fill("[MASK] of this License applies.", "-m", tiny_gpt2, "--top-k", "30")
    words = [p["token_str"] for p in record["predictions"][0]]
    assert len(words) == 30 and all(w[:1].isalnum() for w in words), words  # nor clitics ("'s")


@pytest.mark.slow
def test_the_documented_examples_are_what_the_commands_print():
    """docs/fill-mask.md's examples on the embedded model (deterministic): its --json line and its
    table's probabilities are what the commands give now (to 1e-3: kernels sum in another order on
    another CPU)."""
    import json
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "fill-mask.md").read_text()
    command = '$ llmcli fill-mask "The sky is [MASK] and the grass is [MASK]." --top-k 2 --json\n'
    shown = json.loads(page.split(command, 1)[1].split("\n", 1)[0])
    [record] = fill("The sky is [MASK] and the grass is [MASK].", "--top-k", "2")
    assert [[p["token_str"] for p in row] for row in record["predictions"]] == \
        [[p["token_str"] for p in row] for row in shown["predictions"]]
    assert [p["score"] for row in record["predictions"] for p in row] == \
        pytest.approx([p["score"] for row in shown["predictions"] for p in row], rel=1e-3)
    table = page.split('$ llmcli fill-mask "The capital of France is [MASK]." --top-k 3\n', 1)[1].split("$ ", 1)[0]
    rows = re.findall(r"│ \d │ (\w+) +│ +([0-9.]+) │", table)
    [record] = fill("The capital of France is [MASK].", "--top-k", "3")
    assert [(p["token_str"], round(p["score"], 4)) for p in record["predictions"][0]] == \
        [(word, pytest.approx(float(score), abs=2e-4)) for word, score in rows]


def test_shared_prefix_scores_equal_llama_cpp_one_sequence_at_a_time(tiny_gguf):
    """llama.cpp causal rescoring: each sequence's summed log-probability and its next-token row are
    what the engine's own one-sequence scoring gives, and the shared beginning is decoded once. Scored
    alone, a sequence's sum is the engine's to the last bit; in a group of 64 the batch shape moves it by
    up to 2.5e-5 relative (measured: -238.1033 vs -238.1092 on this tiny model's large logits)."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    from llmcli.engines import Window
    from llmcli.engines.llama_scoring import GROUP, SharedPrefixScorer
    from test_llamacpp import engine_for

    engine = engine_for(tiny_gguf)
    start = engine.encode("This License applies to", add_special=False)
    rests = [engine.encode(" any" + " program" * (i % 4) + word, add_special=False)
             for i, word in enumerate([" work.", " copy.", " notice", " one"] * 20)]  # 80: two groups
    sequences = [start + rest for rest in rests]
    assert len(sequences) > GROUP
    scorer = SharedPrefixScorer(engine)
    scored = scorer.score(sequences, rows=True)
    shared = len(start) + 1  # " any" starts every rest too
    assert scorer.decoded == shared + sum(len(s) - shared for s in sequences)
    for sequence, (total, row) in zip(sequences, scored):
        values, _ = engine.token_logprobs(Window(sequence, len(sequence) - 1), 0)
        assert total == pytest.approx(sum(values), rel=1e-4)
        _, [top] = engine.token_logprobs(Window(sequence + [0], 1), 3)
        assert [t for t, _ in top] == list(np.argsort(-row)[:3])
        # the logits here are in the hundreds: batch shape moves a log-probability by up to 0.01
        assert [v for _, v in top] == pytest.approx(list(np.sort(row)[::-1][:3]), abs=0.03)
    values, _ = engine.token_logprobs(Window(sequences[0], len(sequences[0]) - 1), 0)
    assert scorer.score(sequences[:1])[0][0] == sum(values)
    [(alone, _)] = scorer.score([engine.encode("<|endoftext|>", add_special=False)], rows=True)
    assert alone == 0.0  # one token: nothing to score, its row still comes back


def test_causal_fill_mask_on_llama_cpp_ranks_as_on_hf(tiny_gguf):
    """The same GGUF (F32) on both engines: the same fillings in the same order, the same ids, and
    probabilities within 1% or 1e-4 (llama.cpp scores 64 sentences per batch: see the test above;
    measured here 0.5%, and 1.8e-5 on a probability of 6e-4); auto picks llama.cpp for a .gguf."""
    pytest.importorskip("llama_cpp")
    text = ["This License [MASK] to the work.", "[MASK] License applies."]
    on_llama = fill(*text, "-m", tiny_gguf, "--top-k", "5")
    on_hf = fill(*text, "-m", tiny_gguf, "--top-k", "5", "--engine", "hf")
    for ours, reference in zip(on_llama, on_hf):
        assert [p["token_str"] for p in ours["predictions"][0]] == [p["token_str"] for p in reference["predictions"][0]]
        assert [p["token_ids"] for p in ours["predictions"][0]] == [p["token_ids"] for p in reference["predictions"][0]]
        assert [p["score"] for p in ours["predictions"][0]] == \
            pytest.approx([p["score"] for p in reference["predictions"][0]], rel=1e-2, abs=1e-4)
    result = run_cli("fill-mask", text[0], "-m", tiny_gguf, "--engine", "llama.cpp", "--mode", "mlm")
    assert result.exit_code == 2 and "runs causal LMs only" in result.stderr
