"""Structured output on both engines: every output of seeded samples validates against its JSON
schema (checked by `jsonschema`, independently of the library that constrains), regexes and choices
hold, the mask only removes tokens (a constraint that allows everything changes nothing; among the
allowed tokens the distribution is the model's), and bad constraints are one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 2, "maxItems": 4}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "boolean"}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
]


@pytest.fixture(params=["llama.cpp", "hf"])
def tiny(request):
    """(engine, model): the tiny F32 GGUF on llama.cpp (SmolLM2's 49152-token vocabulary), the tiny
    Llama directory on hf (a 400-token BPE trained here)."""
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        return "llama.cpp", str(request.getfixturevalue("tiny_gguf"))
    return "hf", str(request.getfixturevalue("tiny_llama"))


def generate(tiny, *args) -> list[dict]:
    engine, model = tiny
    result = run_cli("generate", *args, "-m", model, "--engine", engine, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.mark.parametrize("number", range(len(SCHEMAS)))
def test_seeded_samples_validate_against_the_schema(tiny, number):
    """Three seeded samples of each of two prompts, decoded together: each is complete, valid JSON for
    the schema (nested objects, arrays with minItems, enums, bounded integers, patterns, required,
    additionalProperties: false)."""
    schema = SCHEMAS[number]
    records = generate(tiny, "This License", "the work", "--schema", json.dumps(schema), "-n", "120",
                       "-t", "3.0", "--seed", "4", "--num-return-sequences", "3")
    assert len(records) == 6
    for record in records:
        assert record["finish_reason"] == "eos" and not record["incomplete"], record
        jsonschema.validate(json.loads(record["text"]), schema)
    assert len({r["text"] for r in records}) > 1  # samples, not one forced string


def test_a_regex_and_a_choice_hold(tiny):
    dates = generate(tiny, "This License", "--regex", "[0-9]{4}-[0-9]{2}-[0-9]{2}", "-n", "30",
                     "-t", "1.0", "--seed", "1", "--num-return-sequences", "4")
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r["text"]) for r in dates), dates
    picked = generate(tiny, "This License", "the work", "--choice", "yes", "--choice", "no",
                      "--choice", "maybe so", "-n", "10")
    assert all(r["text"] in ("yes", "no", "maybe so") for r in picked), picked
    [alone] = generate(tiny, "This License", "--regex", "[0-9]{3}[a-z]", "-n", "10")  # one sequence
    assert re.fullmatch("[0-9]{3}[a-z]", alone["text"]), alone
    # one sequence on llama.cpp's plain loop (speculation, on by default, decodes in a sequence set)
    [plain] = generate(tiny, "This License", "--regex", "[0-9]{3}[a-z]", "-n", "10", "--speculative", "off")
    assert re.fullmatch("[0-9]{3}[a-z]", plain["text"]), plain


def test_a_constraint_that_allows_everything_changes_nothing(tiny):
    """The mask only removes tokens: with a regex any text matches, greedy output is the unconstrained one."""
    base = ("This License", "--no-chat", "-n", "16")
    free = generate(tiny, *base)
    constrained = generate(tiny, *base, "--regex", "(?s:.*)")
    assert [r["token_ids"] for r in constrained] == [r["token_ids"] for r in free]


@pytest.mark.parametrize("args, fragment", [
    (["--schema", "{not json"], "--schema is not valid JSON"),
    (["--schema", "[1, 2]"], "--schema must be a JSON object"),
    (["--regex", "(["], "the regex cannot be compiled"),
    (["--grammar", "{broken}"], "the grammar cannot be compiled"),
    (["--regex", "a", "--choice", "b"], "--regex and --choice are two constraints"),
    (["--schema", "missing-schema.json"], "--schema missing-schema.json: no such file"),
])
def test_bad_constraints_are_one_line_errors(tiny, args, fragment, tmp_path):
    broken = tmp_path / "broken.lark"
    broken.write_text('start: "a" (\n')  # a group never closed
    args = [arg.replace("{broken}", str(broken)) for arg in args]
    result = run_cli("generate", "hi", "-m", tiny[1], "--engine", tiny[0], *args)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, result.stderr  # the error and at most a hint
    if "--regex" in args or "--grammar" in args:
        assert "JSON-schema" not in result.stderr, result.stderr  # the hint fits the constraint given


def test_greedy_takes_the_likeliest_allowed_token_at_every_step(tiny):
    """Constrained greedy decoding, checked against plain forward passes: at each step the token taken
    is the model's likeliest among those the constraint allowed there (the mask is applied to the
    right row, at the right step, and changes nothing else)."""
    from llmcli.constraints import Constraint, read_schema
    from llmcli.engines import Window, choose_engine

    schema = json.dumps(SCHEMAS[1])
    [record] = generate(tiny, "This License", "--no-chat", "--schema", schema, "-n", "60")
    engine = choose_engine(tiny[1], tiny[0])
    prompt, output = engine.encode("This License"), record["token_ids"]
    vocab = engine.constraints.n_vocab
    _, tops = engine.token_logprobs(Window(prompt + output, len(output)), top=vocab)
    matcher = engine.constraints.matcher(Constraint("schema", read_schema(schema)))
    for token, top in zip(output, tops):
        allowed = matcher.allowed()
        likeliest = max((logprob, t) for t, logprob in top if allowed[t])[1]
        assert token == likeliest
        matcher.accept(token, engine.eos_ids, None, 0)
    assert record["finish_reason"] == "eos"


def test_among_allowed_tokens_the_distribution_is_the_models(tiny):
    """One step against a plain forward pass: the logits the engine samples from under a constraint
    are the model's, minus the disallowed tokens; renormalised, the allowed tokens' probabilities are
    unchanged."""
    import numpy as np

    from llmcli.constraints import Constraint
    from llmcli.engines import Window, choose_engine

    engine = choose_engine(tiny[1], tiny[0])
    prompt = engine.encode("This License")
    matcher = engine.constraints.matcher(Constraint("regex", "[a-m ]{1,20}"))
    if tiny[0] == "llama.cpp":
        engine.token_logprobs(Window(prompt + [0], 1), top=0)  # the context now holds the prompt's logits
        plain = engine.logits_row(engine.context, -1).astype(np.float64)
        masked = engine.logits_row(engine.context, -1)
        matcher.mask(masked)  # what decoding does before llama.cpp's sampler chain
    else:
        import torch

        from llmcli.engines.hf import ConstrainedLogits

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            logits = engine.loaded.model(input_ids=ids).logits[:, -1].float()
        plain = logits[0].double().numpy().copy()
        masked = ConstrainedLogits([matcher], engine.eos_ids)(ids, logits.clone())[0].numpy()
    allowed = np.isfinite(masked)
    assert 1 < allowed.sum() < len(plain) / 2  # a real choice, and a real restriction
    assert (masked[allowed] == plain[allowed].astype(masked.dtype)).all()

    def softmax(row):
        exp = np.exp(row - row.max())
        return exp / exp.sum()

    np.testing.assert_allclose(softmax(masked[allowed].astype(np.float64)), softmax(plain[allowed]), rtol=1e-6)


def test_a_constraint_refuses_proposed_tokens(tiny_gpt2):
    result = run_cli("generate", "hi", "-m", tiny_gpt2, "--schema", "json", "--prompt-lookup", "3")
    assert result.exit_code == 2 and "--prompt-lookup proposes tokens" in result.stderr, result.stderr


def test_output_cut_by_the_token_limit_is_flagged_incomplete(tiny):
    """A JSON object that -n cuts off ends with finish_reason length and, in --json, incomplete: true;
    --stats shows the constraint's compile time."""
    engine, model = tiny
    result = run_cli("generate", "This License", "-m", model, "--engine", engine, "--json", "--stats",
                     "--schema", json.dumps(SCHEMAS[0]), "-n", "3")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert record["finish_reason"] == "length" and record["incomplete"] is True, record
    assert re.search(r"^constraint compile +\d+ ms$", result.stderr, re.M), result.stderr
    [stopped] = generate(tiny, "This License", "--regex", "[a-z]{3}-[a-z]{3}", "--stop", "-", "-n", "20")
    assert stopped["finish_reason"] == "stop" and stopped["incomplete"] is True, stopped
    assert re.fullmatch("[a-z]{3}", stopped["text"]), stopped
    free = generate(tiny, "This License", "-n", "3")
    assert "incomplete" not in free[0]  # the flag belongs to constrained output only
    # printed as text, a cut output says so on stderr, in one line after the text; a whole one does not
    cut = run_cli("generate", "This License", "-m", model, "--engine", engine, "--schema", json.dumps(SCHEMAS[0]),
                  "-n", "3")
    assert cut.exit_code == 0 and cut.stdout.strip() == record["text"], cut.stdout
    assert ("Warning: the output is incomplete: cut at the 3-token limit; -n raises it, so it does not satisfy "
            "the constraint.") in cut.stderr.splitlines(), cut.stderr
    whole = run_cli("generate", "This License", "-m", model, "--engine", engine, "--choice", "yes", "--choice", "no")
    assert whole.exit_code == 0 and whole.stdout.strip() in ("yes", "no") and "incomplete" not in whole.stderr


def test_chat_constrains_every_reply(tiny):
    """`chat --schema`: each reply of a conversation validates (the history grows with them); a bad
    constraint is refused before the first message."""
    engine, model = tiny
    result = run_cli("chat", "-m", model, "--engine", engine, "--schema", json.dumps(SCHEMAS[1]), "-n", "80",
                     "-t", "1.5", "--seed", "3", input="First?\nSecond?\nThird?\n")
    assert result.exit_code == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 3, result.stdout
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMAS[1])
    bad = run_cli("chat", "-m", model, "--engine", engine, "--regex", "([", input="hi\n")
    assert bad.exit_code == 2 and "the regex cannot be compiled" in bad.stderr and not bad.stdout, bad


def test_a_vocabulary_the_library_cannot_read_is_one_line(tmp_path):
    """A WordPiece vocabulary (no bytes to spell arbitrary text with): refused before decoding."""
    from transformers import LlamaConfig

    from conftest import save_tiny, train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.sep_token_id)
    model = save_tiny(tmp_path / "wordpiece-llama", config, tokenizer)
    result = run_cli("generate", "license", "-m", model, "--choice", "license", "-n", "5")
    assert result.exit_code == 2 and "cannot be used for constrained output" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


@pytest.mark.parametrize("engine", ["llama.cpp", "hf"])
def test_the_embedded_model_writes_valid_json_on_each_engine(engine):
    """A real model, batched: two prompts, two seeded samples each, for a schema with an enum, a
    bounded integer and a pattern; each output validates and is complete."""
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"}, "age": {"type": "integer", "minimum": 1,
                                                                           "maximum": 99},
        "pet": {"enum": ["cat", "dog", "none"]}}, "required": ["name", "age", "pet"], "additionalProperties": False}
    result = run_cli("generate", "Describe a person as JSON.", "Invent a character as JSON.", "--engine", engine,
                     "--schema", json.dumps(schema), "-n", "60", "-t", "0.8", "--seed", "2",
                     "--num-return-sequences", "2", "--json")
    assert result.exit_code == 0, result.stderr
    records = result.json_lines()
    assert len(records) == 4
    for record in records:
        assert record["finish_reason"] == "eos" and record["incomplete"] is False, record
        jsonschema.validate(json.loads(record["text"]), schema)


NUMBERS = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
           "required": ["x", "y"], "additionalProperties": False}


def test_numbers_are_bounded_to_what_a_double_needs(tiny):
    """A tiny model writes digits forever under a plain number schema (-777...777 to the token limit,
    seen before the bound); each number now ends within 17 digits of mantissa and 3 of exponent, so
    the object is complete well inside -n."""
    for seed in range(3):
        [record] = generate(tiny, "This License", "--no-chat", "--schema", json.dumps(NUMBERS), "-n", "120",
                            "--temperature", "1", "--seed", str(seed))
        assert record["finish_reason"] == "eos" and record["incomplete"] is False, record
        json.loads(record["text"])
        for number in re.findall(r"-?[0-9.]+(?:[eE][+-]?[0-9]+)?", record["text"]):
            mantissa, _, exponent = number.lower().partition("e")
            assert sum(c.isdigit() for c in mantissa) <= 17 and len(exponent.lstrip("+-")) <= 3, record["text"]


def test_free_strings_get_a_default_length_that_a_schema_lifts(tiny, monkeypatch):
    """A string without maxLength, enum, const, format or pattern gets DEFAULT_STRING_LENGTH (made 5
    here to see it hold); a schema's own maxLength, pattern or enum is left as it is."""
    from llmcli import constraints

    schema = {"type": "object", "properties": {"s": {"type": "string"}, "t": {"type": "string", "maxLength": 40},
                                               "u": {"enum": ["a", "b"]}, "v": {"type": ["string", "null"]}}}
    bounded = constraints.bounded_strings(schema)["properties"]
    assert bounded["s"]["maxLength"] == constraints.DEFAULT_STRING_LENGTH and bounded["t"]["maxLength"] == 40
    assert "maxLength" not in bounded["u"] and bounded["v"]["maxLength"] == constraints.DEFAULT_STRING_LENGTH
    monkeypatch.setattr(constraints, "DEFAULT_STRING_LENGTH", 5)
    [record] = generate(tiny, "This License", "--no-chat", "--schema", '{"type": "string"}', "-n", "60")
    assert record["finish_reason"] == "eos" and len(json.loads(record["text"])) <= 5, record


@pytest.mark.parametrize("regex, ascii_regex", [
    (r"\d{4}", "[0-9]{4}"), (r"[\d.]+", "[0-9.]+"), (r"[^\d]", "[^0-9]"), (r"\D", "[^0-9]"),
    (r"[\D]x", "[[^0-9]]x"), (r"\w+\s", r"[0-9A-Za-z_]+[\t\n\x0B\f\r ]"), (r"\\d", r"\\d"), (r"[]\d]", "[]0-9]"),
    (r"\p{Nd}", r"\p{Nd}"), (r"[[:alpha:]\d]", "[[:alpha:]0-9]"),
])
def test_regex_classes_are_rewritten_as_ascii(regex, ascii_regex):
    from llmcli.constraints import ascii_classes

    assert ascii_classes(regex) == ascii_regex


def test_digits_words_and_spaces_are_ascii_in_regexes_and_schema_patterns():
    """The regex library under llguidance reads \\d as any Unicode digit: `--regex '\\d{4}'` made the
    embedded model write U+1FBF8 (a segmented 8) to the token limit. \\d, \\w and \\s are now ASCII, in
    a regex and in a schema's pattern (checked on the embedded model's vocabulary); \\p{Nd} still
    names every digit; and the embedded model writes a year."""
    pytest.importorskip("llama_cpp")
    from llguidance import LLMatcher

    from llmcli.constraints import Constraint, compile_grammar
    from llmcli.engines import choose_engine

    engine = choose_engine(None, "llama.cpp", fast=True)
    vocabulary = engine.guidance_tokenizer()

    def allows(rule: Constraint, text: str) -> bool:
        matcher = LLMatcher(vocabulary, compile_grammar(rule, vocabulary), log_level=0)
        return all(matcher.consume_token(token) for token in engine.encode(text, add_special=False)) \
            and matcher.is_accepting()

    def pattern(regex: str) -> Constraint:
        return Constraint("schema", json.dumps({"type": "string", "pattern": f"^{regex}$"}))

    for make, quote in ((lambda regex: Constraint("regex", regex), str),
                        (pattern, lambda text: json.dumps(text, ensure_ascii=False))):
        assert allows(make(r"\d{4}"), quote("2024")) and not allows(make(r"\d{4}"), quote("\U0001FBF8" * 4))
        assert not allows(make(r"\w+"), quote("café")) and allows(make(r"\W"), quote("é"))
        assert not allows(make(r"a\sb"), quote("a\u00a0b")) and allows(make(r"[\s\d]+"), quote(" 1"))
        assert allows(make(r"\p{Nd}"), quote("\U0001FBF8"))
    shown = " ".join(run_cli("generate", "--help").stdout.replace("│", " ").split())  # the help says so
    assert r"\d, \w and \s are ASCII" in shown and "a pattern, \\d, \\w and \\s are ASCII" in shown
    result = run_cli("generate", "What year is it?", "--regex", r"\d{4}", "-n", "10", "--json")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    assert re.fullmatch("[0-9]{4}", record["text"]) and record["finish_reason"] == "eos", record
